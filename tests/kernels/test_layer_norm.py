"""The Triton LayerNorm (plain and fused-residual), run in the Triton interpreter on the CPU: output and
every gradient against the reference in fp64, strides, dtypes, autocast, determinism, the custom ops'
registration (opcheck, torch.compile fullgraph) and ahead-of-time compilation for sm_90 and sm_80."""

from __future__ import annotations

import importlib

import pytest
import torch

from fastgpt import kernels
from conftest import rand, DEVICE, KERNEL_DTYPES as DTYPES, check_against_fp64, outputs_and_grads as grads
from fastgpt.kernels.layer_norm import (MAX_N, _add_layer_norm_fwd, _layer_norm_bwd, _layer_norm_fwd,
                               add_layer_norm_reference, layer_norm_reference)

SHAPES = [(1, 1, 7), (3, 7, 384), (2, 129, 1000), (4, 65, 768)]

pytestmark = pytest.mark.usefixtures("triton_kernels")


def make(shape, dtype, with_bias, seed=0):
    g = torch.Generator(DEVICE).manual_seed(seed)
    n = shape[-1]
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    r = torch.randn(shape, generator=g).to(dtype)
    w = (1 + 0.2 * torch.randn(n, generator=g)).to(dtype)
    b = (0.2 * torch.randn(n, generator=g)).to(dtype) if with_bias else None
    return x, r, w, b


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_layer_norm_and_gradients_match_fp64(shape, dtype, with_bias):
    x, _, w, b = make(shape, dtype, with_bias)
    dy = torch.randn(shape, generator=torch.Generator(DEVICE).manual_seed(1)).to(dtype)
    names = ["y", "dx", "dweight"] + (["dbias"] if with_bias else [])
    y = check_against_fp64(names, kernels.layer_norm, layer_norm_reference, (x, w, b), (dy,))[0]
    assert y.dtype == dtype


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_layer_norm_and_gradients_match_fp64(shape, dtype):
    """h = x + r and layer_norm(h), with gradients reaching both h (the residual stream) and y."""
    with_bias = shape[-1] % 2 == 0  # bias on some shapes, not on others
    x, r, w, b = make(shape, dtype, with_bias)
    g = torch.Generator(DEVICE).manual_seed(2)
    dh, dy = torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)
    names = ["h", "y", "dx", "dr", "dweight"] + (["dbias"] if with_bias else [])
    check_against_fp64(names, kernels.add_layer_norm, add_layer_norm_reference, (x, r, w, b), (dh, dy))


def test_strided_rows_and_mixed_dtypes():
    """Rows that are a strided view (every other row of a wider buffer) and a fp16 residual added to an
    fp32 stream: h is fp32 and each gradient comes back in its input's dtype."""
    g = torch.Generator(DEVICE).manual_seed(3)
    buffer = torch.randn(6, 2, 96, generator=g)
    x = buffer[:, 0]  # (6, 96) rows 192 elements apart
    assert not x.is_contiguous()
    r = torch.randn(6, 96, generator=g).half()
    w, b = torch.randn(96, generator=g), torch.randn(96, generator=g)
    ones = (torch.ones(6, 96), torch.ones(6, 96))
    h, y, dx, dr, dw, db = grads(kernels.add_layer_norm, (x, r, w, b), ones)
    h_ref, y_ref, *ref_grads = grads(add_layer_norm_reference, (x, r, w, b), ones)
    assert h.dtype == torch.float32 and dr.dtype == torch.float16 and dx.dtype == torch.float32
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for a, e in zip((dx, dr, dw, db), ref_grads):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-3)


def test_autocast_writes_the_autocast_dtype():
    """Under autocast the output is produced in bf16 directly, as the following linear would cast it."""
    x, _, w, b = make((5, 64), torch.float32, True)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        y = kernels.layer_norm(x, w, b)
    assert y.dtype == torch.bfloat16
    # within one bf16 unit in the last place: the interpreter truncates fp32 -> bf16, a GPU rounds
    torch.testing.assert_close(y.float(), layer_norm_reference(x, w, b).bfloat16().float(), atol=0, rtol=2 ** -7)


def test_no_rows():
    x, r, w, _ = make((0, 3, 16), torch.float32, False)
    h, y, dx, dr, dw = grads(kernels.add_layer_norm, (x, r, w, None), (torch.ones(0, 3, 16),) * 2)
    assert h.shape == y.shape == dx.shape == (0, 3, 16) and torch.equal(dw, torch.zeros(16))


def test_backward_is_deterministic():
    x, r, w, b = make((3, 50, 200), torch.float32, True)
    cot = (torch.randn(3, 50, 200), torch.randn(3, 50, 200))
    first = grads(kernels.add_layer_norm, (x, r, w, b), cot)
    second = grads(kernels.add_layer_norm, (x, r, w, b), cot)
    for a, b_ in zip(first, second):
        assert torch.equal(a, b_)


@pytest.mark.parametrize("bad, message", [
    (lambda x, w: (x.double(), w.double()), "layer_norm: the Triton kernel takes float32, float16 or bfloat16"),
    (lambda x, w: (x.to(torch.int32), w), "got x in torch.int32"),
    (lambda x, w: (torch.zeros(2, MAX_N + 1), torch.ones(MAX_N + 1)), f"N <= {MAX_N}"),
    (lambda x, w: (x, w.to("meta")), "weight is on meta but x is on"),
])
def test_launcher_rejects_bad_inputs_with_a_message(bad, message):
    x, w = bad(torch.ones(2, 8), torch.ones(8))
    with pytest.raises(ValueError, match=message):
        kernels.layer_norm(x, w)


def test_opcheck():
    x, r, w, b = make((3, 5, 40), torch.float32, True)
    mean = x.reshape(-1, 40).mean(-1)
    rstd = torch.rsqrt(x.reshape(-1, 40).var(-1, unbiased=False) + 1e-5)
    rows = x.reshape(-1, 40)
    torch.library.opcheck(_layer_norm_fwd, (rows.requires_grad_(), w.requires_grad_(), b, 1e-5, torch.float32))
    torch.library.opcheck(_add_layer_norm_fwd, (rows.detach(), r.reshape(-1, 40), w.detach(), None, 1e-5,
                                                torch.float32))
    torch.library.opcheck(_layer_norm_bwd, (torch.randn(15, 40), rows.detach(), w.detach(), True, mean, rstd,
                                            torch.randn(15, 40)))


def test_compiles_fullgraph_through_the_custom_ops():
    torch._dynamo.reset()
    x, r, w, b = make((2, 9, 48), torch.float32, True)

    def block(x, r, w, b):
        h, y = kernels.add_layer_norm(x, r, w, b)
        return h * kernels.layer_norm(y, w)

    compiled = torch.compile(block, fullgraph=True)
    for a, e in zip(grads(compiled, (x, r, w, b), (torch.ones(2, 9, 48),)),
                    grads(block, (x, r, w, b), (torch.ones(2, 9, 48),))):
        torch.testing.assert_close(a, e)


def test_auto_backend_falls_back_to_the_reference_outside_the_kernel_limits(monkeypatch):
    module = importlib.import_module("fastgpt.kernels.layer_norm")
    problems = []
    monkeypatch.setattr(module, "select", lambda op, x, ref, tri, problem=None: problems.append(problem) or ref)
    kernels.layer_norm(torch.zeros(2, MAX_N + 1), torch.ones(MAX_N + 1))
    kernels.layer_norm(torch.zeros(2, 8), torch.ones(8))
    kernels.add_layer_norm(torch.zeros(2, 8).double(), torch.zeros(2, 8).double(), torch.ones(8).double())
    assert [p and p.split(":")[0] for p in problems] == ["layer_norm", None, "add_layer_norm"]
    assert f"N <= {MAX_N}" in problems[0] and "got x in torch.float64" in problems[2]


# ---------------------------------------------------------------------------------------------------
# the public entry point (backend auto) against explicit fp64 maths written here


def explicit_layer_norm(x, weight, bias, eps):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)  # biased: divides by N
    y = (x - mean) / torch.sqrt(var + eps) * weight
    return y if bias is None else y + bias


@pytest.mark.api
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 7, 65), (1, 1, 1023), (5, 256)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("eps", [1e-5, 0.5])
def test_layer_norm_matches_mean_var_maths(shape, with_bias, eps):
    n = shape[-1]
    x, weight, bias = rand(*shape, seed=1) * 3 + 1, rand(n, seed=2), rand(n, seed=3) if with_bias else None
    out = kernels.layer_norm(x, weight, bias, eps)
    assert out.shape == x.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, explicit_layer_norm(x, weight, bias, eps))


@pytest.mark.api
@pytest.mark.parametrize("with_bias", [False, True])
def test_layer_norm_gradients(with_bias):
    x = rand(2, 3, 7, seed=1).requires_grad_()
    weight = rand(7, seed=2).requires_grad_()
    inputs = (x, weight) + ((rand(7, seed=3).requires_grad_(),) if with_bias else ())
    assert torch.autograd.gradcheck(lambda *a: kernels.layer_norm(*a), inputs)


@pytest.mark.api
@pytest.mark.parametrize("weight_shape, bias_shape", [((7,), None), ((8, 1), None), ((8,), (7,))])
def test_layer_norm_rejects_mismatched_weight_or_bias(weight_shape, bias_shape):
    x = torch.zeros(2, 8)
    bias = None if bias_shape is None else torch.zeros(bias_shape)
    with pytest.raises(ValueError, match=r"layer_norm: weight and bias must have shape \(8,\)"):
        kernels.layer_norm(x, torch.ones(weight_shape), bias)
