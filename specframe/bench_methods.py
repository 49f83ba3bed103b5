"""`specframe bench`'s method specs: Hugging Face `generate` variants and specframe's engine.

  hf                      Hugging Face generate, greedy or sampled
  hf-early-exit[:N]       generate(assistant_early_exit=N), default N=4
  hf-prompt-lookup[:N]    generate(prompt_lookup_num_tokens=N), default N=10
  hf-assisted             generate(assistant_model=...), needs --assistant-model PATH
  none                    plain decoding through specframe's engine (no drafter)
  DRAFTER+CONTROLLER[+VERIFIER], each part NAME[:key=value,...], for example
                          early_exit+thompson, early_exit+fixed:k=3, ngram:max_ngram=4+heuristic
"""

from __future__ import annotations

import re

from attrs import frozen

from .decoder import PLAIN
from .errors import ConfigError
from .plugins import coerce_options, get_registry, parse_part

HF_METHODS = {  # name -> default parameter (None: takes none)
    "hf": None,
    "hf-early-exit": 4,  # assistant_early_exit: layers of the target used as its own drafter
    "hf-prompt-lookup": 10,  # prompt_lookup_num_tokens: tokens copied per lookup
    "hf-assisted": None,  # a separate draft model, --assistant-model PATH
}
ENGINE = "engine"  # the kind of every method that runs through specframe's engine
OLD_PLAIN_SPELLING = "specframe"  # still read as "none" (records before 2026-11-29 used it)


@frozen
class MethodSpec:
    """One method to benchmark, parsed from its spec string."""

    label: str  # canonical spelling, the key in results and tables
    kind: str  # "hf", "hf-early-exit", "hf-prompt-lookup", "hf-assisted" or ENGINE (specframe's)
    hf_param: int | None = None  # N of hf-early-exit / hf-prompt-lookup
    drafter: str = PLAIN  # "none" = plain decoding through the engine
    controller: str = "fixed"
    verifier: str = "auto"
    options: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = ()  # (kind, ((key, value), ...))

    @property
    def is_hf(self) -> bool:
        return self.kind != ENGINE

    @property
    def speculative(self) -> bool:
        return self.drafter != PLAIN

    def options_of(self, kind: str) -> dict[str, str]:
        return dict(dict(self.options).get(kind, ()))


def split_methods(text: str) -> list[str]:
    """Split a --methods value on commas, keeping `key=value` pieces with the method before them
    (a method never starts with `key=`, so a drafter's second option may be followed by `+`).

    >>> split_methods("hf,early_exit+fixed:k=3,max_k=8,ngram+heuristic")
    ['hf', 'early_exit+fixed:k=3,max_k=8', 'ngram+heuristic']
    >>> split_methods("early_exit:head=h.safetensors,width=2+thompson_cost:max_width=3,min_k=1,none")
    ['early_exit:head=h.safetensors,width=2+thompson_cost:max_width=3,min_k=1', 'none']
    """
    specs: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if re.match(r"^[A-Za-z_]\w*=", piece) and specs:
            specs[-1] += "," + piece
        else:
            specs.append(piece)
    return specs


def parse_methods(text: str, registry=None) -> list[MethodSpec]:
    """Parse a --methods value; errors name the bad spec and say what is allowed."""
    methods = [parse_method(spec, registry) for spec in split_methods(text)]
    seen: set[str] = set()
    for method in methods:
        if method.label in seen:
            raise ConfigError(f"method {method.label!r} is listed twice in --methods; list each once")
        seen.add(method.label)
    return methods


def parse_method(spec: str, registry=None) -> MethodSpec:
    spec = spec.strip()
    if not spec:
        raise ConfigError("--methods has an empty entry (two commas in a row?); " + _METHODS_HINT)
    head, _, param = spec.partition(":")
    if head in HF_METHODS:
        return _parse_hf(head, param, spec)
    if spec in (PLAIN, OLD_PLAIN_SPELLING):
        return MethodSpec(PLAIN, ENGINE)
    if spec.startswith("hf") and "+" not in spec:
        raise ConfigError(f"unknown Hugging Face method {spec!r}; choose from {', '.join(HF_METHODS)}")
    pieces = spec.split("+")
    if len(pieces) == 1:
        raise ConfigError(
            f"method {spec!r} names one part; a specframe method is DRAFTER+CONTROLLER[+VERIFIER], for "
            f"example {spec.split(':')[0]}+heuristic (or 'none' for plain decoding). " + _METHODS_HINT)
    if len(pieces) > 3:
        raise ConfigError(f"method {spec!r} has {len(pieces)} parts; at most DRAFTER+CONTROLLER+VERIFIER")
    kinds = ("drafter", "controller", "verifier")[: len(pieces)]
    parsed = [_parse_part(piece, kind, spec) for piece, kind in zip(pieces, kinds)]
    if parsed[0][0] == PLAIN:
        raise ConfigError(f"method {spec!r}: plain decoding takes no controller or verifier; write 'none'")
    names = {kind: name for kind, (name, _) in zip(kinds, parsed)}
    options = tuple((kind, tuple(sorted(opts.items()))) for kind, (_, opts) in zip(kinds, parsed) if opts)
    _validate_parts(names, options, registry)
    label = "+".join(_part_label(name, opts) for name, opts in parsed)
    if len(parsed) == 3 and parsed[2] == ("auto", {}):
        label = label.rsplit("+", 1)[0]
    return MethodSpec(label, ENGINE, drafter=names["drafter"], controller=names["controller"],
                      verifier=names.get("verifier", "auto"), options=options)


_METHODS_HINT = ("Methods: hf, hf-early-exit[:N], hf-prompt-lookup[:N], hf-assisted, none, "
                 "DRAFTER+CONTROLLER[:key=value,...][+VERIFIER] (see `specframe plugins`).")


def _parse_hf(head: str, param: str, spec: str) -> MethodSpec:
    default = HF_METHODS[head]
    if param and default is None:
        raise ConfigError(f"method {head!r} takes no parameter, got {spec!r}")
    if default is None:
        return MethodSpec(head, head)
    try:
        value = int(param) if param else default
    except ValueError:
        raise ConfigError(f"{head}:N needs a whole number N >= 1, got {param!r} in {spec!r}") from None
    if value < 1:
        raise ConfigError(f"{head}:N needs a whole number N >= 1, got {value} in {spec!r}")
    return MethodSpec(f"{head}:{value}", head, hf_param=value)


def _parse_part(piece: str, kind: str, spec: str) -> tuple[str, dict[str, str]]:
    try:
        return parse_part(piece, kind, f" in method {spec!r}")
    except ConfigError as exc:
        raise ConfigError(f"{exc}. {_METHODS_HINT}") from None


def _part_label(name: str, options: dict[str, str]) -> str:
    return name + (":" + ",".join(f"{k}={v}" for k, v in sorted(options.items())) if options else "")


def _validate_parts(names: dict[str, str], options, registry) -> None:
    """Unknown names and unknown or badly typed options fail here, before any model loads."""
    registry = registry or get_registry()
    option_map = dict(options)
    for kind, name in names.items():
        part = registry.get(kind, name)  # UnknownComponentError lists what exists
        coerce_options(part, dict(option_map.get(kind, ())))


def method_specs_help() -> str:
    """The method specs, as listed in this module's docstring (for `specframe bench --help`)."""
    return __doc__.split("\n\n", 1)[1]
