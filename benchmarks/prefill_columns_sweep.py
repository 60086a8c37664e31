"""Token-column gather loop sweep: pipelining depth (COLUMN_STAGES) x launch config, for token vertical-slash at ~10%
density (the prefill.py vst10 case), 32K and 128K, layout blocks of 128 and 64. GPU only; writes $OUT/colsweep.json.

    python benchmarks/prefill_columns_sweep.py
"""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import prefill as P  # noqa: E402
from patchattn.kernels import finalize_ragged  # noqa: E402
from patchattn.kernels.sparse_prefill import kernel as K  # noqa: E402
from patchattn.layout import column_counts  # noqa: E402

rows = []
for n in (32768, 131072):
    for bs in (128, 64):
        P.BS = bs
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(1, 32, n, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(1, 8, n, 128, device="cuda", dtype=torch.bfloat16, generator=g)
        build, desc = P.token_case("vst10", q, k, n)
        raw, cols = build()
        counts, ids, fill = finalize_ragged(raw)
        cc = column_counts(cols, counts.shape[-1], bs)
        ref = None
        for stages in (None, 1, 2, 3):
            for cfg in ((None, None, None), (64, 64, 4), (128, 64, 8)):
                bm, bn, w = cfg
                if bm is not None and (bs % bm or bs % bn):
                    continue
                K.COLUMN_STAGES = stages
                fn = lambda: K.sparse_prefill_triton(q, k, v, counts, ids, bs, density=fill, columns=cols, column_counts=cc, column_keep=raw, block_m=bm, block_n=bn, num_warps=w)
                try:
                    out = fn()
                    ref = out if ref is None else ref
                    err = P.rel_err(out, ref)
                    ms = P.bench(fn)
                except Exception as e:
                    ms, err = None, str(e)[:80]
                r = dict(n=n, bs=bs, stages=stages, cfg=cfg, ms=ms, err=err, desc=desc)
                rows.append(r); print(r, flush=True)
        del q, k, v, raw, cols, counts, ids
        torch.cuda.empty_cache()
Path(os.environ.get("OUT", "."), "colsweep.json").write_text(json.dumps(rows, indent=1))
