set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
M=/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p /tmp/texts
python -c "
from patchattn.text import load_kind
for k in ('docs', 'dialogue', 'structured'):
    open(f'/tmp/texts/{k}.txt', 'w').write(load_kind(k, 'heldout'))
"
R=$OUT/smollm2-8k-prose-code-2.5.json
python -m patchattn.cli calibrate $M --seq-len 8192 --kinds prose,code --max-loss ppl=2.5% -o $R --heatmap /tmp/h.png > $OUT/calibrate21.log 2>&1
tail -45 $OUT/calibrate21.log
python -m patchattn.cli eval $M -r $R -r examples/max-loss/smollm2-8k/smollm2-8k-max-loss-2.5.json --baseline uniform --lengths 8192 --ppl-windows 2 \
  --ppl-text /tmp/texts/docs.txt --ppl-text /tmp/texts/dialogue.txt --ppl-text /tmp/texts/structured.txt --tasks ppl --speed-runs 0 -o /tmp/eval21 > $OUT/eval21.log 2>&1
grep -v "WARNING\|plans would\|faster, no" $OUT/eval21.log | tail -60
tar czf $OUT/eval21.tgz -C /tmp eval21
