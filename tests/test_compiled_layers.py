"""The compiled decoder layers (specframe.kernels.layers): transformers' layers within fp32
rounding (in bf16: closer to a float64 forward than transformers' bf16 layers), each row bitwise
independent of the rows beside it and of the thread count, token trees, and PyTorch's path
wherever they do not apply."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch

from specframe.kernels import build, layers
from specframe.kernels.layers import CompiledLayers, compiled_layers
from specframe.target import KVCache, TargetModel
from specframe.trees import tree_attention_mask, tree_positions

from .conftest import tiny_llama

HAS_COMPILER = any(shutil.which(name) for name in ("cc", "gcc", "clang"))


def _lib(dtype=torch.float32):
    if build.library(dtype) is None:
        if HAS_COMPILER:
            pytest.fail(f"a C compiler is on PATH but the few-row kernel for {dtype} did not build")
        pytest.skip("no C compiler: the PyTorch path is tested everywhere else")
    return build.library(dtype)


@pytest.fixture
def lib():
    return _lib()


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def dtype(request):
    """Each weight dtype with a build of the layers (skipped only without a C compiler)."""
    _lib(request.param)
    return request.param


def _reference(model, hidden: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """transformers' decoder layers over (S, C) states without a cache -> (S, C)."""
    inner = model.model
    with torch.inference_mode():
        rope = inner.rotary_emb(hidden[None], position_ids=positions)
        x = hidden[None]
        for layer in inner.layers:
            x = layer(x, attention_mask=mask, position_ids=positions, position_embeddings=rope)
    return x[0]


def _assert_fp32_close(got: torch.Tensor, model, hidden: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor):
    """`got` is transformers' fp32 result up to rounding: within a 1e-5 of the states' scale of
    it, and no further from the float64 result than twice transformers' own fp32 error."""
    expected = _reference(model, hidden, mask, positions)
    exact = _reference(copy.deepcopy(model).double(), hidden.double(), mask, positions).float()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    assert (got - exact).abs().max() <= 2 * (expected - exact).abs().max() + 1e-6


def _compiled(model, lib, hidden: torch.Tensor, chunks: list[int], mask: torch.Tensor | None = None,
              positions: torch.Tensor | None = None, split: int | None = None) -> torch.Tensor:
    """The compiled layers over (S, C) states in passes of `chunks` rows; the last pass may take a
    (1, 1, T, S) tree mask and (1, T) positions. `split`: each pass runs layers [0, split) and
    then the rest in a second call, as EESD's lower and upper layers. Runs in the model's dtype."""
    compiled, cache, inner, out, start = CompiledLayers(model, lib), KVCache(), model.model, [], 0
    hidden, layers = hidden.to(compiled.dtype), len(inner.layers)
    runs = [(0, layers)] if split is None else [(0, split), (split, layers)]
    with torch.inference_mode():
        for i, T in enumerate(chunks):
            last = i == len(chunks) - 1
            where = positions if last and positions is not None else torch.arange(start, start + T)[None]
            rope = inner.rotary_emb(hidden[None, start : start + T], position_ids=where)
            x = hidden[start : start + T]
            for first, end in runs:
                x = compiled.run(x, first, end, start, cache, rope, mask if last else None)
            out.append(x)
            start += T
    return torch.cat(out)


def _assert_bf16_closer_than_transformers(got: torch.Tensor, model, hidden: torch.Tensor, mask: torch.Tensor,
                                          positions: torch.Tensor):
    """`got`, from bf16 weights, is closer (root mean square error) to a float64 forward of the
    same bf16 weights than transformers' bf16 layers are: they round every step to bf16, the
    compiled layers only keys, values and each layer's output (measured: about half the error)."""
    model = copy.deepcopy(model).to(torch.bfloat16)
    hidden = hidden.to(torch.bfloat16)
    exact = _reference(copy.deepcopy(model).double(), hidden.double(), mask, positions)
    theirs = (_reference(model, hidden, mask, positions).double() - exact).square().mean().sqrt()
    assert got.dtype == torch.bfloat16
    assert (got.double() - exact).square().mean().sqrt() <= theirs


def _causal(S: int) -> torch.Tensor:
    return (torch.arange(S)[None, :] <= torch.arange(S)[:, None])[None, None]


def _llama(head_dim: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=16, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=head_dim, initializer_range=0.2)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def _assert_close_for(dtype):
    return _assert_fp32_close if dtype == torch.float32 else _assert_bf16_closer_than_transformers


def _in(model, dtype):
    return model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)


@pytest.mark.parametrize("T", [1, 2, 3, 4, 5, 8, 13, 16])
def test_layers_match_transformers_on_a_tiny_llama(dtype, T):
    model = tiny_llama(num_layers=3, seed=T, init=0.3, hidden_size=64)
    hidden = torch.randn(20 + T, 64, generator=torch.Generator().manual_seed(T))
    _assert_close_for(dtype)(_compiled(_in(model, dtype), _lib(dtype), hidden, [16, 4, T]), model, hidden,
                             _causal(20 + T), torch.arange(20 + T)[None])


@pytest.mark.parametrize("head_dim", [8, 10, 16, 32, 64, 128])  # the vector widths' multiples, and not
def test_layers_match_transformers_for_any_head_size(dtype, head_dim):
    model = _llama(head_dim, seed=head_dim)
    hidden = torch.randn(24, 48, generator=torch.Generator().manual_seed(head_dim))
    _assert_close_for(dtype)(_compiled(_in(model, dtype), _lib(dtype), hidden, [16, 3, 5]), model, hidden,
                             _causal(24), torch.arange(24)[None])


@pytest.mark.slow
def test_layers_match_transformers_on_the_default_model(lib, default_model):
    model, _ = default_model
    ids = torch.randint(0, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        hidden = model.model.embed_tokens(ids)
    _assert_fp32_close(_compiled(model, lib, hidden, [16, 16, 1, 7]), model, hidden, _causal(40),
                       torch.arange(40)[None])


@pytest.mark.parametrize("T", range(2, 17))  # every tile shape of the linear layers
def test_each_row_is_bitwise_the_row_of_a_one_token_pass(dtype, T):
    model = _in(tiny_llama(num_layers=3, seed=1, init=0.3, hidden_size=64), dtype)
    hidden = torch.randn(26 + T, 64, generator=torch.Generator().manual_seed(T))
    together = _compiled(model, _lib(dtype), hidden, [10, 16, T])
    alone = _compiled(model, _lib(dtype), hidden, [10, 16] + [1] * T)
    assert torch.equal(together, alone)


@pytest.mark.parametrize("T", [1, 4, 16])
def test_a_stack_split_in_two_calls_gives_bitwise_the_states_of_one(dtype, T):
    """EESD runs the lower layers for drafting and the upper ones to verify; plain decoding runs
    all in one call. In bf16 the states between the calls are bf16, so the compiled layers round
    every layer's output to bf16 and the split changes nothing."""
    model = _in(tiny_llama(num_layers=4, seed=2, init=0.3, hidden_size=64), dtype)
    hidden = torch.randn(12 + T, 64, generator=torch.Generator().manual_seed(T))
    one_call = _compiled(model, _lib(dtype), hidden, [12, T])
    assert all(torch.equal(one_call, _compiled(model, _lib(dtype), hidden, [12, T], split=n)) for n in (1, 2, 3))


@pytest.mark.parametrize("head_dim", [16, 32, 64, 40])
def test_the_folded_sums_are_bitwise_one_sum_at_a_time(dtype, head_dim, monkeypatch, tmp_path):
    """Attention scores (VL keys at a time) and the linear tiles fold their horizontal sums
    together; the layers built with -DSPECFRAME_SERIAL_SUMS sum each alone. Both give bitwise
    the same states, causal (over 16 keys and more, and fewer) and for a tree."""
    monkeypatch.setattr(build, "_kernel_dir", lambda: tmp_path)
    compiler = shutil.which("cc") or shutil.which("gcc")
    flags = (*build.CFLAGS, *build.KERNEL_DTYPES[dtype], "-DSPECFRAME_SERIAL_SUMS")
    serial, lib = build.load_library(build.build_library(compiler, flags), dtype), _lib(dtype)
    model = _in(_llama(head_dim, seed=head_dim), dtype)
    hidden = torch.randn(45, 48, generator=torch.Generator().manual_seed(head_dim))
    mask, positions = tree_attention_mask(PARENTS, 38, "cpu"), tree_positions(PARENTS, 38, "cpu")  # 7 rows
    for chunks, tree in (([5, 16, 16, 8], {}), ([16, 16, 6, 7], {"mask": mask, "positions": positions})):
        assert torch.equal(_compiled(model, lib, hidden, chunks, **tree), _compiled(model, serial, hidden, chunks, **tree))


@pytest.mark.parametrize("threads", [2, 3, 5])
def test_more_threads_give_bitwise_the_one_thread_rows(dtype, threads):
    model, lib = _in(tiny_llama(num_layers=3, seed=4, init=0.3, hidden_size=64), dtype), _lib(dtype)
    hidden = torch.randn(30, 64, generator=torch.Generator().manual_seed(4))
    mask, positions = tree_attention_mask(PARENTS, 23, "cpu"), tree_positions(PARENTS, 23, "cpu")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        many = [_compiled(model, lib, hidden, [16, 7, 7], mask, positions), _compiled(model, lib, hidden, [16, 14])]
        torch.set_num_threads(1)
        one = [_compiled(model, lib, hidden, [16, 7, 7], mask, positions), _compiled(model, lib, hidden, [16, 14])]
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(many, one))


PARENTS = (-1, 0, 0, 1, 3, 2)  # root -> 0 -> 1 -> 3 -> 4, and root -> 0 -> 2 -> 5


def test_a_tree_pass_matches_transformers_with_the_trees_mask(dtype):
    model, lib = tiny_llama(num_layers=3, seed=2, init=0.3, hidden_size=64), _lib(dtype)
    hidden = torch.randn(12 + len(PARENTS) + 1, 64, generator=torch.Generator().manual_seed(1))
    mask = tree_attention_mask(PARENTS, 12, "cpu")  # (1, 1, K+1, 12+K+1)
    positions = tree_positions(PARENTS, 12, "cpu")
    prefix_mask = torch.cat([_causal(12)[0, 0], torch.zeros(12, len(PARENTS) + 1, dtype=torch.bool)], dim=1)
    full_mask = torch.cat([prefix_mask, mask[0, 0]])[None, None]
    got = _compiled(_in(model, dtype), lib, hidden, [12, len(PARENTS) + 1], mask, positions)
    _assert_close_for(dtype)(got, model, hidden, full_mask, torch.cat([torch.arange(12)[None], positions], dim=1))


def test_each_tree_node_is_bitwise_a_chain_pass_over_its_path(dtype):
    model, lib = _in(tiny_llama(num_layers=3, seed=2, init=0.3, hidden_size=64), dtype), _lib(dtype)
    hidden = torch.randn(12 + len(PARENTS) + 1, 64, generator=torch.Generator().manual_seed(1))
    tree = _compiled(model, lib, hidden, [12, len(PARENTS) + 1], tree_attention_mask(PARENTS, 12, "cpu"),
                     tree_positions(PARENTS, 12, "cpu"))
    path = [0, 1, 3, 6]  # the scored rows of root, node 0, node 2, node 5
    chain = _compiled(model, lib, torch.cat([hidden[:12], hidden[12:][path]]), [12, len(path)])
    assert torch.equal(tree[12:][path], chain[12:])


def test_a_target_pass_takes_the_compiled_layers(dtype, tiny_model, monkeypatch):
    target = TargetModel(_in(tiny_model, dtype))
    assert target.compiled is not None
    calls = []
    run = CompiledLayers.run
    monkeypatch.setattr(CompiledLayers, "run", lambda self, hidden, *a: calls.append(hidden.shape[0])
                        or run(self, hidden, *a))
    target.forward(torch.arange(20))  # a prefill of more than 16 tokens keeps PyTorch's layers
    target.forward(torch.tensor([3, 4, 5]))
    assert calls == [3]


def test_transformers_output_capturing_hooks_do_not_turn_the_compiled_layers_off(lib, monkeypatch):
    """transformers leaves a hook on each layer after a call with output_hidden_states=True; it
    does nothing outside such a call, so the compiled layers still run (and give the same logits)."""
    model = tiny_llama(init=0.3)
    ids = torch.tensor([3, 4, 5, 6])
    with torch.no_grad():
        expected = model(ids[None], output_hidden_states=True).logits[0]
    assert model.model.layers[0]._forward_hooks, "transformers no longer leaves its hook: drop this test"
    calls = []
    run = CompiledLayers.run
    monkeypatch.setattr(CompiledLayers, "run", lambda self, hidden, *a: calls.append(hidden.shape[0])
                        or run(self, hidden, *a))
    target = TargetModel(model)
    torch.testing.assert_close(target.forward(ids), expected, atol=1e-5, rtol=1e-4)
    assert calls == [4]


def test_a_hook_on_a_layer_gives_it_its_own_forward(lib, tiny_model):
    model = tiny_llama(init=0.3)
    target = TargetModel(model)
    seen = []
    model.model.layers[1].register_forward_pre_hook(lambda module, args: seen.append(1))
    target.forward(torch.tensor([3, 4, 5]))
    assert seen == [1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_environment_switch_turns_the_compiled_layers_off(monkeypatch, tiny_model, dtype):
    monkeypatch.setenv(build.DISABLE_ENV, "0")
    build.library.cache_clear()
    try:
        assert TargetModel(_in(tiny_model, dtype)).compiled is None
    finally:
        build.library.cache_clear()


@pytest.mark.parametrize("change", ["fp16", "bias", "gelu", "mixed"])
def test_other_layers_keep_pytorchs_path(lib, change):
    from transformers import LlamaConfig, LlamaForCausalLM

    if change in ("fp16", "mixed"):
        model = tiny_llama(dtype=torch.float16 if change == "fp16" else torch.float32)
        if change == "mixed":  # one bf16 layer among fp32 ones
            model.model.layers[1].to(torch.bfloat16)
    else:
        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, attention_bias=change == "bias",
                             hidden_act="gelu" if change == "gelu" else "silu")
        model = LlamaForCausalLM(config).eval()
    assert compiled_layers(model) is None


def test_a_wrong_layer_kernel_is_refused(dtype, monkeypatch, tmp_path):
    monkeypatch.setattr(build, "_kernel_dir", lambda: tmp_path)
    broken = build.C_SOURCE.replace("gv / (splat(1.0f) + exp_lanes((vec){0} - gv)) * loadu(us)", "gv * loadu(us)")
    assert broken != build.C_SOURCE
    flags = (*build.CFLAGS, *build.KERNEL_DTYPES[dtype])
    wrong = build.load_library(build.build_library(shutil.which("cc") or shutil.which("gcc"), flags, broken), dtype)
    says = "from transformers' layers" if dtype == torch.float32 else "from a float64 forward of the same weights"
    assert says in layers._layer_check_error(wrong, dtype)
    assert layers._layer_check_error(_lib(dtype), dtype) is None
    monkeypatch.setattr(build, "library", lambda dtype=torch.float32: wrong)
    with pytest.warns(RuntimeWarning, match="compiled decoder layers are unavailable"):
        assert compiled_layers(tiny_llama(dtype=dtype)) is None


def test_verified_logits_are_bitwise_those_of_plain_one_token_passes(dtype):
    """What makes greedy speculative decoding exact, in fp32 and bf16: an EESD round (the drafts
    run through the lower layers one at a time, then verified through the upper ones in one
    pass) gives bitwise the logits of plain decoding's one-token passes through the whole stack."""
    model = tiny_llama(vocab_size=96, num_layers=4, seed=1, init=0.3, hidden_size=64, dtype=dtype)
    ids = torch.randint(0, 96, (26,), generator=torch.Generator().manual_seed(0))
    plain, eesd = TargetModel(model), TargetModel(model)
    assert plain.compiled is not None
    split = eesd.enable_split(2)
    for target in (plain, eesd):
        target.forward(ids[:20], logits_to_keep=1)  # a prefill over more than 16 tokens: PyTorch's layers
    alone = torch.cat([plain.forward(ids[i : i + 1]) for i in range(20, 26)])
    for i in range(20, 25):
        split.lower(ids[i : i + 1])  # drafting: one token at a time through layers [0, 2)
    assert torch.equal(eesd.forward(ids[20:26]), alone)
