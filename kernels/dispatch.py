"""The backend switch: which implementation the public kernel entry points run.

"auto" runs an op's Triton kernel on CUDA tensors it supports and its PyTorch reference everywhere else
(other devices; inputs outside a kernel's limits, such as an unsupported head_dim); "triton"
runs the Triton kernel on every device (on the CPU that means the Triton interpreter, which tests use);
"reference" runs the PyTorch reference everywhere. On CUDA, the first time "auto" sends an op to its
reference for a reason, one warning on the "kernels" logger names the op, the input's shape and why.
An op that has no Triton kernel yet always runs its reference under "auto", and refuses "triton" with
a message rather than silently measuring the wrong thing.
"""

from __future__ import annotations

import contextlib
import logging
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


_fallbacks_logged: set[tuple[str, str]] = set()
log = logging.getLogger("fastgpt.kernels")


def _log_fallback(op: str, x: torch.Tensor, problem: str) -> None:
    """Say once per op and reason that `auto` runs the reference on CUDA (not while torch.compile traces:
    a log call there would break the graph; the trainer runs one eager forward first for that)."""
    if torch.compiler.is_compiling() or (op, problem) in _fallbacks_logged:
        return
    _fallbacks_logged.add((op, problem))
    log.warning(f"kernels: {op} runs its PyTorch reference for input {tuple(x.shape)} on {x.device}: "
                f"{problem.removeprefix(op + ': ')}")


def select(op: str, x: torch.Tensor, reference: Callable, triton: Callable | None,
           problem: str | None = None) -> Callable:
    """The implementation of `op` to run on tensor `x` under the current backend. `problem` is why the
    Triton kernel cannot take these inputs (head_dim, dtype, width), or None: "auto" falls back to the
    reference (saying so once on CUDA), "triton" raises it as a ValueError."""
    if _current == "reference":
        return reference
    if _current == "auto":
        if triton is None or not x.is_cuda:
            return reference
        if problem is not None:
            _log_fallback(op, x, problem)
            return reference
        return triton
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
    if problem is not None:
        raise ValueError(problem)
    return triton
