"""Plugin discovery through real entry points, broken plugins, duplicate and unknown names."""

from __future__ import annotations

import json
import sys
import textwrap
from importlib import metadata

import pytest

import attrs

from specframe import ConfigError, PluginLoadError, UnknownComponentError
from specframe.hookspecs import hookimpl
from specframe.plugins import ENTRY_POINT_GROUP, PartInfo, PluginRegistry, coerce_options

GOOD = '''
import specframe
from specframe.drafters.ngram import NgramDrafter

class EchoDrafter(NgramDrafter):
    pass

@specframe.hookimpl
def register_drafters(register):
    register("echo", EchoDrafter, "a test drafter")
'''
CLASHING = '''
import specframe
from specframe.drafters.ngram import NgramDrafter

@specframe.hookimpl
def register_drafters(register):
    register("echo", NgramDrafter)
'''
RAISING = '''
import specframe

@specframe.hookimpl
def register_controllers(register):
    raise RuntimeError("registration exploded")
'''


@pytest.fixture
def fake_plugins(tmp_path, monkeypatch):
    """Install modules and entry points that importlib.metadata reports as installed."""

    def install(**modules: str):
        points = []
        for name, source in modules.items():
            if source is not None:
                (tmp_path / f"{name}_mod.py").write_text(textwrap.dedent(source))
            points.append(metadata.EntryPoint(name=name, value=f"{name}_mod", group=ENTRY_POINT_GROUP))
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.setattr(metadata, "entry_points", lambda group=None: [p for p in points if p.group == group])
        for name in modules:
            sys.modules.pop(f"{name}_mod", None)

    return install


def test_entry_point_plugin_is_found(fake_plugins):
    fake_plugins(good=GOOD)
    registry = PluginRegistry(autoload=True)
    part = registry.get("drafter", "echo")
    assert part.plugin == "good" and registry.plugins["good"].status == "ok"
    assert type(registry.create("drafter", "echo", {"max_ngram": "2"})).__name__ == "EchoDrafter"


def test_autoload_can_be_turned_off(fake_plugins, monkeypatch):
    fake_plugins(good=GOOD)
    monkeypatch.setenv("SPECFRAME_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert "echo" not in PluginRegistry().names("drafter")
    monkeypatch.setenv("SPECFRAME_DISABLE_PLUGIN_AUTOLOAD", "0")
    assert "echo" in PluginRegistry().names("drafter")


def test_broken_import_is_listed_and_does_not_break_others(fake_plugins):
    fake_plugins(good=GOOD, missing=None, syntax="def broken(:\n")
    registry = PluginRegistry(autoload=True)
    assert registry.plugins["missing"].status == "broken"
    assert "ModuleNotFoundError" in registry.plugins["missing"].error
    assert "SyntaxError" in registry.plugins["syntax"].error
    assert "echo" in registry.names("drafter") and "ngram" in registry.names("drafter")
    with pytest.raises(PluginLoadError, match="plugin 'missing' failed to load.*ModuleNotFoundError"):
        registry.get("drafter", "missing")


def test_plugin_whose_hook_raises_is_broken(fake_plugins):
    fake_plugins(raising=RAISING)
    registry = PluginRegistry(autoload=True)
    assert registry.plugins["raising"].status == "broken"
    assert "registration exploded" in registry.plugins["raising"].error
    assert "fixed" in registry.names("controller")


def test_unknown_name_lists_what_exists(fake_plugins):
    fake_plugins(missing=None)
    registry = PluginRegistry(autoload=True)
    with pytest.raises(UnknownComponentError) as info:
        registry.get("drafter", "nope")
    message = str(info.value)
    assert "nope" in message and "ngram" in message and "self_exit" in message
    assert "'missing'" in message  # broken plugins are mentioned as possible providers


def test_duplicate_name_names_both_plugins(fake_plugins):
    fake_plugins(good=GOOD, clashing=CLASHING)
    registry = PluginRegistry(autoload=True)
    with pytest.raises(PluginLoadError, match="'good' and 'clashing'"):
        registry.get("drafter", "echo")
    assert "ngram" in registry.names("drafter")


def test_plugins_command_lists_builtins_and_broken(fake_plugins, capsys, monkeypatch):
    from specframe import cli, plugins

    fake_plugins(good=GOOD, missing=None)
    monkeypatch.setattr(plugins, "_default_registry", PluginRegistry(autoload=True))
    assert cli.main(["plugins", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = {(r["kind"], r["name"]): r for r in rows}
    assert names[("drafter", "echo")]["plugin"] == "good"
    assert names[("verifier", "greedy")]["status"] == "ok"
    assert any(r["status"] == "broken" and r["plugin"] == "missing" for r in rows)
    assert cli.main(["plugins"]) == 0
    table = capsys.readouterr().out
    assert "KIND" in table and "echo" in table and "broken" in table


def test_option_errors_are_clear(registry):
    from specframe import ConfigError

    with pytest.raises(ConfigError, match="has no option 'size'.*max_ngram"):
        registry.create("drafter", "ngram", {"size": "3"})
    with pytest.raises(ConfigError, match="must be int, got 'many'"):
        registry.create("controller", "fixed", {"k": "many"})
    with pytest.raises(ConfigError):
        registry.create("controller", "fixed", {"k": "0"})


@attrs.define
class _SequenceOptions:
    """A part whose options are sequences, as a plugin might declare them."""

    costs: tuple[float, ...] = (1.0,)
    sizes: list[int] = attrs.field(factory=list)
    pair: tuple[int, str] = (0, "")
    maybe: tuple[int, ...] | None = None
    flags: tuple[bool, ...] = ()
    k: int = 1


def test_sequence_options_are_read_from_comma_separated_strings():
    part = PartInfo("controller", "seq", _SequenceOptions, "test", "0")
    options = coerce_options(part, {"costs": "1, 1.5,2", "sizes": "3,4", "pair": "5,x", "maybe": "7",
                                    "flags": "true,no", "k": "2"})
    assert options == {"costs": (1.0, 1.5, 2.0), "sizes": [3, 4], "pair": (5, "x"), "maybe": (7,),
                       "flags": (True, False), "k": 2}
    assert coerce_options(part, {"costs": ""}) == {"costs": ()}
    with pytest.raises(ConfigError, match="option 'costs' of controller 'seq' must be finite numbers separated by "
                                          "commas .*got '1,x'"):
        coerce_options(part, {"costs": "1,x"})
    with pytest.raises(ConfigError, match="option 'sizes' .* must be integers separated by commas"):
        coerce_options(part, {"sizes": "1.5"})
    with pytest.raises(ConfigError, match="option 'pair' .* must be 2 values separated by commas, got '5'"):
        coerce_options(part, {"pair": "5"})


# ---- parts that build parts: hybrid's fallback comes from the decoder's registry ------------------
class _LocalOnlyPlugin:
    """Registers a drafter that exists only in the registry it is given to."""

    @staticmethod
    @hookimpl
    def register_drafters(register):
        from specframe.drafters.ngram import NgramDrafter

        register("local_only", NgramDrafter, "known to one registry only")


def test_hybrid_finds_its_fallback_in_the_decoders_registry(tiny_model, stub_tokenizer):
    from specframe import SpeculativeDecoder
    from specframe.plugins import get_registry

    assert "local_only" not in get_registry().names("drafter")
    registry = PluginRegistry(autoload=False, extra_plugins=[_LocalOnlyPlugin])
    decoder = SpeculativeDecoder(tiny_model, stub_tokenizer, drafter="hybrid", controller="fixed",
                                 drafter_options={"fallback": "local_only:max_ngram=2,min_ngram=1"},
                                 registry=registry)
    plain = SpeculativeDecoder(tiny_model, stub_tokenizer, drafter="none", registry=registry)
    prompt = [3, 4, 5, 6, 3, 4, 5]
    result = decoder.generate(prompt, max_new_tokens=12)
    assert result.tokens == plain.generate(prompt, max_new_tokens=12).tokens
    assert decoder.parts.drafter.model_drafter.max_ngram == 2  # built with the fallback's options


def test_hybrid_checks_its_fallback_when_built(registry):
    with pytest.raises(UnknownComponentError, match="no_such_drafter"):
        registry.create("drafter", "hybrid", {"fallback": "no_such_drafter"})
    with pytest.raises(ConfigError, match="has no option 'nope'"):
        registry.create("drafter", "hybrid", {"fallback": "ngram:nope=1"})
    with pytest.raises(ConfigError, match="must be key=value"):
        registry.create("drafter", "hybrid", {"fallback": "ngram:max_ngram"})
