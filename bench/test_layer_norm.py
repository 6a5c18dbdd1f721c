"""LayerNorm and the fused residual add + LayerNorm: `pytest bench/test_layer_norm.py`.

Forward, backward and forward+backward of the Triton kernel vs the PyTorch reference (eager) vs the reference
under torch.compile, at the GPT's rows (64*256, 384) and at (16384, 1024), bf16 and fp32. extra_info carries
gb_per_s: the bytes an ideal implementation must move (read x, write y; backward: read x and dy, write dx; the
residual variant also reads r, writes h and reads dh) over the median time: the GPU's own time on a GPU
(launch overhead excluded, see `bench.common.device_seconds`; extra_info also has the wall clock), the wall
clock on the CPU. On the CPU only the references run, in fp32: the Triton cases are skipped with the reason.
"""

from __future__ import annotations

import pytest
import torch

from bench.common import CUDA, DEVICE, environment, needs_gpu, run_benchmark
from fastgpt.kernels.layer_norm import (add_layer_norm_reference, add_layer_norm_triton, layer_norm_reference,
                               layer_norm_triton)

IMPLS = {
    "layer_norm": {"triton": layer_norm_triton, "reference": layer_norm_reference},
    "add_layer_norm": {"triton": add_layer_norm_triton, "reference": add_layer_norm_reference},
}
# full-size tensors a pass must read or write, per element of the (M, N) rows
TENSORS_MOVED = {("layer_norm", "fwd"): 2, ("layer_norm", "bwd"): 3,
                 ("add_layer_norm", "fwd"): 4, ("add_layer_norm", "bwd"): 4}
_compiled: dict = {}


def case_marks(impl: str, dtype: torch.dtype) -> list:
    if impl == "triton":
        return [needs_gpu]
    if dtype == torch.bfloat16 and not CUDA:
        return [pytest.mark.skip(reason="bf16 LayerNorm on the CPU is not what anyone trains with")]
    return []


CASES = [pytest.param(op, impl, rows, dtype, passes, marks=case_marks(impl, dtype),
                      id=f"{op}-{impl}-{rows[0]}x{rows[1]}-{str(dtype)[6:]}-{passes}")
         for op in IMPLS
         for rows in ((64 * 256, 384), (16384, 1024))
         for dtype in (torch.bfloat16, torch.float32)
         for impl in ("triton", "reference", "compiled")
         for passes in ("fwd", "bwd", "fwd+bwd")]


def implementation(op: str, impl: str):
    if impl != "compiled":
        return IMPLS[op][impl]
    if op not in _compiled:
        _compiled[op] = torch.compile(IMPLS[op]["reference"], dynamic=False)
    return _compiled[op]


@pytest.mark.parametrize("op, impl, rows, dtype, passes", CASES)
def test_layer_norm(benchmark, op, impl, rows, dtype, passes):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    m, n = rows
    x = torch.randn(rows, generator=g, device=DEVICE, dtype=dtype, requires_grad=True)
    r = torch.randn(rows, generator=g, device=DEVICE, dtype=dtype, requires_grad=True)
    w = torch.randn(n, generator=g, device=DEVICE, dtype=dtype, requires_grad=True)
    dy = torch.randn(rows, generator=g, device=DEVICE, dtype=dtype)
    fn = implementation(op, impl)
    inputs = (x, w) if op == "layer_norm" else (x, r, w)
    timing = dict(warmup=10 if impl == "compiled" else 5, rounds=50 if CUDA else 5, device_time=True)

    def forward():
        out = fn(*inputs)
        return (out,) if op == "layer_norm" else out

    def backward(outputs):
        torch.autograd.grad(outputs, inputs, (dy,) * len(outputs))

    if passes == "fwd":
        median = run_benchmark(benchmark, forward, **timing)
    elif passes == "bwd":
        median = run_benchmark(benchmark, backward, setup=lambda: (forward(),), **timing)
    else:
        median = run_benchmark(benchmark, lambda: backward(forward()), **timing)
    tensors = sum(TENSORS_MOVED[(op, p)] for p in ("fwd", "bwd") if p in passes)
    benchmark.extra_info.update(
        gb_per_s=tensors * m * n * x.element_size() / median / 1e9, op=op, backend=impl,
        rows=list(rows), dtype=str(dtype)[6:], passes=passes, **environment(),
    )
