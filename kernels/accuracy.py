"""The kernels' accuracy rule, shared by the tests and the GPU report's smoke phase.

FlashAttention's rule: against the op computed in fp64, a kernel's error may be at most twice PyTorch's
own error in the same input dtype, plus a floor of a few units in the last place of that dtype relative
to the result's scale (PyTorch's CPU ops sometimes compute in higher precision than the dtype).
"""

from __future__ import annotations

import torch

ERROR_FLOOR = {torch.float32: 4e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def compare(actual: torch.Tensor, exact: torch.Tensor, torch_lowp: torch.Tensor) -> dict:
    """The kernel's max error against `exact` (fp64), PyTorch's (`torch_lowp`, its op in the kernel's
    dtype), the bound the rule allows and whether the kernel is within it (finite, same shape)."""
    exact = exact.double()
    if actual.shape != exact.shape:
        return {"ok": False, "why": f"shape {tuple(actual.shape)} != {tuple(exact.shape)}"}
    if not torch.isfinite(actual).all():
        return {"ok": False, "why": "non-finite values"}
    empty = exact.numel() == 0
    error = 0.0 if empty else (actual.double() - exact).abs().max().item()
    torch_error = 0.0 if empty else (torch_lowp.double() - exact).abs().max().item()
    # results that are ~0 (the gradient of a query that sees one key) get the floor of a 0.01 scale
    scale = max(0.0 if empty else exact.abs().max().item(), 1e-2)
    bound = 2 * torch_error + ERROR_FLOOR[actual.dtype] * scale
    return {"ok": error <= bound, "error": error, "torch_error": torch_error, "bound": bound, "scale": scale}
