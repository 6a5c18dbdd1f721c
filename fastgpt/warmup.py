"""Work before the training clock starts, which must leave the run exactly as it was: compiling the
training and evaluation graphs, and (on CUDA) one eager forward in which an op that `auto` sends to its
reference says so. Each runs on a throwaway batch, its RNG states restored afterwards."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

from fastgpt.device import device_rng_state, set_device_rng_state, synchronize


@contextlib.contextmanager
def throwaway_batch(run) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A training batch from a generator of its own, for work that must leave the run as it was: torch's
    and CUDA's RNG states are restored afterwards (dropout draws from them)."""
    rng = torch.get_rng_state(), device_rng_state(run.device)
    try:
        yield run.train_batches.next(run.train_batches.seeded_generator(0))
    finally:
        torch.set_rng_state(rng[0])
        set_device_rng_state(run.device, rng[1])


def say_fallbacks(run) -> None:
    """One eager forward on a throwaway batch: on CUDA, an op that `auto` sends to its reference says so
    here (kernels/dispatch.py), which it cannot while torch.compile traces."""
    with throwaway_batch(run) as (x, y), torch.no_grad(), run.autocast:
        run.raw_model.eval()
        run.raw_model(x, y)
    run.raw_model.train()


def compile_graphs(run) -> float:
    """Compile the training and the evaluation graphs on a throwaway batch before the clock starts, so
    training times are steady-state times; the run is left exactly as it was (no optimizer step,
    gradients cleared, RNG states restored). Returns the seconds it took."""
    started = time.perf_counter()
    if run.device.type == "cuda":
        say_fallbacks(run)
    with throwaway_batch(run) as (x, y):
        with run.autocast:
            _, loss = run.model(x, y)
        loss.backward()
        run.optimizer.zero_grad(set_to_none=True)
        run.core.eval()
        with torch.no_grad(), run.autocast:
            run.core(x, y)
        run.core.train()
    synchronize(run.device)
    return time.perf_counter() - started
