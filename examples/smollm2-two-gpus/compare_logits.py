"""Compare the logits place_and_compare.py saved for two placements (dense and patched)."""
import sys, torch
a, b = torch.load(sys.argv[1]), torch.load(sys.argv[2])
for k in ("dense", "sparse"):
    d = (a[k] - b[k])
    same_top = float((a[k].argmax(-1) == b[k].argmax(-1)).float().mean())
    print(f"{k} logits at 4K, two GPUs vs one: max abs diff {float(d.abs().max()):.4g}, rel {float(d.norm() / b[k].norm()):.3g}, same argmax {same_top:.4f}")
d = a["sparse"] - a["dense"]
print(f"(for scale: patched vs dense on two GPUs, rel {float(d.norm() / a['dense'].norm()):.3g})")
