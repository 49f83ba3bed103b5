"""Checkpoints of a head's training, so that an interrupted run resumes where it stopped.

`train_head` writes one every `minutes` of training, at each held-out evaluation and when it is
interrupted (Ctrl-C); the same command then resumes from it. A checkpoint holds the head's
weights, the optimizer and learning-rate schedule, the random state and the loop's progress, so
a resumed run trains as an uninterrupted one would. It also records what it was trained on and
how (`run_identity`): one from another run is refused with a clear error rather than mixed in.
Writes are atomic (a `.partial` file renamed), so a kill while writing keeps the previous one.
"""

from __future__ import annotations

import time
from pathlib import Path

import attrs
import torch
from attrs import define, field

from ..errors import ConfigError


class CheckpointMismatchError(ConfigError):
    """A training checkpoint made by a run with other settings or other data."""


@define
class TrainingProgress:
    """Where the training loop stands; what a checkpoint restores besides the tensors."""

    step: int = 0  # optimizer steps done
    seen: int = 0  # training positions seen
    smoothed: float | None = None  # exponentially smoothed loss
    minutes: float = 0.0  # training minutes before this process resumed
    curve: list = field(factory=list)  # held-out evaluations so far

    def advance(self, loss: float, positions: int) -> None:
        self.step += 1
        self.seen += positions
        self.smoothed = loss if self.smoothed is None else 0.95 * self.smoothed + 0.05 * loss


def run_identity(config, train, vocab_ids) -> dict:
    """What a checkpoint must match to be resumed: the training settings and the data."""
    return {"config": attrs.asdict(config), "sequences": len(train), "positions": int(train.hidden.shape[0]),
            "vocab": None if vocab_ids is None else vocab_ids.tolist()}


@define
class Checkpoints:
    """Checkpointing of one training run to `path` every `minutes` (0: only at evaluations and on Ctrl-C)."""

    path: Path = field(converter=Path)
    minutes: float = 10.0
    _last: float = field(factory=time.perf_counter, init=False)

    def due(self) -> bool:
        return self.minutes > 0 and time.perf_counter() - self._last >= 60 * self.minutes

    def save(self, identity: dict, progress: TrainingProgress, head, optimizer, schedule, generator) -> None:
        state = {"identity": identity, "progress": attrs.asdict(progress), "head": head.state_dict(),
                 "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                 "generator": generator.get_state(), "torch_rng": torch.get_rng_state()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        torch.save(state, partial)
        partial.replace(self.path)
        self._last = time.perf_counter()

    def resume(self, identity: dict, head, optimizer, schedule, generator) -> TrainingProgress | None:
        """Restore the run's state from the checkpoint, if there is one; its progress, else None."""
        if not self.path.exists():
            return None
        try:
            state = torch.load(self.path, weights_only=True)
        except Exception as exc:  # a truncated or foreign file: say which and what to do
            raise CheckpointMismatchError(f"could not read the training checkpoint {str(self.path)!r} ({exc}); "
                                          "delete it to train from the start") from None
        differs = _differences(state["identity"], identity)
        if differs:
            raise CheckpointMismatchError(
                f"{str(self.path)!r} is the checkpoint of another training run ({'; '.join(differs)}); rerun the "
                "command that made it to resume it, or delete it to train from the start")
        head.load_state_dict(state["head"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        return TrainingProgress(**state["progress"])

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _differences(saved: dict, current: dict) -> list[str]:
    saved_config, config = saved.get("config", {}), current["config"]
    differs = [f"{name}: {saved_config.get(name)!r} there, {value!r} here"
               for name, value in config.items() if saved_config.get(name) != value]
    for name in ("sequences", "positions"):
        if saved.get(name) != current[name]:
            differs.append(f"training data of {saved.get(name)} {name} there, {current[name]} here")
    if saved.get("vocab") != current["vocab"]:
        differs.append("another reduced vocabulary")
    return differs
