#!/usr/bin/env bash
# Issue 21 on Gemma 3 270M at 32K (written 2026-12-07 evening, not run yet). Calibrated on four shipped kinds (prose,
# code, dialogue, structured), so the Python documentation is a kind it never read, beside legal text and C source
# from this folder (the email here is 29K Gemma tokens, too short for a 32K window). Two calibrations at the same
# target: the default strategies, and dense + streaming + block top-k (on SmolLM2 at 8K the vertical-slash heads cost
# the passkey: gpu-sweep/). STEP=ppl: perplexity on the three unseen kinds beside each recipe's uniform twin (~1
# window each); STEP=needles: the 100-prompt passkey, dense and both recipes (~5 min a variant at 32K on an H100).
# The model reaches the device as in benchmarks/NOTES_device_smollm2.md (Gemma converted to /tmp/gemma-hf).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:${SRC:-$PWD}
OUT=${OUT:-out}
G=${GEMMA:-/tmp/gemma-hf}
HERE=$(dirname "$0")
TARGET=${TARGET:-0.84}  # of the full layers' blocks: Gemma's windowed layers are not counted (see ../kinds-gemma3-32k)
R=/tmp/gemma-recipes  # kept on the machine between the two steps (each call has its own OUT)
mkdir -p /tmp/unseen "$OUT" $R
for K in legal c; do zcat "$HERE/$K.txt.gz" > /tmp/unseen/$K.txt; done
python -c "from patchattn.text import load_kind; open('/tmp/unseen/docs.txt', 'w').write(load_kind('docs', 'heldout'))"
KINDS=prose,code,dialogue,structured
if [ "${STEP:-ppl}" = ppl ]; then
  for V in "default" "blocks --strategies dense,streaming,block_topk"; do
    set -- $V; NAME=$1; shift
    SECONDS=0
    python -m patchattn.cli calibrate $G --seq-len 32768 --kinds $KINDS --target-sparsity $TARGET "$@" \
      -o $R/gemma-$NAME.json > $OUT/gemma-$NAME-calibrate.log 2>&1
    cp $R/gemma-$NAME.json $OUT/
    echo "$NAME calibrated in $SECONDS s"
  done
  SECONDS=0
  python -m patchattn.cli eval $G -r $R/gemma-default.json -r $R/gemma-blocks.json --baseline uniform --lengths 32768 \
    --ppl-text /tmp/unseen/docs.txt --ppl-text /tmp/unseen/legal.txt --ppl-text /tmp/unseen/c.txt --tasks ppl \
    --speed-runs 0 -o /tmp/gemma-ppl > $OUT/gemma-ppl.log 2>&1
  echo "perplexity in $SECONDS s"; cp /tmp/gemma-ppl/results.json $OUT/gemma-ppl-results.json
  grep "^| " /tmp/gemma-ppl/results.md | head -20
else
  SECONDS=0
  python -m patchattn.cli eval $G -r $R/gemma-default.json -r $R/gemma-blocks.json --lengths 32768 --tasks passkey \
    --trials ${TRIALS:-100} --speed-runs 0 -o /tmp/gemma-needles > $OUT/gemma-needles.log 2>&1
  echo "needles in $SECONDS s"; cp /tmp/gemma-needles/results.json $OUT/gemma-needles-results.json
  grep "passkey" /tmp/gemma-needles/results.md
fi
