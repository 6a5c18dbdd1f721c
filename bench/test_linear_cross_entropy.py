"""The output layer and its loss: `pytest bench/test_linear_cross_entropy.py`.

Forward+backward (one training step's worth: the loss and the gradients of x and the weight) of
  triton     the fused chunks with the Triton softmax-gradient kernel (kernels.linear_cross_entropy_triton),
  reference  the same chunks in PyTorch,
  plain      F.linear + F.cross_entropy over the whole logits (eager),
  compiled   the plain loss under torch.compile (Inductor fuses the softmax and its gradient itself),
at the shakespeare_char batch (64 x 256 rows of 384) with its 65 characters and with GPT-2's vocabulary
(50257 classes over nanoGPT's 50304 padded rows), bf16 and fp32. extra_info has tflops (the two matmuls
forward and the two backward: 6 * rows * C * V over the median time) and, on a GPU, peak_gib: the memory the
call allocated at its peak above what its inputs hold. On the CPU only the PyTorch paths run, in fp32 and
with 2048 rows.
"""

from __future__ import annotations

import pytest
import torch

from bench.common import CUDA, DEVICE, environment, needs_gpu, run_benchmark
from fastgpt.kernels.linear_cross_entropy import (linear_cross_entropy_plain, linear_cross_entropy_reference,
                                                  linear_cross_entropy_triton)

IMPLS = ("triton", "reference", "plain", "compiled")
VOCABS = ((65, 65), (50304, 50257))  # (weight rows, classes)
ROWS = 64 * 256 if CUDA else 2048
C = 384
_compiled: list = []


def case_marks(impl: str, dtype: torch.dtype) -> list:
    if impl == "triton":
        return [needs_gpu]
    if not CUDA and (dtype == torch.bfloat16 or impl == "compiled"):
        return [pytest.mark.skip(reason="on 2 CPU cores the fp32 PyTorch paths are the ones worth the minutes")]
    return []


CASES = [pytest.param(impl, vocab, dtype, marks=case_marks(impl, dtype),
                      id=f"{impl}-{ROWS}x{C}x{vocab[1]}-{str(dtype)[6:]}")
         for vocab in VOCABS for dtype in (torch.bfloat16, torch.float32) for impl in IMPLS]


def implementation(impl: str):
    if impl == "triton":
        return linear_cross_entropy_triton
    if impl == "reference":
        return linear_cross_entropy_reference
    if impl == "plain":
        return linear_cross_entropy_plain
    if not _compiled:
        _compiled.append(torch.compile(linear_cross_entropy_plain, dynamic=False))
    return _compiled[0]


@pytest.mark.parametrize("impl, vocab, dtype", CASES)
def test_linear_cross_entropy(benchmark, impl, vocab, dtype):
    rows, classes = vocab
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(ROWS, C, generator=g, device=DEVICE, dtype=dtype, requires_grad=True)
    w = (torch.randn(rows, C, generator=g, device=DEVICE) / C ** 0.5).to(dtype).requires_grad_()
    t = torch.randint(classes, (ROWS,), generator=g, device=DEVICE)
    fn = implementation(impl)

    def step():
        loss = fn(x, w, t, None, -100, classes)
        torch.autograd.grad(loss, (x, w))

    peak = None
    if CUDA:
        step()
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - held) / 2**30
    median = run_benchmark(benchmark, step, warmup=10 if impl == "compiled" else 3, rounds=30 if CUDA else 3,
                           device_time=True)
    benchmark.extra_info.update(tflops=6 * ROWS * C * rows / median / 1e12, peak_gib=peak, backend=impl,
                                shape=[ROWS, C, rows], classes=classes, dtype=str(dtype)[6:], **environment())
