#!/usr/bin/env bash
# On the lent GPU: Gemma 3 270M at 32K calibrated with --kinds prose,code --max-loss ppl=$BOUND% (2.5 unless set; the
# SmolLM2 runs lost 1.5-2x on unseen kinds what the search verified on its own), then perplexity on three
# kinds it never read (the shipped held-out docs, dialogue, structured text) beside dense and its uniform twin, and the
# needle tasks. The model travels as in ../max-loss/gemma3-270m-32k/run_gpu.sh (GGUF in five parts, converted with the
# tokenizer files of transformers 5.25's conversion: convert_gguf_on_transformers_5_17.py there).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:${SRC:-$PWD}
OUT=${OUT:-out}
G=${GEMMA:-/tmp/gemma-hf}
mkdir -p /tmp/texts
python -c "
from patchattn.text import load_kind
for k in ('docs', 'dialogue', 'structured', 'code'):
    open(f'/tmp/texts/{k}.txt', 'w').write(load_kind(k, 'heldout'))
"
R=$OUT/gemma3-270m-32k-prose-code-${BOUND:-2.5}.json
SECONDS=0
python -m patchattn.cli calibrate $G --seq-len 32768 --kinds prose,code --max-loss ppl=${BOUND:-2.5}% -o $R --heatmap /tmp/g.png > $OUT/calibrate.log 2>&1
echo "calibrated in $SECONDS s"; SECONDS=0
grep -B2 -A14 "per kind of text" $OUT/calibrate.log | head -30
python -m patchattn.cli eval $G -r $R --baseline uniform --lengths 32768 --ppl-windows 1 \
  --ppl-text /tmp/texts/docs.txt --ppl-text /tmp/texts/dialogue.txt --ppl-text /tmp/texts/structured.txt --ppl-text /tmp/texts/code.txt \
  --tasks ${TASKS:-ppl,passkey,single} --trials ${TRIALS:-20} --speed-runs 0 -o /tmp/geval > $OUT/eval.log 2>&1
echo "eval in $SECONDS s"
cp /tmp/geval/results.json $OUT/results.json; cp /tmp/geval/results.md $OUT/results.md
grep -v "WARNING\|plans would\|faster, no\|own; computing" $OUT/eval.log | tail -40
