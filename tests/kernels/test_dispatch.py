"""The backend switch (kernels/dispatch.py): auto, triton and reference, the context that restores the
previous choice, the fallback said once on CUDA, and the public API's names. Each op's own tests, its
public entry point against explicit fp64 maths among them, are in test_<op>.py."""

from __future__ import annotations

import logging

import pytest
import torch

from fastgpt import kernels
from fastgpt.kernels import dispatch as backend_module
from fastgpt.kernels.attention import causal_attention_reference
from fastgpt.kernels.dispatch import select
from fastgpt.kernels.layer_norm import layer_norm_reference
from fastgpt.kernels.linear_gelu import linear_gelu_reference

OPS = ["layer_norm", "causal_attention", "linear_gelu"]


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
                                              "layer_norm", "linear_cross_entropy", "linear_gelu", "set_backend"])
