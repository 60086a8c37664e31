"""Calibrate, patch and generate in a few lines of Python (runs on a CPU in about a minute).

    python examples/patch_in_python.py
"""

import torch

import patchattn
from patchattn.calibrate import calibrate, tokens_from_text
from patchattn.models import load_model
from patchattn.stats import record_sparsity
from patchattn.text import load_text

model, tokenizer = load_model()  # the embedded SmolLM2-135M-Instruct
ids = tokens_from_text(tokenizer, load_text("calibration"), 2048, model.config)
recipe = calibrate(model, ids, target_sparsity=0.7)
print("heads per strategy:", recipe.strategy_counts(), "achieved sparsity:", recipe.calibration["achieved_sparsity"])

prompt = load_text("heldout")[:6000] + "\n\nIn one sentence, what was this speech about?"
inputs = tokenizer(prompt, return_tensors="pt")
# On a GPU, cache_implementation="static" (the switch that compiles a dense model's decode) replays each decode step of
# the patched model as one CUDA graph over its budgeted KV cache; on a CPU it changes nothing.
fast = {"cache_implementation": "static"} if model.device.type == "cuda" else {}
with torch.no_grad(), patchattn.patched(model, recipe), record_sparsity() as rec:
    out = model.generate(**inputs, max_new_tokens=30, do_sample=False, **fast)
print(f"prefill sparsity {rec.sparsity:.2f}:", tokenizer.decode(out[0, inputs.input_ids.shape[1]:], skip_special_tokens=True))
