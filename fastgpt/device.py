"""The device a run trains on: its compute dtype, its peak FLOP/s (for MFU), its RNG state, waiting for
it, and the CPU allocator's tuning."""

from __future__ import annotations

import ctypes

import torch

from fastgpt.cli import UserError


# dense 16-bit tensor-core peaks in FLOP/s (bf16; fp16 on the T4 and V100, which have no bf16), matched in
# this order against torch.cuda.get_device_name() (the first key found in the name wins, so "H100 NVL"
# before "H100" and "L40S", "L40" before "L4")
PEAK_BF16_FLOPS = {
    "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12, "H200 NVL": 835e12, "H200": 989e12,
    "A100": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10G": 70e12, "A10": 125e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12,
}


def peak_flops(device: torch.device, dtype: str = "bfloat16") -> float | None:
    """The device's dense peak for the run's matmuls: bf16, or TF32 (half of it on these GPUs) for float32
    runs, which the trainer lets use TF32. None off CUDA or for a GPU not in the table."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)
    return peak / 2 if peak is not None and dtype == "float32" else peak


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory for reuse instead of returning it to the OS (CPU training only; CUDA
    has its own caching allocator). By default blocks over 128 KiB are mmap'ed and unmapped on free, and
    the heap top is trimmed, so every step's activations come back as fresh pages that the kernel must
    fault in and zero: about 1,000 page faults and several ms of system time per step of the cpu preset.
    With the thresholds raised, a step reuses the previous step's memory. Returns whether glibc took both
    settings (False on other C libraries)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameters, <malloc.h>
    # 32 MiB is the largest mmap threshold every glibc accepts (older ones refuse more than half of a
    # 64 MiB heap); blocks above it, rare on a CPU, are still mmap'ed
    mmap_set = libc.mallopt(m_mmap_threshold, 32 << 20)
    trim_set = libc.mallopt(m_trim_threshold, 1 << 30)
    return bool(mmap_set and trim_set)


def resolve_dtype(flag: str, device: torch.device) -> str:
    """The run's compute dtype: `auto` is bf16 autocast on a CUDA GPU that has bf16, fp16 autocast with a
    loss scaler on one without (a T4, a V100), float32 elsewhere (nanoGPT's rule)."""
    if flag != "auto":
        if flag == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError(f"--dtype=bfloat16 but {torch.cuda.get_device_name(device)} has no bf16: use "
                            f"--dtype=float16 (or auto, which picks it)")
        return flag
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def device_rng_state(device: torch.device) -> torch.Tensor | None:
    """The RNG state of the device's own generator (dropout draws from it): CUDA's or MPS's; None on the CPU,
    whose state is torch.get_rng_state()."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    if device.type == "mps":
        return torch.mps.get_rng_state()
    return None


def set_device_rng_state(device: torch.device, state: torch.Tensor | None) -> None:
    if state is None:
        return
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    elif device.type == "mps":
        torch.mps.set_rng_state(state)


def rng_states(device: torch.device, batches: torch.Generator) -> dict:
    """This process' RNG states as a checkpoint keeps them: torch's, the device's own (dropout draws from
    it) and the batch stream's generator."""
    return {"device": device.type, "torch": torch.get_rng_state(),
            "cuda": device_rng_state(device) if device.type == "cuda" else None,
            "mps": device_rng_state(device) if device.type == "mps" else None,
            "batches": batches.get_state()}
