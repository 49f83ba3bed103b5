"""The few-row linear kernel: same products as F.linear, rows independent of the batch, routed
only inside TargetModel's passes, and PyTorch's kernels (or the packed oneDNN LM head) where it
cannot be used; fp32 and bf16 weights (the bf16 build widens them to fp32 and rounds as torch)."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F

from specframe import kernels
from specframe.kernels import attention, build, linear, threads
from specframe.kernels import FewRowKernels, KernelCheckError, build_library, few_rows_linear, load_library
from specframe.target import TargetModel

from .conftest import StubTokenizer, tiny_llama

HAS_COMPILER = any(shutil.which(name) for name in ("cc", "gcc", "clang"))


DTYPES = [torch.float32, torch.bfloat16]  # the weight dtypes with a build of the kernel


def _kernel(dtype=torch.float32):
    """The compiled kernel for `dtype`; only a machine without a C compiler may skip (that is the
    fallback's case)."""
    if kernels.library(dtype) is None:
        if HAS_COMPILER:
            pytest.fail(f"a C compiler is on PATH but the few-row kernel for {dtype} did not build")
        pytest.skip("no C compiler: the fallback tests cover this machine")
    return kernels.library(dtype)


@pytest.fixture
def kernel():
    return _kernel()


@pytest.fixture(params=DTYPES, ids=["fp32", "bf16"])
def dtype(request):
    """Each weight dtype with a kernel build (skipped only without a C compiler)."""
    _kernel(request.param)
    return request.param


@pytest.fixture
def no_kernel(monkeypatch):
    monkeypatch.setattr(build, "library", lambda dtype=torch.float32: None)


def _randn(*shape, generator, dtype=torch.float32):
    return torch.randn(*shape, generator=generator).to(dtype)


@pytest.mark.parametrize("rows", range(1, 17))
@pytest.mark.parametrize("K, N", [(576, 192), (37, 9), (96, 130)])  # tails in K and N
def test_kernel_matches_f_linear(kernel, rows, K, N):
    generator = torch.Generator().manual_seed(rows)
    x, w, b = (torch.randn(*shape, generator=generator) for shape in ((rows, K), (N, K), (N,)))
    torch.testing.assert_close(few_rows_linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(few_rows_linear(x[None], w, b), F.linear(x[None], w, b), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 2, 5, 8, 13, 16])
@pytest.mark.parametrize("K, N", [(576, 192), (37, 9), (96, 130)])
def test_the_bf16_kernel_is_f_linear_in_fp32_rounded_once(rows, K, N):
    """bf16 rows and weights, multiplied in fp32 and rounded to bf16 at the end: within a bf16
    step of the fp32 product of the same values (and F.linear in bf16 no closer)."""
    _kernel(torch.bfloat16)
    generator = torch.Generator().manual_seed(rows)
    x, w, b = (_randn(*shape, generator=generator, dtype=torch.bfloat16) for shape in ((rows, K), (N, K), (N,)))
    exact = F.linear(x.double(), w.double(), b.double())
    got = few_rows_linear(x, w, b)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), exact, rtol=2 ** -8, atol=1e-3)
    assert (got.double() - exact).abs().max() <= (F.linear(x, w, b).double() - exact).abs().max()


def test_each_row_is_bitwise_the_one_row_product(dtype):
    generator = torch.Generator().manual_seed(0)
    x, w = _randn(16, 200, generator=generator, dtype=dtype), _randn(67, 200, generator=generator, dtype=dtype)
    together = few_rows_linear(x, w)
    alone = torch.cat([few_rows_linear(x[i : i + 1], w) for i in range(16)])
    assert torch.equal(together, alone)


@pytest.mark.parametrize("rows", range(2, 17))
def test_every_tile_shape_gives_each_row_bitwise_its_one_row_product(dtype, rows):
    """2-16 rows take tiles of up to 8 rows (2 without AVX-512) against 3 or 4 weight rows, and
    narrower tiles at the ends of N: each row is still bitwise the one-row product, on 1 and 3
    threads."""
    generator = torch.Generator().manual_seed(rows)
    for K, N in ((576, 26), (37, 13), (64, 7)):  # N: a tail of 2 or 1 after blocks of 4 or 3
        x, w = _randn(rows, K, generator=generator, dtype=dtype), _randn(N, K, generator=generator, dtype=dtype)
        alone = torch.cat([few_rows_linear(x[i : i + 1], w) for i in range(rows)])
        assert torch.equal(few_rows_linear(x, w), alone), (K, N)
        before = torch.get_num_threads()
        try:
            torch.set_num_threads(3)
            assert torch.equal(few_rows_linear(x, w), alone), (K, N, "3 threads")
        finally:
            torch.set_num_threads(before)


def test_the_folded_sums_are_bitwise_one_sum_at_a_time(dtype, monkeypatch, tmp_path):
    """A tile's horizontal sums are folded together by shuffles; built with
    -DSPECFRAME_SERIAL_SUMS, the kernel sums each accumulator alone (the order every sum had
    before). Both builds give bitwise the same products, so the folding changed no result."""
    monkeypatch.setattr(build, "_kernel_dir", lambda: tmp_path)
    compiler = shutil.which("cc") or shutil.which("gcc")
    flags = (*build.CFLAGS, *build.KERNEL_DTYPES[dtype], "-DSPECFRAME_SERIAL_SUMS")
    serial = load_library(build_library(compiler, flags, kernels.C_SOURCE), dtype)
    generator = torch.Generator().manual_seed(0)
    for rows in range(1, 17):
        for K, N in ((576, 26), (37, 13)):
            x, w = torch.randn(rows, K, generator=generator), _randn(N, K, generator=generator, dtype=dtype)
            folded, one_at_a_time = torch.empty(rows, N), torch.empty(rows, N)
            for lib, y in ((kernels.library(dtype), folded), (serial, one_at_a_time)):
                lib.specframe_few_rows_linear(x.data_ptr(), w.data_ptr(), y.data_ptr(), rows, K, N, 1)
            assert torch.equal(folded, one_at_a_time), (rows, K, N)


def test_a_wrong_kernel_is_refused(kernel, monkeypatch, tmp_path):
    monkeypatch.setattr(build, "_kernel_dir", lambda: tmp_path)
    broken = kernels.C_SOURCE.replace("for (int kk = k; kk < K; kk++) s +=", "for (int kk = k; kk < K; kk++) s -=")
    with pytest.raises(KernelCheckError, match="wrongly"):
        load_library(build_library(shutil.which("cc") or shutil.which("gcc"), kernels.CFLAGS, broken))


def _bf16_build(source: str):
    return build_library(shutil.which("cc") or shutil.which("gcc"), (*kernels.CFLAGS, "-DSPECFRAME_BF16"), source)


def test_the_bf16_kernel_rounds_as_torch_does():
    """Keys and values go into a bf16 cache rounded to nearest, ties to even, as torch rounds:
    bitwise on ties both ways, the largest values, overflow, subnormals and random values."""
    lib = _kernel(torch.bfloat16)
    values = build.rounding_cases()
    got = build.to_weights(lib, values, torch.bfloat16)
    assert torch.equal(got.view(torch.int16), values.to(torch.bfloat16).view(torch.int16))
    assert build.to_weights(lib, torch.tensor([float("nan")]), torch.bfloat16).isnan().all()


@pytest.mark.parametrize("wrong, instead, says", [
    ("(u + 0x7fffu + ((u >> 16) & 1u)) >> 16", "u >> 16", "rounds"),  # truncation instead of rounding to even
    ("#define BF16_SHIFT 16", "#define BF16_SHIFT 15", "wrongly")])  # bf16 weights widened with the wrong shift
def test_a_wrong_bf16_kernel_is_refused(monkeypatch, tmp_path, wrong, instead, says):
    monkeypatch.setattr(build, "_kernel_dir", lambda: tmp_path)
    broken = kernels.C_SOURCE.replace(wrong, instead)
    assert broken != kernels.C_SOURCE
    with pytest.raises(KernelCheckError, match=says):
        load_library(_bf16_build(broken), torch.bfloat16)


def test_a_library_for_other_weights_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(build, "_kernel_dir", lambda: tmp_path)
    with pytest.raises(KernelCheckError, match="2-byte weights"):
        load_library(_bf16_build(kernels.C_SOURCE), torch.float32)


@pytest.mark.parametrize("dtype, name", [(torch.float32, "few-row kernel is"),
                                         (torch.bfloat16, "few-row kernel for bf16 weights is")])
def test_a_failing_compiler_falls_back_with_a_warning(monkeypatch, tmp_path, dtype, name):
    monkeypatch.setattr(build, "_kernel_dir", lambda: tmp_path)
    monkeypatch.setenv("CC", "false")
    kernels.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=f"{name} unavailable"):
            assert kernels.library(dtype) is None
    finally:
        kernels.library.cache_clear()


def test_the_environment_switch_turns_the_kernel_off(monkeypatch):
    monkeypatch.setenv(kernels.DISABLE_ENV, "0")
    kernels.library.cache_clear()
    try:
        assert kernels.library() is None
    finally:
        kernels.library.cache_clear()


@pytest.mark.parametrize("t", range(1, 17))
def test_target_logits_match_pytorch_for_1_to_16_new_tokens(kernel, t):
    model = tiny_llama(vocab_size=96, num_layers=3, seed=t, init=0.3, hidden_size=64)
    ids = torch.randint(0, 96, (20 + t,), generator=torch.Generator().manual_seed(t))
    target = TargetModel(model)
    target.forward(ids[:20], logits_to_keep=1)
    fast = target.forward(ids[20:])  # (t, V)
    with torch.inference_mode():
        stock = model(ids[None]).logits[0, 20:]
    torch.testing.assert_close(fast, stock, rtol=1e-4, atol=1e-4)


def test_a_pass_routes_every_linear_through_the_kernel(kernel, tiny_model, monkeypatch):
    calls = []
    monkeypatch.setattr(linear, "few_rows_linear", lambda *args: calls.append(args[1].shape) or F.linear(*args))
    target = TargetModel(tiny_model)
    target.compiled = None  # the PyTorch path of the layers, as for a model the compiled layers do not cover
    target.forward(torch.tensor([3, 4, 5]))
    layers = tiny_model.config.num_hidden_layers
    assert len(calls) == 7 * layers + 1  # q, k, v, o, gate, up, down per layer, and the LM head


def test_the_model_is_untouched_outside_a_pass(kernel, tiny_model):
    target = TargetModel(tiny_model)
    with target.kernels, target.kernels:  # blocks nest
        assert "forward" in vars(tiny_model.lm_head)
    target.forward(torch.tensor([1, 2, 3]))
    assert not any("forward" in vars(m) for m in tiny_model.modules())
    assert tiny_model.config._attn_implementation == "sdpa"


def test_a_layer_with_its_own_forward_is_left_alone(kernel):
    model = tiny_llama()
    hooked = model.model.layers[0].mlp.down_proj
    hooked.forward = own = lambda x: F.linear(x, hooked.weight)
    with FewRowKernels(model):
        assert hooked.forward is own
        assert "forward" in vars(model.model.layers[0].mlp.up_proj)


def test_fp32_greedy_equals_hf_generate_through_the_engine(kernel):
    from specframe import SpeculativeDecoder

    model = tiny_llama(vocab_size=64, num_layers=4, seed=3, init=0.3)
    prompt = [5, 9, 2, 31, 7, 12, 5, 9]
    with torch.inference_mode():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt):]
    for drafter in (None, "ngram"):
        decoder = SpeculativeDecoder(model, StubTokenizer(), drafter=drafter, controller="fixed")
        assert decoder.target.kernels.path == "compiled few-row kernel"
        got = decoder.generate(prompt, max_new_tokens=24, temperature=0.0).tokens
        assert got == expected.tolist(), drafter


def test_without_a_kernel_a_few_rows_take_the_packed_lm_head(no_kernel, tiny_model):
    target = TargetModel(tiny_model)
    assert target.kernels.path == ("oneDNN LM head" if torch.backends.mkldnn.is_available() else "PyTorch")
    hidden = torch.randn(3, tiny_model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    expected = tiny_model.lm_head(tiny_model.model.norm(hidden))
    torch.testing.assert_close(target.logits(hidden), expected, rtol=1e-5, atol=1e-5)
    if torch.backends.mkldnn.is_available():
        assert target.kernels._routes[0][1].packed is not None  # the few-row path was taken


def test_without_a_kernel_one_row_never_packs_the_lm_head(no_kernel, tiny_model):
    target = TargetModel(tiny_model)
    target.logits(torch.randn(1, tiny_model.config.hidden_size))
    assert all("packed" not in vars(route) for _, route in target.kernels._routes)


def test_other_dtypes_keep_pytorch_kernels(tiny_model):
    model = copy.deepcopy(tiny_model).to(torch.float16)
    target = TargetModel(model)
    assert target.kernels._routes == []
    hidden = torch.randn(3, model.config.hidden_size, dtype=torch.float16)
    assert target.logits(hidden).shape == (3, model.config.vocab_size)


def test_a_bf16_model_routes_its_linears_through_the_bf16_kernel(tiny_model, monkeypatch):
    _kernel(torch.bfloat16)
    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    target = TargetModel(model)
    assert target.kernels.path == "compiled few-row kernel"
    assert len(target.kernels._routes) == 7 * model.config.num_hidden_layers + 1
    hidden = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    calls = []
    monkeypatch.setattr(linear, "few_rows_linear", lambda *args: calls.append(args[1].dtype) or F.linear(*args))
    with torch.inference_mode():
        logits = target.logits(hidden)
    assert calls == [torch.bfloat16] and logits.dtype == torch.bfloat16


def test_with_the_kernels_off_a_bf16_model_keeps_pytorch_kernels(tiny_model, monkeypatch):
    monkeypatch.setenv(kernels.DISABLE_ENV, "0")
    kernels.library.cache_clear()
    try:
        target = TargetModel(copy.deepcopy(tiny_model).to(torch.bfloat16))
        assert target.kernels._routes == [] and target.kernels.path == "PyTorch" and target.compiled is None
    finally:
        kernels.library.cache_clear()


@pytest.mark.parametrize("T", [1, 2, 5, 16, 17])
def test_few_row_attention_matches_transformers_sdpa(tiny_model, T):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from specframe.kernels import few_row_attention
    from specframe.target import causal_mask

    module = tiny_model.model.layers[0].self_attn  # 4 query heads on 2 key/value heads
    generator = torch.Generator().manual_seed(T)
    query = torch.randn(1, 4, T, 8, generator=generator)
    key, value = (torch.randn(1, 2, 30 + T, 8, generator=generator) for _ in range(2))
    mask = causal_mask(T, 30, "cpu")
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=module.scaling)
    got, _ = few_row_attention(module, query, key, value, mask, scaling=module.scaling)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_a_verification_pass_gives_bitwise_the_logits_of_one_token_passes(kernel):
    model = tiny_llama(vocab_size=96, num_layers=3, seed=1, init=0.3, hidden_size=64)
    ids = torch.randint(0, 96, (28,), generator=torch.Generator().manual_seed(0))
    target = TargetModel(model)
    target.forward(ids[:20], logits_to_keep=1)
    together = target.forward(ids[20:])  # (8, V)
    target.rollback(20)
    alone = torch.cat([target.forward(ids[i : i + 1]) for i in range(20, 28)])
    assert torch.equal(together, alone)


def test_a_pass_runs_the_few_row_attention(tiny_model, monkeypatch):
    calls = []
    original = attention.few_row_attention
    monkeypatch.setattr(attention, "few_row_attention",
                        lambda *a, **k: calls.append(a[1].shape[2]) or original(*a, **k))
    from transformers import AttentionInterface

    target = TargetModel(tiny_model)  # registers the (patched) few-row attention
    target.compiled = None
    try:
        target.forward(torch.tensor([3, 4, 5]))
    finally:
        AttentionInterface.register(kernels.ATTENTION, original)
    assert calls == [3] * tiny_model.config.num_hidden_layers


def _threads_seen(monkeypatch, tiny_model, settings: int, env: str | None,
                  idle: tuple[float, ...] = (1.0,)) -> tuple[set[int], list[int]]:
    """Threads torch had in each target pass, and in the caller between tokens and after, with
    `idle` the idle CPUs each look at the load finds (the last repeated)."""
    from specframe import SpeculativeDecoder

    if env is None:
        monkeypatch.delenv(kernels.THREADS_ENV, raising=False)  # a bench run in this process sets it
    else:
        monkeypatch.setenv(kernels.THREADS_ENV, env)
    looks = iter(idle)
    monkeypatch.setattr(threads._LOAD, "idle_cpus", lambda: next(looks, idle[-1]))
    monkeypatch.setattr(threads, "RECHECK_SECONDS", 0.0)  # look at every step
    inside, outside = set(), []
    forward = TargetModel.forward
    monkeypatch.setattr(TargetModel, "forward", lambda self, *a, **k: inside.add(torch.get_num_threads())
                        or forward(self, *a, **k))
    decoder = SpeculativeDecoder(tiny_model, StubTokenizer(), drafter="ngram", controller="fixed")
    before = torch.get_num_threads()
    torch.set_num_threads(settings)
    try:
        for _ in decoder.stream_tokens([5, 9, 2, 31, 7], max_new_tokens=6):
            outside.append(torch.get_num_threads())
        outside.append(torch.get_num_threads())
    finally:
        torch.set_num_threads(before)
    return inside, outside


@pytest.mark.parametrize("env, idle, expected", [(None, (0.5,), {1}), ("auto", (2.0,), {2}), (None, (9.0,), {3}),
                                                 ("2", (0.0,), {2}), ("torch", (0.0,), {3})])
def test_generation_runs_at_the_chosen_threads_and_gives_the_caller_its_own(monkeypatch, tiny_model, env, idle,
                                                                           expected):
    inside, outside = _threads_seen(monkeypatch, tiny_model, 3, env, idle)
    assert inside == expected
    assert set(outside) == {3}


def test_a_generation_follows_the_load_as_it_goes(monkeypatch, tiny_model):
    inside, _ = _threads_seen(monkeypatch, tiny_model, 2, None, (2.0, 2.0, 0.6))
    assert inside == {2, 1}


def test_without_a_reading_of_the_load_a_generation_starts_on_one_thread(monkeypatch, tiny_model):
    inside, _ = _threads_seen(monkeypatch, tiny_model, 2, None, (None,))
    assert inside == {1}


def test_niced_work_counts_as_busy(monkeypatch, tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  10 250 20 700 0 0 0 0 0 0\ncpu0 0 0 0 0 0 0 0 0 0 0\n")
    opened = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: opened(stat if path == "/proc/stat" else path, *a, **k))
    assert threads._reading()[1:3] == (280, 980)  # busy: user + nice + system (+ interrupts, steal); all


@pytest.mark.parametrize("idle, cap, expected", [(0.0, 2, 1), (0.79, 2, 1), (0.85, 2, 1), (1.5, 2, 1), (1.85, 2, 2),
                                                 (7.9, 2, 2), (3.9, 8, 4)])
def test_threads_follow_the_idle_cpus(idle, cap, expected):
    assert threads.threads_from_load(idle, cap) == expected


def test_idle_cpus_leave_out_this_process(monkeypatch):
    readings = iter([(0.0, 0, 0, 0), (1.0, 100, 200, 100), (2.0, 300, 400, 200), (20.0, 300, 600, 200)])
    monkeypatch.setattr(threads, "_reading", lambda: next(readings))
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    load = threads._Load()
    assert load.idle_cpus() is None  # one reading: nothing to compare
    assert load.idle_cpus() == 2.0  # all the busy time was this process's
    assert load.idle_cpus() == 1.0  # another process kept one CPU busy
    assert load.idle_cpus() is None  # too long since the last reading to tell


def test_a_bad_thread_setting_is_a_config_error(monkeypatch, tiny_model):
    from specframe.errors import ConfigError

    with pytest.raises(ConfigError, match="SPECFRAME_THREADS must be a whole number"):
        _threads_seen(monkeypatch, tiny_model, 1, "many")


@pytest.mark.parametrize("threads", [2, 3])
def test_the_kernel_on_more_threads_gives_bitwise_the_one_thread_product(dtype, threads):
    generator = torch.Generator().manual_seed(threads)
    x, w = _randn(7, 96, generator=generator, dtype=dtype), _randn(130, 96, generator=generator, dtype=dtype)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        many = few_rows_linear(x, w)
        torch.set_num_threads(1)
        one = few_rows_linear(x, w)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(many, one)


def test_few_row_attention_leaves_a_sliding_window_to_transformers(tiny_model):
    from transformers.integrations import sdpa_attention

    from specframe.kernels import few_row_attention

    module = tiny_model.model.layers[0].self_attn
    calls = []
    original = sdpa_attention.sdpa_attention_forward
    sdpa_attention.sdpa_attention_forward = lambda *a, **k: calls.append(k) or original(*a, **k)
    try:
        query, key = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 33, 8)
        few_row_attention(module, query, key, key, None, scaling=module.scaling, sliding_window=16)
    finally:
        sdpa_attention.sdpa_attention_forward = original
    assert calls and calls[0]["sliding_window"] == 16
