"""The trainer: a short run learns, resume is bit-exact, signals save, divergence never overwrites."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest
import torch

from fastgpt import train
from fastgpt.checkpoint import load_checkpoint, model_from_checkpoint
from fastgpt.cli import CommandFailed, UserError
from fastgpt.config import PRESETS
from fastgpt.device import peak_flops, resolve_dtype

from conftest import ROOT, tiny_flags

TINY = tiny_flags(warmup_iters=5, lr_decay_iters=60)


def read_metrics(out_dir):
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = {r["iter"]: r["loss"] for r in records if "loss" in r}
    evals = {r["iter"]: r["val_loss"] for r in records if "val_loss" in r}
    return steps, evals


def test_short_run_learns_and_writes_outputs(small_corpus, tmp_path, capsys):
    out = tmp_path / "out"
    code = train.main([f"--data_file={small_corpus}", f"--out_dir={out}", f"--data_dir={tmp_path}",
                       *TINY, "--max_iters=60", "--eval_interval=30", "--log_interval=10",
                       "--learning_rate=3e-3", "--sample_chars=40"])
    assert code == 0
    steps, evals = read_metrics(out)
    assert sorted(evals) == [0, 30, 60]
    assert evals[60] < evals[0] - 1.0  # from ~log(vocab) to well below
    assert sorted(steps) == [10, 20, 30, 40, 50, 60]
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[1])
    assert set(record) >= {"iter", "loss", "lr", "grad_norm", "ms_per_iter", "tokens_per_sec"}
    assert record["tokens_per_sec"] > 0 and record["mfu"] is None  # MFU only on a GPU
    ckpt = load_checkpoint(out / "ckpt.pt")
    best = load_checkpoint(out / "best.pt")
    assert ckpt["iter_num"] == 60 and best["best_val_loss"] == min(evals.values())
    assert not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    assert "optimizer" in ckpt and "optimizer" not in best
    text = capsys.readouterr().out
    assert "best val loss" in text and "sample:" in text and "tokens/s" in text


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_resume_is_bit_exact(small_corpus, tmp_path, dtype):
    """2N steps in one run == N steps, resume, N steps (CPU, dropout on; fp16 with its loss scaler, whose
    state travels in ckpt.pt)."""
    common = [f"--data_file={small_corpus}", f"--data_dir={tmp_path}", *TINY, "--dropout=0.2",
              "--eval_interval=10", f"--dtype={dtype}"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train.main([*common, f"--out_dir={straight}", "--max_iters=24"]) == 0
    assert train.main([*common, f"--out_dir={split}", "--max_iters=12"]) == 0
    assert train.main([f"--out_dir={split}", "--resume", "--max_iters=24"]) == 0
    steps_a, evals_a = read_metrics(straight)
    steps_b, evals_b = read_metrics(split)
    assert len(steps_a) == 24
    assert steps_a == steps_b  # exact float equality
    assert evals_a == {k: v for k, v in evals_b.items() if k != 12}
    a, b = load_checkpoint(straight / "ckpt.pt"), load_checkpoint(split / "ckpt.pt")
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert a["scaler"] == b["scaler"] and (a["scaler"] is None) == (dtype == "float32")
    if dtype == "float16":
        assert a["scaler"]["_growth_tracker"] == 24  # every step counted, across the resume


def test_fp16_steps_the_scaler_skips_are_counted_not_a_divergence(small_corpus, tmp_path, monkeypatch, capsys):
    """A loss scale far too large for fp16 makes the first steps' gradients overflow: the scaler skips
    them and halves its scale, training goes on, and the summary counts the skipped steps."""
    scaler = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *a, **k: scaler(*a, init_scale=2.0**40, **k))
    out = tmp_path / "out"
    assert train.main([f"--data_file={small_corpus}", f"--data_dir={tmp_path}", f"--out_dir={out}", *TINY,
                       "--dtype=float16", "--max_iters=40", "--eval_interval=20", "--learning_rate=3e-3"]) == 0
    summary = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["dtype"] == "float16" and 1 <= summary["skipped_steps"] < 40
    steps, evals = read_metrics(out)
    assert evals[40] < evals[0] - 0.3  # the steps that were taken learned
    text = capsys.readouterr().out
    assert f"fp16 loss scaling: {summary['skipped_steps']} step(s) skipped for overflowing gradients" in text
    assert load_checkpoint(out / "ckpt.pt")["scaler"]["scale"] < 2.0**40


def test_dtype_auto_picks_per_device(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == "float32" and resolve_dtype("float16", cpu) == "float16"
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", cuda) == "float16"  # nanoGPT's rule: fp16 with a scaler
    with pytest.raises(UserError, match="--dtype=bfloat16 but Tesla T4 has no bf16: use --dtype=float16"):
        resolve_dtype("bfloat16", cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", cuda) == "bfloat16" and resolve_dtype("float32", cuda) == "float32"


def test_gradient_accumulation_matches_a_bigger_batch(small_corpus, tmp_path):
    common = [f"--data_file={small_corpus}", f"--data_dir={tmp_path}", *TINY, "--max_iters=8",
              "--eval_interval=100"]
    assert train.main([*common, f"--out_dir={tmp_path / 'a'}", "--batch_size=8"]) == 0
    assert train.main([*common, f"--out_dir={tmp_path / 'b'}", "--batch_size=4",
                       "--gradient_accumulation_steps=2"]) == 0
    big, accumulated = read_metrics(tmp_path / "a")[0], read_metrics(tmp_path / "b")[0]
    assert big.keys() == accumulated.keys()
    for it in big:
        assert big[it] == pytest.approx(accumulated[it], rel=1e-5, abs=1e-6)


def test_learning_rate_schedule():
    cfg = PRESETS["cpu"]
    assert train.get_lr(cfg, 0) == pytest.approx(cfg.learning_rate / (cfg.warmup_iters + 1))
    assert train.get_lr(cfg, cfg.warmup_iters) == pytest.approx(cfg.learning_rate)
    middle = (cfg.warmup_iters + cfg.lr_decay_iters) // 2
    assert train.get_lr(cfg, middle) == pytest.approx((cfg.learning_rate + cfg.min_lr) / 2, rel=1e-3)
    assert train.get_lr(cfg, cfg.lr_decay_iters) == pytest.approx(cfg.min_lr)
    assert train.get_lr(cfg, cfg.lr_decay_iters + 100) == cfg.min_lr
    lrs = [train.get_lr(cfg, it) for it in range(cfg.warmup_iters, cfg.lr_decay_iters)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_divergence_stops_without_overwriting_the_checkpoint(small_corpus, tmp_path, capsys):
    out = tmp_path / "out"
    common = [f"--data_file={small_corpus}", f"--data_dir={tmp_path}", f"--out_dir={out}", *TINY]
    assert train.main([*common, "--max_iters=5", "--eval_interval=5"]) == 0
    good = load_checkpoint(out / "ckpt.pt")
    with pytest.raises(CommandFailed) as stopped:  # run_main: the message on one line, exit code 1
        train.main([*common, "--resume", "--max_iters=40", "--learning_rate=1e30", "--min_lr=0",
                    "--grad_clip=0", "--warmup_iters=0"])
    assert stopped.value.code == 1 and "non-finite" in str(stopped.value) and "\n" not in str(stopped.value)
    kept = load_checkpoint(out / "ckpt.pt")
    assert kept["iter_num"] == good["iter_num"] == 5
    for name, tensor in good["model"].items():
        assert torch.equal(tensor, kept["model"][name])


def test_resume_refuses_mismatches(small_corpus, tmp_path):
    out = tmp_path / "out"
    common = [f"--data_dir={tmp_path}", f"--out_dir={out}"]
    with pytest.raises(UserError, match="no checkpoint"):
        train.main([*common, "--resume"])
    assert train.main([*common, f"--data_file={small_corpus}", *TINY, "--max_iters=2"]) == 0
    with pytest.raises(UserError, match="--n_layer=3 differs"):
        train.main([*common, "--resume", "--n_layer=3"])
    other = tmp_path / "other.txt"
    other.write_text(small_corpus.read_text()[::-1])
    with pytest.raises(UserError, match="not the corpus"):
        train.main([*common, "--resume", f"--data_file={other}"])


@pytest.mark.parametrize("case", ["missing", "empty", "latin1", "short"])
def test_bad_data_is_one_line_and_exit_2(tmp_path, case, cli):
    path = tmp_path / "data.txt"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "latin1":
        path.write_bytes("Kœnig façade".encode("latin-1", errors="replace") + b"\xe7\xe9")
    elif case == "short":
        path.write_text("x" * 200)  # val split has 20 tokens < block_size + 1
    result = cli("fastgpt.train", f"--data_file={path}", f"--data_dir={tmp_path}",
                 f"--out_dir={tmp_path / 'out'}", "--block_size=32", "--max_iters=1")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    expected = {"missing": "does not exist", "empty": "is empty", "latin1": "not UTF-8",
                "short": "--block_size"}[case]
    assert expected in lines[0]


def test_cpu_preset_defaults_on_a_machine_without_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("the no-preset default is shakespeare_char on CUDA machines")
    cfg, _ = train.parse_train_args([], torch.cuda.is_available())
    assert cfg == PRESETS["cpu"]
    assert cfg.compile is None  # resolved per device: eager on the CPU


def test_target_val_loss_stops_at_the_first_evaluation_that_reaches_it(small_corpus, tmp_path, capsys):
    common = [f"--data_file={small_corpus}", f"--data_dir={tmp_path}", *TINY, "--max_iters=40",
              "--eval_interval=10", "--learning_rate=3e-3"]
    assert train.main([*common, f"--out_dir={tmp_path / 'full'}"]) == 0
    _, evals = read_metrics(tmp_path / "full")
    target = evals[20]  # the runs are bit-identical on the CPU, so this run reaches it at iter 20
    assert evals[10] > target
    capsys.readouterr()
    assert train.main([*common, f"--out_dir={tmp_path / 'target'}", f"--target_val_loss={target}"]) == 0
    steps, evals = read_metrics(tmp_path / "target")
    assert sorted(evals) == [0, 10, 20] and max(steps) == 20
    summary = json.loads((tmp_path / "target" / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["summary"] and summary["target_iter"] == 20 and summary["compile_seconds"] == 0.0
    assert 0 < summary["train_seconds"] < summary["wall_seconds"] and summary["stopped_by"] is None
    # every evaluation records the training time before it, so the time to any val loss can be read off
    seconds = [json.loads(line)["train_seconds"] for line in
               (tmp_path / "target" / "metrics.jsonl").read_text().splitlines() if "val_loss" in line]
    assert seconds[0] < 0.5 and seconds == sorted(seconds) and seconds[-1] <= summary["train_seconds"]
    assert load_checkpoint(tmp_path / "target" / "ckpt.pt")["iter_num"] == 20
    assert f"val loss <= {target} reached at iter 20 after" in capsys.readouterr().out


def test_a_run_without_checkpoints_trains_the_same_and_writes_none(small_corpus, tmp_path, capsys):
    """--save_checkpoints=False (bench.report's time_to_target): the same losses, metrics.jsonl only."""
    common = [f"--data_file={small_corpus}", f"--data_dir={tmp_path}", *TINY, "--max_iters=20", "--eval_interval=10"]
    assert train.main([*common, f"--out_dir={tmp_path / 'kept'}"]) == 0
    assert train.main([*common, f"--out_dir={tmp_path / 'none'}", "--save_checkpoints=False"]) == 0
    assert read_metrics(tmp_path / "none") == read_metrics(tmp_path / "kept")
    assert not list((tmp_path / "none").glob("*.pt")) and {p.name for p in (tmp_path / "kept").glob("*.pt")} == {
        "ckpt.pt", "best.pt"}
    assert "no checkpoints kept (--save_checkpoints=False)" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available() or not torch.cuda.is_bf16_supported(),
                    reason="the default CUDA training path (bf16 autocast) needs a GPU with bf16")
def test_cuda_trains_compiled_on_the_kernels_in_bf16_and_reports_mfu(small_corpus, tmp_path, capsys):
    """The GPU default: bf16 autocast, torch.compile, the Triton kernels; MFU against the device's peak."""
    out = tmp_path / "out"
    flags = [f"--data_file={small_corpus}", f"--data_dir={tmp_path}", f"--out_dir={out}", "--n_layer=2",
             "--n_head=2", "--n_embd=64", "--block_size=32", "--batch_size=16", "--eval_iters=2",
             "--sample_chars=20", "--max_iters=40", "--eval_interval=20", "--log_interval=10",
             "--learning_rate=3e-3", "--warmup_iters=5", "--lr_decay_iters=40", "--dropout=0.1"]
    assert train.main(flags) == 0
    text = capsys.readouterr().out
    assert "bfloat16, compile on, kernels auto" in text and "compiled in" in text and "sample:" in text
    steps, evals = read_metrics(out)
    assert evals[40] < evals[0] - 0.5
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    peak = peak_flops(torch.device("cuda"))
    assert all((r["mfu"] is not None) == (peak is not None) for r in records if "loss" in r)
    assert records[-1]["summary"] and records[-1]["compile_seconds"] > 0


FAULTS_PER_STEP = """
import resource, sys
from contextlib import nullcontext
import numpy as np, torch
from fastgpt import train
from fastgpt.data import Batches
from fastgpt.device import keep_freed_memory
from fastgpt.model import GPTConfig, build_model
if sys.argv[1] == "keep" and not keep_freed_memory():
    sys.exit(3)
torch.manual_seed(0)
tokens = np.random.default_rng(0).integers(0, 65, 100_000, dtype=np.uint8)
batches = Batches(tokens, 64, 12, torch.device("cpu"), 0)
model = build_model(GPTConfig(vocab_size=65, block_size=64, n_layer=2, n_head=4, n_embd=128, dropout=0.0))
optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
for _ in range(5):
    train.train_step(model, optimizer, batches, 1, 1.0, nullcontext())
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    train.train_step(model, optimizer, batches, 1, 1.0, nullcontext())
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def test_cpu_training_reuses_freed_memory_instead_of_faulting_in_fresh_pages():
    """With keep_freed_memory a training step (the cpu preset's shapes, 2 layers, in a fresh process) reuses
    the previous step's memory: measured here 0.1 to 30 page faults per step. glibc's defaults fault in up to
    about 800 fresh pages per step, but how many varies from run to run (38 to 829 measured), so only the
    kept side is asserted."""
    proc = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP, "keep"], cwd=ROOT, capture_output=True,
                          text=True)
    if proc.returncode == 3:
        pytest.skip("mallopt is unavailable or refused the settings (not glibc?)")
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) < 100


@pytest.mark.parametrize("name, dtype, peak", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12), ("NVIDIA H100 NVL", "bfloat16", 835e12),
    ("NVIDIA H100 PCIe", "bfloat16", 756e12), ("NVIDIA GH200 480GB", "bfloat16", 989e12),
    ("NVIDIA H200", "bfloat16", 989e12), ("NVIDIA H200 NVL", "bfloat16", 835e12),
    ("NVIDIA L40", "bfloat16", 181e12), ("NVIDIA L40S", "bfloat16", 362e12), ("NVIDIA L4", "bfloat16", 121e12),
    ("NVIDIA A100-SXM4-40GB", "float32", 156e12), ("Some Future GPU", "bfloat16", None),
])
def test_mfu_peak_matches_the_device_name(monkeypatch, name, dtype, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda"), dtype) == peak
    assert peak_flops(torch.device("cpu"), dtype) is None


def test_a_run_on_the_fused_loss_with_a_padded_vocabulary(small_corpus, tmp_path, monkeypatch, capsys):
    """The trainer with the loss forced into chunks (as GPT-2's vocabulary would be) and the output layer
    padded (as on CUDA): its start line says so, its losses are the unfused run's to float rounding, its resume is bit-exact, and its checkpoint samples and exports without the padding."""
    lce = importlib.import_module("fastgpt.kernels.linear_cross_entropy")
    common = [f"--data_file={small_corpus}", f"--data_dir={tmp_path}", *TINY, "--eval_interval=6", "--dropout=0"]
    assert train.main([*common, f"--out_dir={tmp_path / 'plain'}", "--max_iters=12", "--pad_vocab=64"]) == 0
    assert "loss unfused, output layer padded to 64" in capsys.readouterr().out
    monkeypatch.setattr(lce, "PLAIN_MAX_BYTES", 0)
    monkeypatch.setattr(lce, "CHUNK_BYTES", 16 * 4 * 64)
    fused, split = tmp_path / "fused", tmp_path / "split"
    assert train.main([*common, f"--out_dir={fused}", "--max_iters=12", "--pad_vocab=64"]) == 0
    out = capsys.readouterr().out
    assert "loss fused (PyTorch, chunks of 16 rows), output layer padded to 64" in out
    plain_steps, plain_evals = read_metrics(tmp_path / "plain")
    fused_steps, fused_evals = read_metrics(fused)
    assert len(fused_steps) == 12 and plain_steps.keys() == fused_steps.keys()
    assert max(abs(plain_steps[i] - fused_steps[i]) for i in plain_steps) < 1e-4, (plain_steps, fused_steps)
    assert max(abs(plain_evals[i] - fused_evals[i]) for i in plain_evals) < 1e-4
    assert train.main([*common, f"--out_dir={split}", "--max_iters=6", "--pad_vocab=64"]) == 0
    assert train.main([f"--out_dir={split}", "--resume", "--max_iters=12"]) == 0
    assert read_metrics(split)[0] == fused_steps
    ckpt = load_checkpoint(fused / "ckpt.pt")
    assert ckpt["model_config"]["pad_vocab"] == 64 and ckpt["model"]["lm_head.weight"].shape[0] == 64
    model, tokenizer = model_from_checkpoint(ckpt, fused / "ckpt.pt")
    assert model(torch.zeros(1, 3, dtype=torch.long))[0].shape[-1] == tokenizer.vocab_size
    assert model.trimmed_state_dict()["lm_head.weight"].shape[0] == tokenizer.vocab_size
