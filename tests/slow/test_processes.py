"""Processes: killed at any moment, stopped by a signal, out of disk, racing for an out_dir or a cache
entry; each a subprocess (or several) of the trainer or of the corpus reader."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from fastgpt.checkpoint import load_checkpoint

from conftest import ROOT, tiny_flags

TINY = tiny_flags(warmup_iters=5, lr_decay_iters=60)
SMALL = tiny_flags(n_layer=1, n_embd=16, block_size=8, log_interval=5)


def read_metrics(out_dir):
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = {r["iter"]: r["loss"] for r in records if "loss" in r}
    evals = {r["iter"]: r["val_loss"] for r in records if "val_loss" in r}
    return steps, evals


KILL_RUN = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails with EFBIG, as on a full disk
if len(sys.argv) > 1 and sys.argv[1].startswith("--fsize="):
    limit = int(sys.argv.pop(1).partition("=")[2])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from fastgpt import train
from fastgpt.cli import run_main
run_main(train.main, "fastgpt.train")
"""


def train_process(small_corpus, tmp_path, out, *extra):
    return [sys.executable, "-c", KILL_RUN, *extra, f"--data_file={small_corpus}", f"--data_dir={tmp_path}",
            f"--out_dir={out}", *SMALL, "--eval_interval=3", "--log_interval=1"]


def test_a_run_killed_at_any_moment_resumes_or_starts_again(small_corpus, tmp_path):
    """SIGKILL at several moments (during start-up, training, a checkpoint write): what is left in out_dir
    is always either nothing a resume needs or a checkpoint that resumes and finishes."""
    for i, delay in enumerate((0.5, 1.5, 2.5, 3.5, 5.0)):
        out = tmp_path / f"run{i}"
        proc = subprocess.Popen(train_process(small_corpus, tmp_path, out, "--max_iters=100000"), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        if (out / "ckpt.pt").exists():
            ckpt = load_checkpoint(out / "ckpt.pt")
            result = subprocess.run(train_process(small_corpus, tmp_path, out, f"--max_iters={ckpt['iter_num'] + 3}",
                                                  "--resume"), cwd=ROOT, capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, result.stderr[-2000:]
            assert load_checkpoint(out / "ckpt.pt")["iter_num"] == ckpt["iter_num"] + 3
            assert not list(out.glob(".*.tmp"))  # what a kill left half written is cleared by the next run
        else:
            result = subprocess.run(train_process(small_corpus, tmp_path, out, "--max_iters=3", "--overwrite"),
                                    cwd=ROOT, capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, result.stderr[-2000:]


def test_a_full_disk_stops_the_run_in_one_line_and_keeps_the_last_checkpoint(small_corpus, tmp_path):
    out = tmp_path / "out"
    first = subprocess.run(train_process(small_corpus, tmp_path, out, "--max_iters=3"), cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    before = (out / "ckpt.pt").read_bytes()
    limit = len(before) // 2  # the next checkpoint cannot be written whole
    result = subprocess.run(train_process(small_corpus, tmp_path, out, f"--fsize={limit}", "--max_iters=6",
                                          "--resume"), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "could not write" in line and "the previous checkpoint is intact" in line
    assert (out / "ckpt.pt").read_bytes() == before and not list(out.glob(".ckpt.pt.*"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_at_a_step_boundary_and_resume_finishes(small_corpus, tmp_path, sig, cli):
    out = tmp_path / "out"
    args = [f"--data_file={small_corpus}", f"--data_dir={tmp_path}", f"--out_dir={out}", *TINY,
            "--eval_interval=100000", "--max_iters=100000"]
    proc = subprocess.Popen([sys.executable, "-m", "fastgpt.train", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not metrics.exists() or metrics.read_text().count("\n") < 3):
        time.sleep(0.1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    ckpt = load_checkpoint(out / "ckpt.pt")
    stopped_at = ckpt["iter_num"]
    assert stopped_at >= 3
    assert max(read_metrics(out)[0]) == stopped_at  # every logged step is in the checkpoint
    summary = json.loads(metrics.read_text().splitlines()[-1])  # the run says how it ended
    assert summary["summary"] and summary["stopped_by"] == sig.name and summary["iter"] == stopped_at
    done = cli("fastgpt.train", f"--out_dir={out}", "--resume", f"--max_iters={stopped_at + 3}")
    assert done.returncode == 0, done.stderr
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] == stopped_at + 3


def test_one_run_owns_its_out_dir(small_corpus, tmp_path, cli):
    """A second trainer on the out_dir of a running one (here even with --overwrite) ends at once with a
    one-line error naming the first process, exit 2, and touches nothing; once the first is killed (no
    chance to clean up), the out_dir is free again."""
    out = tmp_path / "out"
    args = [f"--data_file={small_corpus}", f"--data_dir={tmp_path}", f"--out_dir={out}", *TINY,
            "--eval_interval=100000", "--max_iters=100000"]
    first = subprocess.Popen([sys.executable, "-m", "fastgpt.train", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not metrics.exists() or metrics.read_text().count("\n") < 3):
            time.sleep(0.1)
        files = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "metrics.jsonl"}
        head = metrics.read_text().splitlines()[:3]
        second = cli("fastgpt.train", *args, "--overwrite", "--seed=7")
        assert second.returncode == 2
        (line,) = second.stderr.strip().splitlines()
        assert line.startswith(f"fastgpt.train: error: --out_dir={out} is in use by fastgpt.train process "
                               f"{first.pid} on ") and "another --out_dir" in line
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "metrics.jsonl"} == files
        assert metrics.read_text().splitlines()[:3] == head and first.poll() is None
    finally:
        first.kill()
        first.wait()
    done = cli("fastgpt.train", f"--out_dir={out}", "--resume", "--max_iters=3")
    assert done.returncode == 0, done.stderr


def test_processes_racing_to_build_one_cache_agree(bpe_text, tmp_path):
    script = textwrap.dedent(f"""
        import hashlib, numpy as np
        from fastgpt.data import load_corpus
        c = load_corpus({str(bpe_text)!r}, {str(tmp_path / 'data')!r}, tokenizer="bpe", vocab_size=400)
        print(hashlib.sha256(np.asarray(c.train).tobytes() + np.asarray(c.val).tobytes()).hexdigest(),
              hashlib.sha256(c.tokenizer.serialized.encode()).hexdigest())
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    assert len({out for out, _ in outs}) == 1
    cache = tmp_path / "data" / "cache"
    assert len(list(cache.glob("*.bin"))) == 1 and not list(cache.glob(".*.tmp"))
