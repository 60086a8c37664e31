set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
M=/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p /tmp/texts
python -c "
from patchattn.text import load_kind
for k in ('docs', 'dialogue', 'structured'):
    open(f'/tmp/texts/{k}.txt', 'w').write(load_kind(k, 'heldout'))
"
R=$OUT/smollm2-8k-prose-code-adaptive-2.5.json
python -m patchattn.cli calibrate $M --seq-len 8192 --kinds prose,code --max-loss ppl=2.5% --strategies dense,streaming,vertical_slash,vertical_slash_tokens,block_topk,vertical_slash_adaptive -o $R --heatmap /tmp/h.png > $OUT/calibrate.log 2>&1
grep -A30 "per kind of text" $OUT/calibrate.log | head -45
python -m patchattn.cli eval $M -r $R -r examples/kinds-smollm2-8k/smollm2-8k-prose-code-2.5.json --baseline uniform --lengths 8192 --ppl-windows 2 \
  --ppl-text /tmp/texts/docs.txt --ppl-text /tmp/texts/dialogue.txt --ppl-text /tmp/texts/structured.txt --tasks ppl,passkey,single --trials 10 --speed-runs 1 -o /tmp/eval > $OUT/eval.log 2>&1
grep -v "WARNING\|plans would\|faster, no\|own; computing" $OUT/eval.log | tail -75
tar czf $OUT/eval.tgz -C /tmp eval
