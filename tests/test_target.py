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
