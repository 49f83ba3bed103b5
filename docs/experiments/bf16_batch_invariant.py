"""Experiment (issue 14): can bf16 verification be made batch-invariant cheaply?

Candidate: bf16 weights and a bf16 residual stream, but every linear layer computed in fp32 (its
weight upcast once and cached) and rounded back to bf16. In fp32 a pass over several tokens gives
each row bit for bit what a one-token pass gives on this CPU (0 greedy mismatches in fp32), so
each linear layer's output, rounded elementwise, would no longer depend on the number of rows;
what is left is attention and the norms, computed per row. The engine and its forward
(specframe/target.py) are not changed: the model's Linear modules are wrapped here.

    python docs/experiments/bf16_batch_invariant.py [PROMPTS] [TOKENS] [attention]   # defaults 13 64

With `attention`, the candidate also computes attention (scaled_dot_product_attention) in fp32.

For plain bf16 and the candidate: greedy mismatches of EESD against plain decoding in the same
setting, and tokens/s of plain decoding relative to plain bf16 in the same process (interleaved).
Results are in docs/numerics.md.
"""
import sys
import time
import types

import torch
import torch.nn.functional as F

from specframe.bench import load_prompts
from specframe.decoder import SpeculativeDecoder
from specframe.models import load_model

torch.set_num_threads(1)
PROMPTS, TOKENS = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (13, 64)
FP32_ATTENTION = sys.argv[3:] == ["attention"]
_sdpa, _in_candidate = F.scaled_dot_product_attention, [False]


def sdpa(query, key, value, *args, **kwargs):
    if not _in_candidate[0]:
        return _sdpa(query, key, value, *args, **kwargs)
    return _sdpa(query.float(), key.float(), value.float(), *args, **kwargs).to(query.dtype)


def fp32_linear(module, x):
    return F.linear(x.float(), module.weight32, None if module.bias is None else module.bias.float()).to(x.dtype)


def with_fp32_linears(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight32 = module.weight.detach().float()
            module.forward = types.MethodType(fp32_linear, module)
    if FP32_ATTENTION:  # transformers looks the function up at call time
        F.scaled_dot_product_attention = sdpa
        for layer in model.model.layers:
            layer.register_forward_pre_hook(lambda *a: _in_candidate.__setitem__(0, True))
            layer.register_forward_hook(lambda *a: _in_candidate.__setitem__(0, False))
    return model


CANDIDATE = "bf16 + fp32 linears" + (" + fp32 attention" if FP32_ATTENTION else "")
settings = {"bf16": load_model(None, dtype="bf16"), CANDIDATE: load_model(None, dtype="bf16")}
with_fp32_linears(settings[CANDIDATE][0])
prompts = load_prompts("benchmarks/spec_bench/question.jsonl", None, PROMPTS)
for name, (model, tokenizer) in settings.items():
    plain = SpeculativeDecoder(model, tokenizer, drafter=None, controller="fixed")
    eesd = SpeculativeDecoder(model, tokenizer)
    settings[name] = (plain, eesd)
mismatches = {name: 0 for name in settings}
seconds = {name: 0.0 for name in settings}
for index, prompt in enumerate(prompts):
    for name in (list(settings) if index % 2 == 0 else list(settings)[::-1]):
        plain, eesd = settings[name]
        ids = plain.encode(prompt.text)
        start = time.perf_counter()
        expected = plain.generate(ids, max_new_tokens=TOKENS).tokens
        seconds[name] += time.perf_counter() - start
        mismatches[name] += eesd.generate(ids, max_new_tokens=TOKENS).tokens != expected
base = seconds["bf16"]
for name in settings:
    print(f"{name:36s} EESD greedy mismatches vs plain {mismatches[name]}/{len(prompts)}; "
          f"plain decoding speed {base / seconds[name]:.2f}x plain bf16")
