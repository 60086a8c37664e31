"""Which layers' sparsity loses the passkey prompts the s80 recipe fails (dense answers them), and how much numerics
alone move them. GPU, the GGUF at G; writes $OUT/diag.json. Results of 2026-11-24 in passkey_diagnostics.json."""
import copy, json, os, sys, time
import torch
import patchattn
from patchattn.models import load_model
from patchattn.recipe import Recipe, HeadPlan
from patchattn.eval.haystack import build_prompt
from patchattn.eval.tasks import answer

G = "/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
model, tok = load_model(G, dtype="bfloat16", device="cuda")
base = Recipe.load("recipes/prose-only/smollm2-135m-instruct-8k-s80.json")
LOST = [1, 15, 28, 31, 37]
OK = [0, 2, 3, 14, 18]
prompts = {t: build_prompt("passkey", tok, 8192, t) for t in LOST + OK}
out = {}

def run(name, recipe, trials):
    t0 = time.time()
    with patchattn.patched(model, recipe):
        s = [answer(model, tok, prompts[t]).score for t in trials]
    out[name] = s
    print(name, s, f"{time.time()-t0:.1f}s", flush=True)

def with_dense(layers, heads=None):
    r = copy.deepcopy(base)
    for li in layers:
        r.layers[li] = [HeadPlan("dense") if heads is None or h in heads else p for h, p in enumerate(r.layers[li])]
    return r

run("s80", base, LOST)
for k in (2, 4, 8, 15):
    run(f"first{k}dense", with_dense(range(k)), LOST)
for k in (15, 22, 26):
    run(f"from{k}dense", with_dense(range(k, 30)), LOST)
for li in range(30):
    run(f"layer{li}dense", with_dense([li]), LOST)
# streaming heads only made dense / VS-token heads only dense
for kind in ("streaming", "vertical_slash_tokens", "block_topk", "vertical_slash"):
    r = copy.deepcopy(base)
    for li, layer in enumerate(r.layers):
        r.layers[li] = [HeadPlan("dense") if p.strategy == kind else p for p in layer]
    run(f"{kind}->dense", r, LOST)
def uniform(plan):
    r = copy.deepcopy(base)
    r.layers = [[plan for _ in layer] for layer in r.layers]
    return r


run("full VS blocks (triton)", uniform(HeadPlan("vertical_slash", {"vertical_tokens": 8192, "slash_tokens": 8192})), LOST + OK)
run("full window (triton)", uniform(HeadPlan("streaming", {"sink_tokens": 64, "window_tokens": 8192})), LOST + OK)
json.dump(out, open(os.environ["OUT"] + "/diag.json", "w"))
