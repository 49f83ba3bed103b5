"""Every error specframe raises on purpose. Messages say what was wrong, the value, and what to do.

`docs/errors.md` lists each error a user can meet, its cause and its fix. The CLI prints any
`SpecframeError` as `specframe: error: MESSAGE` and exits with its `exit_code` (2).
"""

from __future__ import annotations


class SpecframeError(Exception):
    """Base class: catch this to handle any error specframe reports on purpose."""

    exit_code = 2


class UnknownComponentError(SpecframeError, KeyError):
    """A drafter, controller or verifier name that no plugin registered."""

    def __init__(self, kind: str, name: str, available: list[str]):
        self.kind, self.name, self.available = kind, name, sorted(available)
        listing = ", ".join(self.available) or "(none)"
        super().__init__(
            f"unknown {kind} {name!r}; available {kind}s: {listing}. "
            f"Run `specframe plugins` to see every registered part."
        )

    def __str__(self) -> str:  # KeyError would otherwise quote the whole message
        return self.args[0]


class PluginLoadError(SpecframeError):
    """A plugin failed to import or register, or two plugins claimed one name."""


class PluginContractError(SpecframeError):
    """A part broke its contract: wrong shape, token out of range, NaN probabilities, ...

    `plugin` is the plugin that registered the part (or, when the engine does not know it, the
    part's name), `rule` the contract rule it broke, `part` the part as "drafter 'name'".
    """

    def __init__(self, plugin: str, rule: str, detail: str = "", part: str | None = None):
        self.plugin, self.rule, self.detail, self.part = plugin, rule, detail, part
        tail = f": {detail}" if detail else ""
        who = f"{part} of plugin {plugin!r}" if part else f"plugin {plugin!r}"
        super().__init__(f"{who} broke the rule '{rule}'{tail}")

    def __reduce__(self):  # keep the keyword part when pickled (multiprocessing, pytest-xdist)
        return (type(self), (self.plugin, self.rule, self.detail, self.part))


class ModelMismatchError(SpecframeError):
    """A draft head (or draft model) that belongs to another model."""


class ConfigError(SpecframeError, ValueError):
    """A bad option value: the message names the option, the value and the allowed range."""


class ModelLoadError(SpecframeError):
    """A model path that does not exist or does not hold a causal LM."""
