"""Training-step throughput: `pytest bench/` (add `--benchmark-json=FILE` for machines).

One optimizer step of the real trainer (`fastgpt.train.train_step`: forward, backward, clipping, AdamW)
on random token windows, timed by pytest-benchmark after warm-up, with tokens/sec in extra_info. On the
CPU: the cpu preset on the reference ops, eager (what `python -m fastgpt.train` runs there) and
torch.compile'd. On CUDA: the shakespeare_char preset in bf16, eager and torch.compile'd.
"""

from __future__ import annotations

import dataclasses
import platform
from contextlib import nullcontext

import numpy as np
import pytest
import torch

import kernels
from fastgpt.config import PRESETS
from fastgpt.data import Batches
from fastgpt.model import build_model
from fastgpt.train import train_step

VOCAB = 65  # Tiny Shakespeare's
CUDA = torch.cuda.is_available()

# On the CPU, eager vs compiled is what decides the trainer's --compile default there.
CASES = [pytest.param("cpu", "reference", compiled, id=f"cpu-reference-{name}",
                      marks=pytest.mark.skipif(CUDA, reason="the cpu preset is a CPU job"))
         for compiled, name in ((False, "eager"), (True, "compiled"))]
CASES += [pytest.param("shakespeare_char", "reference", compiled, id=f"shakespeare_char-reference-{name}",
                       marks=pytest.mark.skipif(not CUDA, reason="the shakespeare_char preset is a GPU job"))
          for compiled, name in ((False, "eager"), (True, "compiled"))]


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")


@pytest.mark.parametrize("preset, backend, compiled", CASES)
def test_train_step(benchmark, preset, backend, compiled):
    device = torch.device("cuda" if CUDA else "cpu")
    cfg = dataclasses.replace(PRESETS[preset], compile=compiled)
    torch.manual_seed(0)
    tokens = np.random.default_rng(0).integers(0, VOCAB, 1_000_000, dtype=np.uint8)
    batches = Batches(tokens, cfg.block_size, cfg.batch_size, device, seed=0)
    model = build_model(cfg.model_config(VOCAB)).to(device).train()
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                           device.type)
    step_model = torch.compile(model) if compiled else model
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def step():
        loss, _ = train_step(step_model, optimizer, batches, cfg.gradient_accumulation_steps, cfg.grad_clip,
                             autocast)
        loss.item()  # waits for the device, so the round times the whole step

    with kernels.backend(backend):
        for _ in range(5 if not compiled else 15):  # warm-up (and compilation) outside the rounds
            step()
        benchmark.pedantic(step, rounds=100, iterations=1)
    tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
    benchmark.extra_info.update(
        tokens_per_sec=tokens_per_iter / benchmark.stats.stats.median,
        ms_per_iter=benchmark.stats.stats.median * 1e3,
        preset=preset, backend=backend, compiled=compiled, device=device_name(device),
        dtype="bfloat16" if device.type == "cuda" else "float32", torch=torch.__version__,
        threads=torch.get_num_threads(),
    )
