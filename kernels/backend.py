"""The backend switch: which implementation the public kernel entry points run.

"auto" runs an op's Triton kernel on CUDA tensors it supports and its PyTorch reference everywhere else
(other devices; inputs outside a kernel's limits, such as an unsupported head_dim); "triton"
runs the Triton kernel on every device (on the CPU that means the Triton interpreter, which tests use);
"reference" runs the PyTorch reference everywhere. An op that has no Triton kernel yet always runs its
reference under "auto", and refuses "triton" with a message rather than silently measuring the wrong
thing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch

BACKENDS = ("auto", "triton", "reference")

_current = "auto"


def set_backend(name: str) -> None:
    """Select the implementation every kernel entry point uses from now on."""
    global _current
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}: choose one of {', '.join(BACKENDS)}")
    _current = name


def get_backend() -> str:
    return _current


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Run a block with another backend selected, restoring the previous one afterwards."""
    previous = _current
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def select(op: str, x: torch.Tensor, reference: Callable, triton: Callable | None,
           supported: bool = True) -> Callable:
    """The implementation of `op` to run on tensor `x` under the current backend. `supported` says
    whether the Triton kernel handles these inputs (head_dim, dtype, width): "auto" falls back to the
    reference where it does not, "triton" lets the kernel's launcher refuse them with its message."""
    if _current == "reference":
        return reference
    if _current == "auto":
        return triton if (triton is not None and x.is_cuda and supported) else reference
    if triton is None:
        raise NotImplementedError(
            f"{op} has no Triton kernel yet: select backend 'auto' or 'reference'"
        )
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"{op}: the Triton kernels run on CUDA tensors, got a {x.device.type} tensor; move it to a GPU, "
            "select backend 'auto' or 'reference', or set TRITON_INTERPRET=1 (before importing kernels) to "
            "run them in the Triton interpreter"
        )
    return triton
