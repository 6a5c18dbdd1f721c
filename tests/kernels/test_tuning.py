"""kernels/tuning.py: the tile tuner that linear_gelu uses on a GPU, with a stand-in timer (on the CPU
there is nothing to time): it picks the fastest, times a problem once per machine (the choice survives
the process), never times inside a CUDA-graph capture, and skips candidates that do not fit."""

from __future__ import annotations

import importlib
import json
import multiprocessing

import pytest
import triton

from fastgpt.kernels import tuning
from fastgpt.kernels.tuning import Tuner

CONFIGS = ("a", "b", "c")
COST = {"a": 3.0, "b": 1.0, "c": 2.0}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTGPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tuning, "capturing", lambda: False)
    return tmp_path / "cache"


def timer(launched: list):
    def time_ms(call):
        call()
        return COST[launched[-1]]
    return time_ms


def test_picks_the_fastest_and_times_each_problem_once():
    launched = []
    tuner = Tuner("k", "source", time_ms=timer(launched))
    assert tuner.pick(("M", 64), CONFIGS, launched.append) == "b"
    assert launched == ["a", "b", "c"] and tuner.timed == 3
    assert tuner.pick(("M", 64), CONFIGS, launched.append) == "b"
    assert tuner.timed == 3  # remembered
    tuner.pick(("M", 128), CONFIGS, launched.append)
    assert tuner.timed == 6  # another problem is tuned anew


def test_a_later_process_starts_tuned(_cache):
    launched = []
    Tuner("k", "source", time_ms=timer(launched)).pick(("M", 64), CONFIGS, launched.append)
    (path,) = _cache.glob("tuning-k-*.json")
    assert json.loads(path.read_text()) == {repr(("M", 64)): 1}
    fresh = Tuner("k", "source", time_ms=timer([]))
    assert fresh.pick(("M", 64), CONFIGS, pytest.fail) == "b" and fresh.timed == 0
    # a changed kernel, or other candidates, are tuned afresh
    changed = Tuner("k", "source v2", time_ms=timer(launched))
    changed.pick(("M", 64), CONFIGS, launched.append)
    assert changed.timed == 3
    other = Tuner("k", "source", time_ms=timer(launched))
    other.pick(("M", 64), CONFIGS[:2], launched.append)
    assert other.timed == 2


def test_an_untuned_problem_inside_a_cuda_graph_capture_takes_the_fallback_untimed(monkeypatch, _cache):
    monkeypatch.setattr(tuning, "capturing", lambda: True)
    tuner = Tuner("k", "source", time_ms=lambda call: pytest.fail("timed during a capture"))
    assert tuner.pick(("M", 64), CONFIGS, pytest.fail) == "a"
    assert tuner.pick(("M", 64), CONFIGS, pytest.fail, fallback=2) == "c"
    assert not list(_cache.glob("*.json"))  # nothing recorded: the next call outside a capture tunes it
    monkeypatch.setattr(tuning, "capturing", lambda: False)
    launched = []
    tuner.time_ms = timer(launched)
    assert tuner.pick(("M", 64), CONFIGS, launched.append) == "b"
    # and a tuned problem keeps its choice inside a capture
    monkeypatch.setattr(tuning, "capturing", lambda: True)
    assert tuner.pick(("M", 64), CONFIGS, pytest.fail) == "b"


def test_a_candidate_that_does_not_fit_is_never_chosen():
    def time_ms(call):
        call()
        return 1.0

    def launch(config):
        if config == "a":
            raise triton.runtime.errors.OutOfResources(300000, 232448, "shared memory")

    assert Tuner("k", "source", time_ms=time_ms).pick(("M", 1), CONFIGS, launch) == "b"


def test_a_corrupt_or_unwritable_cache_costs_only_a_retune(_cache):
    _cache.mkdir()
    tuner = Tuner("k", "source", time_ms=timer([]))
    path = tuner._path(CONFIGS)
    path.write_text("{not json")
    launched = []
    tuner.time_ms = timer(launched)
    assert tuner.pick(("M", 64), CONFIGS, launched.append) == "b"
    assert json.loads(path.read_text()) == {repr(("M", 64)): 1}
    path.write_text(json.dumps({repr(("M", 64)): 99}))  # an index out of range is ignored
    again = Tuner("k", "source", time_ms=timer(launched))
    assert again.pick(("M", 64), CONFIGS, launched.append) == "b" and again.timed == 3


def _tune_in_a_process(cache: str, m: int) -> None:
    import os
    os.environ["FASTGPT_CACHE_DIR"] = cache
    tuning.capturing = lambda: False
    launched: list = []
    for i in range(20):
        Tuner("k", "source", time_ms=timer(launched)).pick(("M", m, i), CONFIGS, launched.append)


def test_processes_tuning_at_once_keep_each_others_choices(_cache):
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_tune_in_a_process, args=(str(_cache), m)) for m in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    (path,) = _cache.glob("tuning-k-*.json")
    choices = json.loads(path.read_text())
    # every write merged what was there: each process' last choice is there, and the file is whole
    assert repr(("M", 1, 19)) in choices and repr(("M", 2, 19)) in choices
    assert set(choices.values()) == {1}


def test_linear_gelu_tunes_on_a_power_of_two_of_m(monkeypatch):
    """The launcher's key: one tuning for every M in (2**k / 2, 2**k], per N, K, dtype, bias and precision."""
    mlp = importlib.import_module("fastgpt.kernels.linear_gelu")
    keys = []
    monkeypatch.setattr(mlp._TUNER, "pick", lambda key, configs, launch: keys.append((key, configs)) or configs[0])
    import torch
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(mlp, "arch_of", lambda x: 90)
    monkeypatch.setattr(mlp, "_linear_gelu_fwd_kernel", type("K", (), {"__getitem__": lambda s, g: lambda *a, **k: None})())
    for m in (33, 64, 65):
        mlp._forward(torch.zeros(m, 32), torch.zeros(128, 32), None)
    mlp._forward(torch.zeros(8, 32, dtype=torch.float16), torch.zeros(128, 32, dtype=torch.float16),
                 torch.zeros(128, dtype=torch.float16))
    assert [k for k, _ in keys] == [(64, 128, 32, "torch.float32", False, "ieee")] * 2 + [
        (128, 128, 32, "torch.float32", False, "ieee"), (8, 128, 32, "torch.float16", True, "tf32")]
    assert keys[0][1] == mlp._CONFIGS_FP32 and keys[-1][1] == mlp._CONFIGS_16BIT  # every candidate fits sm_90


def test_a_tuned_pick_does_no_hashing(monkeypatch):
    """pick runs on every launch: the cache file's name is worked out once per candidate list."""
    launched = []
    tuner = Tuner("k", "source", time_ms=timer(launched))
    tuner.pick(("M", 64), CONFIGS, launched.append)
    monkeypatch.setattr(tuning.hashlib, "sha256", lambda *a: pytest.fail("hashed on a tuned launch"))
    assert tuner.pick(("M", 64), CONFIGS, launched.append) == "b"
