"""EarlyExitHead storage: round trip, the model-mismatch error, damaged files, KV-cache rollback."""

from __future__ import annotations

import json

import pytest
import torch

from specframe.errors import ModelMismatchError, SpecframeError
from specframe.heads import EarlyExitHead, HeadFileError, model_fingerprint, read_head_file

from .conftest import tiny_llama


@pytest.fixture()
def head(tiny_model):
    torch.manual_seed(0)
    head = EarlyExitHead(tiny_model, exit_layer=2, vocab_ids=torch.tensor([0, 3, 5, 7, 11, 40]))
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    return head.eval()


def test_save_load_round_trip(tmp_path, tiny_model, head):
    path = head.save_pretrained(tmp_path / "h.safetensors", training_command="specframe train early-exit --seed 3",
                                seed=3, acceptance={"heldout_greedy_top1": 0.5})
    loaded = EarlyExitHead.from_pretrained(path, tiny_model)
    assert loaded.exit_layer == 2 and loaded.vocab_ids.tolist() == [0, 3, 5, 7, 11, 40]
    assert loaded.metadata["training_command"] == "specframe train early-exit --seed 3"
    assert loaded.metadata["acceptance"]["heldout_greedy_top1"] == 0.5
    hidden = torch.randn(2, 7, tiny_model.config.hidden_size)
    with torch.no_grad():  # stored in fp16: equal to fp16 precision
        torch.testing.assert_close(loaded(hidden), head(hidden), atol=2e-2, rtol=1e-2)


def test_loading_on_another_model_is_a_clear_mismatch_error(tmp_path, tiny_model, head):
    path = head.save_pretrained(tmp_path / "h.safetensors")
    other_weights = tiny_llama(init=0.3, seed=1)
    with pytest.raises(ModelMismatchError, match="different weights"):
        EarlyExitHead.from_pretrained(path, other_weights)
    other_shape = tiny_llama(init=0.3, hidden_size=48)
    with pytest.raises(ModelMismatchError, match="hidden_size: head 32 vs model 48"):
        EarlyExitHead.from_pretrained(path, other_shape)


def test_the_fingerprint_ignores_the_dtype(tiny_model):
    from specframe.heads import fingerprint_mismatch

    bf16 = tiny_llama(init=0.3).to(torch.bfloat16)
    assert fingerprint_mismatch(model_fingerprint(tiny_model), model_fingerprint(bf16)) is None


@pytest.mark.parametrize("damage", ["truncate", "garbage", "no_metadata", "bad_metadata", "missing"])
def test_damaged_files_raise_a_head_file_error(tmp_path, tiny_model, head, damage):
    from safetensors.torch import save_file

    path = head.save_pretrained(tmp_path / "h.safetensors")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00\x01 not a safetensors file" * 10)
    elif damage == "no_metadata":
        save_file({"x": torch.zeros(2)}, str(path))
    elif damage == "bad_metadata":
        save_file({"x": torch.zeros(2)}, str(path), metadata={"specframe_head": "{not json"})
    else:
        path.unlink()
    with pytest.raises(HeadFileError) as info:
        EarlyExitHead.from_pretrained(path, tiny_model)
    assert isinstance(info.value, SpecframeError) and str(path) in str(info.value)


def test_metadata_is_readable_json(tmp_path, head):
    path = head.save_pretrained(tmp_path / "h.safetensors", data={"train_prompts": 10})
    header, tensors = read_head_file(path)
    assert header["exit_layer"] == 2 and header["data"] == {"train_prompts": 10}
    assert json.dumps(header["fingerprint"])
    assert all(t.dtype in (torch.float16, torch.int32) for t in tensors.values())


def test_cached_extension_matches_teacher_forcing_and_rolls_back(head, tiny_model):
    hidden = torch.randn(9, tiny_model.config.hidden_size)
    with torch.no_grad():
        full = head(hidden[None])[0]  # (T, R)
    head.reset_cache()
    head.extend(hidden[:4], logits=False)
    step = torch.cat([head.extend(hidden[i : i + 1]) for i in range(4, 7)])
    torch.testing.assert_close(step, full[4:7], atol=1e-5, rtol=1e-4)
    head.rollback(5)  # keep positions 0..4, redo 5.. with the same states
    torch.testing.assert_close(head.extend(hidden[5:9]), full[5:9], atol=1e-5, rtol=1e-4)


def test_full_vocab_logits_are_minus_inf_outside_the_subset(head, tiny_model):
    logits = head.to_full_vocab(torch.randn(2, 6))
    outside = torch.ones(tiny_model.config.vocab_size, dtype=torch.bool)
    outside[head.vocab_ids] = False
    assert torch.isinf(logits[:, outside]).all() and torch.isfinite(logits[:, ~outside]).all()


@pytest.mark.parametrize("vocab_ids", [None, torch.tensor([0, 3, 5, 7, 11, 40])])
def test_an_fp32_head_on_a_bf16_target_casts_the_frozen_lm_head_once(vocab_ids):
    """The dtype policy of training: the target in bf16, the head trainable in fp32; the frozen LM
    head is cast once to fp32 (not per step), and the drafting copy is back in the target's dtype."""
    target = tiny_llama(init=0.3).to(torch.bfloat16)
    head = EarlyExitHead(target, exit_layer=2, vocab_ids=vocab_ids).float()
    hidden = torch.randn(2, 5, target.config.hidden_size)  # fp32 states, as DistillSet.collate gives
    logits = head(hidden)
    assert logits.dtype == torch.float32 and logits.shape[-1] == (64 if vocab_ids is None else 6)
    assert head.frozen_lm_weight() is head.frozen_lm_weight()  # one copy, kept
    assert target.get_output_embeddings().weight.dtype == torch.bfloat16  # the target is untouched
    drafting = head.drafting_copy(target)
    assert drafting.norm.weight.dtype == torch.bfloat16
    assert drafting.frozen_lm_weight().data_ptr() == target.get_output_embeddings().weight.data_ptr()  # shared
