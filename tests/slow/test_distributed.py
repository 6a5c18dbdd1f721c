"""Data-parallel training under torchrun on the CPU (gloo): 2 processes against 1, resume, failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fastgpt import train

from conftest import ROOT, tiny_flags


FLAGS = tiny_flags(eval_iters=4, gradient_accumulation_steps=2, eval_interval=10, warmup_iters=0,
                   learning_rate=3e-3, lr_decay_iters=20, dropout=0.1)
ITERS = 20
# 2 processes draw other batches than 1 (each rank seeds its own stream), so the curves agree only
# statistically: measured here, the mean |difference| of the step losses is 0.033, of the final val 0.016
LOSS_TOLERANCE = 0.08


def torchrun(*args: str, nproc: int = 2, timeout: float = 180) -> subprocess.CompletedProcess:
    """Launch `args` (a script or `-m module` and its flags) with torchrun on a free local port."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={nproc}", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def records(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def step_losses(out_dir):
    return {r["iter"]: r["loss"] for r in records(out_dir) if "loss" in r}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    lines = [f"{a} {b} {c}.\n" for a in ("ROMEO", "JULIET", "NURSE") for b in ("loves", "fears", "greets")
             for c in ("the night", "the day", "a rose", "the moon")]
    (root / "corpus.txt").write_text("".join(lines) * 20)
    return root


@pytest.fixture(scope="module")
def runs(corpus):
    """The same job as 1 process and as 2 (the same global batch), and 2 processes stopped halfway."""
    data = [f"--data_file={corpus / 'corpus.txt'}", f"--data_dir={corpus}"]
    assert train.main([*data, *FLAGS, f"--out_dir={corpus / 'one'}", f"--max_iters={ITERS}"]) == 0
    two = torchrun("-m", "fastgpt.train", *data, *FLAGS, f"--out_dir={corpus / 'two'}", f"--max_iters={ITERS}")
    assert two.returncode == 0, two.stderr
    half = torchrun("-m", "fastgpt.train", *data, *FLAGS, f"--out_dir={corpus / 'half'}",
                    f"--max_iters={ITERS // 2}")
    assert half.returncode == 0, half.stderr
    return {"one": corpus / "one", "two": corpus / "two", "half": corpus / "half", "stdout": two.stdout}


def test_two_processes_reach_the_losses_of_one(runs):
    one, two = step_losses(runs["one"]), step_losses(runs["two"])
    assert one.keys() == two.keys() == set(range(1, ITERS + 1))
    mean_gap = sum(abs(one[i] - two[i]) for i in one) / len(one)
    assert mean_gap < LOSS_TOLERANCE
    assert one != two  # each rank really drew its own batches
    val = {name: [r["val_loss"] for r in records(runs[name]) if "val_loss" in r] for name in ("one", "two")}
    assert abs(val["one"][-1] - val["two"][-1]) < LOSS_TOLERANCE
    assert val["two"][-1] < val["two"][0] - 0.5


def test_only_rank_zero_logs_and_writes(runs):
    iters = [r["iter"] for r in records(runs["two"]) if "loss" in r]
    assert iters == sorted(set(iters))  # one record per step, not one per process
    assert runs["stdout"].count(f"iter {ITERS}: train loss") == 1
    assert "x 2 processes" in runs["stdout"]


def test_resume_with_the_same_world_size_is_exact(runs):
    half = runs["half"]
    done = torchrun("-m", "fastgpt.train", f"--out_dir={half}", "--resume", f"--max_iters={ITERS}")
    assert done.returncode == 0, done.stderr
    assert step_losses(half) == step_losses(runs["two"])


def test_resume_with_another_world_size_is_a_one_line_error(runs, cli):
    result = cli("fastgpt.train", f"--out_dir={runs['two']}", "--resume", f"--max_iters={ITERS + 5}")
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "written by 2 process(es)" in line and "--nproc-per-node=2" in line


def test_without_accumulation_steps_each_process_takes_one_micro_batch(corpus):
    """`torchrun --nproc-per-node=2 -m fastgpt.train` with no --gradient_accumulation_steps just works: two
    micro-batches a step, one per process (the global batch is 2 x batch_size), and the start says so."""
    flags = [f for f in FLAGS if not f.startswith("--gradient_accumulation_steps")]
    result = torchrun("-m", "fastgpt.train", f"--data_file={corpus / 'corpus.txt'}", f"--data_dir={corpus}",
                      *flags, f"--out_dir={corpus / 'default'}", "--max_iters=4")
    assert result.returncode == 0, result.stderr
    assert "device cpu x 2 processes" in result.stdout and "2 micro-batches of 4 (1 per process)" in result.stdout
    assert "128 tokens/iter" in result.stdout  # 2 x 4 sequences x 16 tokens
    ckpt = torch.load(corpus / "default" / "ckpt.pt", weights_only=True)
    assert ckpt["train_config"]["gradient_accumulation_steps"] == 2  # and a resume keeps it


def test_accumulation_steps_must_divide_among_the_processes(corpus):
    result = torchrun("-m", "fastgpt.train", f"--data_file={corpus / 'corpus.txt'}", f"--data_dir={corpus}",
                      *FLAGS, "--gradient_accumulation_steps=3", f"--out_dir={corpus / 'odd'}", "--max_iters=2")
    assert result.returncode != 0
    assert "--gradient_accumulation_steps=3 is the global number of micro-batches" in result.stderr


FAILING_RANK = """
import os
import fastgpt.data
from fastgpt import train
from fastgpt.cli import run_main

if os.environ["RANK"] == "1":  # rank 1 dies a few batches in, while rank 0 waits in a collective
    original, calls = fastgpt.data.Batches.next, [0]

    def next_then_fail(self, generator=None):
        calls[0] += 1
        if calls[0] > 5:
            raise RuntimeError("injected failure on rank 1")
        return original(self, generator)

    fastgpt.data.Batches.next = next_then_fail
run_main(train.main, "fastgpt.train")
"""


def test_a_failing_rank_brings_the_job_down_with_its_error(corpus):
    script = corpus / "failing_rank.py"
    script.write_text(FAILING_RANK)
    result = torchrun(str(script), f"--data_file={corpus / 'corpus.txt'}", f"--data_dir={corpus}", *FLAGS,
                      f"--out_dir={corpus / 'failing'}", "--max_iters=1000", "--eval_interval=1000", timeout=120)
    assert result.returncode != 0
    assert "injected failure on rank 1" in result.stdout + result.stderr
