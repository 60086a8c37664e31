#!/usr/bin/env bash
# Issue 21 on three kinds no shipped calibration kind covers (legal, email, C; see README.md), not run yet: SmolLM2 at
# 8K calibrated on all five shipped kinds to ppl=$BOUND%: the old defaults (each kind verified on the recipe of all
# kinds, token columns offered) and today's defaults (unseen-kind, no columns; WITH_COLUMNS_UNSEEN=1 adds unseen-kind
# verification with columns), then perplexity over two 8K windows of each unseen kind beside dense and each recipe's
# uniform twin. With R=<the better recipe>, ../kinds-smollm2-8k/v3/run_gpu_needles.sh next.
# On the lent GPU, the model as in benchmarks/NOTES_device_smollm2.md.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:${SRC:-$PWD}
OUT=${OUT:-out}
M=/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
HERE=$(dirname "$0")
BOUND=${BOUND:-3}
mkdir -p /tmp/unseen
for K in legal email c; do zcat "$HERE/$K.txt.gz" > /tmp/unseen/$K.txt; done
COLUMNS=dense,streaming,vertical_slash,vertical_slash_tokens,block_topk  # the defaults before 2026-12-06 evening
RECIPES=""
RUNS=("held-out columns $COLUMNS" "unseen-kind blocks dense,streaming,vertical_slash,block_topk")
[ -n "${WITH_COLUMNS_UNSEEN:-}" ] && RUNS+=("unseen-kind columns $COLUMNS")  # the third row of the comparison
for RUN in "${RUNS[@]}"; do
  set -- $RUN
  R=$OUT/smollm2-8k-five-kinds-$1-$2-$BOUND.json
  SECONDS=0
  python -m patchattn.cli calibrate $M --seq-len 8192 --max-loss ppl=$BOUND% --verify $1 --strategies $3 --probes 0 \
    -o $R --heatmap /tmp/h.png > $OUT/calibrate-$1-$2.log 2>&1
  echo "five kinds, --verify $1, $2, ppl=$BOUND%: calibrated in $SECONDS s"
  grep -A12 "target sparsity ┃ achieved" $OUT/calibrate-$1-$2.log | head -12
  RECIPES="$RECIPES -r $R"
done
SECONDS=0
python -m patchattn.cli eval $M $RECIPES --baseline uniform --lengths 8192 --ppl-windows 2 \
  --ppl-text /tmp/unseen/legal.txt --ppl-text /tmp/unseen/email.txt --ppl-text /tmp/unseen/c.txt \
  --tasks ppl --speed-runs 0 -o /tmp/eval-unseen > $OUT/eval-ppl.log 2>&1
echo "ppl eval in $SECONDS s"
cp /tmp/eval-unseen/results.json $OUT/results-ppl.json; cp /tmp/eval-unseen/results.md $OUT/results-ppl.md
grep -v "WARNING\|plans would\|faster, no\|own; computing" $OUT/eval-ppl.log | tail -30
python "$HERE/../kinds-smollm2-8k/v4/pick.py" $OUT/results-ppl.json legal,email,c
