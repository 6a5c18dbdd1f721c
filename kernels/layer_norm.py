"""LayerNorm over the last dimension, with an optional bias (nanoGPT's `bias=False` default drops it),
and the fused residual variant the GPT's blocks use.

    y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias,   var biased (divides by N)
    add_layer_norm(x, r):  h = x + r;  y = layer_norm(h);  returns (h, y)

The reference is `torch.nn.functional.layer_norm`; it is the fallback, the test oracle and the
benchmark baseline. The Triton kernels:
  forward   one pass over a tile of rows held in registers: statistics in fp32, mean and rstd saved (fp32)
            for the backward; the residual variant adds r first and writes h, so the residual stream is
            read once and written once per add instead of twice each;
  backward  dx for a run of rows per program, with that program's partial dW / dB sums accumulated in
            fp32 registers and written once; the partials are then reduced over programs (deterministic:
            no atomics).
A row (n_embd) is held whole in registers, so N is limited to MAX_N (4096: wider rows spill registers in
the backward, 32 bytes at 8192 and 1.7 KB at 16384 on sm_90, so `auto` runs the reference there); rows
of any count and strides are fine (the last dimension must be contiguous, otherwise the launcher
copies). fp32, fp16 and bf16 inputs; weights may be of another float type (fp32 parameters under bf16
autocast). Under autocast the output is produced in the autocast dtype directly: the linear layer that
reads it would cast it to that dtype anyway, so the maths is unchanged and a full fp32 write and read
are saved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastgpt.kernels.dispatch import select
from fastgpt.kernels.core import aot_spec, autocast_dtype, tensor_problem

MAX_N = 4096


def layer_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    return F.layer_norm(x, (x.size(-1),), weight, bias, eps)


def add_layer_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    h = x + residual
    return h, layer_norm_reference(h, weight, bias, eps)


# ---------------------------------------------------------------------------------------------------
# Triton kernels


# The row count is not specialised by the JIT (it enters masks only): one compilation serves every batch,
# prompt length and test shape. N is: it also offsets the partial sums' rows.
@triton.jit(do_not_specialize=["M"])
def _layer_norm_fwd_kernel(
    X,  # (M, N) rows to normalise
    R,  # (M, N) residual added to X first (HAS_RESIDUAL)
    H,  # (M, N) out: X + R, the new residual stream (HAS_RESIDUAL)
    Y,  # (M, N) out: the normalised rows
    W,  # (N,) weight
    B,  # (N,) bias (HAS_BIAS)
    Mean,  # (M,) fp32 out
    Rstd,  # (M,) fp32 out: 1 / sqrt(var + eps)
    stride_xm, stride_rm, stride_hm, stride_ym,
    M, N, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(R + rows[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # normalise h as stored (rounded to its dtype), exactly as the reference does
        x = x.to(H.dtype.element_ty)
        tl.store(H + rows[:, None] * stride_hm + cols[None, :], x, mask=mask)
        x = x.to(tl.float32)
    mean = tl.sum(x, axis=1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * stride_ym + cols[None, :], y, mask=mask)
    tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)


# The backward, per row, with xhat = (x - mean) * rstd and g = dy * w:
#     dx = rstd * (g - xhat * mean(g * xhat) - mean(g))          (+ dh, the gradient reaching h directly)
#     dw = sum over rows of dy * xhat,   db = sum over rows of dy
# Each program takes ROWS_PER_PROGRAM consecutive rows, BLOCK_M at a time, writes their dx and one fp32
# row of partial dw (and db) sums; the launcher reduces the (programs, N) partials.
@triton.jit(do_not_specialize=["M", "ROWS_PER_PROGRAM"])
def _layer_norm_bwd_kernel(
    DY,  # (M, N) gradient of y
    X,  # (M, N) the rows that were normalised (h in the residual variant)
    W,  # (N,) weight
    Mean, Rstd,  # (M,) fp32, saved by the forward
    DH,  # (M, N) gradient reaching h directly (HAS_DH)
    DX,  # (M, N) out: gradient of x
    DW_PARTIAL,  # (programs, N) fp32 out
    DB_PARTIAL,  # (programs, N) fp32 out (HAS_BIAS)
    stride_dym, stride_xm, stride_dhm, stride_dxm,
    M, N, ROWS_PER_PROGRAM,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DH: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first = pid.to(tl.int64) * ROWS_PER_PROGRAM
    end = tl.minimum(first + ROWS_PER_PROGRAM, M)
    for start in range(first, end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(X + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :]
        c1 = tl.sum(g * xhat, axis=1) / N
        c2 = tl.sum(g, axis=1) / N
        dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        if HAS_DH:
            dx += tl.load(DH + rows[:, None] * stride_dhm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows[:, None] * stride_dxm + cols[None, :], dx, mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
        if HAS_BIAS:
            db += tl.sum(dy, axis=0)
    tl.store(DW_PARTIAL + pid * N + cols, dw, mask=col_ok)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + pid * N + cols, db, mask=col_ok)


# ---------------------------------------------------------------------------------------------------
# launchers

def _tile(n: int, backward: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for rows of n elements. Narrow rows (n_embd 128..512) are taken
    several to a program so every thread has work: about 4096 elements per program in the forward, 2048
    in the backward, which keeps more tensors live (x, dy, xhat, dy * w and the dw, db sums); at most 8
    elements per thread per tensor keeps both free of register spills."""
    block_n = triton.next_power_of_2(n)
    block_m = max(1, min(16, (2048 if backward else 4096) // block_n))
    elements = block_m * block_n
    num_warps = max(4, min(16, elements // 256))
    return block_m, block_n, num_warps


def _backward_programs(m: int, block_m: int, device: torch.device) -> int:
    """How many programs share the rows in the backward: enough to fill the GPU a few times over, few
    enough that the (programs, N) partial sums stay small. The interpreter runs programs one by one."""
    tiles = triton.cdiv(m, block_m)
    if device.type != "cuda":
        return min(tiles, 4)
    return min(tiles, 4 * torch.cuda.get_device_properties(device).multi_processor_count)


def _rows(t: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """`t` as (M, N) rows with a unit column stride (the kernels' only layout requirement); a view
    whenever the layout allows one. Gradients arrive in any layout (an expanded ones_like, say)."""
    if t is None:
        return None
    t = t.reshape(-1, n)
    return t if t.stride(1) == 1 or n == 1 else t.contiguous()


def _problem(op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             residual: torch.Tensor | None) -> str | None:
    """Why the kernels cannot take these inputs, in one line, or None when they can (`auto` and the
    launchers' check, kernels/dispatch.py)."""
    problem = tensor_problem(op, {"x": x, "weight": weight, "bias": bias, "residual": residual})
    if problem is None and x.size(-1) > MAX_N:
        problem = (f"{op}: the Triton kernel holds a row in registers, so N <= {MAX_N}; got N = {x.size(-1)}: "
                   "use kernels.set_backend('reference')")
    return problem


def _forward(x, residual, weight, bias, eps, out_dtype):
    """Launch the forward on (M, N) rows; returns y, h (None without residual), mean, rstd."""
    m, n = x.shape
    x, residual = _rows(x, n), _rows(residual, n)
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    h = None
    if residual is not None:
        h = torch.empty((m, n), dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
    mean = torch.empty(m, dtype=torch.float32, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return y, h, mean, rstd
    block_m, block_n, num_warps = _tile(n, backward=False)
    _layer_norm_fwd_kernel[(triton.cdiv(m, block_m),)](
        x, residual if residual is not None else x, h if h is not None else y, y, weight,
        bias if bias is not None else weight, mean, rstd,
        x.stride(0), residual.stride(0) if residual is not None else 0, h.stride(0) if h is not None else 0,
        y.stride(0), m, n, eps,
        BLOCK_M=block_m, BLOCK_N=block_n, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        num_warps=num_warps,
    )
    return y, h, mean, rstd


def _backward(dy, x, weight, has_bias, mean, rstd, dh):
    """Launch the backward on (M, N) rows; returns dx (in x's dtype), dweight, dbias (or an empty tensor)."""
    m, n = x.shape
    dy, x, dh = _rows(dy, n), _rows(x, n), _rows(dh, n)
    dx = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return dx, torch.zeros_like(weight), torch.zeros_like(weight) if has_bias else weight.new_empty(0)
    block_m, block_n, num_warps = _tile(n, backward=True)
    programs = _backward_programs(m, block_m, x.device)
    rows_per_program = triton.cdiv(triton.cdiv(m, programs), block_m) * block_m
    programs = triton.cdiv(m, rows_per_program)
    dw_partial = torch.empty((programs, n), dtype=torch.float32, device=x.device)
    db_partial = torch.empty((programs, n), dtype=torch.float32, device=x.device) if has_bias else dw_partial
    _layer_norm_bwd_kernel[(programs,)](
        dy, x, weight, mean, rstd, dh if dh is not None else dy, dx, dw_partial, db_partial,
        dy.stride(0), x.stride(0), dh.stride(0) if dh is not None else 0, dx.stride(0),
        m, n, rows_per_program,
        BLOCK_M=block_m, BLOCK_N=block_n, HAS_BIAS=has_bias, HAS_DH=dh is not None, num_warps=num_warps,
    )
    dweight = dw_partial.sum(0).to(weight.dtype)
    dbias = db_partial.sum(0).to(weight.dtype) if has_bias else weight.new_empty(0)
    return dx, dweight, dbias


def aot_specs(arch: int = 90):
    """Every configuration the launchers may compile (on any `arch`: a row tile's shared memory is small)
    for n_embd from 64 to MAX_N (one width per row tile: 64, 128, 256, 384 -> 512, 768 -> 1024,
    1600 -> 2048, 4096), with and without bias and residual, in fp32 and in bf16 as autocast runs it
    (fp32 residual stream and weights, bf16 branch outputs and normalised rows; fp16 likewise at the
    presets' widths, tagged `preset` with bf16's), with the argument types the launchers pass and the
    divisibility the JIT sees at the presets' shapes (widths multiples of 16; row counts are not
    specialised)."""
    dtypes = {"fp32": dict(x="fp32", r="fp32", w="fp32", y="fp32"),
              "bf16": dict(x="fp32", r="bf16", w="fp32", y="bf16"),
              "fp16": dict(x="fp32", r="fp16", w="fp32", y="fp16")}
    for n in (64, 128, 256, 384, 768, 1600, MAX_N):
        for tag, t in dtypes.items():
            for residual in (False, True):
                for has_bias in (False, True):
                    preset = n in (128, 384) and not has_bias  # the cpu and shakespeare_char presets
                    if tag == "fp16" and not preset:
                        continue  # fp16 autocast (GPUs without bf16): at the presets' shapes only
                    tags = {"n_embd": n, "dtype": tag, "residual": residual, "bias": has_bias,
                            "preset": preset and tag != "fp32"}
                    # without a residual the launchers pass x for R, y for H and dy for DH (unused)
                    r, h, dh = (t["r"], t["x"], t["x"]) if residual else (t["x"], t["y"], t["y"])
                    fwd = {"X": f"*{t['x']}", "R": f"*{r}", "H": f"*{h}", "Y": f"*{t['y']}", "W": f"*{t['w']}",
                           "B": f"*{t['w']}"}
                    bwd = {"DY": f"*{t['y']}", "X": f"*{t['x']}", "W": f"*{t['w']}", "DH": f"*{dh}",
                           "DX": f"*{t['x']}"}
                    for fn, backward, io, flag in ((_layer_norm_fwd_kernel, False, fwd, "HAS_RESIDUAL"),
                                                   (_layer_norm_bwd_kernel, True, bwd, "HAS_DH")):
                        block_m, block_n, num_warps = _tile(n, backward)
                        constexprs = {"BLOCK_M": block_m, "BLOCK_N": block_n, "HAS_BIAS": has_bias, flag: residual}
                        divisible = [name for name in fn.arg_names if name.startswith("stride_")] + ["N"]
                        yield aot_spec(fn, {**io, "Mean": "*fp32", "Rstd": "*fp32", "DW_PARTIAL": "*fp32",
                                            "DB_PARTIAL": "*fp32", "eps": "fp32"}, constexprs, num_warps, 1, tags,
                                       divisible)


# ---------------------------------------------------------------------------------------------------
# op registration: opaque to torch.compile, differentiable through register_autograd


@torch.library.custom_op("fastgpt::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
                    out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, _, mean, rstd = _forward(x, None, weight, bias, eps, out_dtype)
    return y, mean, rstd


@_layer_norm_fwd.register_fake
def _(x, weight, bias, eps, out_dtype):
    m = x.size(0)
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(m, dtype=torch.float32), \
        x.new_empty(m, dtype=torch.float32)


@torch.library.custom_op("fastgpt::add_layer_norm_fwd", mutates_args=())
def _add_layer_norm_fwd(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor | None, eps: float, out_dtype: torch.dtype
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y, h, mean, rstd = _forward(x, residual, weight, bias, eps, out_dtype)
    return h, y, mean, rstd


@_add_layer_norm_fwd.register_fake
def _(x, residual, weight, bias, eps, out_dtype):
    m = x.size(0)
    h = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, residual.dtype))
    return h, x.new_empty(x.shape, dtype=out_dtype), x.new_empty(m, dtype=torch.float32), \
        x.new_empty(m, dtype=torch.float32)


@torch.library.custom_op("fastgpt::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, has_bias: bool,
                    mean: torch.Tensor, rstd: torch.Tensor, dh: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(dy, x, weight, has_bias, mean, rstd, dh)


@_layer_norm_bwd.register_fake
def _(dy, x, weight, has_bias, mean, rstd, dh):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), \
        weight.new_empty(weight.shape if has_bias else (0,))


def _setup_layer_norm(ctx, inputs, output):
    x, weight, bias, _, _ = inputs
    y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(mean, rstd)  # saved for the backward, never returned to users


def _grad_layer_norm(ctx, dy, dmean, drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dweight, dbias = _layer_norm_bwd(dy, x, weight, ctx.has_bias, mean, rstd, None)
    return dx, dweight, dbias if ctx.has_bias else None, None, None


def _setup_add_layer_norm(ctx, inputs, output):
    x, residual, weight, bias, _, _ = inputs
    h, y, mean, rstd = output
    ctx.save_for_backward(h, weight, mean, rstd)  # x and r are not needed: the norm was of h
    ctx.has_bias = bias is not None
    ctx.dtypes = x.dtype, residual.dtype, y.dtype
    ctx.mark_non_differentiable(mean, rstd)
    # an unused h (the last block's residual stream feeds only ln_f) brings no gradient: None, not a
    # zero-filled (M, N) tensor for the kernel to read
    ctx.set_materialize_grads(False)


def _grad_add_layer_norm(ctx, dh, dy, dmean, drstd):
    h, weight, mean, rstd = ctx.saved_tensors
    x_dtype, residual_dtype, y_dtype = ctx.dtypes
    if dy is None:  # only h was used
        dy = torch.zeros(h.shape, dtype=y_dtype, device=h.device)
    dx, dweight, dbias = _layer_norm_bwd(dy, h, weight, ctx.has_bias, mean, rstd, dh)
    return dx.to(x_dtype), dx.to(residual_dtype), dweight, dbias if ctx.has_bias else None, None, None


_layer_norm_fwd.register_autograd(_grad_layer_norm, setup_context=_setup_layer_norm)
_add_layer_norm_fwd.register_autograd(_grad_add_layer_norm, setup_context=_setup_add_layer_norm)


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    return autocast_dtype(x) or x.dtype


def layer_norm_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      eps: float = 1e-5) -> torch.Tensor:
    n = x.size(-1)
    y, _, _ = _layer_norm_fwd(_rows(x, n), weight, bias, eps, _out_dtype(x))
    return y.view(x.shape)


def add_layer_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor | None = None, eps: float = 1e-5
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.size(-1)
    h, y, _, _ = _add_layer_norm_fwd(_rows(x, n), _rows(residual, n), weight, bias, eps, _out_dtype(x))
    return h.view(x.shape), y.view(x.shape)


# ---------------------------------------------------------------------------------------------------
# public entry points


def _check_params(name: str, n: int, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if weight.shape != (n,) or (bias is not None and bias.shape != (n,)):
        raise ValueError(
            f"{name}: weight and bias must have shape ({n},) to match the last dimension of x, got "
            f"weight {tuple(weight.shape)}" + ("" if bias is None else f" and bias {tuple(bias.shape)}")
        )


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """LayerNorm of `x` (..., N) with `weight` (N,) and optional `bias` (N,)."""
    _check_params("layer_norm", x.size(-1), weight, bias)
    problem = _problem("layer_norm", x, weight, bias, None)
    return select("layer_norm", x, layer_norm_reference, layer_norm_triton, problem)(x, weight, bias, eps)


def add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, layer_norm(h)) with h = x + residual: a residual add and the LayerNorm after it, in one pass."""
    if residual.shape != x.shape:
        raise ValueError(f"add_layer_norm: residual {tuple(residual.shape)} must have the shape of x "
                         f"{tuple(x.shape)}")
    _check_params("add_layer_norm", x.size(-1), weight, bias)
    problem = _problem("add_layer_norm", x, weight, bias, residual)
    return select("add_layer_norm", x, add_layer_norm_reference, add_layer_norm_triton, problem)(
        x, residual, weight, bias, eps)
