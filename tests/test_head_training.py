"""Head training internals: the chunked token loss, bf16 matmuls, checkpoints that resume, the
shared evaluation loop and the memory-lean `DistillSet`."""

from __future__ import annotations

import pytest
import torch

from specframe.training.checkpoint import CheckpointMismatchError, Checkpoints
from specframe.training.dataset import DistillSet
from specframe.training.evaluation import EvalBatch, agreement
from specframe.training.head import HeadTraining, train_head
from specframe.training.losses import distill_loss
from specframe.training.precision import cpu_has_bf16_units, matmul_precision, resolve_train_dtype
from specframe.training.shards import ShardSettings, teacher_forced_shard

from .test_early_exit import EXIT_LAYER, greedy_sequences


def reference_loss(logits, ids, logprobs, weights, loss):
    """The token loss as first written: a stored (B, T, R) log-softmax, gathered."""
    picked = torch.log_softmax(logits.float(), -1).gather(-1, ids)
    total = torch.zeros(())
    if "kl" in loss:
        p = torch.softmax(logprobs, -1).nan_to_num(0.0)
        w = weights * torch.isfinite(logprobs).any(-1)
        total = total + (-(p * picked).sum(-1) * w).sum() / w.sum().clamp(min=1)
    if "ce" in loss:
        w = weights * torch.isfinite(logprobs[..., 0])
        total = total + (-picked[..., 0] * w).sum() / w.sum().clamp(min=1)
    return total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss", ["kl", "ce", "kl+ce"])
def test_the_chunked_loss_and_its_gradient_equal_the_log_softmax_formula(dtype, loss):
    generator = torch.Generator().manual_seed(0)
    B, T, R, K = 3, 70, 300, 8  # 210 rows: several chunks of 64 and a partial one
    logits = (torch.randn(B, T, R, generator=generator) * 3).to(dtype).requires_grad_()
    ids = torch.randint(0, R, (B, T, K), generator=generator)
    ids[0, 0] = 0  # repeated columns (tokens outside a reduced vocabulary all map to column 0)
    logprobs = torch.log_softmax(torch.randn(B, T, K, generator=generator), -1)
    logprobs[0, 1] = float("-inf")  # no expressible mass: the row is skipped by both terms
    logprobs[1, 2, 0] = float("-inf")  # argmax outside the vocabulary: skipped by ce only
    weights = torch.rand(B, T, generator=generator)
    weights[2, 10:] = 0  # padding
    expected = reference_loss(logits, ids, logprobs, weights, loss)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    value = distill_loss(logits, ids, logprobs, weights, loss)
    (grad,) = torch.autograd.grad(value, logits)
    assert grad.dtype == dtype
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)
    tolerance = dict(rtol=1e-4, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-6)  # ~ 1 bf16 ulp
    torch.testing.assert_close(grad.float(), expected_grad.float(), **tolerance)


def test_bf16_units_are_read_from_the_cpu_flags():
    assert cpu_has_bf16_units("processor: 0\nflags\t\t: fpu sse avx512f amx_bf16 amx_tile\n")
    assert cpu_has_bf16_units("flags : fpu avx512_bf16\n")
    assert not cpu_has_bf16_units("flags : fpu avx2 avx512f\n")
    assert resolve_train_dtype("fp32", "cpu") == "fp32" and resolve_train_dtype("bf16", "cpu") == "bf16"
    assert resolve_train_dtype("auto", "cpu") == ("bf16" if cpu_has_bf16_units() else "fp32")


def test_bf16_precision_runs_the_matmuls_in_bf16_and_keeps_fp32_weights():
    layer = torch.nn.Linear(8, 4)
    with matmul_precision("bf16", "cpu"):
        out = layer(torch.randn(2, 8))
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and layer.weight.grad.dtype == torch.float32
    with matmul_precision("fp32", "cpu"):
        assert layer(torch.randn(2, 8)).dtype == torch.float32


# ---- training that resumes ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_data(tiny_model):
    sequences = greedy_sequences(tiny_model, 48, 6, 24)
    settings = ShardSettings(layers=[EXIT_LAYER], max_prompt_tokens=6, batch_size=len(sequences), top_k=16,
                             order_seed=0, max_answer_tokens=24, store_final=True)
    shard = teacher_forced_shard(tiny_model, sequences, [6] * len(sequences), settings)
    return DistillSet.from_shards([shard], EXIT_LAYER)


def tiny_config(**changes) -> HeadTraining:
    settings = dict(layer=EXIT_LAYER, epochs=3, lr=3e-3, tokens_per_batch=256, eval_points=3, loss="kl+ce",
                    head_kind="eagle", train_dtype="fp32")
    return HeadTraining(**(settings | changes))


def interrupt_at_first_evaluation(message: str) -> None:
    if message.startswith("eval"):
        raise KeyboardInterrupt


@pytest.mark.parametrize("train_dtype", ["fp32", "bf16"])
def test_an_interrupted_training_resumes_to_the_same_head(tiny_model, tiny_data, tmp_path, train_dtype):
    """Interrupted at its first evaluation and rerun, training ends with the head, and curve, of
    an uninterrupted run: weights, optimizer, schedule, noise generator and progress come back."""
    config = tiny_config(train_dtype=train_dtype)
    expected, expected_curve, _ = train_head(tiny_model, tiny_data, tiny_data, config, None)
    checkpoints = Checkpoints(tmp_path / "run.checkpoint.pt", minutes=0)
    with pytest.raises(KeyboardInterrupt):
        train_head(tiny_model, tiny_data, tiny_data, config, None, interrupt_at_first_evaluation, checkpoints)
    assert checkpoints.path.exists()
    messages = []
    head, curve, _ = train_head(tiny_model, tiny_data, tiny_data, config, None, messages.append, checkpoints)
    assert any(m.startswith("resumed from") for m in messages), messages
    for name, tensor in expected.state_dict().items():
        torch.testing.assert_close(head.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    strip = lambda points: [{k: v for k, v in p.items() if k != "minutes"} for p in points]  # noqa: E731
    assert strip(curve) == strip(expected_curve)


def test_a_checkpoint_of_another_run_is_refused(tiny_model, tiny_data, tmp_path):
    checkpoints = Checkpoints(tmp_path / "run.checkpoint.pt", minutes=0)
    with pytest.raises(KeyboardInterrupt):
        train_head(tiny_model, tiny_data, tiny_data, tiny_config(), None, interrupt_at_first_evaluation, checkpoints)
    with pytest.raises(CheckpointMismatchError, match=r"lr: 0.003 there, 0.001 here.*delete it"):
        train_head(tiny_model, tiny_data, tiny_data, tiny_config(lr=1e-3), None, checkpoints=checkpoints)


# ---- evaluation and data ------------------------------------------------------------------------
def test_the_evaluation_loop_counts_what_the_scorer_chooses(tiny_model, tiny_data):
    """A scorer that picks the target's own argmax agrees everywhere; one that never does, nowhere."""
    from specframe.heads import EarlyExitHead

    head = EarlyExitHead(tiny_model, EXIT_LAYER)

    def scorer(batch: EvalBatch):
        _, ids, _, _, _, _ = tiny_data.collate(batch.indices, "cpu")
        return (("answer", ids[..., 0], batch.answer), ("prompt", ids[..., 0] + 1, batch.prompt))

    result = agreement(head, tiny_data, "cpu", scorer, tokens_per_batch=300)
    assert result["answer_acceptance"] == 1.0 and result["prompt_acceptance"] == 0.0
    assert result["answer_positions"] == tiny_data.answer_positions
    assert result["answer_positions"] + result["prompt_positions"] == tiny_data.hidden.shape[0]
    assert head.training, "the loop keeps the head's mode"


def test_a_distill_set_keeps_stored_dtypes_and_loads_features_only_when_asked(tiny_model, tiny_data, tmp_path):
    from safetensors.torch import save_file

    sequences = greedy_sequences(tiny_model, 6, 6, 8)
    settings = ShardSettings(layers=[EXIT_LAYER], max_prompt_tokens=6, batch_size=3, top_k=16, order_seed=0,
                             max_answer_tokens=8, store_final=True)
    shards = [teacher_forced_shard(tiny_model, sequences[i : i + 3], [6] * 3, settings) for i in (0, 3)]
    paths = [tmp_path / f"shard_{i}.safetensors" for i in range(2)]
    for shard, path in zip(shards, paths):
        save_file(shard, str(path))
    data = DistillSet.from_shards(paths, EXIT_LAYER, weights=[1.0, 0.5])
    assert data.top_ids.dtype == torch.int32 and data.top_logprobs.dtype == torch.float16
    for name, key in (("hidden", f"hidden_{EXIT_LAYER}"), ("final", "final"), ("top_ids", "top_ids"), ("tokens", "tokens")):
        assert torch.equal(getattr(data, name), torch.cat([s[key] for s in shards])), name
    assert data.weights.tolist() == [1.0] * 3 + [0.5] * 3
    assert DistillSet.from_shards(paths, EXIT_LAYER, features=False).final is None
    hidden, ids, logprobs, *_ = data.collate([0, 4], "cpu")
    assert hidden.dtype == torch.float32 and ids.dtype == torch.long and logprobs.dtype == torch.float32
