"""Bad environments and easy mistakes: one line and a non-zero exit, or carrying on; nothing lost."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fastgpt import compare, sample, train
from fastgpt.checkpoint import load_checkpoint, save_checkpoint
from fastgpt.config import parse_train_args
from fastgpt.cli import UserError

from conftest import ROOT, SMALL_TRAINER as TINY, one_line_error


def test_a_new_run_does_not_replace_an_earlier_one(trained, small_corpus, tmp_path):
    before = load_checkpoint(trained / "ckpt.pt")
    args = [f"--data_file={small_corpus}", f"--data_dir={tmp_path}", f"--out_dir={trained}", *TINY, "--max_iters=2"]
    with pytest.raises(UserError, match="--resume.*--overwrite"):
        train.main(args)
    after = load_checkpoint(trained / "ckpt.pt")
    assert after["iter_num"] == before["iter_num"] == 10
    assert train.main([*args, "--overwrite"]) == 0
    assert load_checkpoint(trained / "ckpt.pt")["iter_num"] == 2


def test_a_closed_stdout_does_not_stop_training(small_corpus, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "fastgpt.train", f"--data_file={small_corpus}",
                             f"--data_dir={tmp_path}", f"--out_dir={out}", *TINY, "--max_iters=20",
                             "--eval_interval=10", "--log_interval=1", "--sample_chars=50"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # as `| head -1` does once it has its line
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] == 20


def test_sample_into_a_closed_pipe_ends_quietly(trained):
    proc = subprocess.Popen([sys.executable, "-m", "fastgpt.sample", f"--out_dir={trained}",
                             "--max_new_tokens=2000", "--num_samples=8"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.readline()
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_a_finetuning_run_resumes_with_its_preset(trained, small_corpus, tmp_path):
    ft = tmp_path / "ft"
    common = ["--preset=finetune", f"--out_dir={ft}", "--batch_size=4", "--eval_iters=2", "--sample_chars=0"]
    assert train.main([*common, f"--init_from={trained / 'ckpt.pt'}", f"--data_file={small_corpus}",
                       f"--data_dir={tmp_path}", "--max_iters=4", "--eval_interval=2"]) == 0
    assert train.main([*common, "--resume", "--max_iters=6"]) == 0
    assert load_checkpoint(ft / "ckpt.pt")["iter_num"] == 6


def test_resume_survives_a_cut_metrics_line(trained):
    with (trained / "metrics.jsonl").open("a") as f:
        f.write('{"iter": 11, "lo')  # a crash mid-write
    assert train.main([f"--out_dir={trained}", "--resume", "--max_iters=15"]) == 0
    iters = [json.loads(line)["iter"] for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert iters == sorted(iters) and iters[-1] == 15


def test_resuming_from_weights_only_says_what_to_do(trained):
    (trained / "ckpt.pt").write_bytes((trained / "best.pt").read_bytes())
    with pytest.raises(UserError, match="lacks optimizer.*--init_from"):
        train.main([f"--out_dir={trained}", "--resume"])


def test_a_checkpoint_from_a_newer_fastgpt_is_a_user_error(trained):
    ckpt = load_checkpoint(trained / "ckpt.pt")
    ckpt["train_config"]["future_flag"] = 1
    save_checkpoint(trained / "ckpt.pt", {k: v for k, v in ckpt.items() if k not in ("format", "version")})
    with pytest.raises(UserError, match="does not fit this fastgpt"):
        train.main([f"--out_dir={trained}", "--resume"])


@pytest.mark.parametrize("argv, message", [
    (["--beta1=1"], "--beta1 and --beta2 must be in"),
    (["--beta2=-0.5"], "--beta1 and --beta2 must be in"),
    (["--seed=99999999999999999999999"], "out of range"),
    (["--seed=4611686018427387904"], "--seed must be between"),
    (["--out_dir="], "--out_dir is empty"),
    (["--out_dir", "--resume"], "--out_dir needs a value"),
    (["--lr=1e-3"], "did you mean --learning_rate"),
])
def test_more_bad_flags(argv, message):
    with pytest.raises(UserError, match=message):
        parse_train_args(argv, cuda_available=False)


def test_stray_distributed_variables_are_a_one_line_error(cli, tmp_path):
    line = one_line_error(cli("fastgpt.train", f"--out_dir={tmp_path}", env={"RANK": "0"}))
    assert "launch with torchrun" in line and "WORLD_SIZE" in line


def test_environment_errors_are_one_line(cli, tmp_path):
    long_name = tmp_path / ("x" * 300)
    assert "File name too long" in one_line_error(cli("fastgpt.train", f"--init_from={long_name}",
                                                      f"--out_dir={tmp_path / 'o'}"))
    assert "cannot read" in one_line_error(cli("fastgpt.train", f"--data_file={long_name}",
                                               f"--out_dir={tmp_path / 'o'}"))
    utf16 = tmp_path / "utf16.txt"
    utf16.write_text("hello there\n" * 100, encoding="utf-16")
    assert "iconv -f UTF-16" in one_line_error(cli("fastgpt.train", f"--data_file={utf16}",
                                                   f"--out_dir={tmp_path / 'o'}"))


def test_sample_defaults_to_a_prompt_the_vocabulary_has(tmp_path, capsys):
    corpus = tmp_path / "no_newlines.txt"
    corpus.write_text("abcabcabd" * 300)
    out = tmp_path / "out"
    assert train.main([f"--data_file={corpus}", f"--data_dir={tmp_path}", f"--out_dir={out}", *TINY,
                       "--max_iters=2", "--sample_chars=5"]) == 0
    capsys.readouterr()
    assert sample.main([f"--out_dir={out}", "--max_new_tokens=5", "--num_samples=1",
                        "--temperature=1e-45"]) == 0  # a near-zero temperature is greedy, not nan
    assert capsys.readouterr().out.startswith("a")


def test_compare_takes_out_dir_in_either_form(small_corpus, tmp_path):
    out = tmp_path / "cmp"
    assert compare.main([f"--data_file={small_corpus}", f"--data_dir={tmp_path}", "--out_dir", str(out), *TINY,
                         "--max_iters=2", "--eval_interval=2"]) == 0
    assert (out / "compare.md").is_file()
    with pytest.raises(UserError, match="--init_from"):
        compare.main([f"--init_from={out / 'gpt' / 'ckpt.pt'}"])


def test_a_checkpoint_from_another_device_type_is_refused(trained):
    ckpt = load_checkpoint(trained / "ckpt.pt")
    for state in ckpt["rng"]:
        state["device"] = "cuda"
    save_checkpoint(trained / "ckpt.pt", {k: v for k, v in ckpt.items() if k not in ("format", "version")})
    with pytest.raises(UserError, match="written on cuda.*same kind of device"):
        train.main([f"--out_dir={trained}", "--resume", "--device=cpu"])
    assert torch.equal(load_checkpoint(trained / "ckpt.pt")["model"]["lm_head.weight"],
                       ckpt["model"]["lm_head.weight"])


def test_out_of_memory_is_a_user_error(small_corpus, tmp_path, monkeypatch):
    """Where the platform does not say how much memory there is (so nothing is refused up front), an
    allocation that fails is still one line."""
    from fastgpt import memory

    monkeypatch.setattr(memory, "device_bytes", lambda device: None)
    with pytest.raises(UserError, match="out of memory: lower --batch_size"):  # 8 TB of window offsets
        train.main([f"--data_file={small_corpus}", f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'o'}",
                    *TINY, "--batch_size=1000000000000", "--max_iters=1"])
