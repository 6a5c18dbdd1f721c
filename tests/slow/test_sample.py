"""`python -m fastgpt.sample` end to end, on one tiny model trained once for the module.

The sampling commands run once each, in subprocesses, two at a time (a start costs ~2 s of imports);
the tests then read their command's result. Bad inputs run in-process through the same `run_main` as
`python -m`, and two of them in subprocesses too, to show the process's own exit code and stderr.
"""

from __future__ import annotations

import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import run_module, tiny_flags

from fastgpt.checkpoint import load_checkpoint
from fastgpt.cli import run_main
from fastgpt.sample import main

# one thread per process: the tiny model gains nothing from more, and the runs go in parallel
ENV = {"OMP_NUM_THREADS": "1"}
CPU = "--device=cpu"  # the same float32 computation on every machine, and no torch.compile on a GPU one
SEPARATOR = "---------------"
PROMPT = "ROMEO:"
NEW = 40  # more than block_size (16): generation slides its context window
COMMON = (f"--max_new_tokens={NEW}", "--num_samples=2", "--seed=7")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, shakespeare_path) -> Path:
    """A trained out_dir (best.pt, ckpt.pt) and the files the commands below read."""
    tmp = tmp_path_factory.mktemp("sample")
    r = run_module("fastgpt.train", f"--data_file={shakespeare_path}", f"--data_dir={tmp / 'data'}",
                   *tiny_flags(n_layer=1, max_iters=20, eval_interval=10, log_interval=None), f"--out_dir={tmp / 'out'}",
                   env=ENV)
    assert r.returncode == 0, r.stderr
    best = tmp / "out" / "best.pt"
    (tmp / "prompt.txt").write_text(PROMPT, encoding="utf-8")
    raw = best.read_bytes()
    (tmp / "half.pt").write_bytes(raw[:len(raw) // 2])
    shutil.copy(shakespeare_path, tmp / "text.pt")
    torch.save({"model": {}, "vocab": "abc"}, tmp / "plain.pt")
    return tmp


def bad_input(tmp: Path) -> dict[str, tuple[str, ...]]:
    out = f"--out_dir={tmp / 'out'}"
    return {
        "unknown chars": (out, "--prompt=ROMEO@ é#"),
        "temperature 0": (out, "--temperature=0"),
        "temperature negative": (out, "--temperature=-0.5"),
        "top_k negative": (out, "--top_k=-1"),
        "top_k above vocab": (out, "--top_k=66"),
        "prompt and prompt_file": (out, "--prompt=A", f"--prompt_file={tmp / 'prompt.txt'}"),
        "missing prompt_file": (out, f"--prompt_file={tmp / 'nope.txt'}"),
        "empty prompt": (out, "--prompt="),
        "missing checkpoint": (f"--out_dir={tmp / 'nothing'}",),
        "truncated checkpoint": (f"--checkpoint={tmp / 'half.pt'}",),
        "text checkpoint": (f"--checkpoint={tmp / 'text.pt'}",),
        "plain dict checkpoint": (f"--checkpoint={tmp / 'plain.pt'}",),
    }


def commands(tmp: Path) -> dict[str, tuple[str, ...]]:
    out = f"--out_dir={tmp / 'out'}"
    return {
        "prompt": (out, f"--prompt={PROMPT}", *COMMON),
        "prompt again": (out, f"--prompt={PROMPT}", *COMMON),
        "no kv cache": (out, f"--prompt={PROMPT}", *COMMON, "--no-kv_cache"),
        "prompt file": (f"--checkpoint={tmp / 'out' / 'best.pt'}", f"--prompt_file={tmp / 'prompt.txt'}", *COMMON),
        "other seed": (out, f"--prompt={PROMPT}", f"--max_new_tokens={NEW}", "--num_samples=2", "--seed=8"),
        "top_k vocab": (out, "--top_k=65", "--max_new_tokens=5", "--num_samples=1"),
        **{name: bad_input(tmp)[name] for name in ("unknown chars", "truncated checkpoint")},
    }


@pytest.fixture(scope="module")
def runs(workdir):
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        futures = {name: pool.submit(run_module, "fastgpt.sample", CPU, *args, env=ENV)
                   for name, args in commands(workdir).items()}
    return {name: future.result() for name, future in futures.items()}


def samples(run) -> list[str]:
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    assert run.stdout.endswith("\n")
    return run.stdout[:-1].split(f"\n{SEPARATOR}\n")


# ---------------------------------------------------------------------------------------------------
# sampling


def test_samples_continue_the_prompt(runs):
    out = samples(runs["prompt"])
    assert len(out) == 2
    for sample in out:
        assert sample.startswith(PROMPT)
        assert len(sample) == len(PROMPT) + NEW
    assert out[0] != out[1]  # independent samples


def test_same_seed_same_output(runs):
    assert samples(runs["prompt again"]) == samples(runs["prompt"])
    assert samples(runs["other seed"]) != samples(runs["prompt"])


def test_kv_cache_does_not_change_the_output(runs):
    assert samples(runs["no kv cache"]) == samples(runs["prompt"])


def test_prompt_file_and_checkpoint_flag(runs):
    assert samples(runs["prompt file"]) == samples(runs["prompt"])


def test_top_k_may_be_the_vocabulary_size(workdir, runs):
    assert len(load_checkpoint(workdir / "out" / "best.pt")["vocab"]) == 65
    (sample,) = samples(runs["top_k vocab"])
    assert sample.startswith("\n") and len(sample) == 1 + 5  # the default prompt is a newline


# ---------------------------------------------------------------------------------------------------
# bad inputs: exit 2, one line on stderr that says what to do, no traceback


BAD_INPUT_MESSAGES = {
    "unknown chars": "the prompt has characters the model's vocabulary lacks: '#' '@' 'é'; remove or replace",
    "temperature 0": "--temperature must be a finite number > 0, got 0.0",
    "temperature negative": "--temperature must be a finite number > 0, got -0.5",
    "top_k negative": "--top_k must be between 1 and the vocabulary size 65 (or 0 for no top-k), got -1",
    "top_k above vocab": "--top_k must be between 1 and the vocabulary size 65 (or 0 for no top-k), got 66",
    "prompt and prompt_file": "pass either --prompt or --prompt_file, not both",
    "missing prompt_file": "nope.txt does not exist: pass an existing UTF-8 text file with --prompt_file",
    "empty prompt": "the prompt is empty",
    "missing checkpoint": "no checkpoint at",
    "truncated checkpoint": "half.pt is not a readable fastgpt checkpoint (truncated, damaged or another kind of file)",
    "text checkpoint": "text.pt is not a readable fastgpt checkpoint (truncated, damaged or another kind of file)",
    "plain dict checkpoint": "plain.pt is not a fastgpt checkpoint: use one written by python -m fastgpt.train",
}


def assert_one_line_error(code, stdout: str, stderr: str, message: str) -> None:
    assert code == 2, (stdout, stderr)
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("fastgpt.sample: error: ")
    assert message in lines[0]
    assert stdout == ""


@pytest.mark.parametrize("name", list(BAD_INPUT_MESSAGES))
def test_bad_input_is_one_line_and_exit_2(workdir, monkeypatch, capsys, name):
    monkeypatch.setattr(sys, "argv", ["fastgpt.sample", CPU, *bad_input(workdir)[name]])
    with pytest.raises(SystemExit) as exit_:
        run_main(main, "fastgpt.sample")
    captured = capsys.readouterr()
    assert_one_line_error(exit_.value.code, captured.out, captured.err, BAD_INPUT_MESSAGES[name])


@pytest.mark.parametrize("name", ["unknown chars", "truncated checkpoint"])
def test_bad_input_in_a_subprocess(runs, name):
    r = runs[name]
    assert_one_line_error(r.returncode, r.stdout, r.stderr, BAD_INPUT_MESSAGES[name])
