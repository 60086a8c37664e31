"""Which recipe of run_gpu.sh goes on to the needle tasks: among the calibrated variants (not dense, not the uniform
twins), those within +3% of dense on every kind neither read (docs, dialogue, structured, or the comma-separated
kinds given second), the one of highest mean sparsity over those kinds; when none holds, the one of smallest worst
loss. Prints its path (results-ppl.json's directory) and a line per variant.

    python pick.py out/results-ppl.json [legal,email,c]"""

import json
import sys
from pathlib import Path

path = Path(sys.argv[1])
UNSEEN = tuple(sys.argv[2].split(",")) if len(sys.argv) > 2 else ("docs", "dialogue", "structured")
results = json.loads(path.read_text())["results"]
value = {(r["variant"], r["task"]): r for r in results}
variants = [v for v in {r["variant"] for r in results} if v != "dense" and not v.endswith("-uniform")]
scored = []
for v in sorted(variants):
    losses = [value[(v, f"ppl:{k}")]["value"] / value[("dense", f"ppl:{k}")]["value"] - 1 for k in UNSEEN]
    sparsity = sum(value[(v, f"ppl:{k}")]["sparsity"] for k in UNSEEN) / len(UNSEEN)
    scored.append((max(losses) <= 0.03, sparsity, -max(losses), v))
    print(f"{v}: unseen losses {', '.join(f'{x:+.2%}' for x in losses)}, mean sparsity {sparsity:.1%}", file=sys.stderr)
held = [s for s in scored if s[0]]
best = max(held, key=lambda s: s[1]) if held else max(scored, key=lambda s: s[2])
print(path.parent / f"{best[3]}.json")
