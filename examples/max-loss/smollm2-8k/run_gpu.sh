#!/usr/bin/env bash
# On the lent GPU (benchmarks/NOTES_device_smollm2.md: the GGUF travels in two parts, the gguf wheel in /tmp/site):
# calibrate SmolLM2 at 8K to a perplexity bound of +2.5%, then evaluate it beside dense and the shipped fixed-target
# recipe (80%, probed) on the same prompts.
set -euo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:${SRC:-$PWD}
M=/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
OUT=${OUT:-out}
python -m patchattn.cli calibrate "$M" --seq-len 8192 --kinds prose --max-loss ppl=2.5% -o "$OUT/smollm2-8k-max-loss-2.5.json" \
    --heatmap /tmp/heatmap.png 2>&1 | tee "$OUT/calibrate.log"
python -m patchattn.cli eval "$M" -r "$OUT/smollm2-8k-max-loss-2.5.json" -r recipes/prose-only/smollm2-135m-instruct-8k-s80-probed.json \
    --lengths 8192 --ppl-windows 4 --tasks ppl,passkey,single --trials 20 --speed-runs 1 -o /tmp/eval 2>&1 | tee "$OUT/eval.log"
tar czf "$OUT/eval.tgz" -C /tmp eval
