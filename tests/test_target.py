"""TargetModel: logits_to_keep returns the last rows of what a full pass returns."""

from __future__ import annotations

import pytest
import torch

from specframe.target import TargetModel


@pytest.mark.parametrize("layered", [True, False], ids=["layered", "generic"])
@pytest.mark.parametrize("keep", [1, 3])
def test_logits_to_keep_returns_the_last_rows_of_a_full_pass(tiny_model, layered, keep):
    ids = torch.tensor([5, 9, 2, 31, 7, 12])
    target = TargetModel(tiny_model, layered=layered)
    full = target.forward(ids)
    target.reset()
    kept = target.forward(ids, logits_to_keep=keep)
    assert kept.shape == (keep, full.shape[1])
    torch.testing.assert_close(kept, full[-keep:], rtol=1e-5, atol=1e-5)
    assert target.length == len(ids)
    assert target.cached_length() == len(ids)


def test_logits_to_keep_0_returns_every_row(tiny_model):
    target = TargetModel(tiny_model)
    assert target.forward(torch.tensor([1, 2, 3]), logits_to_keep=0).shape[0] == 3


# ---- the split a drafter sees (SplitView) -------------------------------------------------------
PROMPT = [5, 9, 2, 7, 7, 1, 3, 8, 4, 6]


def _count_layer_calls(model, layer: int) -> list[int]:
    """Tokens run through decoder layer `layer`, summed over calls (a forward pre-hook)."""
    counted = [0]
    model.model.layers[layer].register_forward_pre_hook(lambda module, args: counted.__setitem__(
        0, counted[0] + args[0].shape[1]) if args else None)
    return counted


def test_split_before_the_prefill_keeps_the_prompts_states_and_runs_each_layer_once():
    from .conftest import tiny_llama

    model = tiny_llama(init=0.3)
    target = TargetModel(model)
    split = target.enable_split(2)
    lower_calls, upper_calls = _count_layer_calls(model, 0), _count_layer_calls(model, 3)
    target.forward(torch.tensor(PROMPT), logits_to_keep=1)
    prompt_states = split.hidden(0, len(PROMPT))  # (T, C)
    assert prompt_states.shape == (len(PROMPT), model.config.hidden_size)
    split.lower(torch.tensor([4]))
    target.forward(torch.tensor([4, 2]))  # verification extends the lowered token
    assert lower_calls[0] == len(PROMPT) + 2 and upper_calls[0] == len(PROMPT) + 2  # every token once


def test_split_enabled_after_the_prefill_gives_the_same_prompt_states(tiny_model):
    early, late = TargetModel(tiny_model), TargetModel(tiny_model)
    early.enable_split(2)
    early.forward(torch.tensor(PROMPT))
    late.forward(torch.tensor(PROMPT))
    late_split = late.enable_split(2)  # the states of the cached prompt are computed when asked for
    torch.testing.assert_close(late_split.hidden(0, len(PROMPT)), early.enable_split(2).hidden(0, len(PROMPT)))
    token = torch.tensor([3])
    torch.testing.assert_close(late_split.lower(token), early.enable_split(2).lower(token))
    torch.testing.assert_close(late.forward(token), early.forward(token))


def test_split_view_checks_what_it_is_asked(tiny_model):
    from specframe.errors import PluginContractError, SpecframeError

    target = TargetModel(tiny_model)
    with pytest.raises(SpecframeError, match="exit layer must be in"):
        target.enable_split(0)
    split = target.enable_split(1)
    target.forward(torch.tensor(PROMPT))
    with pytest.raises(PluginContractError, match="split states exist only for tokens already run"):
        split.hidden(0, len(PROMPT) + 1)
    split.lower(torch.tensor([3]))
    with pytest.raises(PluginContractError, match="cannot move while lowered tokens await verification"):
        target.enable_split(2)


def test_the_engine_lets_the_drafter_split_before_the_prefill(registry):
    """early_exit enables its split in before_prefill, so its begin() reads the prompt's states
    from the prefill instead of running the prompt through the lower layers a second time."""
    from specframe import SpeculativeDecoder

    from .conftest import tiny_llama
    from .test_early_exit import train_tiny_head

    model = tiny_llama(init=0.3)
    head, _, _ = train_tiny_head(model, steps_epochs=1)
    decoder = SpeculativeDecoder(model, None, drafter="early_exit", controller="fixed",
                                 drafter_options={"head": head}, registry=registry)
    lower_calls = _count_layer_calls(model, 0)
    decoder.generate(PROMPT, max_new_tokens=2)  # prefill, then one round without room for a draft
    assert lower_calls[0] == len(PROMPT) + 1
