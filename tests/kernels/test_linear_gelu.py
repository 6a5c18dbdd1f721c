"""The Triton linear + GELU, run in the Triton interpreter on the CPU: output and every gradient against
the reference in fp64, strides, autocast, determinism, saved activations, the custom ops' registration
(opcheck, torch.compile fullgraph) and ahead-of-time compilation for sm_90 and sm_80."""

from __future__ import annotations

import math
import importlib

import pytest
import torch

from fastgpt import kernels
from conftest import rand, DEVICE, KERNEL_DTYPES as DTYPES, check_against_fp64, outputs_and_grads as grads
from fastgpt.kernels.linear_gelu import _linear_gelu_bwd, _linear_gelu_fwd, linear_gelu_reference

linear_gelu_module = importlib.import_module("fastgpt.kernels.linear_gelu")  # kernels.linear_gelu is the op

# (x shape, N): the row shapes, N = 4 * K as in the GPT's MLP where that stays small enough for
# the interpreter, and ragged tile edges in every dimension
CASES = [((1, 1, 7), 28), ((3, 7, 384), 1536), ((2, 129, 1000), 200), ((4, 65, 768), 300)]

pytestmark = pytest.mark.usefixtures("triton_kernels")


def make(x_shape, n, dtype, with_bias, seed=0):
    g = torch.Generator(DEVICE).manual_seed(seed)
    k = x_shape[-1]
    x = torch.randn(x_shape, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    b = (0.5 * torch.randn(n, generator=g)).to(dtype) if with_bias else None
    dy = torch.randn(*x_shape[:-1], n, generator=g).to(dtype)
    return x, w, b, dy


@pytest.mark.parametrize("x_shape, n", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_gelu_and_gradients_match_fp64(x_shape, n, dtype, with_bias):
    x, w, b, dy = make(x_shape, n, dtype, with_bias)
    names = ["y", "dx", "dweight"] + (["dbias"] if with_bias else [])
    y = check_against_fp64(names, kernels.linear_gelu, linear_gelu_reference, (x, w, b), (dy,))[0]
    assert y.dtype == dtype and y.shape == (*x_shape[:-1], n)


def test_strided_input_and_weight():
    """x a column slice of a wider activation, the weight a transposed view: no copies needed."""
    g = torch.Generator(DEVICE).manual_seed(1)
    wide = torch.randn(2, 9, 80, generator=g)
    x = wide[..., 16:64]  # (2, 9, 48), rows 80 elements apart
    w = torch.randn(48, 40, generator=g).t()  # (40, 48) with strides (1, 40)
    dy = torch.randn(2, 9, 40, generator=g)
    ours = grads(kernels.linear_gelu, (x, w, None), (dy,))
    ref = grads(linear_gelu_reference, (x, w, None), (dy,))
    for a, e in zip(ours, ref):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)


def test_autocast_runs_in_the_autocast_dtype():
    """fp32 parameters under autocast are cast as F.linear's would be; fp16 stands in for bf16, which
    the interpreter computes wrongly."""
    x, w, b, _ = make((4, 32), 64, torch.float32, True)
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        y = kernels.linear_gelu(x, w, b)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y, linear_gelu_reference(x.half(), w.half(), b.half()), atol=2e-3, rtol=2e-3)


def test_saves_no_more_than_the_reference():
    """Activation memory in training: the reference's autograd graph keeps x, weight and the GELU's input z."""
    x, w, b, _ = make((3, 5, 32), 128, torch.float32, True)
    for t in (x, w, b):
        t.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        kernels.linear_gelu(x, w, b)
    with kernels.backend("reference"):
        reference_saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: reference_saved.append(t.numel()) or t,
                                                      lambda t: t):
            kernels.linear_gelu(x, w, b)
    assert sum(saved) <= sum(reference_saved)


def test_backward_is_deterministic():
    x, w, b, dy = make((3, 40, 96), 200, torch.float32, True)
    first, second = grads(kernels.linear_gelu, (x, w, b), (dy,)), grads(kernels.linear_gelu, (x, w, b), (dy,))
    assert all(torch.equal(a, b_) for a, b_ in zip(first, second))


def test_no_rows():
    x, w, b, dy = make((0, 16), 24, torch.float32, True)
    y, dx, dw, db = grads(kernels.linear_gelu, (x, w, b), (dy,))
    assert y.shape == (0, 24) and dx.shape == (0, 16) and torch.equal(dw, torch.zeros(24, 16))


@pytest.mark.parametrize("bad, message", [
    (lambda x, w: (x.double(), w.double()), "the Triton kernel takes float32, float16 or bfloat16"),
    (lambda x, w: (x, w.half()), "takes one dtype, got weight in torch.float16 and x in torch.float32"),
    (lambda x, w: (x, w.to("meta")), "weight is on meta but x is on"),
])
def test_launcher_rejects_bad_inputs_with_a_message(bad, message):
    x, w = bad(torch.ones(2, 8), torch.ones(4, 8))
    with pytest.raises(ValueError, match=message):
        kernels.linear_gelu(x, w)


def test_opcheck():
    x, w, b, dy = make((10, 24), 40, torch.float32, True)
    torch.library.opcheck(_linear_gelu_fwd, (x.requires_grad_(), w.requires_grad_(), b.requires_grad_()))
    torch.library.opcheck(_linear_gelu_fwd, (x.detach(), w.detach(), None))
    torch.library.opcheck(_linear_gelu_bwd, (dy, torch.randn(10, 40)))


def test_compiles_fullgraph_through_the_custom_ops():
    torch._dynamo.reset()
    x, w, b, dy = make((2, 9, 48), 96, torch.float32, True)

    def mlp_half(x, w, b):
        return kernels.linear_gelu(x, w, b) * 2

    compiled = torch.compile(mlp_half, fullgraph=True)
    for a, e in zip(grads(compiled, (x, w, b), (dy,)), grads(mlp_half, (x, w, b), (dy,))):
        torch.testing.assert_close(a, e)


def test_a_tile_that_does_not_fit_a_gpu_is_never_timed_there():
    """Before sm_80 the 16-bit tiles are Turing's own (the others spill registers there, and the three
    largest, 72-96 KiB as compiled, overflow a T4's 64 KiB of shared memory); an A100, an RTX 3090
    (99 KiB), an H100 and a B200 take every 16-bit candidate."""
    everything = linear_gelu_module._CONFIGS_16BIT
    assert linear_gelu_module._candidates(2, 75) == linear_gelu_module._CONFIGS_TURING
    for arch in (80, 86, 89, 90, 100):
        assert linear_gelu_module._candidates(2, arch) == everything
    # the estimate is the compiled figure on sm_80 (tests/aot.py): fp32's largest tile is exactly 64 KiB
    assert linear_gelu_module._candidates(4, 75) == linear_gelu_module._CONFIGS_FP32


def test_auto_backend_falls_back_to_the_reference_outside_the_kernel_limits(monkeypatch):
    problems = []
    monkeypatch.setattr(linear_gelu_module, "select",
                        lambda op, x, ref, tri, problem=None: problems.append(problem) or (lambda *args: None))
    x, w = torch.zeros(2, 8), torch.zeros(4, 8)
    kernels.linear_gelu(x, w)
    kernels.linear_gelu(x, w.double())  # mixed dtypes without autocast
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        kernels.linear_gelu(x, w.double())  # autocast casts both
    assert problems[0] is None and problems[2] is None
    assert "takes float32, float16 or bfloat16, got weight in torch.float64" in problems[1]


# ---------------------------------------------------------------------------------------------------
# the public entry point (backend auto) against explicit fp64 maths written here


def explicit_linear_gelu(x, weight, bias):
    z = x @ weight.T
    if bias is not None:
        z = z + bias
    return 0.5 * z * (1.0 + torch.special.erf(z / math.sqrt(2.0)))


@pytest.mark.api
@pytest.mark.parametrize("x_shape, n", [((1, 1, 1), 1), ((3, 7, 65), 33), ((2, 17), 130)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_gelu_matches_erf_gelu(x_shape, n, with_bias):
    x, weight = rand(*x_shape, seed=1) * 2, rand(n, x_shape[-1], seed=2)
    bias = rand(n, seed=3) if with_bias else None
    out = kernels.linear_gelu(x, weight, bias)
    assert out.shape == (*x_shape[:-1], n)
    torch.testing.assert_close(out, explicit_linear_gelu(x, weight, bias))


@pytest.mark.api
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_gelu_gradients(with_bias):
    x = rand(2, 3, 5, seed=1).requires_grad_()
    weight = rand(4, 5, seed=2).requires_grad_()
    inputs = (x, weight) + ((rand(4, seed=3).requires_grad_(),) if with_bias else ())
    assert torch.autograd.gradcheck(lambda *a: kernels.linear_gelu(*a), inputs)


@pytest.mark.parametrize("weight_shape, bias_shape, message", [
    ((5,), None, r"linear_gelu: weight must have shape \(N, 8\)"),
    ((5, 7), None, r"linear_gelu: weight must have shape \(N, 8\)"),
    ((5, 8), (8,), r"linear_gelu: bias must have shape \(5,\)"),
    ((5, 8), (5, 1), r"linear_gelu: bias must have shape \(5,\)"),
])
@pytest.mark.api
def test_linear_gelu_rejects_bad_shapes(weight_shape, bias_shape, message):
    bias = None if bias_shape is None else torch.zeros(bias_shape)
    with pytest.raises(ValueError, match=message):
        kernels.linear_gelu(torch.zeros(3, 8), torch.zeros(weight_shape), bias)
