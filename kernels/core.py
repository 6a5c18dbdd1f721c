"""What the op files share: the dtypes the kernels take, the autocast dtype, the tensor checks of the one
support test that `auto` and the launchers both use (each op's `_problem`), and ahead-of-time compilation
specs built from a kernel's own argument names (tests/aot.py compiles them)."""

from __future__ import annotations

import torch

# Shared memory one block may use (the opt-in maximum), bytes, by compute capability: what limits a
# kernel's tiles and pipeline stages on each GPU generation (T4, V100, A100, RTX 30xx/A10, Jetson Orin,
# L4/RTX 40xx, H100/H200, B200, RTX 50xx)
SHARED_MEMORY = {75: 64 * 1024, 70: 96 * 1024, 80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024,
                 90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}


def shared_memory(arch: int | None) -> int:
    """SHARED_MEMORY of a compute capability (10 * major + minor); an unlisted one gets the nearest listed
    below it (48 KiB below them all); None (the interpreter) has no limit that matters."""
    if arch is None:
        return 1 << 30
    known = [a for a in SHARED_MEMORY if a <= arch]
    return SHARED_MEMORY[max(known)] if known else 48 * 1024


_archs: dict[int, int] = {}


def arch_of(x: torch.Tensor) -> int | None:
    """The compute capability of x's GPU as one number (sm_90 -> 90), or None off CUDA."""
    if not x.is_cuda:
        return None
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if index not in _archs:
        major, minor = torch.cuda.get_device_capability(index)
        _archs[index] = 10 * major + minor
    return _archs[index]


# the dtypes the Triton kernels take, with Triton's names for them (signatures of ahead-of-time specs)
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast computes in on x's device, or None outside autocast."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None


def tensor_problem(op: str, tensors: dict[str, torch.Tensor | None], one_dtype: bool = False,
                   any_dtype: bool = False) -> str | None:
    """Why a kernel cannot take these tensors (the first named is the one the others are held to), in one
    line, or None: every tensor on the first one's device, each a dtype of TRITON_TYPES (unless
    `any_dtype`: the op casts them first, as under autocast), and with `one_dtype` all of the same dtype."""
    named = [(label, t) for label, t in tensors.items() if t is not None]
    first_label, first = named[0]
    for label, t in named:
        if t.device != first.device:
            return f"{op}: {label} is on {t.device} but {first_label} is on {first.device}; move them together"
        if any_dtype:
            continue
        if t.dtype not in TRITON_TYPES:
            return (f"{op}: the Triton kernel takes float32, float16 or bfloat16, got {label} in {t.dtype}; use "
                    "kernels.set_backend('reference') for other dtypes")
        if one_dtype and t.dtype != first.dtype:
            return (f"{op}: the Triton kernel takes one dtype, got {label} in {t.dtype} and {first_label} in "
                    f"{first.dtype} (run under torch.autocast, or cast them)")
    return None


def aot_spec(fn, types: dict[str, str], constexprs: dict, num_warps: int, num_stages: int, tags: dict,
             divisible: list[str] | None = None) -> dict:
    """One tests/aot.py spec for `fn`: its signature is built from its own argument names, each a
    compile-time constant if `constexprs` sets it, else its type in `types`, else a 32-bit integer (strides
    and sizes). `divisible` names the integer arguments the JIT would see as multiples of 16 (by default
    every stride: the layouts the launchers pass have them)."""
    missing = [name for name in constexprs if name not in fn.arg_names]
    if missing:
        raise ValueError(f"{fn.__name__} has no argument {', '.join(missing)}")
    signature = {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in fn.arg_names}
    if divisible is None:
        divisible = [name for name in fn.arg_names if name.startswith("stride_") and name not in constexprs]
    return {"fn": fn, "signature": signature, "constexprs": constexprs, "num_warps": num_warps,
            "num_stages": num_stages, "tags": tags, "divisible": divisible}
