#!/usr/bin/env bash
# On the lent GPU (see benchmarks/NOTES_device_smollm2.md for how the model travels): SmolLM2 at 8K,
#  A: --kinds prose,code --max-loss ppl=3%: evaluated on three kinds it never read (docs, dialogue, structured);
#  B: the default calibration (all five shipped kinds) at --max-loss ppl=2.5%.
# Perplexity over two 8K windows of each shipped held-out text, each recipe beside its uniform twin.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:${SRC:-$PWD}
OUT=${OUT:-out}
M=/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p /tmp/texts
python -c "
from patchattn.text import load_kind
for k in ('docs', 'dialogue', 'structured', 'code'):
    open(f'/tmp/texts/{k}.txt', 'w').write(load_kind(k, 'heldout'))
"
A=$OUT/smollm2-8k-prose-code-3.json
B=$OUT/smollm2-8k-five-kinds-2.5.json
SECONDS=0
python -m patchattn.cli calibrate $M --seq-len 8192 --kinds prose,code --max-loss ppl=3% -o $A --heatmap /tmp/a.png > $OUT/calibrate-a.log 2>&1
echo "A calibrated in $SECONDS s"; SECONDS=0
RECIPES="-r $A"
if [ -n "${WITH_B:-}" ]; then
  python -m patchattn.cli calibrate $M --seq-len 8192 --max-loss ppl=2.5% -o $B --heatmap /tmp/b.png > $OUT/calibrate-b.log 2>&1
  echo "B calibrated in $SECONDS s"; SECONDS=0; RECIPES="$RECIPES -r $B"
fi
grep -B2 -A14 "per kind of text" $OUT/calibrate-a.log | head -40
[ -n "${WITH_B:-}" ] && grep -B2 -A14 "per kind of text" $OUT/calibrate-b.log | head -40
python -m patchattn.cli eval $M $RECIPES --baseline uniform --lengths 8192 --ppl-windows 2 \
  --ppl-text /tmp/texts/docs.txt --ppl-text /tmp/texts/dialogue.txt --ppl-text /tmp/texts/structured.txt --ppl-text /tmp/texts/code.txt \
  --tasks ppl --speed-runs 0 -o /tmp/eval > $OUT/eval-ppl.log 2>&1
echo "ppl eval in $SECONDS s"
cp /tmp/eval/results.json $OUT/results-ppl.json; cp /tmp/eval/results.md $OUT/results-ppl.md
grep -v "WARNING\|plans would\|faster, no\|own; computing" $OUT/eval-ppl.log | tail -40
