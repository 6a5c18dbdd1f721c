"""The public kernel API: each op against explicit fp64 maths written here, its gradients, its input
checks, and the backend switch."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from fastgpt import kernels
from fastgpt.kernels.attention import causal_attention_reference
from fastgpt.kernels.dispatch import select
from fastgpt.kernels.layer_norm import layer_norm_reference
from fastgpt.kernels.linear_gelu import linear_gelu_reference

from fastgpt.kernels import dispatch as backend_module
OPS = ["layer_norm", "causal_attention", "linear_gelu"]


@pytest.fixture(autouse=True)
def restore_backend():
    """Each test starts and ends on the backend it found, whatever it selects on the way."""
    previous = kernels.get_backend()
    yield
    kernels.set_backend(previous)


def op_inputs(op: str) -> tuple:
    """Small fp64 CPU arguments for `op`."""
    g = torch.Generator().manual_seed(0)
    if op == "layer_norm":
        return torch.randn(2, 3, 8, generator=g, dtype=torch.float64), torch.randn(8, generator=g,
                                                                                   dtype=torch.float64)
    if op == "causal_attention":
        return tuple(torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64) for _ in range(3))
    return torch.randn(2, 3, 8, generator=g, dtype=torch.float64), torch.randn(6, 8, generator=g,
                                                                               dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------
# explicit fp64 maths: the oracles for the references


def explicit_layer_norm(x, weight, bias, eps):
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)  # biased: divides by N
    y = (x - mean) / torch.sqrt(var + eps) * weight
    return y if bias is None else y + bias


def explicit_linear_gelu(x, weight, bias):
    z = x @ weight.T
    if bias is not None:
        z = z + bias
    return 0.5 * z * (1.0 + torch.special.erf(z / math.sqrt(2.0)))


def explicit_attention(q, k, v, window):
    """softmax over the masked score matrix, the mask spelled out entry by entry."""
    tq, tk, d = q.size(-2), k.size(-2), q.size(-1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d)  # (B, H, Tq, Tk)
    allowed = torch.zeros(tq, tk, dtype=torch.bool)
    for i in range(tq):
        position = i + tk - tq  # the queries are the last tq positions of the key sequence
        for j in range(tk):
            allowed[i, j] = j <= position and (window is None or j >= position - window + 1)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------
# layer_norm


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 7, 65), (1, 1, 1023), (5, 256)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("eps", [1e-5, 0.5])
def test_layer_norm_matches_mean_var_maths(shape, with_bias, eps):
    n = shape[-1]
    x, weight, bias = rand(*shape, seed=1) * 3 + 1, rand(n, seed=2), rand(n, seed=3) if with_bias else None
    out = kernels.layer_norm(x, weight, bias, eps)
    assert out.shape == x.shape and out.dtype == torch.float64
    torch.testing.assert_close(out, explicit_layer_norm(x, weight, bias, eps))


@pytest.mark.parametrize("with_bias", [False, True])
def test_layer_norm_gradients(with_bias):
    x = rand(2, 3, 7, seed=1).requires_grad_()
    weight = rand(7, seed=2).requires_grad_()
    inputs = (x, weight) + ((rand(7, seed=3).requires_grad_(),) if with_bias else ())
    assert torch.autograd.gradcheck(lambda *a: kernels.layer_norm(*a), inputs)


@pytest.mark.parametrize("weight_shape, bias_shape", [((7,), None), ((8, 1), None), ((8,), (7,))])
def test_layer_norm_rejects_mismatched_weight_or_bias(weight_shape, bias_shape):
    x = torch.zeros(2, 8)
    bias = None if bias_shape is None else torch.zeros(bias_shape)
    with pytest.raises(ValueError, match=r"layer_norm: weight and bias must have shape \(8,\)"):
        kernels.layer_norm(x, torch.ones(weight_shape), bias)


# ---------------------------------------------------------------------------------------------------
# linear_gelu


@pytest.mark.parametrize("x_shape, n", [((1, 1, 1), 1), ((3, 7, 65), 33), ((2, 17), 130)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_gelu_matches_erf_gelu(x_shape, n, with_bias):
    x, weight = rand(*x_shape, seed=1) * 2, rand(n, x_shape[-1], seed=2)
    bias = rand(n, seed=3) if with_bias else None
    out = kernels.linear_gelu(x, weight, bias)
    assert out.shape == (*x_shape[:-1], n)
    torch.testing.assert_close(out, explicit_linear_gelu(x, weight, bias))


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
def test_linear_gelu_rejects_bad_shapes(weight_shape, bias_shape, message):
    bias = None if bias_shape is None else torch.zeros(bias_shape)
    with pytest.raises(ValueError, match=message):
        kernels.linear_gelu(torch.zeros(3, 8), torch.zeros(weight_shape), bias)


# ---------------------------------------------------------------------------------------------------
# causal_attention


@pytest.mark.parametrize("tq, tk", [(1, 1), (7, 7), (65, 65), (1, 7), (3, 7), (1, 65), (20, 65)])
@pytest.mark.parametrize("window", [None, 1, 3, 64])
def test_causal_attention_matches_masked_softmax(tq, tk, window):
    q, k, v = rand(2, 3, tq, 5, seed=1), rand(2, 3, tk, 5, seed=2), rand(2, 3, tk, 5, seed=3)
    out = kernels.causal_attention(q, k, v, window=window)
    assert out.shape == (2, 3, tq, 5)
    torch.testing.assert_close(out, explicit_attention(q, k, v, window))


def test_causal_attention_decode_step_is_the_last_row_of_the_full_attention():
    """What KV-cached decoding relies on: one query over all keys is the full result's last row."""
    q, k, v = rand(1, 2, 9, 4, seed=1), rand(1, 2, 9, 4, seed=2), rand(1, 2, 9, 4, seed=3)
    for window in (None, 4):
        full = kernels.causal_attention(q, k, v, window=window)
        torch.testing.assert_close(kernels.causal_attention(q[:, :, -1:], k, v, window=window), full[:, :, -1:])
        torch.testing.assert_close(kernels.causal_attention(q[:, :, -3:], k, v, window=window), full[:, :, -3:])


@pytest.mark.parametrize("tq, tk", [(7, 7), (2, 7), (65, 65)])
def test_causal_attention_window_at_least_t_is_full_causal(tq, tk):
    q, k, v = rand(1, 2, tq, 4, seed=1), rand(1, 2, tk, 4, seed=2), rand(1, 2, tk, 4, seed=3)
    full = kernels.causal_attention(q, k, v, window=None)
    for window in (tk, tk + 1, 10 * tk):
        torch.testing.assert_close(kernels.causal_attention(q, k, v, window=window), full)
    # and a window just short of it does change something, so the comparison above can fail
    assert not torch.allclose(kernels.causal_attention(q, k, v, window=tk - 1), full)


@pytest.mark.parametrize("tq, tk, window", [(4, 4, None), (4, 4, 2), (2, 5, None), (2, 5, 2), (1, 3, 1)])
def test_causal_attention_gradients(tq, tk, window):
    q = rand(1, 2, tq, 3, seed=1).requires_grad_()
    k = rand(1, 2, tk, 3, seed=2).requires_grad_()
    v = rand(1, 2, tk, 3, seed=3).requires_grad_()
    assert torch.autograd.gradcheck(lambda q, k, v: kernels.causal_attention(q, k, v, 0.0, window), (q, k, v))


def test_causal_attention_dropout_is_random_and_unbiased():
    n, t, d, p = 4000, 6, 4, 0.5
    # one (q, k, v) repeated n times along the batch: every copy draws its own dropout mask
    q, k = rand(1, 1, t, d, seed=1).expand(n, 1, t, d), rand(1, 1, t, d, seed=2).expand(n, 1, t, d)
    v = (3.0 + rand(1, 1, t, d, seed=3)).expand(n, 1, t, d)  # far from 0, so a missing 1/(1-p) shows
    exact = kernels.causal_attention(q[:1], k[:1], v[:1])
    torch.manual_seed(0)
    dropped = kernels.causal_attention(q, k, v, dropout_p=p)
    torch.manual_seed(0)
    assert torch.equal(kernels.causal_attention(q, k, v, dropout_p=p), dropped)  # seeded: reproducible
    # row 0 attends only to itself: its output is v[0] / (1 - p) or 0 in every copy
    assert ((dropped[:, 0] - exact[:, 0]).abs() > 1e-6).float().mean() > 0.9
    assert 0.4 < (dropped[:, 0, 0] == 0).all(dim=-1).float().mean() < 0.6
    # unbiased: the mean over copies is the dropout-free output; a copy's std is at most
    # |v| sqrt(p / (1 - p)) ~ 4.5, so the mean's is ~0.07 and 0.4 is > 5 sigma, while a missing
    # rescale would be off by ~1.5 (half of v)
    assert (dropped.mean(dim=0) - exact[0]).abs().max() < 0.4


@pytest.mark.parametrize("q_shape, k_shape, v_shape", [
    ((2, 4, 3), (2, 4, 3), (2, 4, 3)),  # not 4-D
    ((1, 2, 4, 3), (1, 2, 4, 3), (1, 2, 5, 3)),  # k, v differ
    ((1, 2, 5, 3), (1, 2, 4, 3), (1, 2, 4, 3)),  # Tq > Tk
    ((1, 2, 4, 3), (1, 2, 4, 5), (1, 2, 4, 5)),  # head dims differ
    ((1, 2, 4, 3), (1, 3, 4, 3), (1, 3, 4, 3)),  # head counts differ
    ((2, 2, 4, 3), (1, 2, 4, 3), (1, 2, 4, 3)),  # batch sizes differ
])
def test_causal_attention_rejects_bad_shapes(q_shape, k_shape, v_shape):
    with pytest.raises(ValueError, match=r"causal_attention: expected q \(B, H, Tq, D\).*got q "
                                         + r"\(" + ", ".join(map(str, q_shape))):
        kernels.causal_attention(torch.zeros(q_shape), torch.zeros(k_shape), torch.zeros(v_shape))


@pytest.mark.parametrize("kwargs, message", [
    ({"dropout_p": 1.0}, "dropout_p must be in"), ({"dropout_p": -0.1}, "dropout_p must be in"),
    ({"window": 0}, "window must be None or >= 1"), ({"window": -3}, "window must be None or >= 1"),
])
def test_causal_attention_rejects_bad_arguments(kwargs, message):
    q = torch.zeros(1, 1, 4, 2)
    with pytest.raises(ValueError, match=f"causal_attention: {message}"):
        kernels.causal_attention(q, q, q, **kwargs)


# ---------------------------------------------------------------------------------------------------
# the backend switch


def test_set_backend_switches_and_rejects_unknown_names():
    kernels.set_backend("reference")
    assert kernels.get_backend() == "reference"
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda': choose one of auto, triton, reference"):
        kernels.set_backend("cuda")
    assert kernels.get_backend() == "reference"


def test_backend_context_restores_the_previous_backend():
    kernels.set_backend("reference")
    with kernels.backend("triton"):
        assert kernels.get_backend() == "triton"
        with kernels.backend("auto"):
            assert kernels.get_backend() == "auto"
        assert kernels.get_backend() == "triton"
    assert kernels.get_backend() == "reference"


def test_backend_context_restores_the_previous_backend_on_exception():
    kernels.set_backend("reference")
    with pytest.raises(KeyError):
        with kernels.backend("triton"):
            raise KeyError("boom")
    assert kernels.get_backend() == "reference"
    with pytest.raises(ValueError, match="unknown kernel backend"):
        with kernels.backend("nope"):
            pass  # pragma: no cover - never entered
    assert kernels.get_backend() == "reference"


class FakeCuda:
    """Stands in for a CUDA tensor where select() only asks where it is and its shape."""
    is_cuda = True
    shape = (64, 256, 6, 48)
    device = "cuda:0"


def test_select_picks_by_backend_and_device(monkeypatch):
    cpu = torch.zeros(1)

    def reference():
        pass

    def triton():
        pass

    monkeypatch.setattr(backend_module, "_fallbacks_logged", set())
    with kernels.backend("auto"):
        assert select("op", cpu, reference, triton) is reference  # no CUDA tensor: the reference
        assert select("op", cpu, reference, triton, "op: too wide") is reference
        assert select("op", cpu, reference, None) is reference
        assert select("op", FakeCuda(), reference, triton) is triton
        assert select("op", FakeCuda(), reference, triton, "op: head_dim 48") is reference
    with kernels.backend("triton"):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert select("op", cpu, reference, triton) is triton  # the interpreter on the CPU
        with pytest.raises(ValueError, match="^op: head_dim 48$"):  # the launcher's own message
            select("op", cpu, reference, triton, "op: head_dim 48")
        with pytest.raises(NotImplementedError, match="op has no Triton kernel yet"):
            select("op", cpu, reference, None)
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(ValueError, match="op: the Triton kernels run on CUDA tensors, got a cpu tensor"):
            select("op", cpu, reference, triton)
    with kernels.backend("reference"):
        assert select("op", cpu, reference, triton) is reference


def test_a_fallback_on_cuda_is_said_once_per_op_and_reason(monkeypatch, caplog):
    monkeypatch.setattr(backend_module, "_fallbacks_logged", set())
    with kernels.backend("auto"), caplog.at_level(logging.WARNING, logger="fastgpt.kernels"):
        for _ in range(3):
            select("causal_attention", FakeCuda(), None, lambda: None,
                   "causal_attention: the Triton kernel supports head_dim in 16, 32, 64, 128, got 48")
        select("causal_attention", FakeCuda(), None, lambda: None, "causal_attention: another reason")
        select("layer_norm", FakeCuda(), None, lambda: None, "layer_norm: N <= 4096")
        select("layer_norm", torch.zeros(1), None, lambda: None, "layer_norm: N <= 4096")  # the CPU: no news
    assert [r.getMessage() for r in caplog.records] == [
        "kernels: causal_attention runs its PyTorch reference for input (64, 256, 6, 48) on cuda:0: the Triton "
        "kernel supports head_dim in 16, 32, 64, 128, got 48",
        "kernels: causal_attention runs its PyTorch reference for input (64, 256, 6, 48) on cuda:0: another reason",
        "kernels: layer_norm runs its PyTorch reference for input (64, 256, 6, 48) on cuda:0: N <= 4096"]


@pytest.mark.parametrize("name", ["auto", "reference"])
@pytest.mark.parametrize("op", OPS)
def test_cpu_tensors_run_the_reference(name, op):
    reference = {"layer_norm": layer_norm_reference, "causal_attention": causal_attention_reference,
                 "linear_gelu": linear_gelu_reference}[op]
    with kernels.backend(name):
        assert torch.equal(getattr(kernels, op)(*op_inputs(op)), reference(*op_inputs(op)))


def test_public_api():
    assert sorted(kernels.__all__) == sorted(["add_layer_norm", "backend", "causal_attention", "get_backend",
                                              "layer_norm", "linear_gelu", "set_backend"])
