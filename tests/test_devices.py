"""Where the trainer runs: device and dtype selection (CUDA, then Apple's MPS, then the CPU), and what MPS
needs (its RNG state, the optimizer, the references). Nothing here has MPS or CUDA hardware: the selection
and fallback logic is tested with the availability checks stood in for."""

from __future__ import annotations

import importlib

import pytest
import torch

from fastgpt import kernels
from fastgpt import device, distributed, model
from fastgpt.config import parse_train_args
from fastgpt.device import resolve_dtype
from fastgpt.cli import UserError
from fastgpt.model import GPTConfig, build_model


@pytest.fixture
def machine(monkeypatch):
    """machine(cuda=..., mps=...): what this machine pretends to have."""
    def set_machine(cuda: bool, mps: bool) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(distributed, "mps_available", lambda: mps)
    return set_machine


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_picks_cuda_then_mps_then_the_cpu(machine, cuda, mps, expected):
    machine(cuda=cuda, mps=mps)
    assert distributed.resolve_device("auto").type == expected
    if expected != "cuda":  # (CUDA's pick between bf16 and fp16: tests/test_train.py)
        assert resolve_dtype("auto", torch.device(expected)) == "float32"


def test_mps_asked_for_and_absent_is_one_line(machine):
    machine(cuda=False, mps=False)
    with pytest.raises(UserError, match=r"^--device=mps but MPS \(Apple's GPU backend\) is not available here: "
                                        r"it needs an Apple-silicon Mac and a torch built with MPS; use --device=cpu$"):
        distributed.resolve_device("mps")


def test_mps_is_a_device_flag_and_trains_in_float32_without_compile(machine):
    machine(cuda=False, mps=True)
    cfg, _ = parse_train_args(["--device=mps"], cuda_available=False)
    assert cfg.device == "mps" and cfg.compile is None  # resolved per device: eager off CUDA
    assert resolve_dtype(cfg.dtype, torch.device("mps")) == "float32"
    with pytest.raises(UserError, match="--device must be auto, cpu, mps, cuda or cuda:N, got 'metal'"):
        parse_train_args(["--device=metal"], cuda_available=False)


def test_fused_adamw_only_where_torch_has_it(monkeypatch):
    m = build_model(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=16))
    assert m.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu").defaults["fused"]
    for version, fused in (((2, 4), False), ((2, 5), True), ((3, 0), True)):
        monkeypatch.setattr(model, "torch_version", lambda: version)
        assert bool(m.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "mps").defaults["fused"]) == fused


def test_the_device_generators_rng_state_is_saved_and_restored(monkeypatch):
    """Dropout draws from the device's own generator: a checkpoint holds its state on CUDA and on MPS."""
    assert device.device_rng_state(torch.device("cpu")) is None
    state, restored = torch.arange(4, dtype=torch.uint8), []
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: state)
    monkeypatch.setattr(torch.mps, "set_rng_state", restored.append)
    assert device.device_rng_state(torch.device("mps")) is state
    device.set_device_rng_state(torch.device("mps"), state)
    device.set_device_rng_state(torch.device("mps"), None)  # a checkpoint without one (CPU-written) sets nothing
    assert restored == [state]


class FakeMps:
    is_cuda = False
    shape = (1, 2, 3)
    device = torch.device("mps")


def test_on_mps_every_op_runs_its_reference(monkeypatch):
    select = importlib.import_module("fastgpt.kernels.dispatch").select
    with kernels.backend("auto"):
        assert select("layer_norm", FakeMps(), "reference", "triton") == "reference"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with kernels.backend("triton"), pytest.raises(ValueError, match="run on CUDA tensors, got a mps tensor"):
        select("layer_norm", FakeMps(), "reference", "triton")


def test_torchrun_on_mps_is_refused(monkeypatch):
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "localhost"),
                        ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match="torchrun with --device=mps"):
        distributed.init("mps")
