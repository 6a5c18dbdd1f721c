"""linear + GELU (the MLP's first half): `pytest bench/test_linear_gelu.py`.

Forward, backward and forward+backward of the Triton kernel (matmul with the bias and GELU in its epilogue) vs
the PyTorch reference (cuBLAS matmul, then GELU) vs the reference under torch.compile (cuBLAS plus a fused
elementwise kernel), at the GPT's MLP (64*256, 384) -> 1536 and at (16384, 1024) -> 4096, bf16 and fp32.
extra_info carries tflops: 2*M*N*K per forward, twice that per backward, over the median time: the GPU's own
time on a GPU (launch overhead excluded, see `bench.common.device_seconds`; extra_info also has the wall
clock), the wall clock on the CPU. On the CPU only the references run, in fp32 and at the smaller shape: the
other cases are skipped with the reason.
"""

from __future__ import annotations

import pytest
import torch

from bench.common import CUDA, DEVICE, environment, needs_gpu, run_benchmark
from fastgpt.kernels.linear_gelu import linear_gelu_reference, linear_gelu_triton

_compiled: list = []


def case_marks(impl: str, dtype: torch.dtype, shape: tuple) -> list:
    if impl == "triton":
        return [needs_gpu]
    if not CUDA and (dtype == torch.bfloat16 or shape[0][1] > 384):
        return [pytest.mark.skip(reason="on 2 CPU cores only the GPT's own shape in fp32 is worth the minutes")]
    return []


SHAPES = (((64 * 256, 384), 1536), ((16384, 1024), 4096))
CASES = [pytest.param(impl, shape, dtype, passes, marks=case_marks(impl, dtype, shape),
                      id=f"{impl}-{shape[0][0]}x{shape[0][1]}x{shape[1]}-{str(dtype)[6:]}-{passes}")
         for shape in SHAPES
         for dtype in (torch.bfloat16, torch.float32)
         for impl in ("triton", "reference", "compiled")
         for passes in ("fwd", "bwd", "fwd+bwd")]


def implementation(impl: str):
    if impl == "triton":
        return linear_gelu_triton
    if impl == "reference":
        return linear_gelu_reference
    if not _compiled:
        _compiled.append(torch.compile(linear_gelu_reference, dynamic=False))
    return _compiled[0]


@pytest.mark.parametrize("impl, shape, dtype, passes", CASES)
def test_linear_gelu(benchmark, impl, shape, dtype, passes):
    (m, k), n = shape
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(m, k, generator=g, device=DEVICE, dtype=dtype, requires_grad=True)
    w = (torch.randn(n, k, generator=g, device=DEVICE) / k ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(n, generator=g, device=DEVICE, dtype=dtype, requires_grad=True)
    dy = torch.randn(m, n, generator=g, device=DEVICE, dtype=dtype)
    fn = implementation(impl)

    def backward(y):
        torch.autograd.grad(y, (x, w, b), dy)

    timing = dict(warmup=10 if impl == "compiled" else 5, rounds=50 if CUDA else 3, device_time=True)
    if passes == "fwd":
        median = run_benchmark(benchmark, lambda: fn(x, w, b), **timing)
    elif passes == "bwd":
        median = run_benchmark(benchmark, backward, setup=lambda: (fn(x, w, b),), **timing)
    else:
        median = run_benchmark(benchmark, lambda: backward(fn(x, w, b)), **timing)
    flops = 2 * m * n * k * ((1 if "fwd" in passes else 0) + (2 if "bwd" in passes else 0))
    benchmark.extra_info.update(
        tflops=flops / median / 1e12, backend=impl, shape=[m, k, n], dtype=str(dtype)[6:],
        passes=passes, **environment(),
    )
