"""The first half of the GPT MLP: a linear layer followed by exact (erf) GELU.

    y = gelu(x @ weight.T + bias),   gelu(z) = z * (1 + erf(z / sqrt(2))) / 2

The reference is `F.gelu(F.linear(...))`; it is the fallback, the test oracle and the benchmark
baseline. The Triton kernel (matmul with the bias and GELU fused into its epilogue) plugs in through
`kernels.backend.select`. The MLP's second linear (`c_proj`) stays a plain matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.backend import select


def linear_gelu_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    return F.gelu(F.linear(x, weight, bias))


def linear_gelu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Exact GELU of `x` (..., K) times `weight.T` (K, N) plus optional `bias` (N,)."""
    if weight.dim() != 2 or weight.size(1) != x.size(-1):
        raise ValueError(
            f"linear_gelu: weight must have shape (N, {x.size(-1)}) to match x {tuple(x.shape)}, "
            f"got {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != (weight.size(0),):
        raise ValueError(
            f"linear_gelu: bias must have shape ({weight.size(0)},), got {tuple(bias.shape)}"
        )
    return select("linear_gelu", x, linear_gelu_reference, None)(x, weight, bias)
