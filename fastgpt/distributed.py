"""Data-parallel training under torchrun: the process group and the few collectives the trainer needs.

Started by `torchrun` (RANK, LOCAL_RANK and WORLD_SIZE in the environment), each process trains a
replica on its own batches; DistributedDataParallel averages the gradients (NCCL on CUDA, gloo on
the CPU). Started plainly, everything here is a no-op on a world of one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from fastgpt.cli import UserError

# how long a collective may wait for a peer before the job fails rather than hangs
TIMEOUT = timedelta(minutes=5)


@dataclass
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")  # this process' training device

    @property
    def master(self) -> bool:
        """The process that logs and writes files."""
        return self.rank == 0

    def seed(self, base: int, stream: int) -> int:
        """A distinct seed per rank and per random stream (0: batches, 1: evaluation, 2: dropout)."""
        return base + 1000 * self.rank + stream

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of `t` over all ranks (in place)."""
        if self.size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= self.size
        return t

    def any(self, flag: torch.Tensor | bool) -> bool:
        """True on every rank if `flag` is true on any (a collective call under torchrun)."""
        if self.size == 1:
            return bool(flag)
        flag = torch.as_tensor(flag, device=self.device).to(torch.int32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def gather(self, obj: object) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out


def mps_available() -> bool:
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


def resolve_device(name: str) -> torch.device:
    """--device as a torch.device: `auto` is CUDA, else Apple's MPS, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu")
    device = torch.device(name)
    if device.type == "mps" and not mps_available():
        raise UserError(f"--device={name} but MPS (Apple's GPU backend) is not available here: it needs an "
                        f"Apple-silicon Mac and a torch built with MPS; use --device=cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device={name} but CUDA is not available here: use --device=cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device={name} but this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def init(device_flag: str) -> World:
    """Join the torchrun job if there is one; returns this process' place in it, with its device."""
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # what torchrun sets
    present = [name for name in names if name in os.environ]
    if not present:
        return World(device=resolve_device(device_flag))
    if len(present) < len(names):
        raise UserError(f"{', '.join(present)} set but not {', '.join(n for n in names if n not in present)}: "
                        f"launch with torchrun, or unset them for a single process")
    try:
        world = World(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    except ValueError:
        raise UserError("RANK, LOCAL_RANK and WORLD_SIZE must be integers: launch with torchrun") from None
    if device_flag == "mps":
        raise UserError("torchrun with --device=mps: MPS runs one process; train without torchrun")
    use_cuda = device_flag.startswith("cuda") or (device_flag == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise UserError(f"--device={device_flag} but CUDA is not available here: use --device=cpu")
        if world.local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {world.local_rank} has no GPU ({torch.cuda.device_count()} here): "
                            f"lower --nproc-per-node")
        world.device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(world.device)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=TIMEOUT)
    return world


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
