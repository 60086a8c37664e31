"""What the Triton kernel tests share.

Triton reads TRITON_INTERPRET when it (and each kernel) is first imported, so importing this module first switches
the interpreter on where there is no CUDA. Importing patchattn imports transformers, which imports Triton: when
another test module did that first the switch comes too late, the kernel tests skip (``runs_kernel``) and
``rerun_interpreted`` runs the file's kernel tests anew in a subprocess with the interpreter on.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")


def is_interpreted(kernel_fn) -> bool:
    """Whether ``kernel_fn`` and Triton's own jit'd helpers (tl.max, tl.sum...) run in the interpreter."""
    import triton

    return all(type(fn).__name__ == "InterpretedFunction" for fn in (kernel_fn, triton.language.standard.max))


def runs_kernel_mark(interpreted: bool) -> pytest.MarkDecorator:
    """Skip unless the kernel runs: on a GPU, or interpreted."""
    return pytest.mark.skipif(
        not ON_GPU and not interpreted,
        reason="no CUDA, and Triton was imported before TRITON_INTERPRET=1 could be set: "
        "test_kernel_in_interpreter_subprocess runs these",
    )


def rerun_interpreted(test_file: str, selection: str, timeout_s: int) -> None:
    """Run ``selection`` (a pytest -k expression) of ``test_file`` in a fresh interpreter with TRITON_INTERPRET=1;
    fail unless it passed without skipping."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-m", "not gpu", "-k", selection]
    res = subprocess.run(cmd, env=env, cwd=Path(test_file).resolve().parents[1], capture_output=True, text=True, timeout=timeout_s)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and "skipped" not in res.stdout.splitlines()[-1], res.stdout[-2000:]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()
