import gzip, shutil, sys
from pathlib import Path
import torch
from transformers import AutoConfig, AutoModelForCausalLM
src, out, tok = Path("/tmp/gemma"), Path("/tmp/gemma-hf"), Path(sys.argv[1])
loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file="gemma-3-270m-Q4_K_M.gguf", dtype=torch.float32)
cfg = loaded.config.to_dict(); cfg.pop("quantization_config", None)
fresh = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
print(fresh.load_state_dict(loaded.state_dict(), strict=False))
fresh.save_pretrained(out)
with gzip.open(tok / "tokenizer.json.gz", "rb") as f, open(out / "tokenizer.json", "wb") as g:
    shutil.copyfileobj(f, g)
shutil.copy(tok / "tokenizer_config.json", out)
