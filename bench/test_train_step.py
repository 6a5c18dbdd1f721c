"""Training-step and sampling throughput: `pytest bench/test_train_step.py`.

Training: one optimizer step of the real trainer (`fastgpt.train.train_step`: forward, backward,
clipping, fused AdamW) on random token windows, with tokens/sec (and on a GPU MFU and peak memory) in
extra_info, for the Triton kernels and the references, each under torch.compile's default mode and
reduce-overhead (CUDA graphs), and the references eager. On a GPU: the
shakespeare_char preset in bf16 autocast; on the CPU: the cpu preset in fp32, where the Triton cases are
skipped with the reason (the interpreter measures nothing useful).

Sampling: `model.generate` with and without the KV cache from a one-character prompt, new tokens per
second over the batch, eager, fp32 (what `python -m fastgpt.sample` runs).
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from fastgpt import kernels
from bench.common import CUDA, DEVICE, environment, needs_gpu, run_benchmark
from fastgpt.config import PRESETS
from fastgpt.data import Batches
from fastgpt.model import build_model
from fastgpt.train import train_step
from fastgpt.device import peak_flops

VOCAB = 65  # Tiny Shakespeare's
PRESET = "shakespeare_char" if CUDA else "cpu"
PEAK = peak_flops(DEVICE)  # bf16 dense FLOP/s of a known GPU, else None

# (backend, torch.compile mode or None for eager); reduce-overhead adds CUDA graphs, which only a GPU has
# (the order of what they teach: the headline pair first, then CUDA graphs, then eager)
CASES = [
    pytest.param("triton", "default", id=f"{PRESET}-triton-compiled", marks=needs_gpu),
    pytest.param("reference", "default", id=f"{PRESET}-reference-compiled"),
    pytest.param("triton", "reduce-overhead", id=f"{PRESET}-triton-compiled-cudagraphs", marks=needs_gpu),
    pytest.param("reference", "reduce-overhead", id=f"{PRESET}-reference-compiled-cudagraphs", marks=needs_gpu),
    pytest.param("reference", None, id=f"{PRESET}-reference-eager"),
]


@pytest.mark.parametrize("backend, mode", CASES)
def test_train_step(benchmark, backend, mode):
    compiled = mode is not None
    cfg = dataclasses.replace(PRESETS[PRESET], compile=compiled)
    torch.manual_seed(0)
    tokens = np.random.default_rng(0).integers(0, VOCAB, 1_000_000, dtype=np.uint8)
    batches = Batches(tokens, cfg.block_size, cfg.batch_size, DEVICE, seed=0)
    model = build_model(cfg.model_config(VOCAB)).to(DEVICE).train()
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                           DEVICE.type)
    step_model = torch.compile(model, mode=mode) if compiled else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if CUDA else nullcontext()

    def step():
        train_step(step_model, optimizer, batches, cfg.gradient_accumulation_steps, cfg.grad_clip, autocast)

    if CUDA:
        torch.cuda.reset_peak_memory_stats(DEVICE)
    with kernels.backend(backend):
        median = run_benchmark(benchmark, step, warmup=15 if compiled else 5, rounds=100)
    tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
    benchmark.extra_info.update(
        tokens_per_sec=tokens_per_iter / median, ms_per_iter=median * 1e3, preset=PRESET, backend=backend,
        compiled=compiled, compile_mode=mode, dtype="bfloat16" if CUDA else "float32",
        mfu=model.flops_per_token() * tokens_per_iter / median / PEAK if PEAK else None,
        peak_memory_mb=torch.cuda.max_memory_allocated(DEVICE) / 2**20 if CUDA else None,
        **environment(),
    )

SAMPLE_CASES = [pytest.param(backend, cache, id=f"{PRESET}-{backend}-{'cache' if cache else 'no-cache'}",
                             marks=[needs_gpu] if backend == "triton" else [])
                for backend in ("triton", "reference") for cache in (True, False)]


@pytest.mark.parametrize("backend, use_cache", SAMPLE_CASES)
def test_sample(benchmark, backend, use_cache):
    """New tokens/sec of generation: 4 samples of block_size tokens each from a one-token prompt."""
    cfg = PRESETS[PRESET]
    torch.manual_seed(0)
    model = build_model(cfg.model_config(VOCAB)).to(DEVICE).eval()
    new_tokens, samples = cfg.block_size, 4
    prompt = torch.zeros((samples, 1), dtype=torch.long, device=DEVICE)
    generator = torch.Generator(device=DEVICE).manual_seed(0)

    @torch.no_grad()
    def sample():
        model.generate(prompt, new_tokens, generator=generator, use_cache=use_cache)

    with kernels.backend(backend):
        median = run_benchmark(benchmark, sample, warmup=2, rounds=10 if CUDA else 3)
    benchmark.extra_info.update(
        tokens_per_sec=samples * new_tokens / median, ms_per_token=median * 1e3 / new_tokens, preset=PRESET,
        backend=backend, kv_cache=use_cache, dtype="float32", batch=samples, **environment(),
    )
