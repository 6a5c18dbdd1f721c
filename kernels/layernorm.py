"""LayerNorm over the last dimension, with an optional bias (nanoGPT's `bias=False` default drops it).

    y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias,   var biased (divides by N)

The reference is `torch.nn.functional.layer_norm`; it is the fallback, the test oracle and the
benchmark baseline. The Triton kernel (fused forward with fp32 statistics, fused backward) plugs in
through `kernels.backend.select`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.backend import select


def layer_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    return F.layer_norm(x, (x.size(-1),), weight, bias, eps)


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """LayerNorm of `x` (..., N) with `weight` (N,) and optional `bias` (N,)."""
    n = x.size(-1)
    if weight.shape != (n,) or (bias is not None and bias.shape != (n,)):
        raise ValueError(
            f"layer_norm: weight and bias must have shape ({n},) to match x {tuple(x.shape)}, "
            f"got weight {tuple(weight.shape)}"
            + ("" if bias is None else f" and bias {tuple(bias.shape)}")
        )
    return select("layer_norm", x, layer_norm_reference, None)(x, weight, bias, eps)
