"""An early-exit head's acceptance in the engine (fixed k = 1) against its teacher-forced top-1
agreement on the same greedy answers (fp32, 64 tokens, held-out ShareGPT prompts of at most 180
tokens). Equal figures mean drafting feeds the head what training did.

    python docs/experiments/engine_vs_teacher_forced.py 6 HEAD.safetensors   # an early-exit head
"""
import json, sys, torch
from specframe import SpeculativeDecoder
from specframe.models import load_model
from specframe.data import sharegpt_prompts
from specframe.heads import EarlyExitHead
torch.set_num_threads(1)
model, tok = load_model()
n, path = int(sys.argv[1]), sys.argv[2]
held = [p.text for p in sharegpt_prompts("heldout")]
held = [t for t in held if len(tok(t)["input_ids"]) <= 180][:n]
head = EarlyExitHead.from_pretrained(path, model).eval()
assert type(head) is EarlyExitHead, "teacher forcing here feeds layer-N states only: give an early-exit head"
tf_hit = tf_n = acc = drafted = 0
for text in held:
    plain = SpeculativeDecoder(model, tok, drafter=None).generate(text, max_new_tokens=64).tokens
    r = SpeculativeDecoder(model, tok, drafter="early_exit", controller="fixed", controller_options={"k": 1},
                           drafter_options={"head": path}).generate(text, max_new_tokens=64)
    acc += r.stats.accepted; drafted += r.stats.drafted
    prompt = [int(t) for t in SpeculativeDecoder(model, tok, drafter=None).encode(text, True)]
    ids = torch.tensor([prompt + list(plain)])
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        pred = head.vocab_ids[head(out.hidden_states[head.exit_layer]).argmax(-1)][0]
    P = len(prompt)
    hits = pred[P:-1] == ids[0, P + 1:]  # the head at answer token j predicts token j + 1
    tf_hit += int(hits.sum()); tf_n += hits.numel()
print(json.dumps({"teacher_forced": round(tf_hit / tf_n, 3), "positions": tf_n,
                  "engine_k1": round(acc / drafted, 3), "drafted": drafted}))
