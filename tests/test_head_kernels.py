"""Draft heads on the compiled path (specframe.heads): in CPU fp32 and bf16 a head's decoder layer
runs through the compiled decoder layers and its reduced LM head through the few-row kernel, and
it drafts the tokens, probabilities and confidences of PyTorch's path, to rounding, for both head
kinds, chains and trees, across rollbacks and catch-ups. In bf16, greedy speculative decoding on
the compiled path gives plain decoding's tokens exactly."""

from __future__ import annotations

import copy

import pytest
import torch

from drafters.early_exit import EarlyExitDrafter
from specframe.eagle_head import EagleHead
from specframe.heads import EarlyExitHead
from specframe.kernels import DISABLE_ENV, build, linear
from specframe.kernels.layers import CompiledLayers
from specframe.sampling import Sampler
from specframe.target import TargetModel
from specframe.types import SamplingConfig

from .conftest import tiny_llama

EXIT_LAYER = 2
PROMPT = [5, 9, 2, 33, 5, 9, 17, 40, 3, 3, 12]  # 11 tokens: the head's catch-up fits one compiled pass


class _Always:
    """A controller that drafts as many tokens as it is allowed."""

    def keep_drafting(self, drafted: int, confidence: float) -> bool:
        return True


@pytest.fixture
def lib():
    if build.library() is None:
        pytest.skip("no compiled kernels here: heads keep PyTorch's path, tested everywhere else")
    return build.library()


@pytest.fixture
def lib_bf16():
    if build.library(torch.bfloat16) is None:
        pytest.skip("no compiled kernels here: heads keep PyTorch's path, tested everywhere else")
    return build.library(torch.bfloat16)


@pytest.fixture
def disable_kernels(monkeypatch):
    """Turns the kernels off for the rest of the test (SPECFRAME_FEW_ROW_KERNEL=0; the library is
    looked up once per process, so the lookup is forgotten on both sides)."""

    def disable() -> None:
        monkeypatch.setenv(DISABLE_ENV, "0")
        build.library.cache_clear()
        assert build.library() is None

    yield disable
    build.library.cache_clear()


@pytest.fixture(scope="module")
def model():
    return tiny_llama(num_layers=4, seed=3, init=0.3, hidden_size=64)


def _random_head(model, kind: str, reduced: bool) -> EarlyExitHead:
    """A head of `kind` unlike the target's own layer (seeded noise on every weight)."""
    vocab_ids = torch.arange(0, model.config.vocab_size, 3) if reduced else None
    head = (EagleHead if kind == "eagle" else EarlyExitHead)(model, EXIT_LAYER, vocab_ids=vocab_ids).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.add_(0.2 * parameter.abs().mean() * torch.randn(parameter.shape, generator=generator))
        head.norm.weight.mul_(8.0)  # peaked drafts, as a trained head's
    return head


def _rounds(model, kind: str, reduced: bool, temperature: float, width: int = 1, tree: str = "fixed") -> list:
    """Three drafting rounds of 5 tokens, each followed by a verification that accepts 2 drafts
    and a bonus token: each round's (tokens, parents, q, confidences)."""
    target = TargetModel(model)
    drafter = EarlyExitDrafter(head=_random_head(model, kind, reduced), width=width, tree=tree)
    sampler = Sampler(SamplingConfig(temperature, seed=0))
    drafter.before_prefill(target, PROMPT[:-1])
    target.forward(torch.tensor(PROMPT[:-1]), logits_to_keep=1)
    drafter.begin(target, PROMPT[:-1], sampler)
    context, rounds = list(PROMPT), []
    for bonus in (7, 21, 30):
        draft = drafter.propose(list(context), 5, _Always(), sampler)
        rounds.append((draft.tokens.tolist(), draft.parents, draft.q, draft.confidences))
        accepted = [context[-1], *draft.tokens.tolist()[:2]] if draft.parents is None else [context[-1]]
        target.rollback(len(context) - 1)
        target.forward(torch.tensor(accepted))
        valid = len(context) - 1 + len(accepted)
        drafter.rollback(valid)
        context = [*context, *accepted[1:], bonus]
    return rounds


def _assert_same_drafts(compiled: list, pytorch: list) -> None:
    for (tokens, parents, q, confidences), (tokens_, parents_, q_, confidences_) in zip(compiled, pytorch, strict=True):
        assert (tokens, parents) == (tokens_, parents_)
        torch.testing.assert_close(torch.tensor(confidences), torch.tensor(confidences_), rtol=1e-4, atol=1e-5)
        assert (q is None) == (q_ is None)
        if q is not None:
            torch.testing.assert_close(q, q_, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("reduced", [False, True])
@pytest.mark.parametrize("kind", ["early_exit", "eagle"])
def test_compiled_chains_draft_as_pytorchs(lib, model, disable_kernels, kind, reduced, temperature):
    compiled = _rounds(model, kind, reduced, temperature)
    disable_kernels()  # PyTorch's path for the target and the head
    _assert_same_drafts(compiled, _rounds(model, kind, reduced, temperature))


@pytest.mark.parametrize("tree", ["fixed", "dynamic"])
@pytest.mark.parametrize("kind", ["early_exit", "eagle"])
def test_compiled_trees_draft_as_pytorchs(lib, model, disable_kernels, kind, tree):
    compiled = _rounds(model, kind, True, 0.0, width=3, tree=tree)
    disable_kernels()
    _assert_same_drafts(compiled, _rounds(model, kind, True, 0.0, width=3, tree=tree))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["early_exit", "eagle"])
def test_a_draft_step_takes_the_compiled_head(lib, lib_bf16, model, monkeypatch, kind, dtype):
    """Each draft step runs the head's layer in one compiled call after the target's lower layers,
    and its LM head (and an eagle head's fuse) through the few-row kernel, in fp32 and bf16."""
    model = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
    calls = {"layers": [], "linear": []}
    run, few_rows = CompiledLayers.run, linear.few_rows_linear

    def counted_run(self, hidden, first, last, *args, **kwargs):
        calls["layers"].append((hidden.shape[0], last - first))
        return run(self, hidden, first, last, *args, **kwargs)

    def counted_linear(x, weight, bias=None):
        assert weight.dtype == dtype
        calls["linear"].append(tuple(weight.shape))
        return few_rows(x, weight, bias)

    monkeypatch.setattr(CompiledLayers, "run", counted_run)
    monkeypatch.setattr("specframe.kernels.linear.few_rows_linear", counted_linear)
    assert len(_rounds(model, kind, True, 0.0)[0][0]) == 5
    assert calls["layers"].count((1, 1)) >= 15, calls["layers"]  # 3 rounds of 5 one-token head steps
    R = len(range(0, model.config.vocab_size, 3))
    assert calls["linear"].count((R, 64)) >= 15, calls["linear"]
    if kind == "eagle":
        assert calls["linear"].count((64, 128)) >= 15, calls["linear"]


def test_heads_keep_pytorchs_path_without_the_kernels(model, monkeypatch, disable_kernels):
    disable_kernels()
    head = _random_head(model, "early_exit", True)
    assert head.compiled_layers() is None
    monkeypatch.setattr(CompiledLayers, "run", lambda *a, **k: pytest.fail("the compiled layers ran"))
    assert len(_rounds(model, "early_exit", True, 0.0)[0][0]) == 5


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("kind", ["early_exit", "eagle"])
def test_bf16_compiled_chains_draft_as_pytorchs(lib_bf16, model, disable_kernels, kind, temperature):
    """The same drafts as PyTorch's bf16 path; probabilities to bf16 rounding (a logit step of
    0.125-0.25 at these logits moves a probability by up to about 0.06 here)."""
    model = copy.deepcopy(model).to(torch.bfloat16)
    compiled = _rounds(model, kind, True, temperature)
    disable_kernels()
    for (tokens, parents, q, confidences), (tokens_, parents_, q_, confidences_) in zip(
            compiled, _rounds(model, kind, True, temperature), strict=True):
        assert (tokens, parents) == (tokens_, parents_)
        torch.testing.assert_close(torch.tensor(confidences), torch.tensor(confidences_), rtol=0, atol=0.1)
        if q is not None:
            torch.testing.assert_close(q.float(), q_.float(), rtol=0, atol=0.1)


def test_a_bf16_head_takes_the_compiled_path(lib_bf16):
    model = tiny_llama(num_layers=4, seed=3, init=0.3, hidden_size=64, dtype=torch.bfloat16)
    head = EarlyExitHead(model, EXIT_LAYER).eval()
    assert head.compiled_layers() is not None and head.compiled_layers().dtype == torch.bfloat16
    with torch.inference_mode():
        logits = head.extend(torch.randn(3, 64, dtype=torch.bfloat16))
    assert logits.dtype == torch.bfloat16 and logits.shape == (3, model.config.vocab_size)


@pytest.mark.parametrize("drafter, options", [
    ("self_exit", {"layer": 2}), ("ngram", {}), ("early_exit", {"kind": "early_exit"}),
    ("early_exit", {"kind": "eagle"}), ("early_exit", {"kind": "eagle", "width": 3, "tree": "dynamic"})])
def test_bf16_greedy_speculative_decoding_gives_plain_decodings_tokens(lib_bf16, drafter, options):
    """On the compiled path a verification pass gives bitwise the logits of one-token passes in
    bf16 too, and a split stack the states of one call: greedy output is plain decoding's, token
    for token (PyTorch's bf16 path promises that only up to near-ties)."""
    from specframe import SpeculativeDecoder

    from .conftest import StubTokenizer

    model = tiny_llama(num_layers=4, seed=5, init=0.3, hidden_size=64, dtype=torch.bfloat16)
    if drafter == "early_exit":
        kind, options = options["kind"], {k: v for k, v in options.items() if k != "kind"}
        options["head"] = _random_head(model, kind, reduced=True)
    prompts = [PROMPT, [7, 3, 19, 3, 7, 3, 19, 3, 7, 2, 50, 12, 9, 9], [1, 2]]
    plain = SpeculativeDecoder(model, StubTokenizer(), drafter=None, controller="fixed")
    assert plain.target.compiled is not None and plain.target.kernels.path == "compiled few-row kernel"
    spec = SpeculativeDecoder(model, StubTokenizer(), drafter=drafter, controller="fixed",
                              controller_options={"k": 4}, drafter_options=options)
    accepted = 0
    for prompt in prompts:
        expected = plain.generate(prompt, max_new_tokens=40, temperature=0.0).tokens
        result = spec.generate(prompt, max_new_tokens=40, temperature=0.0)
        assert result.tokens == expected, prompt
        accepted += result.stats.accepted
    assert accepted > 0  # verification did keep drafts


def test_copies_and_moved_heads_make_their_own_compiled_path(lib, model):
    head = _random_head(model, "eagle", True)
    compiled = head.compiled_layers()
    assert compiled is not None and head.compiled_layers() is compiled
    copied = copy.deepcopy(head)  # ctypes handles cannot be copied: the copy makes its own
    assert copied.compiled_layers() is not None and copied.compiled_layers() is not compiled
    head.to(torch.bfloat16)  # the same parameters, new storage: not the old weights' path
    moved = head.compiled_layers()
    assert moved is not compiled and moved.dtype == torch.bfloat16
    head.to(torch.float16)
    assert head.compiled_layers() is None
