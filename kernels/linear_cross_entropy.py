"""The output layer and its loss in one op: the mean cross-entropy of `x @ weight.T + bias` against
integer targets, without the (rows x vocabulary) logits ever existing whole.

    loss = mean over rows r with targets[r] != ignore_index of  logsumexp(z_r) - z_r[targets[r]],
    z = x @ weight.T + bias, over the first n_classes columns (the rest are padding: never predicted)

With GPT-2's 50257 tokens, the logits of a shakespeare_char batch (64 x 256 rows) are 3.3 GB in fp32, and
a plain `F.cross_entropy(F.linear(...))` keeps them, their softmax and their gradient: 13 GB. Here the rows
are walked in chunks: each chunk's logits are computed (a cuBLAS matmul), turned into their gradient in
place (softmax minus the one-hot target), and folded into the gradients of x, weight and bias at once,
during the forward, so that only one chunk's logits exist at a time (Liger-Kernel's fused linear
cross-entropy does the same). The backward only scales those gradients by the loss's gradient.

Three paths, one result:
  plain      `F.cross_entropy(F.linear(x, weight, bias))`: one matmul and PyTorch's (or Inductor's) loss;
             what `auto` and `reference` run while the whole logits are small (at most PLAIN_MAX_BYTES in
             fp32: the 65 characters of shakespeare_char), where chunking saves no memory worth its cost;
  reference  the chunked computation in PyTorch (the CPU and MPS get the memory saving too): the fallback
             and the test oracle;
  triton     the same chunks, with each chunk's log-sum-exp, loss and gradient computed by one Triton
             program per row, in two passes over the row (online softmax, then the gradient written over
             the logits); the matmuls stay cuBLAS.
The loss is fp32 whatever the inputs' dtype (fp64 for fp64 inputs); under autocast the matmuls run in the autocast dtype (as
F.linear would) with fp32 accumulation of the weight's and bias' gradients across chunks, which are
returned in the weight's own dtype. The per-chunk gradient is left unscaled (values in [-1, 1]) and the
1 / (number of targets) is applied in fp32 afterwards, so fp16 does not flush it to zero.

A target outside [0, n_classes) that is not ignore_index makes the loss NaN (the trainer stops on a
non-finite loss); on the CPU, outside torch.compile, it raises a ValueError as F.cross_entropy does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fastgpt.kernels.core import aot_spec, autocast_dtype, tensor_problem
from fastgpt.kernels.dispatch import get_backend, select

# The whole logits below this many bytes (fp32) take the plain path under `auto` and `reference`.
PLAIN_MAX_BYTES = 256 * 2**20
# One chunk's fp32 logits take about this many bytes (the chunk's rows a power of two, at least 16).
CHUNK_BYTES = 64 * 2**20


def plain_is_chosen(rows: int, width: int) -> bool:
    """Whether `auto` (and `reference`) compute this loss unfused: the whole fp32 logits of `rows` rows
    of `width` columns are at most PLAIN_MAX_BYTES."""
    return rows * width * 4 <= PLAIN_MAX_BYTES


def chunk_rows(rows: int, width: int) -> int:
    """Rows per chunk: a power of two whose fp32 logits take about CHUNK_BYTES (at least 16 rows), and
    never more than `rows`."""
    fit = max(CHUNK_BYTES // (4 * max(width, 1)), 16)
    return max(1, min(rows, 1 << (fit.bit_length() - 1)))


def runs_unfused(rows: int, width: int) -> bool:
    """Whether the current backend computes this loss unfused: `auto` and `reference` by the size rule
    (plain_is_chosen); `triton` never."""
    return get_backend() != "triton" and plain_is_chosen(rows, width)


def describe(rows: int, width: int, device: torch.device) -> str:
    """How the current backend computes a loss over `rows` rows of `width` logits on `device`, in words (the
    trainer's start line says it)."""
    if runs_unfused(rows, width):
        return "unfused"
    backend = get_backend()
    kernel = backend == "triton" or (backend == "auto" and device.type == "cuda")
    return f"fused ({'Triton' if kernel else 'PyTorch'}, chunks of {chunk_rows(rows, width)} rows)"


def linear_cross_entropy_plain(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               bias: torch.Tensor | None = None, ignore_index: int = -100,
                               n_classes: int | None = None) -> torch.Tensor:
    """The unfused loss: the whole logits, then F.cross_entropy (in fp32)."""
    logits = F.linear(x, weight, bias)
    n = weight.size(0) if n_classes is None else n_classes
    if n < logits.size(-1):
        logits = logits[..., :n]
    logits = logits.reshape(-1, n)
    return F.cross_entropy(logits.to(_accumulator(logits.dtype)), targets.reshape(-1), ignore_index=ignore_index)


# ---------------------------------------------------------------------------------------------------
# one chunk's rows: log-sum-exp, loss and (unscaled) gradient, in PyTorch and in Triton


def _rows_reference(logits: torch.Tensor, targets: torch.Tensor, n_classes: int, ignore_index: int,
                    write_grad: bool) -> torch.Tensor:
    """Each row's loss (fp32; 0 where ignored, NaN where the target is out of range), and with
    `write_grad` the rows' gradient softmax - onehot (0 on ignored rows and padding columns) written
    over `logits`."""
    z = logits[:, :n_classes]
    z32 = z.to(_accumulator(z.dtype))  # z itself when the logits are fp32 (or fp64): worked on in place
    lse = torch.logsumexp(z32, dim=1)
    valid = targets != ignore_index
    in_range = (targets >= 0) & (targets < n_classes)
    picked = z32.gather(1, torch.where(in_range, targets, 0)[:, None]).squeeze(1)
    loss = torch.where(valid, torch.where(in_range, lse - picked, float("nan")), 0.0)
    if write_grad:
        grad = z32.sub_(lse[:, None]).exp_()  # over the logits themselves when they are fp32
        hit = (valid & in_range).to(grad.dtype)[:, None]
        grad.scatter_add_(1, torch.where(in_range, targets, 0)[:, None], -hit)
        grad.mul_(valid[:, None])
        if grad is not z:  # 16-bit logits: the gradient computed in fp32, written back
            z.copy_(grad)
        if n_classes < logits.size(1):
            logits[:, n_classes:] = 0
    return loss


@triton.jit
def _rows_kernel(
    LOGITS,  # (rows, width) this chunk's logits; with WRITE_GRAD overwritten by softmax - onehot
    TARGETS,  # (rows,) int64
    LOSS,  # (rows,) fp32 out: lse - z[target], 0 if ignored, NaN if out of range
    n_classes, width, ignore_index,
    stride_row,
    BLOCK: tl.constexpr, WRITE_GRAD: tl.constexpr,
):
    row = tl.program_id(0)
    base = LOGITS + row.to(tl.int64) * stride_row
    target = tl.load(TARGETS + row)
    valid = target != ignore_index
    in_range = (target >= 0) & (target < n_classes)
    cols = tl.arange(0, BLOCK)
    # pass 1: running max and sum of exponentials over the row (online softmax)
    top = -float("inf")
    total = 0.0
    for start in range(0, n_classes, BLOCK):
        z = tl.load(base + start + cols, mask=start + cols < n_classes, other=-float("inf")).to(tl.float32)
        new_top = tl.maximum(top, tl.max(z, axis=0))
        total = total * tl.exp(top - new_top) + tl.sum(tl.exp(z - new_top), axis=0)
        top = new_top
    lse = top + tl.log(total)
    picked = tl.load(base + tl.where(in_range, target, 0)).to(tl.float32)
    loss = tl.where(valid, tl.where(in_range, lse - picked, float("nan")), 0.0)
    tl.store(LOSS + row, loss)
    if WRITE_GRAD:
        # pass 2: the gradient over the same row, padding columns (n_classes..width) zeroed
        keep = tl.where(valid, 1.0, 0.0)
        for start in range(0, width, BLOCK):
            c = start + cols
            z = tl.load(base + c, mask=c < n_classes, other=-float("inf")).to(tl.float32)
            grad = tl.exp(z - lse) - tl.where((c == target) & in_range, 1.0, 0.0)
            tl.store(base + c, (grad * keep).to(LOGITS.dtype.element_ty), mask=c < width)


# (columns a program reads at a time, warps): a block that holds a small vocabulary in one step, and one
# that walks a large one in few; the launcher picks the first that covers the vocabulary, else the last
_BLOCKS = ((128, 4), (1024, 4), (4096, 8))


def _block(n_classes: int) -> tuple[int, int]:
    return next((b for b in _BLOCKS if b[0] >= n_classes), _BLOCKS[-1])


def _rows_triton(logits: torch.Tensor, targets: torch.Tensor, n_classes: int, ignore_index: int,
                 write_grad: bool) -> torch.Tensor:
    loss = torch.empty(logits.size(0), dtype=torch.float32, device=logits.device)
    if logits.size(0):
        block, warps = _block(n_classes)
        _rows_kernel[(logits.size(0),)](logits, targets, loss, n_classes, logits.size(1), ignore_index,
                                        logits.stride(0), BLOCK=block, WRITE_GRAD=write_grad, num_warps=warps)
    return loss


def aot_specs(arch: int = 90):
    """Every configuration the launcher compiles: each block for bf16, fp16 and fp32 logits, with and
    without the gradient. The presets' are the largest block (GPT-2's vocabulary; shakespeare_char's 65
    characters take the plain path)."""
    for dtype in ("bf16", "fp16", "fp32"):
        for block, warps in _BLOCKS:
            for write_grad in (True, False):
                tags = {"dtype": dtype, "block": block, "grad": write_grad,
                        "preset": block == _BLOCKS[-1][0] and dtype != "fp32"}
                yield aot_spec(_rows_kernel, {"LOGITS": f"*{dtype}", "TARGETS": "*i64", "LOSS": "*fp32"},
                               {"BLOCK": block, "WRITE_GRAD": write_grad}, warps, 1, tags, ["stride_row"])


# ---------------------------------------------------------------------------------------------------
# the chunked computation (both paths) and its registration


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    """The dtype the loss and the gradients are summed in: fp32, or fp64 for fp64 inputs (the oracle's)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunked(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
             ignore_index: int, n_classes: int, rows_per_chunk: int, compute_dtype: torch.dtype | None,
             needs_grad: bool, kernel: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dx, dweight, dbias) of the mean loss over x's (rows, C) against targets (rows,), one chunk
    of rows at a time; the gradients in fp32 (cast to the inputs' dtypes by the backward, after its
    scaling), empty without `needs_grad` (evaluation), dbias empty without a bias."""
    rows, width = x.size(0), weight.size(0)
    dtype = compute_dtype or x.dtype
    w = weight.to(dtype)
    b = bias.to(dtype) if bias is not None else None
    acc = _accumulator(dtype)
    count = (targets != ignore_index).sum()
    loss_sum = torch.zeros((), dtype=acc, device=x.device)
    dx = x.new_empty((rows, x.size(1)) if needs_grad else (0,), dtype=acc)
    dw = torch.zeros(weight.shape if needs_grad else (0,), dtype=acc, device=x.device)
    db = torch.zeros(width if needs_grad and bias is not None else 0, dtype=acc, device=x.device)
    per_rows = _rows_triton if kernel else _rows_reference
    with torch.autocast(x.device.type, enabled=False):  # the dtypes here are chosen, not autocast's
        for start in range(0, rows, rows_per_chunk):
            end = min(start + rows_per_chunk, rows)
            xc = x[start:end].to(dtype)
            logits = torch.addmm(b, xc, w.t()) if b is not None else xc @ w.t()  # (chunk, width)
            loss_sum += per_rows(logits, targets[start:end], n_classes, ignore_index, needs_grad).sum()
            if not needs_grad:
                continue
            # the logits now hold the chunk's gradient, softmax - onehot, not yet divided by count
            if dtype == acc:
                torch.mm(logits, w, out=dx[start:end])
                dw.addmm_(logits.t(), xc)
            else:
                dx[start:end] = logits @ w
                dw += (logits.t() @ xc).float()
            if bias is not None:
                db += logits.sum(0, dtype=acc)
    loss = loss_sum / count  # no targets: 0 / 0 = NaN, as F.cross_entropy
    if needs_grad:
        scale = 1.0 / count.clamp(min=1).to(acc)
        dx *= scale
        dw *= scale
        db *= scale
    return loss, dx, dw, db


@torch.library.custom_op("fastgpt::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          targets: torch.Tensor, ignore_index: int, n_classes: int, rows_per_chunk: int,
                          compute_dtype: torch.dtype | None, needs_grad: bool, kernel: bool
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _chunked(x, weight, bias, targets, ignore_index, n_classes, rows_per_chunk, compute_dtype,
                    needs_grad, kernel)


@_linear_cross_entropy.register_fake
def _(x, weight, bias, targets, ignore_index, n_classes, rows_per_chunk, compute_dtype, needs_grad, kernel):
    acc = _accumulator(compute_dtype or x.dtype)
    loss = x.new_empty((), dtype=acc)
    dx = x.new_empty(x.shape if needs_grad else (0,), dtype=acc)
    dw = weight.new_empty(weight.shape if needs_grad else (0,), dtype=acc)
    db = weight.new_empty((weight.size(0) if needs_grad and bias is not None else 0,), dtype=acc)
    return loss, dx, dw, db


def _setup(ctx, inputs, output):
    x, weight, bias = inputs[:3]
    _, dx, dw, db = output
    ctx.dtypes = (x.dtype, weight.dtype, bias.dtype if bias is not None else None)
    ctx.save_for_backward(dx, dw, db)
    ctx.mark_non_differentiable(dx, dw, db)
    ctx.set_materialize_grads(False)


def _grad(ctx, dloss, *_):
    dx, dw, db = ctx.saved_tensors
    if dloss is None:
        return None, None, None, None, None, None, None, None, None, None
    if dx.numel() == 0 and dw.numel() == 0:
        raise RuntimeError("linear_cross_entropy: the loss was computed without gradients (under no_grad or "
                           "with inputs that needed none), so it cannot be differentiated")
    x_dtype, w_dtype, b_dtype = ctx.dtypes
    dbias = (dloss * db).to(b_dtype) if b_dtype is not None else None
    return (dloss * dx).to(x_dtype), (dloss * dw).to(w_dtype), dbias, None, None, None, None, None, None, None


_linear_cross_entropy.register_autograd(_grad, setup_context=_setup)


def _run(x, weight, targets, bias, ignore_index, n_classes, chunk_size, kernel: bool) -> torch.Tensor:
    x2 = x.reshape(-1, x.size(-1))
    t = targets.reshape(-1)
    rows = chunk_size or chunk_rows(x2.size(0), weight.size(0))
    needs_grad = torch.is_grad_enabled() and any(
        a is not None and a.requires_grad for a in (x, weight, bias))
    return _linear_cross_entropy(x2, weight, bias, t, ignore_index, n_classes, rows, autocast_dtype(x),
                                 needs_grad, kernel)[0]


def linear_cross_entropy_reference(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   bias: torch.Tensor | None = None, ignore_index: int = -100,
                                   n_classes: int | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """The chunked loss computed in PyTorch (chunk_size rows at a time; by default chunk_rows's)."""
    return _run(x, weight, targets, bias, ignore_index, weight.size(0) if n_classes is None else n_classes,
                chunk_size, kernel=False)


def linear_cross_entropy_triton(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                bias: torch.Tensor | None = None, ignore_index: int = -100,
                                n_classes: int | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """The chunked loss with each chunk's softmax and gradient computed by the Triton kernel."""
    return _run(x, weight, targets, bias, ignore_index, weight.size(0) if n_classes is None else n_classes,
                chunk_size, kernel=True)


def _problem(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    return tensor_problem("linear_cross_entropy", {"x": x, "weight": weight, "bias": bias},
                          any_dtype=autocast_dtype(x) is not None)


# ---------------------------------------------------------------------------------------------------
# public entry point


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, ignore_index: int = -100,
                         n_classes: int | None = None, chunk_size: int | None = None) -> torch.Tensor:
    """Mean cross-entropy (fp32) of the logits `x @ weight.T + bias` against `targets`, fused.

    x (..., C); weight (V, C), as nn.Linear stores it; targets (...) integer ids, x's leading shape, those
    equal to `ignore_index` left out of the mean; bias (V,) or None. `n_classes` (default V) counts the
    real classes: the weight's later rows are padding (a vocabulary rounded up to a multiple of 64),
    never predicted and given no gradient. `chunk_size` rows are computed at a time (default: about 64 MiB
    of fp32 logits); giving it also forces the chunked path at any size.

    Under `auto` (and `reference`) a loss whose whole fp32 logits fit in PLAIN_MAX_BYTES (256 MiB) runs
    unfused (`plain_is_chosen`), elsewhere `auto` runs the Triton kernel on CUDA and the PyTorch chunks
    on other devices; backend `triton` always runs the kernel."""
    if weight.dim() != 2 or weight.size(1) != x.size(-1):
        raise ValueError(f"linear_cross_entropy: weight must have shape (V, {x.size(-1)}) to match x "
                         f"{tuple(x.shape)}, got {tuple(weight.shape)}")
    if targets.shape != x.shape[:-1] or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"linear_cross_entropy: targets must be integer ids of shape {tuple(x.shape[:-1])}, got "
                         f"{targets.dtype} of shape {tuple(targets.shape)}")
    if bias is not None and bias.shape != (weight.size(0),):
        raise ValueError(f"linear_cross_entropy: bias must have shape ({weight.size(0)},), got {tuple(bias.shape)}")
    n = weight.size(0) if n_classes is None else n_classes
    if not 1 <= n <= weight.size(0):
        raise ValueError(f"linear_cross_entropy: n_classes must be between 1 and the weight's {weight.size(0)} "
                         f"rows, got {n}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    targets = targets.long()
    if targets.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= n))
        if bad.any():
            raise ValueError(f"linear_cross_entropy: target {targets[bad][0].item()} is out of bounds for "
                             f"{n} classes")
    if chunk_size is None and runs_unfused(targets.numel(), weight.size(0)):
        return linear_cross_entropy_plain(x, weight, targets, bias, ignore_index, n)
    impl = select("linear_cross_entropy", x, linear_cross_entropy_reference, linear_cross_entropy_triton,
                  _problem(x, weight, bias))
    return impl(x, weight, targets, bias, ignore_index, n, chunk_size)
