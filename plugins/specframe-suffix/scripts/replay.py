"""Replay recorded greedy outputs through drafters, without running the model.

At temperature 0 the committed text does not depend on the drafter, so the rounds a drafter
needs follow from the output alone: each round it drafts from the committed context, the longest
prefix that equals the true continuation is accepted, plus one token of the target. This gives
exactly the acceptance and mean accepted length that `specframe bench` measures, in seconds,
and an estimate of the speed-up from the fp32 cost of verifying t tokens at once, relative to
one (the table in specframe's design brief). Mean accepted length here counts the tokens after
the prefill's first one per round.

    python scripts/replay.py --distill ~/.cache/specframe/distill/train-* --shards 2 \
        "ngram+heuristic" "suffix+heuristic" "suffix:min_prob=0.3+heuristic"
    python scripts/replay.py --bench bench-results/results.jsonl "suffix+fixed"

--distill reads the target's greedy outputs for ShareGPT *training* prompts written by
`specframe train` (use these to tune options); --bench reads the `specframe` (plain decoding)
records of a bench run (only to check a bench's accepted lengths, not to tune on).
"""

from __future__ import annotations

import argparse
import glob
import json

from specframe.plugins import PluginRegistry
from specframe.sampling import Sampler
from specframe.types import RoundStats, SamplingConfig

VERIFY_COST = {1: 1.0, 2: 1.15, 3: 1.23, 4: 1.6, 5: 1.7, 6: 1.78, 7: 1.9, 8: 2.03}  # forward of t tokens, fp32


def verify_cost(tokens: int) -> float:
    return VERIFY_COST.get(tokens, 2.03 + 0.12 * (tokens - 8))


def replay(drafter, controller, prompt: list[int], generated: list[int]) -> tuple[int, int, int, float]:
    """(rounds, drafted, accepted, cost in forward passes) of one greedy generation."""
    greedy = Sampler(SamplingConfig(0.0))
    controller.begin()
    drafter.begin(None, prompt, greedy)  # drafters that need the target cannot be replayed
    context, position = prompt + generated[:1], 1  # the first token comes from the prefill
    rounds = drafted = accepted = 0
    cost = 0.0
    while position < len(generated):
        budget = min(controller.max_draft(), len(generated) - position - 1)
        draft = drafter.propose(list(context), budget, controller, greedy).tokens.tolist() if budget > 0 else []
        truth = generated[position : position + len(draft)]
        kept = next((i for i, (d, t) in enumerate(zip(draft, truth)) if d != t), len(draft))
        committed = generated[position : position + kept + 1]
        context += committed
        position += len(committed)
        drafter.rollback(len(context) - 1)
        controller.update(RoundStats(len(draft), kept))
        rounds, drafted, accepted = rounds + 1, drafted + len(draft), accepted + kept
        cost += verify_cost(len(draft) + 1)
    return rounds, drafted, accepted, cost


def distill_outputs(directories: list[str], shards: int) -> list[tuple[list[int], list[int]]]:
    from safetensors.torch import load_file

    outputs = []
    paths = sorted(p for d in directories for p in glob.glob(f"{d}/shard_*.safetensors"))[:shards]
    for path in paths:
        tensors = load_file(path)
        tokens, start = tensors["tokens"].tolist(), 0
        for length, prompt_length in zip(tensors["lengths"].tolist(), tensors["prompt_lengths"].tolist()):
            sequence = tokens[start : start + length]
            start += length
            outputs.append((sequence[:prompt_length], sequence[prompt_length:]))
    return outputs


def bench_outputs(path: str) -> list[tuple[list[int], list[int]]]:
    from specframe.decoder import SpeculativeDecoder
    from specframe.models import default_model_dir
    from transformers import AutoTokenizer

    run = json.load(open(path.replace("results.jsonl", "run.json")))
    questions = {str(q["question_id"]): q for q in map(json.loads, open(run["dataset"]))}
    encoder = SpeculativeDecoder.__new__(SpeculativeDecoder)
    encoder.tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    outputs = []
    for record in map(json.loads, open(path)):
        if record["method"] == "specframe" and "tokens" in record:
            prompt = encoder.encode(questions[record["prompt_id"]]["turns"][0], run.get("chat"))
            assert len(prompt) == record["prompt_tokens"], "prompt encoding differs from the bench's"
            outputs.append((prompt, record["tokens"]))
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--distill", nargs="+", metavar="DIR", help="self-distillation data folders")
    source.add_argument("--bench", metavar="RESULTS", help="a bench run's results.jsonl")
    parser.add_argument("--shards", type=int, default=2, help="distillation shards to read (32 outputs each)")
    parser.add_argument("methods", nargs="+", help="DRAFTER[:k=v,...]+CONTROLLER[:k=v,...]")
    args = parser.parse_args()
    outputs = distill_outputs(args.distill, args.shards) if args.distill else bench_outputs(args.bench)
    print(f"{len(outputs)} outputs, {sum(len(g) for _, g in outputs)} generated tokens")
    from specframe.bench import parse_method

    registry = PluginRegistry(autoload=True)
    for text in args.methods:
        method = parse_method(text, registry)
        drafter = registry.create("drafter", method.drafter, method.options_of("drafter"))
        controller = registry.create("controller", method.controller, method.options_of("controller"))
        totals = [0, 0, 0, 0.0]
        for prompt, generated in outputs:
            if len(generated) > 1:
                for i, value in enumerate(replay(drafter, controller, prompt, generated)):
                    totals[i] += value
        tokens = sum(len(g) - 1 for _, g in outputs if len(g) > 1)  # tokens after the prefill's
        rounds, drafted, accepted, cost = totals
        print(f"{method.label:40} mean accepted length {tokens / rounds:.3f}"
              f"  acceptance {accepted / max(1, drafted):.3f}"
              f"  drafts/round {drafted / rounds:.2f}  est. speed-up {tokens / cost:.3f}")


if __name__ == "__main__":
    main()
