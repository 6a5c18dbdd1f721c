"""What every benchmark shares: the device, the versions it records, and timing that waits for the GPU."""

from __future__ import annotations

import platform
from collections.abc import Callable

import pytest
import torch
import triton

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")

# Triton kernels run on the CPU only in the interpreter, which measures Python, not the kernel.
needs_gpu = pytest.mark.skipif(not CUDA, reason="Triton kernels are timed on a GPU; the CPU runs them only "
                                                "in the interpreter, which measures nothing useful")


def device_name(device: torch.device = DEVICE) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")


def environment() -> dict:
    """Device and versions, for every benchmark's extra_info."""
    return {"device": device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "threads": torch.get_num_threads()}


def synchronize() -> None:
    if CUDA:
        torch.cuda.synchronize()


def run_benchmark(benchmark, fn: Callable[..., object], warmup: int, rounds: int,
                  setup: Callable[[], tuple] | None = None) -> float:
    """Median seconds of `fn(*setup())` over `rounds` timed calls, each waiting for the device to finish.
    `setup` (untimed, before every call) prepares what a call consumes, e.g. the forward whose graph a
    timed backward frees. Warm-up (and compilation) runs first, outside the rounds."""
    def prepare() -> tuple[tuple, dict]:
        args = setup() if setup else ()
        synchronize()
        return args, {}

    def run(*args) -> None:
        fn(*args)
        synchronize()

    for _ in range(warmup):
        run(*prepare()[0])
    benchmark.pedantic(run, setup=prepare, rounds=rounds, iterations=1)
    return benchmark.stats.stats.median
