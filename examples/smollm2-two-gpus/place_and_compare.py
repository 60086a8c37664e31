"""Place SmolLM2 with accelerate (MAP: balanced, auto, ...), print where its layers went, and save its dense and
patched (the shipped 8K s80 recipe) logits on 4K tokens of the calibration text, for compare_logits.py.

    python place_and_compare.py GGUF balanced two.pt                         # over every visible GPU
    CUDA_VISIBLE_DEVICES=0 python place_and_compare.py GGUF auto one.pt      # one GPU
    python compare_logits.py two.pt one.pt
"""
import sys

import torch

from patchattn.models import load_model
from patchattn.patch import patched
from patchattn.recipe import Recipe
from patchattn.text import load_text

g, dmap, out = sys.argv[1], sys.argv[2], sys.argv[3]
m, tok = load_model(g, dtype="bfloat16", device="cuda", device_map=dmap)
hmap = getattr(m, "hf_device_map", None) or {"": str(m.device)}
print(f"{dmap} over {torch.cuda.device_count()} visible GPU(s): devices {sorted({str(v) for v in hmap.values()})}",
      {k: str(v) for k, v in list(hmap.items())[:2]}, "...", {k: str(v) for k, v in list(hmap.items())[-2:]})
ids = tok(load_text("calibration"), return_tensors="pt").input_ids[:, :4096].to("cuda:0")
rec = Recipe.load("recipes/prose-only/smollm2-135m-instruct-8k-s80.json")
with torch.no_grad():
    dense = m(ids).logits.float().cpu()
    with patched(m, rec):
        sparse = m(ids).logits.float().cpu()
torch.save({"dense": dense, "sparse": sparse}, out)
