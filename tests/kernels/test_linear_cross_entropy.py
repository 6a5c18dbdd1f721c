"""The fused linear + cross-entropy: the chunked PyTorch reference and the Triton kernel (the interpreter on
the CPU) against the whole logits' loss in fp64 (value and every gradient) at odd shapes, padding, ignored
targets, autocast, the size rule of `auto`, the custom op's registration (opcheck, torch.compile fullgraph)
and its ahead-of-time compilation."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, KERNEL_DTYPES as DTYPES, check_against_fp64, check_kernel_error
from fastgpt import kernels

lce = importlib.import_module("fastgpt.kernels.linear_cross_entropy")  # kernels.linear_cross_entropy is the op
from fastgpt.kernels.linear_cross_entropy import (  # noqa: E402
    _linear_cross_entropy, chunk_rows, linear_cross_entropy_plain, linear_cross_entropy_reference,
    linear_cross_entropy_triton, plain_is_chosen)

IGNORE = -100
pytestmark = pytest.mark.usefixtures("triton_kernels")

# (rows, C, V, n_classes, chunk): vocab 1, 65 (shakespeare_char), GPT-2's 50257 and nanoGPT's padded 50304
# (in full, and as 50257 real classes over 50304 rows); rows that are not a multiple of the chunk
CASES = [(5, 16, 1, 1, 2), (37, 32, 65, 65, 8), (37, 24, 128, 65, 16), (9, 32, 50257, 50257, 4),
         (7, 16, 50304, 50304, 3), (7, 16, 50304, 50257, 5)]
IMPLS = {"reference": linear_cross_entropy_reference, "triton": linear_cross_entropy_triton}


def make(rows, c, v, n, dtype, with_bias, seed=0, ignored=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, c, generator=g).to(DEVICE, dtype)
    w = (torch.randn(v, c, generator=g) / c ** 0.5).to(DEVICE, dtype)
    b = (0.5 * torch.randn(v, generator=g)).to(DEVICE, dtype) if with_bias else None
    t = torch.randint(n, (rows,), generator=g)
    if ignored:
        t[1::3] = IGNORE  # a third of the rows left out of the mean
    return x, w, b, t.to(DEVICE)


def check_loss(name, actual, exact, torch_lowp):
    """The accuracy rule; the loss itself is computed in fp32 at every dtype, so fp32's floor applies to it
    (PyTorch's own low-precision error comes from the matmul alone)."""
    if name == "loss":
        assert actual.dtype == torch.float32
        bound = 2 * (torch_lowp.double() - exact).abs().item() + 1e-5 * max(exact.abs().item(), 1.0)
        assert (actual.double() - exact).abs().item() <= bound, (actual.item(), exact.item(), torch_lowp.item())
        return
    check_kernel_error(name, actual, exact, torch_lowp)


@pytest.mark.parametrize("rows, c, v, n, chunk", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_loss_and_gradients_match_fp64(impl, rows, c, v, n, chunk, dtype):
    with_bias = v % 2 == 0
    x, w, b, t = make(rows, c, v, n, dtype, with_bias)
    names = ["loss", "dx", "dweight"] + (["dbias"] if with_bias else [])

    def fused(x, w, b):
        return IMPLS[impl](x, w, t, b, IGNORE, n, chunk)

    def plain(x, w, b):
        return linear_cross_entropy_plain(x, w, t, b, IGNORE, n)

    with kernels.backend("triton" if impl == "triton" else "reference"):
        got = check_against_fp64(names, fused, plain, (x, w, b), (torch.tensor(1.0),), check=check_loss)
    assert [g.dtype for g in got[1:]] == [dtype] * (len(got) - 1)
    if n < v:  # the padding rows are never predicted: no gradient reaches them
        assert not got[2][n:].any() and (not with_bias or not got[3][n:].any())


@pytest.mark.parametrize("impl", list(IMPLS))
def test_leading_dims_are_rows(impl):
    """x (B, T, C) with targets (B, T), as the model calls it: the rows are B*T."""
    x, w, b, t = make(24, 16, 40, 40, torch.float32, True)
    with kernels.backend("triton" if impl == "triton" else "reference"):
        loss = IMPLS[impl](x.view(2, 12, 16), w, t.view(2, 12), b, IGNORE, None, 5)
    torch.testing.assert_close(loss, linear_cross_entropy_plain(x, w, t, b, IGNORE))


@pytest.mark.parametrize("impl", list(IMPLS))
def test_every_target_ignored_gives_nan_and_no_gradient_as_pytorch(impl):
    x, w, _, t = make(6, 8, 10, 10, torch.float32, False)
    t[:] = IGNORE
    x.requires_grad_()
    with kernels.backend("triton" if impl == "triton" else "reference"):
        loss = IMPLS[impl](x, w, t, None, IGNORE, None, 4)
    expected = F.cross_entropy(x @ w.t(), t)
    assert math.isnan(loss.item()) and math.isnan(expected.item())
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_another_ignore_index():
    x, w, _, t = make(10, 8, 12, 12, torch.float32, False, ignored=False)
    t[::2] = 3
    expected = F.cross_entropy(x @ w.t(), t, ignore_index=3)
    for impl in IMPLS.values():
        with kernels.backend("triton" if impl is linear_cross_entropy_triton else "reference"):
            torch.testing.assert_close(impl(x, w, t, None, 3, None, 4), expected)


@pytest.mark.parametrize("kernel", [False, True])
def test_a_target_out_of_range_makes_the_loss_nan_inside_the_op(kernel):
    """Without a host sync (CUDA, torch.compile) a target the model has no row for cannot raise: it makes the
    loss NaN, which the trainer stops on, instead of reading outside the row."""
    x, w, _, t = make(6, 8, 10, 10, torch.float32, False, ignored=False)
    for bad in (10, -1):
        t[2] = bad
        loss = _linear_cross_entropy(x, w, None, t, IGNORE, 10, 4, None, False, kernel)[0]
        assert math.isnan(loss.item())


@pytest.mark.api
def test_the_entry_point_refuses_bad_arguments_in_one_line():
    x, w, _, t = make(6, 8, 10, 10, torch.float32, False, ignored=False)
    t[0] = 10
    with pytest.raises(ValueError, match="target 10 is out of bounds for 10 classes"):
        kernels.linear_cross_entropy(x, w, t)
    t[0] = 9
    with pytest.raises(ValueError, match="out of bounds for 5 classes"):
        kernels.linear_cross_entropy(x, w, t, n_classes=5)
    with pytest.raises(ValueError, match="weight must have shape"):
        kernels.linear_cross_entropy(x, w.t(), t)
    with pytest.raises(ValueError, match="targets must be integer ids of shape"):
        kernels.linear_cross_entropy(x, w, t[:3])
    with pytest.raises(ValueError, match="targets must be integer ids"):
        kernels.linear_cross_entropy(x, w, t.float())
    with pytest.raises(ValueError, match="bias must have shape"):
        kernels.linear_cross_entropy(x, w, t, torch.zeros(3))
    with pytest.raises(ValueError, match="n_classes must be between 1 and"):
        kernels.linear_cross_entropy(x, w, t, n_classes=11)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        kernels.linear_cross_entropy(x, w, t, chunk_size=0)


@pytest.mark.api
def test_auto_runs_small_losses_unfused_and_large_ones_in_chunks(monkeypatch):
    """The size rule: the 65 characters of shakespeare_char (64 x 256 rows) are 4 MiB of logits and run
    unfused; GPT-2's vocabulary there is 3.1 GiB and runs in chunks of 256 rows (64 MiB)."""
    assert plain_is_chosen(64 * 256, 65) and not plain_is_chosen(64 * 256, 50304)
    assert chunk_rows(64 * 256, 50304) == 256 and chunk_rows(64 * 256, 65) == 64 * 256
    assert chunk_rows(3, 50304) == 3 and chunk_rows(10**6, 10**7) == 16
    calls = []
    monkeypatch.setattr(lce, "linear_cross_entropy_reference", lambda *a: calls.append("chunked") or a[0].sum())
    x, w, _, t = make(12, 8, 10, 10, torch.float32, False)
    assert torch.equal(kernels.linear_cross_entropy(x, w, t), linear_cross_entropy_plain(x, w, t))
    assert calls == []
    monkeypatch.setattr(lce, "PLAIN_MAX_BYTES", 12 * 10 * 4 - 1)
    kernels.linear_cross_entropy(x, w, t)
    assert calls == ["chunked"]
    with kernels.backend("reference"):  # the reference backend follows the same rule on every device
        kernels.linear_cross_entropy(x, w, t)
    assert calls == ["chunked"] * 2


@pytest.mark.api
def test_no_gradient_work_under_no_grad():
    """Evaluation (no_grad) computes the loss alone: the op returns no gradients, so nothing of the weight's
    size is allocated for them."""
    x, w, _, t = make(12, 8, 10, 10, torch.float32, False)
    w.requires_grad_()
    with torch.no_grad():
        out = _linear_cross_entropy(x, w, None, t, IGNORE, 10, 4, None,
                                    torch.is_grad_enabled() and w.requires_grad, False)
        loss = kernels.linear_cross_entropy(x, w, t, chunk_size=4)
    assert out[1].numel() == out[2].numel() == 0 and not loss.requires_grad
    torch.testing.assert_close(loss, out[0])


def test_autocast_computes_in_the_autocast_dtype_and_returns_fp32_weight_gradients():
    """fp32 parameters under autocast: the matmuls run in the autocast dtype (fp16 here; the interpreter's
    bf16 is wrong), the loss is fp32, and the weight's gradient comes back in fp32, summed over the chunks in
    fp32 (not rounded to fp16 on the way)."""
    x, w, b, t = make(37, 32, 65, 65, torch.float32, True)
    x, w, b = (a.requires_grad_() for a in (x, w, b))
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        loss = kernels.linear_cross_entropy(x, w, t, b, chunk_size=8)
        expected = F.cross_entropy(F.linear(x, w, b).float(), t)
    assert loss.dtype == torch.float32
    grads = torch.autograd.grad(loss, (x, w, b))
    ref = torch.autograd.grad(expected, (x, w, b))
    assert [g.dtype for g in grads] == [torch.float32] * 3
    for a, e in zip((loss, *grads), (expected, *ref)):
        torch.testing.assert_close(a, e, atol=2e-3, rtol=2e-2)


def test_fp16_gradients_of_many_rows_do_not_flush_to_zero():
    """The chunks' gradients are divided by the number of targets in fp32, after the fp16 matmuls: 4096 rows
    make most of x's gradients ~1e-5, below fp16's normal range, and yet the gradient is PyTorch's."""
    x, w, _, t = make(4096, 16, 30, 30, torch.float16, False, ignored=False)
    got = torch.autograd.grad(linear_cross_entropy_reference(x.requires_grad_(), w, t, None, IGNORE, None, 512), x)[0]
    xd = x.detach().double().requires_grad_()
    exact = torch.autograd.grad(linear_cross_entropy_plain(xd, w.double(), t), xd)[0]
    assert exact.abs().median() < 6.1e-5  # most below fp16's smallest normal number
    assert (got.double() - exact).norm() < 0.01 * exact.norm()


def test_opcheck():
    x, w, b, t = make(11, 16, 40, 37, torch.float32, True)
    for kernel in (False, True):
        for needs_grad in (False, True):
            args = (x.requires_grad_(needs_grad), w.requires_grad_(needs_grad), b, t, IGNORE, 37, 4, None,
                    needs_grad, kernel)
            torch.library.opcheck(_linear_cross_entropy, args)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_torch_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) traces through the op (forward and backward) with no graph break, and
    gives the eager loss and gradients."""
    torch._dynamo.reset()
    x, w, b, t = make(37, 16, 50, 45, torch.float32, True)

    def step(x, w, b):
        return kernels.linear_cross_entropy(x, w, t, b, n_classes=45, chunk_size=8)

    compiled = torch.compile(step, fullgraph=True)
    with kernels.backend(backend):
        eager = check = None
        for fn in (step, compiled):
            leaves = [a.detach().requires_grad_() for a in (x, w, b)]
            loss = fn(*leaves)
            out = [loss, *torch.autograd.grad(loss, leaves)]
            if eager is None:
                eager = out
            else:
                check = out
    for a, e in zip(check, eager):
        torch.testing.assert_close(a, e)
