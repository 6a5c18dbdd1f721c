"""Causal multi-head self-attention, optionally restricted to a sliding window, with dropout on the
attention probabilities.

    S = q @ k.T / sqrt(D);  S[i, j] = -inf unless  i' - W < j <= i'   (i' = i + Tk - Tq);
    P = dropout(softmax(S));  out = P @ v

q is (B, H, Tq, D) and k, v are (B, H, Tk, D) with Tq <= Tk: the queries are the *last* Tq positions of
the key sequence (the causal mask is aligned bottom-right), which is what KV-cached generation needs.
`window=W` lets query i' see keys i'-W+1..i' only; `window=None` is full causal attention.

The reference is `torch.nn.functional.scaled_dot_product_attention` (its fused causal path when the
mask is plain causal, an explicit boolean mask otherwise); it is the fallback, the test oracle and the
benchmark baseline.

The Triton kernels are FlashAttention-2 (Dao 2023; Triton tutorial 06-fused-attention): a program owns
a tile of BLOCK_M queries and streams tiles of BLOCK_N keys/values past it with an online softmax in
fp32 (exp2, scores pre-multiplied by log2(e) / sqrt(D)), so the T x T score matrix never exists; it saves
the per-row log-sum-exp (fp32, natural log) for the backward. Each program visits only the key tiles
that intersect its rows' allowed band [i' - W + 1, i']: tiles entirely above the diagonal or left of the
window are never loaded, so the cost is O(T^2) causal and O(T W) windowed. The tiles the band covers
completely run without any mask; only the tiles it cuts (the diagonal, the window's left edge, the
ragged last tile) are masked. The backward recomputes the probabilities from the LSE:
`delta = rowsum(dO * O)` in a preprocess kernel, then one kernel per key tile for dK, dV (looping over
query tiles) and one per query tile for dQ (looping over key tiles): every output element is written
by one program, no atomics, so results are bit-identical run to run.

Dropout is counter-based: the keep decision of entry (b, h, i, j) is `uniform(key, i * Tk + j) >= p`
(Philox, `tl.rand`) with the key made of a seed tensor drawn from torch's generator and b * H + h, so
the backward regenerates the forward's mask and no mask is stored. `_dropout_keep_mask` materialises
it for tests.

Limitations of the Triton path: head_dim in {16, 32, 64, 128}; batch * heads <= 65535 (a grid axis);
float16, bfloat16 or float32 (float32 products at full "ieee" precision, not TF32); CUDA tensors (or the
Triton interpreter); q, k, v may be
any strided views (the fused qkv projection's) as long as the head dimension has unit stride, else they
are copied.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastgpt.kernels.dispatch import select
from fastgpt.kernels.core import aot_spec, arch_of, tensor_problem


def causal_mask(tq: int, tk: int, window: int | None, device: torch.device) -> torch.Tensor:
    """(tq, tk) boolean mask, True where query i (at key position i + tk - tq) may attend key j."""
    i = torch.arange(tk - tq, tk, device=device)[:, None]
    j = torch.arange(tk, device=device)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= j > i - window
    return allowed


def causal_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                               window: int | None = None) -> torch.Tensor:
    tq, tk = q.size(-2), k.size(-2)
    if tq == tk and (window is None or window >= tk):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    mask = causal_mask(tq, tk, window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


# ---------------------------------------------------------------------------------------------------
# Triton kernels
#
# Notation: a program of the forward / dQ kernels owns query rows [start_m, start_m + BLOCK_M) of one
# (batch, head); row i sits at key position i' = i + Tk - Tq and may see keys (i' - W, i'], W = window
# (W = Tk when there is no window). Its rows' bands together span keys [lo, hi):
#     lo = max(0, first_row' - W + 1),  hi = last_row' + 1,
# and a key tile [n, n + BLOCK_N) is inside every row's band iff  n + BLOCK_N - 1 <= first_row'  and
# n > last_row' - W. The loop over key tiles is split at those bounds into masked | unmasked | masked
# segments. The dK/dV kernel does the same with the roles of rows and keys exchanged.

# The JIT compiles a variant per value class (== 1, a multiple of 16, neither) of every integer argument
# it may specialise; for the sizes that would be one variant for each of those of H, Tq, Tk and the window
# (about 250 compilations for the native test suite, a third of that without). They are only compared
# against and multiplied by, never strides, so they are not specialised: one compilation per tile, dtype,
# head_dim and dropout flag.
_SIZES = ["H", "Tq", "Tk", "window"]
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): log(x) = log2(x) * LN2


@triton.jit
def _dropout_keep(seed, rows, cols, Tk, dropout_p):
    """Keep (True) or drop each probability at (rows, cols) of one (batch, head); `seed` already holds
    the (batch, head) in its high 32 bits. Offsets are int32: the launcher checks Tq * Tk < 2**31."""
    return tl.rand(seed, rows * Tk + cols) >= dropout_p


@triton.jit
def _segments(lo, hi, full_lo, full_hi, BLOCK: tl.constexpr):
    """Tiles covering [lo, hi), given [full_lo, full_hi) (multiples of BLOCK), the span of tiles that need
    no mask: the masked tiles are [start, a) and [b, hi), the unmasked ones [a, b). Returns start, the
    number of tiles in [start, a), b, the number of masked tiles, a and the number of unmasked tiles.
    (The two masked runs share one loop: one inlined copy of the masked tile code, not two.)"""
    start = lo // BLOCK * BLOCK
    a = tl.minimum(tl.maximum(full_lo, start), hi)
    b = tl.minimum(tl.maximum(full_hi, a), hi)
    n_left = tl.cdiv(a - start, BLOCK)
    return start, n_left, b, n_left + tl.cdiv(hi - b, BLOCK), a, (b - a) // BLOCK


@triton.jit
def _key_segments(start_m, Tq, Tk, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key tiles the query rows [start_m, start_m + BLOCK_M) visit, as `_segments` splits them (the
    forward and the dQ kernel walk the same ones)."""
    shift = Tk - Tq
    first = start_m + shift
    last = tl.minimum(start_m + BLOCK_M, Tq) - 1 + shift
    lo = tl.maximum(first - window + 1, 0)
    full_lo = tl.cdiv(tl.maximum(last - window + 1, 0), BLOCK_N) * BLOCK_N
    full_hi = (first + 1) // BLOCK_N * BLOCK_N
    return _segments(lo, last + 1, full_lo, full_hi, BLOCK_N)


@triton.jit
def _head_seed(Seed, bh, DROPOUT: tl.constexpr):
    """The dropout key of one (batch, head): the seed with bh in its high 32 bits (0 without dropout)."""
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed) + (bh.to(tl.int64) << 32)
    return seed


@triton.jit
def _at_head(bh, H, A, stride_ab, stride_ah, B, stride_bb, stride_bh, C, stride_cb, stride_ch, D, stride_db,
             stride_dh):
    """Four (B, H, T, D) pointers advanced to the (batch, head) bh = b * H + h, in 64-bit offsets."""
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    return (A + b * stride_ab + h * stride_ah, B + b * stride_bb + h * stride_bh, C + b * stride_cb + h * stride_ch,
            D + b * stride_db + h * stride_dh)


@triton.jit
def _tile_start(i, lo_a, n_a, lo_b, BLOCK: tl.constexpr):
    """Start of the i-th tile of the runs [lo_a, lo_a + n_a * BLOCK) and then lo_b, lo_b + BLOCK, ..."""
    return tl.where(i < n_a, lo_a + i * BLOCK, lo_b + (i - n_a) * BLOCK)


@triton.jit
def _load_rows(X, offs, stride, limit, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Rows `offs` of one head's (T, D) tensor X (row stride `stride`, unit stride along D), as a (rows, D)
    tile, or (D, rows) if TRANSPOSED; with MASKED, rows at or past `limit` read as 0."""
    offs_d = tl.arange(0, HEAD_DIM)
    if TRANSPOSED:
        ptrs = X + offs[None, :] * stride + offs_d[:, None]
        mask = (offs < limit)[None, :]
    else:
        ptrs = X + offs[:, None] * stride + offs_d[None, :]
        mask = (offs < limit)[:, None]
    if MASKED:
        tile = tl.load(ptrs, mask=mask, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _load_row_stats(X, offs, limit, MASKED: tl.constexpr):
    """X[offs] of a per-row fp32 vector (LSE, delta); with MASKED, entries at or past `limit` read as 0."""
    if MASKED:
        values = tl.load(X + offs, mask=offs < limit, other=0.0)
    else:
        values = tl.load(X + offs)
    return values


@triton.jit
def _attention_fwd_tiles(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, offs_m, pos, seed, lo_a, n_a, lo_b, n_tiles,
                         Tk, window, qk_scale, dropout_p,
                         HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                         DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
    """Fold key tiles (the runs `_tile_start` describes) into the running softmax state (acc, l_i, m_i)
    of the rows in q."""
    for i in range(0, n_tiles):
        offs_n = _tile_start(i, lo_a, n_a, lo_b, BLOCK_N) + tl.arange(0, BLOCK_N)
        col_ok = offs_n < Tk
        kt = _load_rows(K, offs_n, stride_kt, Tk, HEAD_DIM, MASKED, True)  # (D, BLOCK_N)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        if MASKED:
            allowed = (offs_n[None, :] <= pos[:, None]) & (offs_n[None, :] > pos[:, None] - window)
            s = tl.where(allowed & col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:
            # a row may have seen no allowed key yet (window edge): exponentiate against 0 instead of
            # -inf so that its alpha and p are 0, not NaN; m_i itself stays -inf
            m_exp = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_exp = m_new
        alpha = tl.math.exp2(m_i - m_exp)
        p = tl.math.exp2(s - m_exp[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)  # the normaliser counts every probability, kept or dropped
        if DROPOUT:
            p = tl.where(_dropout_keep(seed, offs_m[:, None], offs_n[None, :], Tk, dropout_p), p, 0.0)
        v = _load_rows(V, offs_n, stride_vt, Tk, HEAD_DIM, MASKED, False)  # (BLOCK_N, D)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=_SIZES)
def _attention_fwd_kernel(
    Q,  # (B, H, Tq, D), strided, unit stride along D
    K, V,  # (B, H, Tk, D), strided, unit stride along D
    Out,  # (B, H, Tq, D), strided, unit stride along D
    Lse,  # (B, H, Tq) fp32, contiguous: log-sum-exp of each row's scaled scores (natural log)
    Seed,  # (1,) int64: dropout seed, read only with DROPOUT
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    H, Tq, Tk, window,
    qk_scale,  # log2(e) / sqrt(D)
    dropout_p,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
):
    # the last query tiles see the most keys: launch them first so the short ones fill the tail
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    Q, K, V, Out = _at_head(bh, H, Q, stride_qb, stride_qh, K, stride_kb, stride_kh, V, stride_vb, stride_vh,
                            Out, stride_ob, stride_oh)
    Lse += bh.to(tl.int64) * Tq
    seed = _head_seed(Seed, bh, DROPOUT)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Tq
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)

    pos = offs_m + (Tk - Tq)
    start, n_left, b_, n_masked, a, n_full = _key_segments(start_m, Tq, Tk, window, BLOCK_M, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    acc, l_i, m_i = _attention_fwd_tiles(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, offs_m, pos, seed,
                                         start, n_left, b_, n_masked, Tk, window, qk_scale, dropout_p,
                                         HEAD_DIM, BLOCK_N, True, DROPOUT, PRECISION)
    acc, l_i, m_i = _attention_fwd_tiles(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, offs_m, pos, seed,
                                         a, n_full, a, n_full, Tk, window, qk_scale, dropout_p,
                                         HEAD_DIM, BLOCK_N, False, DROPOUT, PRECISION)
    l_i = tl.where(row_ok, l_i, 1.0)  # rows past Tq may have seen no key: keep their (unstored) maths finite
    out = acc / l_i[:, None]
    if DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    tl.store(Out + offs_m[:, None] * stride_ot + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(Lse + offs_m, (m_i + tl.math.log2(l_i)) * LN2, mask=row_ok)


@triton.jit(do_not_specialize=_SIZES[:2])
def _attention_bwd_preprocess_kernel(
    Out, DO,  # (B, H, Tq, D), strided, unit stride along D
    Delta,  # (B, H, Tq) fp32, contiguous: rowsum(dO * O)
    stride_ob, stride_oh, stride_ot,
    stride_dob, stride_doh, stride_dot,
    H, Tq,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m[:, None] < Tq
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                mask=row_ok, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                 mask=row_ok, other=0.0).to(tl.float32)
    tl.store(Delta + bh.to(tl.int64) * Tq + offs_m, tl.sum(o * do, 1), mask=offs_m < Tq)


# The backward, with Z = keep / (1 - p) the dropout multiplier (Z = 1 without dropout), scale = 1/sqrt(D):
#     S = scale Q K^T,  P = exp(S - lse),  O = (P * Z) V
#     dV = (P * Z)^T dO
#     dP = (dO V^T) * Z
#     dS = P * (dP - delta),  delta_i = sum_j P_ij dP_ij = sum_j (P * Z)_ij (dO V^T)_ij = rowsum(dO * O)_i
#     dQ = scale dS K,  dK = scale dS^T Q
# The dK/dV kernel works on transposed tiles (keys along rows), so that its accumulators are row tiles.


@triton.jit
def _attention_bwd_dkdv_tiles(dk, dv, k, v, Q, DO, Lse, Delta, stride_qt, stride_dot, offs_n, seed,
                              lo_a, n_a, lo_b, n_tiles, Tq, Tk, window, qk_scale, dropout_p,
                              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                              DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate the dK, dV contributions of query tiles (see `_tile_start`) to the key tile (k, v)."""
    for i in range(0, n_tiles):
        offs_m = _tile_start(i, lo_a, n_a, lo_b, BLOCK_M) + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Tq
        qt = _load_rows(Q, offs_m, stride_qt, Tq, HEAD_DIM, MASKED, True)  # (D, BLOCK_M)
        do = _load_rows(DO, offs_m, stride_dot, Tq, HEAD_DIM, MASKED, False)  # (BLOCK_M, D)
        lse = _load_row_stats(Lse, offs_m, Tq, MASKED)
        delta = _load_row_stats(Delta, offs_m, Tq, MASKED)
        st = tl.dot(k, qt, input_precision=PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M), log2 units
        pt = tl.math.exp2(st - lse[None, :] * LOG2E)
        if MASKED:
            pos = offs_m + (Tk - Tq)
            allowed = (offs_n[:, None] <= pos[None, :]) & (offs_n[:, None] > pos[None, :] - window)
            pt = tl.where(allowed & row_ok[None, :], pt, 0.0)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BLOCK_N, BLOCK_M): (dO V^T)^T
        if DROPOUT:
            keep = _dropout_keep(seed, offs_m[None, :], offs_n[:, None], Tk, dropout_p)
            rescale = 1.0 / (1.0 - dropout_p)
            pzt = tl.where(keep, pt * rescale, 0.0)
            dpt = tl.where(keep, dpt * rescale, 0.0)
        else:
            pzt = pt
        dv = tl.dot(pzt.to(do.dtype), do, dv, input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attention_bwd_dkdv(Q, DO, K, V, Lse, Delta, DK, DV, seed, stride_qt, stride_dot, stride_kt, stride_vt,
                        stride_dkt, stride_dvt, Tq, Tk, window, qk_scale, sm_scale, dropout_p,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
    """dK and dV of the key tile [start_n, start_n + BLOCK_N) of one (batch, head)."""
    start_n = tl.program_id(0) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n[:, None] < Tk
    k = tl.load(K + offs_n[:, None] * stride_kt + offs_d[None, :], mask=col_ok, other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :], mask=col_ok, other=0.0)

    # query rows whose band meets keys [start_n, last]: row' >= start_n and row' - W < last; the tiles
    # of rows with row' >= last (causal) and row' + BLOCK_M - 1 < start_n + W (window), all < Tq, are
    # inside every band. Keys past Tk need no mask: their rows of dK, dV are not stored.
    shift = Tk - Tq
    last = tl.minimum(start_n + BLOCK_N, Tk) - 1
    lo = tl.maximum(start_n - shift, 0)
    hi = tl.minimum(last + window - shift, Tq)
    full_lo = tl.cdiv(tl.maximum(last - shift, 0), BLOCK_M) * BLOCK_M
    full_hi = tl.minimum(tl.maximum(start_n - shift + window, 0) // BLOCK_M, Tq // BLOCK_M) * BLOCK_M
    start, n_left, b_, n_masked, a, n_full = _segments(lo, hi, full_lo, full_hi, BLOCK_M)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dk, dv = _attention_bwd_dkdv_tiles(dk, dv, k, v, Q, DO, Lse, Delta, stride_qt, stride_dot, offs_n, seed,
                                       start, n_left, b_, n_masked, Tq, Tk, window, qk_scale, dropout_p,
                                       HEAD_DIM, BLOCK_M, True, DROPOUT, PRECISION)
    dk, dv = _attention_bwd_dkdv_tiles(dk, dv, k, v, Q, DO, Lse, Delta, stride_qt, stride_dot, offs_n, seed,
                                       a, n_full, a, n_full, Tq, Tk, window, qk_scale, dropout_p,
                                       HEAD_DIM, BLOCK_M, False, DROPOUT, PRECISION)
    tl.store(DK + offs_n[:, None] * stride_dkt + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
             mask=col_ok)
    tl.store(DV + offs_n[:, None] * stride_dvt + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=col_ok)


@triton.jit
def _attention_bwd_dq_tiles(dq, q, do, lse, delta, K, V, stride_kt, stride_vt, offs_m, pos, seed,
                            lo_a, n_a, lo_b, n_tiles, Tk, window, qk_scale, dropout_p,
                            HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                            DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate the dQ contributions of key tiles (see `_tile_start`) to the query tile q."""
    for i in range(0, n_tiles):
        offs_n = _tile_start(i, lo_a, n_a, lo_b, BLOCK_N) + tl.arange(0, BLOCK_N)
        kt = _load_rows(K, offs_n, stride_kt, Tk, HEAD_DIM, MASKED, True)  # (D, BLOCK_N)
        vt = _load_rows(V, offs_n, stride_vt, Tk, HEAD_DIM, MASKED, True)  # (D, BLOCK_N)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            allowed = (offs_n[None, :] <= pos[:, None]) & (offs_n[None, :] > pos[:, None] - window)
            p = tl.where(allowed & (offs_n < Tk)[None, :], p, 0.0)
        dp = tl.dot(do, vt, input_precision=PRECISION)  # (BLOCK_M, BLOCK_N)
        if DROPOUT:
            keep = _dropout_keep(seed, offs_m[:, None], offs_n[None, :], Tk, dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=PRECISION)
    return dq


@triton.jit
def _attention_bwd_dq(Q, DO, K, V, Lse, Delta, DQ, seed, stride_qt, stride_dot, stride_kt, stride_vt, stride_dqt,
                      Tq, Tk, window, qk_scale, sm_scale, dropout_p,
                      HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      DROPOUT: tl.constexpr, PRECISION: tl.constexpr):
    """dQ of the query tile [start_m, start_m + BLOCK_M) of one (batch, head)."""
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Tq
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(Lse + offs_m, mask=row_ok, other=0.0) * LOG2E
    delta = tl.load(Delta + offs_m, mask=row_ok, other=0.0)

    pos = offs_m + (Tk - Tq)
    start, n_left, b_, n_masked, a, n_full = _key_segments(start_m, Tq, Tk, window, BLOCK_M, BLOCK_N)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq = _attention_bwd_dq_tiles(dq, q, do, lse, delta, K, V, stride_kt, stride_vt, offs_m, pos, seed,
                                 start, n_left, b_, n_masked, Tk, window, qk_scale, dropout_p,
                                 HEAD_DIM, BLOCK_N, True, DROPOUT, PRECISION)
    dq = _attention_bwd_dq_tiles(dq, q, do, lse, delta, K, V, stride_kt, stride_vt, offs_m, pos, seed,
                                 a, n_full, a, n_full, Tk, window, qk_scale, dropout_p,
                                 HEAD_DIM, BLOCK_N, False, DROPOUT, PRECISION)
    tl.store(DQ + offs_m[:, None] * stride_dqt + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


@triton.jit(do_not_specialize=_SIZES)
def _attention_bwd_kernel(
    Q, DO,  # (B, H, Tq, D), strided, unit stride along D
    K, V,  # (B, H, Tk, D), strided, unit stride along D
    Lse, Delta,  # (B, H, Tq) fp32, contiguous
    DQ,  # (B, H, Tq, D) out (DQ_PART), strided, unit stride along D
    DK, DV,  # (B, H, Tk, D) out (not DQ_PART), strided, unit stride along D
    Seed,  # (1,) int64: dropout seed, read only with DROPOUT
    stride_qb, stride_qh, stride_qt, stride_dob, stride_doh, stride_dot,  # (batch, head, row) strides of q, dO,
    stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,  # k, v,
    stride_dqb, stride_dqh, stride_dqt, stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
    H, Tq, Tk, window, qk_scale, sm_scale, dropout_p,  # qk_scale = log2(e) / sqrt(D), sm_scale = 1 / sqrt(D)
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    DQ_PART: tl.constexpr,  # one program per query tile, for dQ; else one per key tile, for dK and dV
):
    bh = tl.program_id(1)
    Q, DO, K, V = _at_head(bh, H, Q, stride_qb, stride_qh, DO, stride_dob, stride_doh, K, stride_kb, stride_kh,
                           V, stride_vb, stride_vh)
    Lse += bh.to(tl.int64) * Tq
    Delta += bh.to(tl.int64) * Tq
    seed = _head_seed(Seed, bh, DROPOUT)
    # the outputs: the dQ part's (B, H, Tq, D) or the other's (B, H, Tk, D) pair
    DQ, DK, DV, _ = _at_head(bh, H, DQ, stride_dqb, stride_dqh, DK, stride_dkb, stride_dkh, DV, stride_dvb,
                             stride_dvh, DV, 0, 0)
    if DQ_PART:
        _attention_bwd_dq(Q, DO, K, V, Lse, Delta, DQ, seed, stride_qt, stride_dot, stride_kt, stride_vt,
                          stride_dqt, Tq, Tk, window, qk_scale, sm_scale, dropout_p,
                          HEAD_DIM, BLOCK_M, BLOCK_N, DROPOUT, PRECISION)
    else:
        _attention_bwd_dkdv(Q, DO, K, V, Lse, Delta, DK, DV, seed, stride_qt, stride_dot, stride_kt, stride_vt,
                            stride_dkt, stride_dvt, Tq, Tk, window, qk_scale, sm_scale, dropout_p,
                            HEAD_DIM, BLOCK_M, BLOCK_N, DROPOUT, PRECISION)


@triton.jit
def _attention_dropout_mask_kernel(
    Seed,  # (1,) int64
    Mask,  # (B * H, Tq, Tk) int8, contiguous: 1 where the kernels keep the probability
    Tq, Tk, dropout_p,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    bh = tl.program_id(2)
    seed = _head_seed(Seed, bh, True)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(seed, offs_m[:, None], offs_n[None, :], Tk, dropout_p)
    tl.store(Mask + bh.to(tl.int64) * Tq * Tk + offs_m[:, None] * Tk + offs_n[None, :], keep.to(tl.int8),
             mask=(offs_m[:, None] < Tq) & (offs_n[None, :] < Tk))


# ---------------------------------------------------------------------------------------------------
# launchers

HEAD_DIMS = (16, 32, 64, 128)
# B*H is the launch grid's second axis, which CUDA caps at 65535 programs (the first axis, the query or
# key tiles, is the one without a cap, but it keeps a head's tiles together so they share its K/V in L2)
MAX_BATCH_HEADS = 65535
DECODE_ROWS = 16  # Tq up to this without dropout (KV-cached generation): 16-row query tiles


def _tiles(head_dim: int, dtype: torch.dtype, decode: bool = False, arch: int | None = 90
           ) -> dict[str, tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of each kernel for this head_dim and dtype on a GPU of
    compute capability `arch`; `decode`: the forward of a generation step (Tq <= DECODE_ROWS, no dropout).

    16-bit, as FlashAttention-2 and the Triton tutorial tile it: the forward streams 64-key tiles past
    128-query tiles (8 warps, 3-stage K/V pipeline); dK/dV streams 32-query tiles past 128 keys and dQ
    32-key tiles past 128 queries, each program holding its fp32 accumulators. head_dim 128 halves the
    streamed (forward) or the held (backward) tile to stay within the registers. A decoding step
    (Tq <= 16 queries) runs the forward with 16-query tiles instead of wasting 7/8 of a 128-row tile.
    fp32 inputs (exact "ieee" products on CUDA cores, no tensor cores) take 32 x 32 tiles.
    These are the tiles that compile without register spills at head_dim 32 and 64 (the presets') on
    sm_90 and sm_80 (`aot_specs`, tests/aot.py); they are not tuned on a GPU. Other generations, as
    tests/aot.py compiles them: before sm_80 (a T4, a V100) those tiles spill kilobytes and overflow a
    T4's 64 KiB of shared memory, so 16-bit inputs take 32 x 32 to 64 x 32 tiles in a 2-stage pipeline
    there (8 warps from head_dim 64); on sm_100 (a B200) the 8-warp dK/dV tile with dropout spills in a
    3-stage pipeline, so it takes 2, and the delta preprocess takes 32-row tiles.
    """
    warps = 8 if head_dim == 128 else 4
    if dtype == torch.float32:
        fwd = (16 if decode else 32, 32, warps, 2)
        return {"fwd": fwd, "preprocess": (64, 0, 4, 1), "dkdv": (32, 32, warps, 2), "dq": (32, 32, warps, 2)}
    if arch is not None and arch < 80:
        warps = 8 if head_dim >= 64 else 4
        return {"fwd": (16, 32, 4, 2) if decode else (64, 32, warps, 2), "preprocess": (64, 0, 4, 1),
                "dkdv": (32, 32, warps, 2), "dq": (32, 32, warps, 2)}
    if head_dim == 128:
        fwd, dkdv, dq = (128, 32, 8, 3), (32, 64, 8, 3), (64, 32, 8, 3)
    else:
        fwd, dkdv, dq = (128, 64, 8, 3), (32, 128, 8, 3), (128, 32, 8, 3)
    tiles = {"fwd": (16, 64, 4, 3) if decode else fwd, "preprocess": (64, 0, 4, 1), "dkdv": dkdv, "dq": dq}
    if arch is not None and arch >= 100:
        tiles["dkdv"], tiles["preprocess"] = (*dkdv[:3], 2), (32, 0, 4, 1)
    return tiles


def _precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: fp32 inputs get true fp32 products (TF32 would cost ~1e-3 relative)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> str | None:
    """Why the Triton path cannot take these inputs (beyond the public entry's shape checks and
    `select`'s device check), in one line, or None when it can (`auto` and the launchers' check)."""
    problem = tensor_problem("causal_attention", {"q": q, "k": k, "v": v}, one_dtype=True)
    if problem:
        return problem
    if q.size(-1) not in HEAD_DIMS:
        return (f"causal_attention: the Triton kernel supports head_dim in {', '.join(map(str, HEAD_DIMS))}, got "
                f"{q.size(-1)}; choose n_embd / n_head accordingly or use kernels.set_backend('reference')")
    if q.size(0) * q.size(1) > MAX_BATCH_HEADS:
        return (f"causal_attention: the Triton kernels take batch * heads <= {MAX_BATCH_HEADS}, got "
                f"{q.size(0)} x {q.size(1)}; use a smaller batch or kernels.set_backend('reference')")
    if dropout_p > 0 and q.size(-2) * k.size(-2) >= 2**31:
        return (f"causal_attention: dropout in the Triton kernel needs Tq * Tk < 2**31, got {q.size(-2)} x "
                f"{k.size(-2)}")
    return None


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when its last dimension has unit stride (any other strides are passed to the kernels),
    else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _empty_bthd(like: torch.Tensor, t: int) -> torch.Tensor:
    """An empty (B, H, t, D) tensor laid out as (B, t, H, D): the model's `y.transpose(1, 2)` back to
    (B, T, C) is then contiguous already, and so are the gradients flowing into the qkv projection."""
    b, h, _, d = like.shape
    return like.new_empty((b, t, h, d)).transpose(1, 2)


def _window(window: int | None, tk: int) -> int:
    """The kernels' W: a window of at least Tk keys, or none, is plain causal attention."""
    return tk if window is None else min(window, tk)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _seed_arg(seed: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The Seed pointer: the seed, or (without dropout, where the kernels never read it) an empty int64."""
    return seed if seed is not None else like.new_empty(1, dtype=torch.int64)


def _forward(q, k, v, seed, dropout_p, window):
    """Launch the forward; returns out (B, H, Tq, D) and lse (B, H, Tq) fp32."""
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    b, h, tq, d = q.shape
    tk = k.size(2)
    out = _empty_bthd(q, tq)
    lse = q.new_empty((b, h, tq), dtype=torch.float32)
    if out.numel() == 0:
        return out, lse
    decode = tq <= DECODE_ROWS and dropout_p == 0
    block_m, block_n, num_warps, num_stages = _tiles(d, q.dtype, decode, arch_of(q))["fwd"]
    _attention_fwd_kernel[(triton.cdiv(tq, block_m), b * h)](
        q, k, v, out, lse, _seed_arg(seed, q),
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        h, tq, tk, _window(window, tk), math.log2(math.e) / math.sqrt(d), dropout_p,
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, DROPOUT=dropout_p > 0, PRECISION=_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, lse


def _backward(dout, q, k, v, out, lse, seed, dropout_p, window):
    """Launch the backward; returns dq, dk, dv."""
    dout, q, k, v = _unit_stride(dout), _unit_stride(q), _unit_stride(k), _unit_stride(v)
    b, h, tq, d = q.shape
    tk = k.size(2)
    dq, dk, dv = _empty_bthd(q, tq), _empty_bthd(k, tk), _empty_bthd(v, tk)
    if b * h * tq == 0:
        return dq, dk.zero_(), dv.zero_()
    tiles = _tiles(d, q.dtype, arch=arch_of(q))
    delta = torch.empty_like(lse)
    block_m, _, num_warps, num_stages = tiles["preprocess"]
    _attention_bwd_preprocess_kernel[(triton.cdiv(tq, block_m), b * h)](
        out, dout, delta, *_strides(out), *_strides(dout), h, tq,
        HEAD_DIM=d, BLOCK_M=block_m, num_warps=num_warps, num_stages=num_stages,
    )
    args = (q, dout, k, v, lse, delta, dq, dk, dv, _seed_arg(seed, q), *_strides(q), *_strides(dout), *_strides(k),
            *_strides(v), *_strides(dq), *_strides(dk), *_strides(dv), h, tq, tk, _window(window, tk),
            math.log2(math.e) / math.sqrt(d), 1.0 / math.sqrt(d), dropout_p)
    for part, tiles_along in (("dkdv", tk), ("dq", tq)):
        block_m, block_n, num_warps, num_stages = tiles[part]
        _attention_bwd_kernel[(triton.cdiv(tiles_along, block_n if part == "dkdv" else block_m), b * h)](
            *args, HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, DROPOUT=dropout_p > 0, PRECISION=_precision(q.dtype),
            DQ_PART=part == "dq", num_warps=num_warps, num_stages=num_stages)
    return dq, dk, dv


def _dropout_keep_mask(seed: torch.Tensor, b: int, h: int, tq: int, tk: int, dropout_p: float) -> torch.Tensor:
    """(B, H, Tq, Tk) boolean: the keep-mask the kernels draw from `seed` (for tests and debugging)."""
    mask = seed.new_empty((b * h, tq, tk), dtype=torch.int8)
    _attention_dropout_mask_kernel[(triton.cdiv(tq, 64), triton.cdiv(tk, 64), b * h)](
        seed, mask, tq, tk, dropout_p, BLOCK_M=64, BLOCK_N=64)
    return mask.view(b, h, tq, tk).bool()


def _aot_spec(fn, dtype: str, constexprs: dict, tile: tuple[int, int, int, int], tags: dict) -> dict:
    """One tests/aot.py spec: `fn` with `dtype` tensors, the given compile-time arguments and tile."""
    block_m, block_n, num_warps, num_stages = tile
    constexprs = {**constexprs, "BLOCK_M": block_m, **({"BLOCK_N": block_n} if "BLOCK_N" in fn.arg_names else {})}
    scalars = {"Lse": "*fp32", "Delta": "*fp32", "Seed": "*i64", "Mask": "*i8", "qk_scale": "fp32",
               "sm_scale": "fp32", "dropout_p": "fp32"}
    sizes = set(_SIZES)
    tensors = {name: f"*{dtype}" for name in fn.arg_names
               if name not in scalars and name not in sizes and not name.startswith("stride_")}
    # the model's tensors have every stride a multiple of 16 elements: the JIT specialises them so
    return aot_spec(fn, {**tensors, **scalars}, constexprs, num_warps, num_stages, {"dtype": dtype, **tags})


def aot_specs(arch: int = 90):
    """Every configuration the launchers may compile on a GPU of compute capability `arch` for 16-bit
    inputs (what training and sampling on a GPU use): head_dim 16..128 x fp16/bf16, with and without
    dropout; the forward also with decoding tiles (no dropout, for a generation step); the presets' head
    dims (32, 64) tagged `preset`. The sizes (H, Tq, Tk, window) are not specialised. The fp32
    tiles (tests' accuracy path) are left out to keep the test suite's compile time down: compiled once,
    they build for sm_90 and sm_80 but spill registers on sm_90 at head_dim 64 (dK/dV, 16-24 bytes) and
    128 (up to 344 bytes)."""
    for d in HEAD_DIMS:
        for dtype, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
            train, decode = _tiles(d, dtype, arch=arch), _tiles(d, dtype, decode=True, arch=arch)
            common = {"HEAD_DIM": d, "PRECISION": _precision(dtype)}
            preset = d in (32, 64)
            for dropout in (False, True):
                tags = {"head_dim": d, "dropout": dropout, "preset": preset}
                flags = {**common, "DROPOUT": dropout}
                yield _aot_spec(_attention_fwd_kernel, name, flags, train["fwd"], {**tags, "regime": "train"})
                for part in ("dkdv", "dq"):
                    yield _aot_spec(_attention_bwd_kernel, name, {**flags, "DQ_PART": part == "dq"}, train[part],
                                    {**tags, "part": part})
            yield _aot_spec(_attention_fwd_kernel, name, {**common, "DROPOUT": False}, decode["fwd"],
                            {"head_dim": d, "dropout": False, "regime": "decode", "preset": preset})
            yield _aot_spec(_attention_bwd_preprocess_kernel, name, {"HEAD_DIM": d}, train["preprocess"],
                            {"head_dim": d, "preset": preset})
    yield _aot_spec(_attention_dropout_mask_kernel, "i8", {}, (64, 64, 4, 1),
                    {"head_dim": 0, "debug": True, "preset": False})


# ---------------------------------------------------------------------------------------------------
# op registration: opaque to torch.compile, differentiable through register_autograd


@torch.library.custom_op("fastgpt::causal_attention_fwd", mutates_args=())
def _causal_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seed: torch.Tensor | None,
                          dropout_p: float, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, seed, dropout_p, window)


@_causal_attention_fwd.register_fake
def _(q, k, v, seed, dropout_p, window):
    return _empty_bthd(q, q.size(2)), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("fastgpt::causal_attention_bwd", mutates_args=())
def _causal_attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          out: torch.Tensor, lse: torch.Tensor, seed: torch.Tensor | None, dropout_p: float,
                          window: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(dout, q, k, v, out, lse, seed, dropout_p, window)


@_causal_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, seed, dropout_p, window):
    return _empty_bthd(q, q.size(2)), _empty_bthd(k, k.size(2)), _empty_bthd(v, v.size(2))


def _setup_causal_attention(ctx, inputs, output):
    q, k, v, seed, dropout_p, window = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, seed)
    ctx.dropout_p, ctx.window = dropout_p, window


def _grad_causal_attention(ctx, dout, dlse):
    q, k, v, out, lse, seed = ctx.saved_tensors
    dq, dk, dv = _causal_attention_bwd(dout, q, k, v, out, lse, seed, ctx.dropout_p, ctx.window)
    return dq, dk, dv, None, None, None


_causal_attention_fwd.register_autograd(_grad_causal_attention, setup_context=_setup_causal_attention)


def causal_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                            window: int | None = None) -> torch.Tensor:
    # The dropout seed is drawn on q's device from torch's generator: torch.manual_seed reproduces a run,
    # and the kernels load it from device memory, so there is no host sync, eagerly or in a compiled
    # graph (where the draw is part of the graph). The kernels give it the (batch, head) as high bits.
    seed = torch.randint(0, 2**32, (1,), dtype=torch.int64, device=q.device) if dropout_p > 0 else None
    return _causal_attention_fwd(q, k, v, seed, dropout_p, window)[0]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                     window: int | None = None) -> torch.Tensor:
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
    return select("causal_attention", q, causal_attention_reference, causal_attention_triton,
                  _problem(q, k, v, dropout_p))(q, k, v, dropout_p, window)
