"""Causal attention: `pytest bench/test_attention.py` (add `--benchmark-json=FILE` for machines).

Forward, backward and forward+backward of the Triton flash-attention kernel vs
`F.scaled_dot_product_attention` under each SDPA backend (flash, efficient, math; via
`torch.nn.attention.sdpa_kernel`) vs the reference (SDPA choosing for itself), in bf16 at the GPT's
training shape (B=64, H=6, T=256, D=64) and at T=1024 and T=4096 with the batch shrunk to keep 16k
tokens; and a sliding window of 256 keys at T=1024 and T=4096, whose cost should grow linearly in T
(SDPA has no sliding-window flash kernel: it runs on an explicit mask). q, k, v are strided views of one
(B, T, 3C) projection, as the model makes them, in four copies used in turn so that no round finds its
inputs in L2.

extra_info carries tflops: causal attention's useful FLOPs, 4*D per (query, attended key) pair in the forward
(2*B*H*T*T*D for full causal attention), 2.5x that in the backward, over the median time: the GPU's own time
on a GPU (launch overhead excluded, see `bench.common.device_seconds`; extra_info also has the wall clock),
the wall clock on the CPU. On the CPU the GPU cases are skipped with the reason; one small fp32 reference case
runs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastgpt import kernels
from bench.common import CUDA, DEVICE, environment, needs_gpu, run_benchmark
from fastgpt.kernels.attention import causal_attention_reference, causal_mask

SDPA_BACKENDS = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "sdpa-math": SDPBackend.MATH}
IMPLS = ("triton", *SDPA_BACKENDS, "reference")
H, D = 6, 64
# (B, T, window): the training shape, longer sequences at ~16k tokens, and sliding windows
SHAPES = [(64, 256, None), (16, 1024, None), (4, 4096, None), (16, 1024, 256), (4, 4096, 256)]
COPIES = 4  # input sets used in turn: 4 x (q, k, v, dout) at the smallest shape is ~150 MB, over L2


def attended_pairs(t: int, window: int | None) -> int:
    """(query, key) pairs causal attention over t positions computes: sum over i of min(i + 1, window)."""
    w = t if window is None else min(window, t)
    return t * w - w * (w - 1) // 2


def attention_fn(impl: str, window: int | None, t: int):
    """The implementation as a function of (q, k, v); SDPA backends with the mask they need."""
    if impl == "triton":
        def triton(q, k, v):
            with kernels.backend("triton"):
                return kernels.causal_attention(q, k, v, 0.0, window)
        return triton
    if impl == "reference":
        return lambda q, k, v: causal_attention_reference(q, k, v, 0.0, window)
    mask = None if window is None else causal_mask(t, t, window, DEVICE)

    def sdpa(q, k, v):
        with sdpa_kernel(SDPA_BACKENDS[impl]):
            if mask is None:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return sdpa


GPU_CASES = [pytest.param(impl, b, t, window, passes, marks=needs_gpu,
                          id=f"{impl}-B{b}-T{t}-{'causal' if window is None else f'window{window}'}-{passes}")
             for b, t, window in SHAPES
             for impl in IMPLS
             if not (window is not None and impl == "sdpa-flash")  # flash takes no mask
             for passes in ("fwd", "bwd", "fwd+bwd")]
CPU_CASES = [pytest.param("reference", 4, 256, None, "fwd+bwd", id="cpu-reference-B4-T256-causal-fwd+bwd",
                          marks=pytest.mark.skipif(CUDA, reason="the CPU baseline; GPUs run the cases above"))]


@pytest.mark.parametrize("impl, b, t, window, passes", GPU_CASES + CPU_CASES)
def test_attention(benchmark, impl, b, t, window, passes):
    dtype = torch.bfloat16 if CUDA else torch.float32
    g = torch.Generator(device=DEVICE).manual_seed(0)
    copies = []
    for _ in range(COPIES if CUDA else 1):
        qkv = torch.randn(b, t, 3 * H * D, generator=g, device=DEVICE, dtype=dtype).requires_grad_()
        q, k, v = (x.view(b, t, H, D).transpose(1, 2) for x in qkv.split(H * D, dim=2))  # (B, H, T, D)
        copies.append((q, k, v, torch.randn(b, H, t, D, generator=g, device=DEVICE, dtype=dtype)))
    fn = attention_fn(impl, window, t)
    turn = iter(range(10**9))

    def inputs():
        return copies[next(turn) % len(copies)]

    def forward(q, k, v, dout):
        return fn(q, k, v)

    def backward(out, q, k, v, dout):
        torch.autograd.grad(out, (q, k, v), dout)

    def forward_backward(q, k, v, dout):
        backward(fn(q, k, v), q, k, v, dout)

    try:
        fn(*inputs()[:3])  # an SDPA backend that cannot take this case says so here
    except RuntimeError as error:
        pytest.skip(f"{impl} does not run this case: {str(error).splitlines()[0][:200]}")
    timing = dict(warmup=10 if CUDA else 1, rounds=50 if CUDA else 3, device_time=True)
    if passes == "fwd":
        median = run_benchmark(benchmark, forward, setup=inputs, **timing)
    elif passes == "bwd":
        def setup():
            q, k, v, dout = inputs()
            return fn(q, k, v), q, k, v, dout
        median = run_benchmark(benchmark, backward, setup=setup, **timing)
    else:
        median = run_benchmark(benchmark, forward_backward, setup=inputs, **timing)
    forward_flops = 4 * b * H * D * attended_pairs(t, window)
    flops = forward_flops * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[passes]
    benchmark.extra_info.update(
        backend=impl, passes=passes, batch=b, heads=H, seq_len=t, head_dim=D, window=window,
        dtype=str(dtype).removeprefix("torch."), tflops=flops / median / 1e12,
        **environment(),
    )
