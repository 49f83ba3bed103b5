"""`specframe bench`'s run: every (prompt, method, repeat) not yet recorded, methods interleaved,
each generation appended to the results file as it finishes."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from .bench_methods import MethodSpec
from .bench_runners import build_runner, peak_memory, reset_peak_memory
from .errors import ConfigError, SpecframeError
from .prompts import encode_prompt

WARMUP_TOKENS = 16


# ---- prompts ----------------------------------------------------------------------------------
def load_prompts(dataset: str, categories: list[str] | None = None, limit: int | None = None) -> list:
    """Spec-Bench-format JSONL (first turn of each row), or 'sharegpt' (the held-out split), with
    `limit` taken stratified by category (see `specframe.data.stratified`)."""
    from .data import load_spec_bench, sharegpt_prompts, stratified

    if dataset == "sharegpt":
        if categories:
            raise ConfigError("--categories does not apply to --dataset sharegpt (it has one category)")
        prompts = stratified(sharegpt_prompts("heldout"), limit)
    else:
        prompts = load_spec_bench(dataset, categories, limit)
    if not prompts:
        raise ConfigError(f"--dataset {dataset!r} holds no prompts")
    return prompts


# ---- results file -------------------------------------------------------------------------------
class ResultsFile:
    """JSON lines, one per generation, flushed as written. Reading skips a torn last line."""

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> list[dict]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                record = json.loads(line)
                if isinstance(record, dict):
                    records.append(record)
        return records

    def append(self, record: dict) -> None:
        with self.path.open("a", encoding="utf-8") as handle:
            if handle.tell() and not self.path.read_bytes().endswith(b"\n"):
                handle.write("\n")  # an interrupted write left a torn line: start a fresh one
            handle.write(json.dumps(record) + "\n")
            handle.flush()


def record_key(record: dict) -> tuple[str, str, int]:
    return (str(record["prompt_id"]), record["method"], int(record["repeat"]))


# ---- the run --------------------------------------------------------------------------------------
class Bench:
    """Runs every (prompt, method, repeat) not yet in the results file, methods interleaved."""

    def __init__(self, config, model, tokenizer, assistant, results: ResultsFile):
        from .models import context_length, eos_token_ids
        from .numerics import dtype_name

        self.config, self.methods, self.results = config, config.methods, results
        self.sampling = {"temperature": config.temperature, "top_k": config.top_k, "top_p": config.top_p}
        self.tokenizer, self.vocab_size = tokenizer, model.config.get_text_config().vocab_size
        self.context = context_length(model.config)
        eos = eos_token_ids(tokenizer, model)
        self.runners = {m.label: build_runner(m, model, tokenizer, eos, assistant) for m in self.methods}
        self.done = {record_key(r) for r in results.read() if not r.get("error")}
        self.dtype = dtype_name(model.dtype)  # numerics: each record names its dtype, so none is compared across

    def encode(self, prompts: list) -> dict[str, list[int]]:
        """Token ids per prompt id (chat template on the first turn, as `specframe run` does)."""
        ids, too_long = {}, []
        for prompt in prompts:
            tokens = encode_prompt(prompt.text, self.tokenizer, self.vocab_size, self.config.chat)
            if self.context and len(tokens) + self.config.max_new_tokens > self.context:
                too_long.append(prompt.id)
            ids[prompt.id] = tokens
        if too_long:
            print(f"specframe bench: skipping {len(too_long)} prompts longer than the context allows "
                  f"with --max-new-tokens {self.config.max_new_tokens}: {', '.join(too_long[:10])}", file=sys.stderr)
            for prompt_id in too_long:
                del ids[prompt_id]
        return ids

    def warm_up(self, ids: dict[str, list[int]]) -> None:
        """Untimed generations so one-off costs (allocations, lazy init) land in no record."""
        if not ids or not self.config.warmup:
            return
        first = next(iter(ids.values()))
        tokens = min(WARMUP_TOKENS, self.config.max_new_tokens)
        for method in self.methods:
            for _ in range(self.config.warmup):
                try:
                    self.runners[method.label].generate(first, tokens, self.sampling, self.config.seed)
                except SpecframeError as exc:
                    raise SpecframeError(f"method {method.label!r} failed in warm-up: {exc}") from exc

    def run_all(self, prompts: list, ids: dict[str, list[int]]) -> None:
        prompts = _categories_interleaved([p for p in prompts if p.id in ids])
        todo = [(r, i, p, m) for r in range(self.config.repeats) for i, p in enumerate(prompts)
                for m in _rotated(self.methods, i + r) if (p.id, m.label, r) not in self.done]
        bar = _progress(len(todo), not self.config.progress)
        try:
            for repeat, index, prompt, method in todo:
                bar.set_postfix_str(f"{method.label} · {prompt.category}", refresh=False)
                seed = self.config.seed + 1_000_003 * repeat + index
                self.results.append(self.run_one(prompt, ids[prompt.id], method, repeat, seed))
                bar.update(1)
        finally:
            bar.close()

    def run_one(self, prompt, ids: list[int], method: MethodSpec, repeat: int, seed: int) -> dict:
        record = {"prompt_id": prompt.id, "category": prompt.category, "method": method.label,
                  "repeat": repeat, "seed": seed, "prompt_tokens": len(ids), "dtype": self.dtype}
        reset_peak_memory()
        try:
            outcome = self.runners[method.label].generate(ids, self.config.max_new_tokens, self.sampling, seed)
        except (SpecframeError, RuntimeError, ValueError) as exc:  # recorded, counted, not fatal
            return {**record, "error": f"{type(exc).__name__}: {exc}"}
        return {**record, "new_tokens": len(outcome.tokens), "seconds": round(outcome.seconds, 5),
                "tokens_per_second": round(len(outcome.tokens) / outcome.seconds, 4) if outcome.seconds else 0.0,
                "finish_reason": outcome.finish_reason, **peak_memory(), "stats": outcome.stats,
                "tokens": outcome.tokens}


def _categories_interleaved(prompts: list) -> list:
    """One prompt of each category in turn, so that an interrupted run still covers them all."""
    rank: dict[str, int] = {}
    order = {c: i for i, c in enumerate(dict.fromkeys(p.category for p in prompts))}
    keyed = []
    for prompt in prompts:
        rank[prompt.category] = rank.get(prompt.category, -1) + 1
        keyed.append((rank[prompt.category], order[prompt.category], prompt))
    return [prompt for *_, prompt in sorted(keyed, key=lambda k: k[:2])]


def _rotated(items: list, shift: int) -> list:
    shift %= len(items)
    return items[shift:] + items[:shift]


def _progress(total: int, disabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="gen", desc="bench", disable=disabled, file=sys.stderr, dynamic_ncols=True)
