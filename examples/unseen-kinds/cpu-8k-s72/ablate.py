"""Which heads of a recipe cost its perplexity on a kind of text: the recipe as written, then with one strategy's heads
(or one range of layers) made dense, each over two held-out 8K windows of the shipped kind's calibration text.

    python ablate.py MODEL.gguf smollm2-8k-five-kinds-s72.json code,dialogue > ablate.txt
"""
import copy
import json
import sys
import time

import torch

from patchattn.models import load_model
from patchattn.recipe import Recipe
from patchattn.text import load_kind
from patchattn.calibrate.verify import split_text, Verifier
torch.set_num_threads(2)
M = sys.argv[1]; R = sys.argv[2]; kinds = sys.argv[3].split(",")
model, tok = load_model(M, dtype="float32", device="cpu")
base = json.load(open(R))
def variant(pred):
    d = copy.deepcopy(base)
    for li, l in enumerate(d["layers"]):
        for h in l["heads"]:
            if pred(li, h):
                h["strategy"], h["params"] = "dense", {}
                h["density"] = 1.0
    return Recipe.from_dict(d)
variants = {
  "recipe": lambda li, h: False,
  "streaming->dense": lambda li, h: h["strategy"] == "streaming",
  "vslash->dense": lambda li, h: h["strategy"] == "vertical_slash",
  "topk->dense": lambda li, h: h["strategy"] == "block_topk",
  "layers0-10 dense": lambda li, h: li <= 10,
  "layers11-29 dense": lambda li, h: li >= 11,
}
for kind in kinds:
    text = open(kind).read() if kind.endswith(".txt") else load_kind(kind, "calibration")
    _, held = split_text(tok, text, 8192)
    v = Verifier(model, held, tokens=2 * 8192)
    for name, pred in variants.items():
        t = time.time(); rec = variant(pred)
        loss, sp, n = v.loss(rec, 8192)
        print(f"{kind:10s} {name:20s} loss {100*loss:+.2f}% sparsity {sp if sp is None else round(sp,3)} ({time.time()-t:.0f}s)", flush=True)
