"""What every benchmark shares: the device, the versions it records, and timing that waits for the GPU."""

from __future__ import annotations

import platform
import statistics
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
                  setup: Callable[[], tuple] | None = None, device_time: bool = False) -> float:
    """Median seconds of `fn(*setup())` over `rounds` timed calls, each waiting for the device to finish.
    `setup` (untimed, before every call) prepares what a call consumes, e.g. the forward whose graph a
    timed backward frees. Warm-up (and compilation) runs first, outside the rounds.

    pytest-benchmark's table is that wall clock, launch overhead included. With `device_time` on a GPU the
    call is timed again by `device_seconds` and that is returned: the kernel benchmarks' figures (GB/s,
    TFLOP/s) are the kernels' own; extra_info keeps both as wall_ms and device_ms."""
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
    wall = benchmark.stats.stats.median
    device = device_seconds(fn, rounds, setup) if device_time else None
    benchmark.extra_info.update(wall_ms=wall * 1e3, device_ms=device * 1e3 if device is not None else None)
    return device if device is not None else wall


# An L2 flush bigger than any GPU's L2 (H100: 50 MB), and a GPU spin of about a millisecond.
FLUSH_BYTES = 256 * 2**20
SPIN_CYCLES = 2_000_000


def device_seconds(fn: Callable[..., object], rounds: int, setup: Callable[[], tuple] | None = None
                   ) -> float | None:
    """Median GPU time of one call of `fn(*setup())`, from CUDA events around it; None on the CPU.

    Before each call the GPU spins for about a millisecond and then flushes L2, so the host has queued the
    whole call before the GPU reaches it: Python, dispatch and launch overhead are not counted, and no
    call finds its inputs in L2 (as `triton.testing.do_bench`, but flushing by reading, which leaves
    clean lines: a zero-fill leaves dirty ones that the timed kernel would pay to write back). That is the kernels' own cost, what is left
    once CUDA graphs remove the launches; run_benchmark's wall-clock median counts the overhead too.
    """
    if not CUDA:
        return None
    flush = torch.ones(FLUSH_BYTES // 4, dtype=torch.float32, device=DEVICE)
    flushed = torch.empty((), dtype=torch.float32, device=DEVICE)
    events = []
    for _ in range(rounds):
        args = setup() if setup else ()
        torch.cuda._sleep(SPIN_CYCLES)
        torch.sum(flush, dim=0, out=flushed)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events) / 1e3
