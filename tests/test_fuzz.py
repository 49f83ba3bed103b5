"""Fuzzing the Python API and the CLI argument parser with random and hostile values.

The property: every call either succeeds, with lossless output and at most max_new_tokens tokens
in the vocabulary, or raises a SpecframeError with a message (CLI: exit code 2 and
`specframe: error: ...`, or argparse's usage error, also exit 2). Never another exception type,
never a traceback. A call whose every argument was drawn from the valid values must succeed: an
error there is a broken built-in part, not a rejected input. Lossless: at temperature 0 exactly
the tokens of plain decoding; above it, every token is one the target can produce under the same
temperature, top-k and top-p (p > 0). (That sampled output follows p exactly is proved by
enumeration in tests/test_exact_engine.py.)

The examples are derandomised, so CI sees the same ones each run; set SPECFRAME_FUZZ_EXAMPLES to
run more, and SPECFRAME_FUZZ_RANDOM=1 to draw new ones.
"""

from __future__ import annotations

import io
import json
import math
import os
import warnings

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

import torch

from specframe import SpecframeError, SpeculativeDecoder, cli
from specframe.sampling import probs_from_logits
from specframe.types import SamplingConfig

from .test_cli import save_tiny_model

EXAMPLES = int(os.environ.get("SPECFRAME_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    deadline=None, derandomize=not os.environ.get("SPECFRAME_FUZZ_RANDOM"), database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

HOSTILE = st.sampled_from([
    None, -1, 0, 1.5, -0.0, math.nan, math.inf, -math.inf, 10**30, 2**64, -(2**70), "", "7", "nan", "auto",
    True, False, [], {}, (), b"x", object(), [1, 2], {"k": 1},
])
DRAFTERS = [None, "none", "ngram", "self_exit", "draft_model", "early_exit"]
CONTROLLERS = ["fixed", "heuristic", "confidence", "thompson", "thompson_calibrated", "thompson_cost"]
VERIFIERS = ["auto", "greedy", "speculative"]
OPTION_KEYS = ["k", "max_k", "layer", "max_ngram", "min_ngram", "threshold", "head", "model", "seed", "discount",
               "persist", "bins", "nope", ""]
OPTION_VALUES = st.one_of(st.integers(-3, 70).map(str), st.integers(-3, 9), st.floats(-1, 2), HOSTILE,
                          st.text(max_size=6))


def mostly(valid, hostile, odds: int = 10):
    """`valid`, except one time in `odds` `hostile`: most examples then get far enough to generate."""
    return st.sampled_from([False] * (odds - 1) + [True]).flatmap(lambda bad: hostile if bad else valid)


def marked(valid, hostile, odds: int = 10):
    """Like `mostly`, drawing (hostile?, value), so the test knows whether every argument was valid."""
    return st.sampled_from([False] * (odds - 1) + [True]).flatmap(
        lambda bad: (hostile if bad else valid).map(lambda value: (bad, value)))


def _options():
    return marked(st.none(), st.one_of(st.dictionaries(st.sampled_from(OPTION_KEYS), OPTION_VALUES, max_size=3),
                                       HOSTILE), odds=4)


# valid drafters with the options they need on the 4-layer tiny model
VALID_DRAFTERS = [(None, None), ("none", None), ("ngram", None), ("self_exit", {"layer": 2})]


# ---- the Python API ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plain(tiny_model, stub_tokenizer, registry):
    return SpeculativeDecoder(tiny_model, stub_tokenizer, drafter=None, controller="fixed", registry=registry)


@settings(FUZZ, max_examples=EXAMPLES or 100)
@given(
    drafter=marked(st.sampled_from(VALID_DRAFTERS),
                   st.tuples(st.one_of(st.sampled_from(DRAFTERS), HOSTILE, st.text(max_size=8)), st.none())),
    controller=marked(st.sampled_from(CONTROLLERS), HOSTILE),
    verifier=marked(st.sampled_from(VERIFIERS), HOSTILE),
    drafter_options=_options(), controller_options=_options(), verifier_options=_options(),
    on_error=marked(st.sampled_from(["fail", "fallback"]), HOSTILE),
    prompt=marked(st.lists(st.integers(0, 63), min_size=1, max_size=12),
                  st.one_of(st.lists(st.one_of(st.integers(-5, 70), HOSTILE), max_size=4), st.text(max_size=10),
                            HOSTILE)),
    max_new_tokens=marked(st.integers(1, 16), st.one_of(st.integers(-3, 0), st.sampled_from([512, 10**7, 2**70]), HOSTILE)),
    temperature=marked(st.one_of(st.just(0.0), st.just(0.0), st.floats(0, 2)),
                       st.one_of(st.floats(), st.sampled_from([1e-6, 5e-324, 1e-7]), HOSTILE)),
    top_k=marked(st.one_of(st.just(0), st.integers(0, 70)), st.one_of(st.integers(-5, 10**20), HOSTILE)),
    top_p=marked(st.one_of(st.just(1.0), st.floats(0.01, 1)), st.one_of(st.floats(), st.just(0.0), HOSTILE)),
    seed=marked(st.one_of(st.none(), st.integers(0, 2**64 - 1)), st.one_of(st.integers(2**64, 2**65), st.integers(-5, -1), HOSTILE)),
    chat=marked(st.one_of(st.none(), st.just(False)), st.one_of(st.just(True), HOSTILE)),
    truncate=marked(st.booleans(), HOSTILE),
)
def test_fuzz_python_api(tiny_model, stub_tokenizer, registry, plain, drafter, controller, verifier, drafter_options,
                         controller_options, verifier_options, on_error, prompt, max_new_tokens, temperature, top_k,
                         top_p, seed, chat, truncate):
    drawn = [drafter, controller, verifier, drafter_options, controller_options, verifier_options, on_error, prompt,
             max_new_tokens, temperature, top_k, top_p, seed, chat, truncate]
    all_valid = not any(bad for bad, _ in drawn)
    (_, (drafter, needed_options)), *rest = drawn
    (controller, verifier, drafter_options, controller_options, verifier_options, on_error, prompt, max_new_tokens,
     temperature, top_k, top_p, seed, chat, truncate) = [value for _, value in rest]
    drafter_options = drafter_options if drafter_options is not None else needed_options
    kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                  chat=chat, truncate=truncate)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fallback and truncation warnings
            decoder = SpeculativeDecoder(
                tiny_model, stub_tokenizer, drafter=drafter, controller=controller, verifier=verifier,
                drafter_options=drafter_options, controller_options=controller_options,
                verifier_options=verifier_options, on_error=on_error, registry=registry)
            result = decoder.generate(prompt, **kwargs)
    except SpecframeError as error:
        assert str(error).strip()
        assert not (all_valid and (temperature == 0 or temperature >= 1e-6)), f"valid arguments raised {error!r}"
        event(f"API: {type(error).__name__}: {str(error)[:30]}")
        return
    event(f"API: success at temperature {'0' if temperature == 0 else '> 0'}")
    assert 1 <= len(result.tokens) <= max_new_tokens and all(0 <= t < 64 for t in result.tokens)
    assert result.finish_reason in ("eos", "length") and result.stats.new_tokens == len(result.tokens)
    if temperature == 0:
        assert result.tokens == plain.generate(prompt, **kwargs).tokens
    elif temperature >= 0.05 and top_p == 1.0:  # away from float ties at the top-p edge or near T = 0
        ids = plain.encode(prompt, chat)  # at most 12 + 16 tokens: never truncated
        assert_target_can_produce(tiny_model, ids, result.tokens, SamplingConfig(temperature, top_k, top_p))


def assert_target_can_produce(model, prompt_ids: list[int], tokens: list[int], config: SamplingConfig) -> None:
    """Every generated token has p > 0 under the target, processed with the same sampling settings."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt_ids + tokens])).logits[0, len(prompt_ids) - 1 : -1]  # (T, V)
    p = probs_from_logits(logits, config)
    impossible = [(i, t) for i, t in enumerate(tokens) if not float(p[i, t]) > 0]
    assert not impossible, f"tokens the target cannot produce (position, token): {impossible}"


@settings(FUZZ, max_examples=EXAMPLES or 30)
@given(model=HOSTILE, tokenizer=st.one_of(HOSTILE, st.none()))
def test_fuzz_constructor_objects(stub_tokenizer, registry, model, tokenizer):
    with pytest.raises(SpecframeError):
        SpeculativeDecoder(model, tokenizer, drafter=None, registry=registry)


# ---- the CLI ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("fuzz_model")))


@pytest.fixture
def cached_loading(monkeypatch):
    """Load each (path, device, dtype) once: the fuzz is about arguments, not about load times."""
    from specframe import models

    real, cache = models.load_model, {}

    def load_model(path=None, device="auto", dtype="auto"):
        key = (str(path), str(device), str(dtype))
        if key not in cache:
            cache[key] = real(path, device=device, dtype=dtype)
        return cache[key]

    monkeypatch.setattr(models, "load_model", load_model)


NUMBERS = st.one_of(st.integers(-3, 30).map(str), st.floats().map(repr), st.sampled_from(
    ["", "abc", "1e309", "-0", "0x10", "1_000", "٣", "99999999999999999999999", " 5", "1e-7", "inf", "NaN"]))
JUNK = st.text(max_size=12).filter(lambda s: s != "--")
CLI_VALUES = {  # option -> (valid values, hostile values)
    "--drafter": (st.sampled_from(["none", "ngram", "self_exit"]),
                  st.one_of(st.sampled_from(["draft_model", "early_exit", "NGRAM", "ngram ", ""]), JUNK)),
    "--controller": (st.sampled_from(CONTROLLERS), JUNK),
    "--verifier": (st.sampled_from(VERIFIERS), JUNK),
    "--max-new-tokens": (st.integers(1, 12).map(str), st.one_of(st.sampled_from(["0", "-1", "256", "10000000"]), NUMBERS)),
    "--temperature": (st.sampled_from(["0", "0.0", "0", "0.7", "1e-6"]), NUMBERS),
    "--top-k": (st.sampled_from(["0", "1", "50"]), NUMBERS),
    "--top-p": (st.sampled_from(["1", "0.9", "1e-9"]), NUMBERS),
    "--seed": (st.sampled_from(["0", "7", str(2**63 - 1)]), st.one_of(st.sampled_from([str(2**63), str(2**64)]), NUMBERS)),
    "--device": (st.sampled_from(["auto", "cpu"]),
                 st.sampled_from(["cuda", "cuda:7", "meta", "mps", "xla", "gpu", "", "cpu:0", "-1"])),
    "--dtype": (st.sampled_from(["auto", "fp32"]), st.sampled_from(["bf16", "fp16", "fp8", ""])),
    "--on-error": (st.sampled_from(["fail", "fallback"]), st.just("ignore")),
    "--drafter-opt": (st.sampled_from(["layer=1", "max_ngram=2", "min_ngram=1"]),
                      st.builds(lambda k, v, sep: f"{k}{sep}{v}", st.sampled_from(OPTION_KEYS), JUNK | NUMBERS,
                                st.sampled_from(["=", "=", ":", ""]))),
    "--controller-opt": (st.just("seed=3"), st.builds(lambda k, v: f"{k}={v}", st.sampled_from(OPTION_KEYS), NUMBERS)),
    "--verifier-opt": (st.nothing(), st.builds(lambda k, v: f"{k}={v}", st.sampled_from(OPTION_KEYS), JUNK)),
    "--model": (st.nothing(), st.sampled_from(["/nonexistent/model", ".", "", "/dev/null"])),
}
FLAGS = ["--json", "--quiet", "--chat", "--no-chat", "--truncate-prompt", "--help", "--version", "-x", "--bogus"]


@st.composite
def cli_arguments(draw):
    argv = [draw(mostly(st.just("run"), st.sampled_from(["plugins", "runn", "", "-h"])))]
    argv += ["--drafter", draw(mostly(*CLI_VALUES["--drafter"]))]  # the default (early_exit) needs a trained head
    argv += ["--max-new-tokens", draw(mostly(*CLI_VALUES["--max-new-tokens"]))]  # the default (128) is slow here
    for _ in range(draw(st.integers(0, 5))):
        if draw(st.integers(0, 3)) == 0:
            argv.append(draw(mostly(st.sampled_from(FLAGS[:5]), st.sampled_from(FLAGS[5:]))))
            continue
        option = draw(st.sampled_from(sorted(CLI_VALUES)))
        valid, hostile = CLI_VALUES[option]
        argv.append(option)
        if draw(st.integers(0, 30)):  # now and then an option without its value
            argv.append(draw(mostly(valid, hostile) if not valid.is_empty else hostile))
    if draw(st.integers(0, 15)):
        argv += ["--model", "{TINY}"]  # the tiny model, last so it wins
    prompt = draw(mostly(st.sampled_from(["Hello there", "Hi", "word " * 300, None, "\u00e9t\u00e9 \U0001f600"]),
                         st.one_of(st.sampled_from(["", "   ", "-"]), st.text(max_size=30))))
    if prompt is not None:
        argv.append(prompt)
    stdin = draw(mostly(st.just("Write a haiku."), st.sampled_from(["", "\n"]), odds=4))
    return argv, stdin


def _main(argv, stdin, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    try:
        code = cli.main(argv)
        usage = False
    except SystemExit as exit_:
        code, usage = exit_.code, True
    out, err = capsys.readouterr()
    return code, usage, out, err


@settings(FUZZ, max_examples=EXAMPLES or 50)
@given(arguments=cli_arguments())
def test_fuzz_cli(cli_model, cached_loading, monkeypatch, capsys, arguments):
    argv, stdin = arguments
    argv = [cli_model if a == "{TINY}" else a for a in argv]
    code, usage, out, err = _main(argv, stdin, monkeypatch, capsys)
    assert "Traceback" not in err
    event(f"CLI: exit {code}{' (argparse)' if usage else ''} {err[:45]}")
    if usage:  # argparse: --help / --version (0) or a usage error (2)
        assert code == 0 or (code == 2 and "usage:" in err), (code, err)
        return
    assert code in (0, 2), (code, err)
    if code == 2:
        assert err.startswith("specframe: error: ") or (argv[0] != "run" and "usage:" in out), err
        return
    if argv[0] != "run":
        return
    args = cli.build_parser().parse_args(argv)
    if args.temperature != 0 or args.dtype in ("bf16", "fp16"):
        return  # sampled output, or half precision where batched and single passes may round apart
    reference = [a for a in argv]
    reference.insert(len(reference) - (1 if args.prompt is not None else 0), "--drafter")
    reference.insert(len(reference) - (1 if args.prompt is not None else 0), "none")
    event("CLI: compared with plain decoding")
    plain_code, _, plain_out, plain_err = _main(reference, stdin, monkeypatch, capsys)
    assert plain_code == 0, plain_err
    if args.json:
        assert json.loads(out)["tokens"] == json.loads(plain_out)["tokens"]
    else:
        assert out == plain_out
