"""Causal multi-head self-attention, optionally restricted to a sliding window, with dropout on the
attention probabilities.

    S = q @ k.T / sqrt(D);  S[i, j] = -inf unless  i' - W < j <= i'   (i' = i + Tk - Tq);
    P = dropout(softmax(S));  out = P @ v

q is (B, H, Tq, D) and k, v are (B, H, Tk, D) with Tq <= Tk: the queries are the *last* Tq positions of
the key sequence (the causal mask is aligned bottom-right), which is what KV-cached generation needs.
`window=W` lets query i' see keys i'-W+1..i' only; `window=None` is full causal attention.

The reference is `torch.nn.functional.scaled_dot_product_attention` (its fused causal path when the
mask is plain causal, an explicit boolean mask otherwise); it is the fallback, the test oracle and the
benchmark baseline. The Triton flash-attention kernel plugs in through `kernels.backend.select`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.backend import select


def causal_mask(tq: int, tk: int, window: int | None, device: torch.device) -> torch.Tensor:
    """(tq, tk) boolean mask, True where query i (at key position i + tk - tq) may attend key j."""
    i = torch.arange(tk - tq, tk, device=device)[:, None]
    j = torch.arange(tk, device=device)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= j > i - window
    return allowed


def causal_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    window: int | None = None,
) -> torch.Tensor:
    tq, tk = q.size(-2), k.size(-2)
    if tq == tk and (window is None or window >= tk):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    mask = causal_mask(tq, tk, window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    window: int | None = None,
) -> torch.Tensor:
    """Causal attention of q (B, H, Tq, D) over k, v (B, H, Tk, D), Tq <= Tk; returns (B, H, Tq, D)."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or q.shape[:2] != k.shape[:2] \
            or q.size(-1) != k.size(-1) or q.size(-2) > k.size(-2):
        raise ValueError(
            "causal_attention: expected q (B, H, Tq, D) and k, v (B, H, Tk, D) with Tq <= Tk, got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"causal_attention: dropout_p must be in [0, 1), got {dropout_p}")
    if window is not None and window < 1:
        raise ValueError(f"causal_attention: window must be None or >= 1, got {window}")
    return select("causal_attention", q, causal_attention_reference, None)(q, k, v, dropout_p, window)
