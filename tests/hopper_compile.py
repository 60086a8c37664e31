"""Compile the Gluon Hopper prefill kernel for sm90 without a GPU and print what it became, as JSON.

Run as a script (``python tests/hopper_compile.py HEAD_DIM STAGES PINGPONG``) by
test_kernel_sparse_prefill_hopper.py: it swaps Triton's active driver for one that only names an sm90 target, so
Triton's own pipeline (Gluon front end, MLIR passes, LLVM, ptxas) runs to a cubin on any machine. Nothing launches.
"""

from __future__ import annotations

import json
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver


class _Sm90Target:
    """Just enough of a driver for JITFunction.warmup: an sm90 target, device 0, no stream."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


def main(head_dim: int, stages: int, pingpong: bool) -> dict:
    driver.set_active(_Sm90Target())
    from triton.experimental.gluon import language as gl

    from patchattn.kernels.sparse_prefill import hopper

    n, block = 1024, 128
    q = torch.empty(1, 4, n, head_dim, dtype=torch.bfloat16)
    k = torch.empty(1, 1, n, head_dim, dtype=torch.bfloat16)
    counts = torch.zeros(1, 4, n // block, dtype=torch.int32)
    ids = torch.zeros(1, 4, n // block, n // block, dtype=torch.int32)
    layout = gl.NVMMASharedLayout.get_default_for([block, head_dim], gl.bfloat16)
    desc = hopper.TensorDescriptor.from_tensor(k.view(-1, head_dim), [block, head_dim], layout)
    compiled = hopper._sparse_prefill_hopper.warmup(
        q, q, desc, desc, counts, ids, *q.stride()[:3], *q.stride()[:3], *counts.stride()[:2], *ids.stride()[:3],
        4, 1, 4, n, n, n // block, 0.1,
        HEAD_DIM=head_dim, BLOCK_N=block, STAGES=stages, ELEM_BYTES=2, CONSUMER_REGS=hopper.CONSUMER_REGS,
        PRODUCER_REGS=hopper.PRODUCER_REGS, PINGPONG=pingpong, num_warps=4, grid=(1,),
    )
    compiled = compiled.result() if hasattr(compiled, "result") else compiled
    ptx = compiled.asm["ptx"]
    return dict(
        triton=triton.__version__,
        shared_bytes=compiled.metadata.shared,
        num_warps=compiled.metadata.num_warps,
        cubin_bytes=len(compiled.asm["cubin"]),
        wgmma=ptx.count("wgmma.mma_async"),
        wgmma_waits_1=ptx.count("wgmma.wait_group.sync.aligned 1"),
        setmaxnreg=sorted({line.split()[-1].rstrip(";") for line in ptx.splitlines() if "setmaxnreg" in line}),
        tma_loads=ptx.count("cp.async.bulk.tensor"),
    )


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1")))
