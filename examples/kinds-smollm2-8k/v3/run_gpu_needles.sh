#!/usr/bin/env bash
# Needle tasks at 100 prompts each (passkey, single needle), dense against the recipes of run_gpu.sh, 8K.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:${SRC:-$PWD}
OUT=${OUT:-out}
M=/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
SECONDS=0
python -m patchattn.cli eval $M -r ${R:-$OUT/smollm2-8k-prose-code-3.json} --lengths 8192 \
  --tasks passkey,single --trials 100 --speed-runs 0 -o /tmp/needles > $OUT/eval-needles.log 2>&1
echo "needles in $SECONDS s"
cp /tmp/needles/results.json $OUT/results-needles.json; cp /tmp/needles/results.md $OUT/results-needles.md
grep -v "WARNING\|plans would\|faster, no\|own; computing" $OUT/eval-needles.log | tail -25
