"""The plugin manager: the only module that touches pluggy's `pm.hook`.

Built-in parts (`specframe.drafters`, `.controllers`, `.verifiers`) register through the same
hooks as third-party plugins, which are found through the entry-point group `specframe`.
Set SPECFRAME_DISABLE_PLUGIN_AUTOLOAD=1 to skip entry points (the tests do).
"""

from __future__ import annotations

import collections.abc
import importlib
import math
import os
import re
import types
import typing
from importlib import metadata

import attrs
import pluggy
from attrs import field, frozen

from . import hookspecs
from .errors import ConfigError, PluginLoadError, SpecframeError, UnknownComponentError

ENTRY_POINT_GROUP = "specframe"
AUTOLOAD_ENV = "SPECFRAME_DISABLE_PLUGIN_AUTOLOAD"
KINDS = ("drafter", "controller", "verifier")
BUILTIN_MODULES = ("specframe.drafters", "specframe.controllers", "specframe.verifiers")


@frozen
class PartInfo:
    """One registered drafter, controller or verifier."""

    kind: str
    name: str
    factory: typing.Callable = field(eq=False, repr=False)
    plugin: str
    version: str
    description: str = ""


@frozen
class PluginInfo:
    """One plugin and whether it loaded."""

    name: str
    version: str
    status: str  # "ok" or "broken"
    error: str = ""


def _version(dist_name: str | None) -> str:
    if not dist_name:
        return "?"
    try:
        return metadata.version(dist_name)
    except metadata.PackageNotFoundError:
        return "?"


class PluginRegistry:
    """Finds plugins, records what each registered, and builds parts by name."""

    def __init__(self, autoload: bool | None = None, extra_plugins: typing.Iterable[object] = ()):
        if autoload is None:
            autoload = os.environ.get(AUTOLOAD_ENV, "") in ("", "0", "false", "no")
        self.pm = pluggy.PluginManager("specframe")
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.parts: dict[tuple[str, str], PartInfo] = {}
        self.conflicts: dict[tuple[str, str], list[str]] = {}
        self._versions: dict[str, str] = {}
        for module_name in BUILTIN_MODULES:
            self._add(module_name, lambda m=module_name: importlib.import_module(m), _version("specframe"))
        for plugin in extra_plugins:
            self._add(getattr(plugin, "__name__", repr(plugin)), lambda p=plugin: p, "local")
        if autoload:
            for entry_point in metadata.entry_points(group=ENTRY_POINT_GROUP):
                dist = getattr(entry_point, "dist", None)
                version = dist.version if dist is not None else "?"
                self._add(entry_point.name, entry_point.load, version)
        self._collect()

    # ---- loading -----------------------------------------------------------------------------
    def _add(self, name: str, load: typing.Callable[[], object], version: str) -> None:
        """Import and register one plugin; a failure marks it broken instead of raising."""
        try:
            self.pm.register(load(), name=name)
        except Exception as exc:  # a broken plugin must not break the others
            self.plugins[name] = PluginInfo(name, version, "broken", f"{type(exc).__name__}: {exc}")
            return
        self._versions[name] = version
        self.plugins[name] = PluginInfo(name, version, "ok")

    def _collect(self) -> None:
        for kind in KINDS:
            caller = getattr(self.pm.hook, f"register_{kind}s")
            for impl in caller.get_hookimpls():
                self._call_one(kind, impl)

    def _call_one(self, kind: str, impl: pluggy.HookImpl) -> None:
        plugin = impl.plugin_name

        def register(name: str, factory: typing.Callable, description: str = "") -> None:
            self._record(PartInfo(kind, name, factory, plugin, self._versions.get(plugin, "?"), description))

        try:
            impl.function(register=register)
        except Exception as exc:
            info = self.plugins[plugin]
            self.plugins[plugin] = attrs.evolve(info, status="broken", error=f"{type(exc).__name__}: {exc}")

    def _record(self, part: PartInfo) -> None:
        key = (part.kind, part.name)
        if key in self.parts or key in self.conflicts:
            owners = self.conflicts.setdefault(key, [self.parts.pop(key).plugin] if key in self.parts else [])
            owners.append(part.plugin)
            return
        self.parts[key] = part

    # ---- lookup ------------------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        return sorted(name for (k, name) in self.parts if k == kind)

    def get(self, kind: str, name: str) -> PartInfo:
        key = (kind, name)
        if key in self.conflicts:
            owners = " and ".join(repr(p) for p in self.conflicts[key])
            raise PluginLoadError(
                f"{kind} {name!r} is registered by more than one plugin: {owners}; "
                "uninstall one of them or ask its author to rename the part"
            )
        if key in self.parts:
            return self.parts[key]
        broken = [p for p in self.plugins.values() if p.status == "broken"]
        for plugin in broken:
            if plugin.name == name:
                raise PluginLoadError(f"plugin {name!r} failed to load, so {kind} {name!r} is unavailable: {plugin.error}")
        error = UnknownComponentError(kind, name, self.names(kind))
        if broken:
            notes = "; ".join(f"{p.name!r} ({p.error})" for p in broken)
            error.args = (error.args[0] + f" Note: these plugins failed to load and may provide it: {notes}",)
        raise error

    def create(self, kind: str, name: str, options: dict | None = None):
        """Build the part `name` of `kind` with its options (strings are converted to field types)."""
        part = self.get(kind, name)
        kwargs = coerce_options(part, dict(options or {}))
        try:
            instance = part.factory(**kwargs)
        except SpecframeError:
            raise
        except Exception as exc:  # attrs validators raise TypeError/ValueError; a plugin may raise anything
            shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "no options"
            raise ConfigError(
                f"bad options for {kind} {name!r} (plugin {part.plugin!r}) with {shown}: {type(exc).__name__}: {exc}; "
                f"see `specframe plugins` and the part's documentation for its options"
            ) from exc
        bind = getattr(instance, "use_registry", None)
        if callable(bind):  # a part that builds parts by name (hybrid) finds them here too
            bind(self)
        return instance


def parse_part(text: str, kind: str, where: str = "") -> tuple[str, dict[str, str]]:
    """A part written NAME[:key=value,...] (a bench method's parts, hybrid's fallback) -> (name,
    options as strings). `where` ends the error messages, e.g. " in method 'a+b'"."""
    name, colon, rest = text.partition(":")
    if not re.fullmatch(r"[A-Za-z_][\w.-]*", name.strip()):
        raise ConfigError(f"{kind} name {name!r}{where} is not a name; write NAME[:key=value,...]")
    options: dict[str, str] = {}
    for item in filter(None, (i.strip() for i in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise ConfigError(f"option {item!r} of {kind} {name!r}{where} must be key=value")
        options[key.strip()] = value.strip()
    if colon and not options:
        raise ConfigError(f"{kind} {name!r}{where} has ':' but no key=value options")
    return name.strip(), options


def coerce_options(part: PartInfo, options: dict) -> dict:
    """Check option names against an attrs factory's fields and convert string values."""
    factory = part.factory
    if not (isinstance(factory, type) and attrs.has(factory)):
        return options
    fields = {f.name: f for f in attrs.fields(factory) if f.init}
    try:
        hints = typing.get_type_hints(factory)
    except Exception:  # unresolvable annotations in a plugin: pass the strings through unconverted
        hints = {}
    for key, value in list(options.items()):
        if key not in fields:
            valid = ", ".join(sorted(fields)) or "(none)"
            raise ConfigError(f"{part.kind} {part.name!r} has no option {key!r}; its options are: {valid}")
        if isinstance(value, str):
            options[key] = _convert(part, key, value, hints.get(key, str))
    return options


_SEQUENCES = {tuple: tuple, list: list, collections.abc.Sequence: tuple}  # hint origin -> built type


def _convert(part: PartInfo, key: str, value: str, hint) -> object:
    """A string option (from `--drafter-opt k=4` and the like) as the field's type.

    Optional[X] and unions use their first member that is not None. tuple[X, ...], list[X] and
    Sequence[X] read "a,b,c" (an empty string is empty), tuple[X, Y] exactly that many items.
    Types other than bool, int, float and these sequences get the string unchanged.
    """
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next((a for a in typing.get_args(hint) if a is not type(None)), str)
    origin = typing.get_origin(hint) or (hint if hint in _SEQUENCES else None)
    if origin not in _SEQUENCES:
        return _convert_one(part, key, value, hint, value)
    args = typing.get_args(hint)
    items = [item.strip() for item in value.split(",")] if value.strip() else []
    if origin is tuple and args and args[-1] is not Ellipsis:  # tuple[X, Y]: a fixed length
        if len(items) != len(args):
            raise ConfigError(f"option {key!r} of {part.kind} {part.name!r} must be {len(args)} values separated "
                              f"by commas, got {value!r}")
        item_types = args
    else:
        item_types = [args[0] if args else str] * len(items)
    return _SEQUENCES[origin](_convert_one(part, key, item, t, value, many=True) for item, t in zip(items, item_types))


def _convert_one(part: PartInfo, key: str, value: str, hint, whole: str, many: bool = False) -> object:
    try:
        if hint is bool:
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("1", "true", "yes")
        if hint is int:
            return int(value)
        if hint is float:
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(value)
            return number
    except ValueError:
        if many:
            what = {bool: "true/false values", int: "integers", float: "finite numbers"}[hint]
            raise ConfigError(f"option {key!r} of {part.kind} {part.name!r} must be {what} separated by commas "
                              f"(e.g. 1,2,3), got {whole!r}") from None
        raise ConfigError(
            f"option {key!r} of {part.kind} {part.name!r} must be {'a finite ' if hint is float else ''}"
            f"{hint.__name__}, got {value!r}"
        ) from None
    return value


_default_registry: PluginRegistry | None = None


def get_registry() -> PluginRegistry:
    """The process-wide registry, built on first use."""
    global _default_registry
    if _default_registry is None:
        _default_registry = PluginRegistry()
    return _default_registry
