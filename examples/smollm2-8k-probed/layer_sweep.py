"""Which layers' sparsity costs an answer: each layer's plan of a recipe alone (the rest dense), scored by the
log-probability of the dense model's own correct reply on eval prompts, with patchattn's layer probe
(`patchattn.calibrate.layer_sensitivity`). Usage: python layer_sweep.py GGUF RECIPE [TASK] [LENGTH] [PROMPTS]."""
import sys

import torch

from patchattn.calibrate import Probe, layer_sensitivity
from patchattn.eval.haystack import build_prompt
from patchattn.models import load_model
from patchattn.recipe import Recipe

model_path, recipe_path = sys.argv[1], sys.argv[2]
task = sys.argv[3] if len(sys.argv) > 3 else "passkey"
length, wanted = (int(sys.argv[4]) if len(sys.argv) > 4 else 8192), (int(sys.argv[5]) if len(sys.argv) > 5 else 12)
model, tok = load_model(model_path, dtype="bfloat16", device="cuda")
probes = []
for seed in range(4 * wanted):
    p = build_prompt(task, tok, length, seed)
    ids = torch.tensor([p.input_ids], device=model.device)
    reply = model.generate(ids, max_new_tokens=p.max_new_tokens, do_sample=False)[0, ids.shape[1]:].tolist()
    cut = next((i for i in range(1, len(reply) + 1) if p.answers[0] in tok.decode(reply[:i])), None)
    if cut is not None:  # the dense model answers it: its reply is what the probe scores
        probes.append(Probe(ids.cpu(), torch.tensor([reply[:cut]]), p.depths[0]))
    if len(probes) == wanted:
        break
sens = layer_sensitivity(model, Recipe.load(recipe_path), probes)
print(f"{task} at {length}, {len(probes)} prompts, dense reply log-probability {sens.dense_answer_logprob:.3f}")
for layer, (drop, rise) in enumerate(zip(sens.answer_drop.tolist(), sens.nll_rise.tolist())):
    print(f"layer {layer:2d}: answer drop {drop:+.3f}, prompt NLL rise {rise * 1000:+.2f} millinats")
