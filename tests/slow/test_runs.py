"""Longer runs: the lecture's six models drawn together, and a BPE run resumed bit for bit."""

from __future__ import annotations

import json

import torch

from fastgpt import compare, plot, train
from fastgpt.checkpoint import load_checkpoint

from conftest import tiny_flags

TINY = tiny_flags(warmup_iters=5, lr_decay_iters=60, eval_interval=10)
BPE = ["--tokenizer=bpe", "--vocab_size=320"]


def lines_with_data(ax) -> list:
    return [line for line in ax.get_lines() if len(line.get_xdata())]


def losses(out_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iter"]: r["loss"] for r in records if "loss" in r}


def test_compare_draws_the_six_models(tmp_path, small_corpus):
    out = tmp_path / "cmp"
    assert compare.main([f"--data_file={small_corpus}", f"--data_dir={tmp_path}", f"--out_dir={out}",
                         *tiny_flags(eval_interval=2, max_iters=2, log_interval=1)]) == 0
    rows = json.loads((out / "compare.json").read_text())["rows"]
    fig = plot.compare_figure(rows, [plot.read_run(out / r["model"]) for r in rows])
    curves, bars = fig.axes
    assert [t.get_text() for t in curves.get_legend().get_texts()] == [r["model"] for r in rows]
    assert len(rows) == 6 and len(lines_with_data(curves)) == 6
    assert [p.get_height() for p in bars.patches] == [r["val_loss"] for r in rows]
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_a_resumed_bpe_run_is_bit_exact(small_corpus_module, tmp_path):
    common = [f"--data_file={small_corpus_module}", f"--data_dir={tmp_path}", *TINY, *BPE, "--dropout=0.1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train.main([*common, f"--out_dir={straight}", "--max_iters=16"]) == 0
    assert train.main([*common, f"--out_dir={split}", "--max_iters=8"]) == 0
    assert train.main([f"--out_dir={split}", "--resume", "--max_iters=16", f"--data_dir={tmp_path}"]) == 0
    assert losses(straight) == losses(split) and len(losses(straight)) == 16
    a, b = load_checkpoint(straight / "ckpt.pt"), load_checkpoint(split / "ckpt.pt")
    assert a["tokenizer"] == b["tokenizer"]
    assert all(torch.equal(t, b["model"][name]) for name, t in a["model"].items())
