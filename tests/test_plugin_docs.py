"""The plugin surface and its guide (docs/plugins.md): every hook is documented with its signature
and has a test of its own, and the guide's toy package, built from its code blocks exactly as a
reader would copy them, installs with pip, shows up in `specframe plugins` and passes the kit."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import specframe
from specframe import hookspecs, testing
from specframe.interfaces import Controller, Drafter, Verifier
from specframe.plugins import AUTOLOAD_ENV, PluginRegistry
from specframe.target import TargetModel
from specframe.types import Draft, SamplingConfig, Verdict

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "plugins.md"
TOY = "specframe-unigram"


def hook_specs() -> dict:
    return {name: fn for name, fn in vars(hookspecs).items() if callable(fn) and hasattr(fn, "specframe_spec")}


# ---- every hook documented ---------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(hook_specs()))
def test_every_hook_is_documented_with_its_signature(name):
    guide = GUIDE.read_text()
    signature = re.sub(r"[\"']", "", str(inspect.signature(hook_specs()[name])))
    assert f"#### {name}\n" in guide, f"docs/plugins.md has no section '#### {name}'"
    assert f"def {name}{signature}" in guide, f"docs/plugins.md does not give the signature def {name}{signature}"


# ---- every hook tested: a part registered through it from an in-memory plugin is found and runs -
class DocDrafter(Drafter):
    def propose(self, context, max_tokens, controller, sampler):
        return Draft(torch.tensor(context[-max_tokens:], dtype=torch.long))


class DocController(Controller):
    def max_draft(self):
        return 2


class DocVerifier(Verifier):
    def verify(self, draft_tokens, q, p, sampler):
        return Verdict(0, int(p[0].argmax()))


def in_memory_plugin(hook: str, kind: str, factory) -> types.ModuleType:
    module = types.ModuleType(f"doc_plugin_{kind}")

    def implementation(register):
        register(f"doc_{kind}", factory, f"a {kind} from an in-memory plugin")

    setattr(module, hook, specframe.hookimpl(implementation))
    return module


def check_hook(hook: str, kind: str, factory) -> None:
    module = in_memory_plugin(hook, kind, factory)
    registry = PluginRegistry(autoload=False, extra_plugins=[module])
    part = registry.get(kind, f"doc_{kind}")
    assert (part.plugin, part.description) == (module.__name__, f"a {kind} from an in-memory plugin")
    built = registry.create(kind, f"doc_{kind}")
    assert isinstance(built, factory)
    table = testing.TableLM.random()
    parts = {"drafter": testing.TableDrafter.near(table, sample=False), "controller": testing.KitController(2),
             "verifier": testing.reference_verifier(), kind: built}
    tokens = testing.generate(TargetModel(table), parts["drafter"], parts["controller"], parts["verifier"],
                              [1, 2, 3], 6, SamplingConfig(0.0))
    assert tokens == testing.plain_greedy(table, [1, 2, 3], 6)


def test_register_drafters():
    check_hook("register_drafters", "drafter", DocDrafter)


def test_register_controllers():
    check_hook("register_controllers", "controller", DocController)


def test_register_verifiers():
    check_hook("register_verifiers", "verifier", DocVerifier)


HOOK_TESTS = {"register_drafters": test_register_drafters, "register_controllers": test_register_controllers,
              "register_verifiers": test_register_verifiers}


def test_every_hook_has_a_test_of_its_own():
    missing = set(hook_specs()) - set(HOOK_TESTS)
    assert not missing, f"hooks without a test in tests/test_plugin_docs.py: {sorted(missing)}"
    assert set(HOOK_TESTS) <= set(hook_specs()), "HOOK_TESTS names a hook that no longer exists"


# ---- following the guide ---------------------------------------------------------------------
def guide_files() -> dict[str, str]:
    """Code blocks whose first line is a comment naming a file of the toy package."""
    blocks = re.finditer(r"```\w+\n# (" + TOY + r"/[^\n]+)\n(.*?)```", GUIDE.read_text(), re.S)
    return {match.group(1): f"# {match.group(1)}\n{match.group(2)}" for match in blocks}


def test_the_guide_gives_every_file_of_the_toy_package():
    expected = {f"{TOY}/pyproject.toml", f"{TOY}/specframe_unigram.py", f"{TOY}/tests/test_unigram.py"}
    assert set(guide_files()) == expected


@pytest.fixture(scope="module")
def installed_toy(tmp_path_factory) -> tuple[Path, dict]:
    """The toy package written from the guide and pip-installed into its own folder (leaving the
    environment untouched); returns the package folder and an environment that sees it."""
    work = tmp_path_factory.mktemp("guide")
    for relative, text in guide_files().items():
        path = work / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    site = work / "site"
    install = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
               "--target", str(site), str(work / TOY)]
    done = subprocess.run(install, capture_output=True, text=True, cwd=work)
    assert done.returncode == 0, f"pip install of the guide's package failed:\n{done.stdout}\n{done.stderr}"
    env = {k: v for k, v in os.environ.items() if k != AUTOLOAD_ENV}
    env["OMP_NUM_THREADS"] = "1"  # torch in a subprocess on shared cores: one thread is far faster
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
    return work / TOY, env


def test_the_guide_package_shows_up_in_specframe_plugins(installed_toy):
    _, env = installed_toy
    done = subprocess.run([sys.executable, "-m", "specframe.cli", "plugins", "--json"], capture_output=True,
                          text=True, env=env)
    assert done.returncode == 0, done.stderr
    rows = [r for r in json.loads(done.stdout) if r["name"] == "unigram"]
    assert rows and rows[0]["kind"] == "drafter" and rows[0]["plugin"] == "unigram"
    assert (rows[0]["status"], rows[0]["version"]) == ("ok", "0.1.0")


def test_the_guide_package_passes_its_conformance_tests(installed_toy):
    package, env = installed_toy
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(package / "tests")],
                          capture_output=True, text=True, env=env, cwd=package.parent)
    assert done.returncode == 0, f"the guide's tests failed:\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}"
    assert "2 passed" in done.stdout


@pytest.mark.slow
def test_the_guide_package_runs_with_specframe_run(installed_toy):
    _, env = installed_toy
    command = [sys.executable, "-m", "specframe.cli", "run", "--drafter", "unigram", "--controller", "fixed",
               "--controller-opt", "k=2", "--max-new-tokens", "8", "Name three primary colours."]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


# ---- the target a drafter sees: what the built-ins use is documented -----------------------------
def _drafter_section() -> str:
    guide = GUIDE.read_text()
    return guide[guide.index("#### The target a drafter sees"):guide.index("#### A drafter that builds other drafters")]


def _attributes_of(name: str) -> set[str]:
    """Attributes the built-in drafters read from a variable called `name` (or `self.name`)."""
    import ast

    used = set()
    for path in (ROOT / "drafters").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Attribute):
                continue
            owner = node.value
            if isinstance(owner, ast.Attribute) and isinstance(owner.value, ast.Name) and owner.value.id == "self":
                owner = ast.Name(id=owner.attr)
            if isinstance(owner, ast.Name) and owner.id == name:
                used.add(node.attr)
    return used


def test_builtin_drafters_use_only_the_documented_target():
    section = _drafter_section()
    used = _attributes_of("target")
    assert {"enable_split", "layered", "model", "vocab_size"} <= used  # the scan sees the drafters' use
    undocumented = {a for a in used if f"`{a}`" not in section and f"`{a}(" not in section}
    assert not undocumented, f"drafters use TargetModel attributes docs/plugins.md does not document: {undocumented}"


def test_every_split_view_method_is_documented_and_the_builtins_use_no_other():
    from specframe.target import SplitView

    section = _drafter_section()
    public = {name for name in dir(SplitView) if not name.startswith("_")}
    assert {"lower", "hidden", "logits", "layer"} <= public
    assert all(f"`{name}" in section for name in public), public
    assert _attributes_of("split") <= public
