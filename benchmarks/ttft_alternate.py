"""Dense vs patched time to first token, alternated, where every layer is under its break-even (issue 19).

GPU only; never part of the test suite. Below the fitted break-even a patched layer runs the same SDPA call as dense,
so any difference is the patch's own host work. ``ttft.py`` times dense and patched minutes apart, and clocks drift;
this script alternates them: per round, ``--reps`` forwards of each (dense first in even rounds, patched first in odd
ones: on 2026-12-07 the 8B shape at 2K read 0.8 ms slower patched in all three rounds, each of which ran dense
first), each timed twice -- to the end of the GPU's work (synchronised: the time to first token) and to the forward's
return without waiting (the host's share: launching). Writes JSON: per length, per round, [dense ms, patched ms, dense
host ms, patched host ms], and the medians' ratio.

    python benchmarks/ttft_alternate.py --shape 1b --lengths 2048,4096 --rounds 3 --reps 15
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import patchattn  # noqa: E402
from patchattn.calibrate.breakeven import fit_break_even  # noqa: E402
from ttft import SHAPES, random_model, sparse_recipe  # noqa: E402


def timed(model, ids, reps: int) -> tuple[float, float]:
    """(median ms to the end of the GPU's work, median ms to the forward's return) over ``reps`` forwards."""
    ends, hosts = [], []
    with torch.no_grad():
        model(ids, logits_to_keep=1, use_cache=False)
        for _ in range(reps):
            torch.cuda.synchronize()
            start = time.perf_counter()
            model(ids, logits_to_keep=1, use_cache=False)
            hosts.append((time.perf_counter() - start) * 1000)
            torch.cuda.synchronize()
            ends.append((time.perf_counter() - start) * 1000)
    return statistics.median(ends), statistics.median(hosts)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--kind", default="issue19")
    parser.add_argument("--lengths", default="2048,4096")
    parser.add_argument("--break-even", default="2048,4096,8192", help="lengths the break-even is fitted at first")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--out", default="ttft_alternate.json")
    parser.add_argument("--through-patchattn", action="store_true", help="route every layer through patchattn's "
                        "attention function even where all are dense (as before patchattn/dense_forward.py)")
    args = parser.parse_args()
    if args.through_patchattn:
        from patchattn import cache_hooks

        cache_hooks.dense_prefill = lambda *a: None
    model = random_model(None, args.shape)
    recipe = sparse_recipe(model.config, args.kind)
    fit = [int(x) for x in args.break_even.split(",")]
    fit_ids = torch.randint(0, 128256, (1, max(fit)), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    fit_break_even(model, recipe, fit_ids, fit)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": args.shape,
              "kind": args.kind, "through_patchattn": args.through_patchattn, "break_even": recipe.layer_min_tokens, "lengths": {}}
    for n in [int(x) for x in args.lengths.split(",")]:
        ids = torch.randint(0, 128256, (1, n), device="cuda", generator=torch.Generator(device="cuda").manual_seed(n))
        rounds = []
        for i in range(args.rounds):
            if i % 2:  # odd rounds time the patched model first, so the order within a round biases neither
                with patchattn.patched(model, recipe, backend="auto"):
                    patched, patched_host = timed(model, ids, args.reps)
                dense, dense_host = timed(model, ids, args.reps)
            else:
                dense, dense_host = timed(model, ids, args.reps)
                with patchattn.patched(model, recipe, backend="auto"):
                    patched, patched_host = timed(model, ids, args.reps)
            rounds.append([round(x, 3) for x in (dense, patched, dense_host, patched_host)])
        speed = statistics.median(r[0] for r in rounds) / statistics.median(r[1] for r in rounds)
        result["lengths"][str(n)] = {"rounds": rounds, "speedup": round(speed, 4)}
        print(f"{n:>7} tokens: dense / patched " + ", ".join(f"{r[0]:.2f}/{r[1]:.2f} ms (host {r[2]:.2f}/{r[3]:.2f})"
                                                              for r in rounds) + f" -> {speed:.3f}x", flush=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
