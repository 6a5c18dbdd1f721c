"""The first half of the GPT MLP: a linear layer followed by exact (erf) GELU.

    z = x @ weight.T + bias,   y = gelu(z) = z * (1 + erf(z / sqrt(2))) / 2

The reference is `F.gelu(F.linear(...))`; it is the fallback, the test oracle and the benchmark
baseline. The MLP's second linear (`c_proj`) stays a plain (cuBLAS) matmul.

The Triton path:
  forward   a tiled matmul (tiles tuned per problem, fp32 accumulators, grouped tile order for L2
            reuse) whose epilogue adds the bias and applies the GELU while the tile is still in
            registers, storing y and the pre-activation z: the reference writes z, reads it back for
            the GELU and writes y; here z and y are written once each and z is never read back in the
            forward;
  backward  dz = dy * gelu'(z), gelu'(z) = Phi(z) + z * phi(z), in one elementwise pass over dy and the
            saved z, then dx = dz @ weight and dweight = dz.T @ x as cuBLAS matmuls and dbias = the
            column sums of dz. Saved for the backward: x, weight and z, as the reference saves x,
            weight and z (the GELU's input): no more activation memory than it uses.
The gradient matmuls are cuBLAS: they are plain matmuls with nothing to fuse, and cuBLAS is what a
Triton matmul would have to beat (on an H100 it does not, for these shapes, without wgmma/TMA tuning).
fp32, fp16 and bf16 inputs (one dtype for x, weight and bias; under autocast they are cast to the
autocast dtype first, as F.linear would). fp32 inputs use TF32 in the matmul exactly when PyTorch's
`torch.backends.cuda.matmul.allow_tf32` does.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastgpt.kernels.dispatch import select
from fastgpt.kernels.core import aot_spec, arch_of, autocast_dtype, shared_memory, tensor_problem
from fastgpt.kernels.tuning import Tuner, kernel_source


def linear_gelu_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    return F.gelu(F.linear(x, weight, bias))


# ---------------------------------------------------------------------------------------------------
# Triton kernels


# M, N and K stay specialised by the JIT (a variant for == 1 / a multiple of 16 / neither): without their
# divisibility the tiles took up to 12 more registers on sm_90 (the fp32 128 x 128 tile spilled), and in
# training they are constants of the run. So does the backward's numel: its masks are then uniform over
# 16-element groups, which lets its loads and stores be vectors.
@triton.jit
def _linear_gelu_fwd_kernel(
    X,  # (M, K) input rows
    W,  # (N, K) weight, as nn.Linear stores it
    B,  # (N,) bias (HAS_BIAS)
    Y,  # (M, N) out: gelu(z)
    Z,  # (M, N) out: z = x @ W.T + b, saved for the backward
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_zm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # grouped order: GROUP_M row tiles sweep the column tiles together, so the weight tiles they share
    # and their rows of x are reused from L2
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_m
    pid_n = (pid % (GROUP_M * tiles_n)) // group_m

    # 64-bit tile origins, 32-bit offsets within a tile (fewer registers than 64-bit pointer tiles)
    row0 = pid_m.to(tl.int64) * BLOCK_M
    col0 = pid_n.to(tl.int64) * BLOCK_N
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    rows_left = M - row0
    cols_left = N - col0
    x_ptrs = X + row0 * stride_xm + rows[:, None] * stride_xm + ks[None, :] * stride_xk  # (BLOCK_M, BLOCK_K)
    w_ptrs = W + col0 * stride_wn + cols[None, :] * stride_wn + ks[:, None] * stride_wk  # (BLOCK_K, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=(rows[:, None] < rows_left) & (ks[None, :] < k_left), other=0.0)
        b = tl.load(w_ptrs, mask=(cols[None, :] < cols_left) & (ks[:, None] < k_left), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        acc += tl.load(B + col0 + cols, mask=cols < cols_left, other=0.0).to(tl.float32)[None, :]
    mask = (rows[:, None] < rows_left) & (cols[None, :] < cols_left)
    # y is computed from z as stored (rounded to its dtype), as the reference's GELU reads it
    z = acc.to(Z.dtype.element_ty)
    tl.store(Z + row0 * stride_zm + col0 + rows[:, None] * stride_zm + cols[None, :], z, mask=mask)
    z = z.to(tl.float32)
    y = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    tl.store(Y + row0 * stride_ym + col0 + rows[:, None] * stride_ym + cols[None, :], y, mask=mask)


@triton.jit
def _linear_gelu_bwd_kernel(
    DY,  # (numel,) gradient of y, contiguous
    Z,  # (numel,) saved pre-activation, contiguous
    DZ,  # (numel,) out
    numel,
    BLOCK: tl.constexpr,
):
    # dz = dy * gelu'(z),  gelu'(z) = Phi(z) + z * phi(z),  Phi(z) = (1 + erf(z / sqrt 2)) / 2,
    # phi(z) = exp(-z^2 / 2) / sqrt(2 pi)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    z = tl.load(Z + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
    pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
    tl.store(DZ + offs, dy * (cdf + z * pdf), mask=mask)


# ---------------------------------------------------------------------------------------------------
# launchers


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): the tuner's candidates on a GPU, chosen per problem
# (kernels/tuning.py). Wide tiles for the training shapes (M = B*T in the tens of thousands, N = 4*n_embd),
# narrow ones for the small M of generation. fp32 tiles hold twice the bytes per element, so they take a
# shorter K step and fewer stages to stay within shared memory (163 KiB on an A100). Every candidate
# compiles without register spills for sm_80 and sm_90 (tests/slow/test_aot.py). The first of each list is
# the fallback for a problem met untuned inside a CUDA-graph capture.
_CONFIGS_16BIT = (
    (128, 128, 64, 8, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 3),
    (32, 64, 64, 4, 3),
)
_CONFIGS_FP32 = (
    (128, 128, 32, 8, 3),
    (64, 128, 32, 4, 3),
    (64, 64, 32, 4, 3),
    (32, 64, 32, 4, 3),
)
# The interpreter runs one program at a time: one medium tile (the interpreter's cost is per program).
_INTERPRETER_CONFIG = (64, 64, 32, 4, 1)
_GROUP_M = 8
_BWD_BLOCK = 1024
_BWD_WARPS = 4
_TUNER = Tuner("linear_gelu_fwd", kernel_source(_linear_gelu_fwd_kernel))


# Before sm_80 (a T4, a V100) every 16-bit tile above spills registers (hundreds of bytes to kilobytes, as
# tests/aot.py compiles them for sm_75) and the three largest overflow a T4's 64 KiB of shared memory:
# these compile clean there.
_CONFIGS_TURING = (
    (64, 64, 32, 8, 2),
    (32, 64, 32, 4, 2),
    (64, 32, 32, 4, 2),
)


@functools.lru_cache(maxsize=None)
def _candidates(element_size: int, arch: int | None) -> tuple[tuple[int, int, int, int, int], ...]:
    """The tuner's candidates on a GPU of compute capability `arch` (None: the interpreter), those that fit
    its block's shared memory: a tile keeps (stages - 1) x and weight slices of BLOCK_K in flight,
    (BLOCK_M + BLOCK_N) x BLOCK_K elements each (the compiled figure on sm_80; tests/aot.py checks every
    architecture's). If none fitted, the smallest would be taken."""
    configs = _CONFIGS_16BIT if element_size == 2 else _CONFIGS_FP32
    if element_size == 2 and arch is not None and arch < 80:
        configs = _CONFIGS_TURING
    fits = tuple(c for c in configs
                 if (c[0] + c[1]) * c[2] * element_size * max(c[4] - 1, 1) <= shared_memory(arch))
    return fits or configs[-1:]


def _input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored by Triton for 16-bit inputs


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x.shape
    n = weight.size(0)
    y = x.new_empty((m, n))
    z = x.new_empty((m, n))
    if m == 0 or n == 0:
        return y, z
    args = (x, weight, bias if bias is not None else weight, y, z, m, n, k,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), y.stride(0), z.stride(0))
    flags = dict(GROUP_M=_GROUP_M, HAS_BIAS=bias is not None, INPUT_PRECISION=_input_precision(x.dtype))

    def launch(config: tuple[int, int, int, int, int]) -> None:
        bm, bn, bk, w, s = config
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
        _linear_gelu_fwd_kernel[grid](*args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=s,
                                      **flags)

    if x.is_cuda:
        # one tuning per power of two of M: generation without the KV cache grows M by a row per token
        key = (triton.next_power_of_2(m), n, k, str(x.dtype), flags["HAS_BIAS"], flags["INPUT_PRECISION"])
        launch(_TUNER.pick(key, _candidates(x.element_size(), arch_of(x)), launch))
    else:
        launch(_INTERPRETER_CONFIG)
    return y, z


def _backward(dy: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    dy = dy.contiguous()
    dz = torch.empty_like(z)
    if z.numel():
        _linear_gelu_bwd_kernel[(triton.cdiv(z.numel(), _BWD_BLOCK),)](dy, z, dz, z.numel(), BLOCK=_BWD_BLOCK,
                                                                       num_warps=_BWD_WARPS)
    return dz


def _problem(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """Why the kernel cannot take these inputs, in one line, or None when it can (`auto` and the
    launchers' check, kernels/dispatch.py). Under autocast the dtypes do not matter: `linear_gelu_triton`
    casts all three to the autocast dtype."""
    return tensor_problem("linear_gelu", {"x": x, "weight": weight, "bias": bias}, one_dtype=True,
                          any_dtype=autocast_dtype(x) is not None)


def aot_specs(arch: int = 90):
    """Every configuration the launchers may compile on a GPU of compute capability `arch`: each tuner
    candidate that fits it, with and without bias, for bf16 and fp32 (TF32 and IEEE), and fp16 without
    bias (the presets' under fp16 autocast, tagged `preset` with bf16's), and the elementwise backward.
    n_embd does not enter the compiled code (M, N and K are runtime arguments), so one compilation covers
    n_embd 128..4096; the JIT specialises unit strides (contiguous rows) and sizes and strides that are
    multiples of 16, as they are for every n_embd in that range."""
    variants = [("bf16", "tf32", 2, (False, True)), ("fp16", "tf32", 2, (False,)),
                ("fp32", "tf32", 4, (False, True)), ("fp32", "ieee", 4, (False,))]
    for dtype, precision, element_size, biases in variants:
        types = {name: f"*{dtype}" for name in ("X", "W", "B", "Y", "Z")}
        for bm, bn, bk, w, s in _candidates(element_size, arch):
            for has_bias in biases:
                constexprs = {"stride_xk": 1, "stride_wk": 1, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk,
                              "GROUP_M": _GROUP_M, "HAS_BIAS": has_bias, "INPUT_PRECISION": precision}
                divisible = ["M", "N", "K", "stride_xm", "stride_wn", "stride_ym", "stride_zm"]
                tags = {"dtype": dtype, "bias": has_bias, "precision": precision,
                        "preset": element_size == 2 and not has_bias}
                yield aot_spec(_linear_gelu_fwd_kernel, types, constexprs, w, s, tags, divisible)
    for dtype in ("bf16", "fp16", "fp32"):
        yield aot_spec(_linear_gelu_bwd_kernel, {name: f"*{dtype}" for name in ("DY", "Z", "DZ")},
                       {"BLOCK": _BWD_BLOCK}, _BWD_WARPS, 1, {"dtype": dtype, "preset": dtype != "fp32"}, ["numel"])


# ---------------------------------------------------------------------------------------------------
# op registration: opaque to torch.compile, differentiable through register_autograd


@torch.library.custom_op("fastgpt::linear_gelu_fwd", mutates_args=())
def _linear_gelu_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(x, weight, bias)


@_linear_gelu_fwd.register_fake
def _(x, weight, bias):
    shape = (x.size(0), weight.size(0))
    return x.new_empty(shape), x.new_empty(shape)


@torch.library.custom_op("fastgpt::linear_gelu_bwd", mutates_args=())
def _linear_gelu_bwd(dy: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return _backward(dy, z)


@_linear_gelu_bwd.register_fake
def _(dy, z):
    return torch.empty_like(z)


def _setup_linear_gelu(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.has_bias = bias is not None
    # z is saved for the backward and never returned to users: no zero-filled (M, N) gradient for it
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _grad_linear_gelu(ctx, dy, dz_out):
    x, weight, z = ctx.saved_tensors
    if dy is None:  # y unused: nothing flows back
        return None, None, None
    dz = _linear_gelu_bwd(dy, z)  # (M, N)
    dx = dz @ weight  # (M, K)
    dweight = dz.t() @ x  # (N, K)
    dbias = dz.sum(0) if ctx.has_bias else None
    return dx, dweight, dbias


_linear_gelu_fwd.register_autograd(_grad_linear_gelu, setup_context=_setup_linear_gelu)


def linear_gelu_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
                       ) -> torch.Tensor:
    dtype = autocast_dtype(x)
    if dtype is not None:
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    y, _ = _linear_gelu_fwd(x.reshape(-1, x.size(-1)), weight, bias)
    return y.view(*x.shape[:-1], weight.size(0))


# ---------------------------------------------------------------------------------------------------
# public entry point


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
    return select("linear_gelu", x, linear_gelu_reference, linear_gelu_triton, _problem(x, weight, bias))(
        x, weight, bias)
