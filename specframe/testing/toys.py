"""Toy models and parts the kit drives other parts with. Shapes: K drafts, V vocabulary."""

from __future__ import annotations

import random
import types

import torch
from attrs import define, field

from ..interfaces import Controller, Drafter, Verifier
from ..trees import ROOT, path_to
from ..types import Draft, TreeVerdict, Verdict

VOCAB_SIZE = 16  # the vocabulary of the kit's toy models, so parts can be swapped between them


def tiny_llama(vocab_size: int = VOCAB_SIZE, num_layers: int = 6, seed: int = 0, logit_scale: float = 10.0,
               hidden_size: int = 32, init: float = 0.02, dtype: torch.dtype = torch.float32,
               max_positions: int = 1024):
    """A random Llama small enough to run hundreds of generations a second (the suite's too).

    `init` is the weights' standard deviation. The final norm is scaled by `logit_scale`, so that
    with the defaults its distributions are far from uniform and its greedy choices are not near
    ties (float error then cannot flip them). Seeding does not touch torch's global generator.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_positions, tie_word_embeddings=True, initializer_range=init,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.norm.weight.mul_(logit_scale)
    return model.to(dtype)


class TableLM(torch.nn.Module):
    """A toy causal LM whose next-token distribution depends on the last two tokens only.

    `log_probs[prev, cur]` (V,) is the log-distribution of the token after `cur` when `prev` came
    before it (prev = 0 at the first position); -inf marks impossible tokens. Float64, so exact
    checks hold to 1e-9. It keeps its history in the KV cache the engine hands it (token ids
    stored as keys), so a wrong rollback of the target's cache changes what it predicts.
    """

    def __init__(self, log_probs: torch.Tensor):  # (V, V, V)
        super().__init__()
        from transformers import PretrainedConfig

        V = log_probs.shape[-1]
        self.config = PretrainedConfig(vocab_size=V, num_hidden_layers=1)
        self.lm_head = torch.nn.Linear(1, V, bias=False)  # only its shape is used
        self.register_buffer("log_probs", log_probs.double())

    @classmethod
    def random(cls, vocab_size: int = VOCAB_SIZE, seed: int = 0, max_support: int = 3,
               min_support: int = 1) -> "TableLM":
        """Each row puts all its mass on min_support..max_support tokens, unevenly."""
        generator = torch.Generator().manual_seed(seed)
        V = vocab_size
        min_support, max_support = min(min_support, V), min(max_support, V)
        log_probs = torch.full((V, V, V), float("-inf"), dtype=torch.float64)
        for prev in range(V):
            for cur in range(V):
                support = int(torch.randint(min_support, max_support + 1, (), generator=generator))
                tokens = torch.randperm(V, generator=generator)[:support]
                weights = torch.rand(support, generator=generator, dtype=torch.float64) ** 2 + 0.05
                log_probs[prev, cur, tokens] = (weights / weights.sum()).log()
        return cls(log_probs)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, cache=None, **kwargs):
        """(1, T) ids -> an object whose .logits is (1, T, V)."""
        ids = input_ids[0].long().cpu()  # (T,)
        history = torch.empty(0, dtype=torch.long)
        if cache is not None and cache.get_seq_length() > 0:
            history = cache.layers[0].keys[0, 0, :, 0].long()  # (S,)
        if cache is not None:
            slot = ids.float().view(1, 1, -1, 1)
            cache.update(slot, slot, 0)
        full = torch.cat([history, ids])  # (S + T,)
        prev = torch.cat([full.new_zeros(1), full[:-1]])[-len(ids):]  # (T,)
        return types.SimpleNamespace(logits=self.log_probs[prev, ids][None])


@define
class KitController(Controller):
    """Draft up to k tokens; with stop_after set, say stop after that many."""

    k: int = 4
    stop_after: int | None = None

    def max_draft(self) -> int:
        return self.k

    def keep_drafting(self, drafted: int, confidence: float) -> bool:
        return self.stop_after is None or drafted < self.stop_after


@define
class ScriptedController(Controller):
    """Adversarial draft lengths: round r drafts lengths[(r + accepted so far) % len(lengths)],
    so the length depends on what was accepted before; with stop_below set it also stops a
    chain as soon as a draft's confidence falls below it; with widths set it plans tree widths
    the same way (`tree_width()`). Lossless decoding must stay exact under every such schedule."""

    lengths: tuple[int, ...] = (1, 2, 3, 4)
    stop_below: float | None = None
    widths: tuple[int, ...] = ()  # tree widths to plan, chosen like the lengths; () plans none
    rounds: int = field(default=0, init=False)
    accepted: int = field(default=0, init=False)

    def begin(self) -> None:
        self.rounds = self.accepted = 0

    def max_draft(self) -> int:
        return self.lengths[(self.rounds + self.accepted) % len(self.lengths)]

    def tree_width(self) -> int | None:
        return self.widths[(self.rounds + 2 * self.accepted) % len(self.widths)] if self.widths else None

    def keep_drafting(self, drafted: int, confidence: float) -> bool:
        return self.stop_below is None or confidence >= self.stop_below

    def update(self, round_stats) -> None:
        self.rounds += 1
        self.accepted += round_stats.accepted


@define
class TableDrafter(Drafter):
    """A model-free drafter on a (prev, cur) table, like TableLM's. sample=True draws each token from
    q = sampler.probs(row) and returns q; sample=False drafts the row's argmax with q=None."""

    log_probs: torch.Tensor = field(eq=False, repr=False)  # (V, V, V), any finite values
    sample: bool = True

    @classmethod
    def near(cls, target: TableLM, seed: int = 1, noise: float = 1.0, sample: bool = True) -> "TableDrafter":
        """A drafter whose table is a noisy copy of `target`'s, with every token possible."""
        generator = torch.Generator().manual_seed(seed)
        base = target.log_probs.clamp(min=-3.0)
        return cls(base + noise * torch.randn(base.shape, generator=generator, dtype=base.dtype), sample)

    def propose(self, context, max_tokens, controller, sampler) -> Draft:
        prev, cur = (context[-2] if len(context) > 1 else 0), context[-1]
        tokens, rows, confidences = [], [], []
        while len(tokens) < max_tokens:
            q_i = sampler.probs(self.log_probs[prev, cur][None])[0]  # (V,)
            token = sampler.sample(q_i) if self.sample else int(self.log_probs[prev, cur].argmax())
            tokens.append(token)
            rows.append(q_i)
            confidences.append(float(q_i.max()))
            prev, cur = cur, token
            if not controller.keep_drafting(len(tokens), confidences[-1]):
                break
        q = torch.stack(rows) if self.sample and tokens and not sampler.greedy else None
        return Draft(torch.tensor(tokens, dtype=torch.long), q, tuple(confidences))


@define
class ChaosVerifier(Verifier):
    """Accepts a random number of drafts and adds a random token (lossy on purpose): it makes the
    engine roll back often and the committed text hard to predict from rejected drafts."""

    lossless = False
    rng: random.Random = field(factory=lambda: random.Random(0))

    def verify(self, draft_tokens, q, p, sampler) -> Verdict:
        accepted = self.rng.randint(0, draft_tokens.shape[0])
        return Verdict(accepted, self.rng.randrange(p.shape[-1]))  # a random correction

    def verify_tree(self, draft, p, sampler) -> TreeVerdict:
        """A random accepted path (to a random node, or none), so branches off the tree's first
        chain are accepted too, and a random token after it."""
        last = self.rng.randrange(-1, len(draft))
        return TreeVerdict(tuple(path_to(draft.parents, last)) if last != ROOT else (), self.rng.randrange(p.shape[-1]))


class SpyDrafter(Drafter):
    """Records every proposal of the drafter it wraps: (context, max_tokens, the Draft)."""

    def __init__(self, inner: Drafter):
        self.inner, self.calls = inner, []

    def begin(self, target, prompt_ids, sampler) -> None:
        self.inner.begin(target, prompt_ids, sampler)

    def propose(self, context, max_tokens, controller, sampler) -> Draft:
        draft = self.inner.propose(context, max_tokens, controller, sampler)
        self.calls.append((list(context), max_tokens, draft))
        return draft

    def rollback(self, valid_length: int) -> None:
        self.inner.rollback(valid_length)
