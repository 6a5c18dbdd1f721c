"""The codebase's shape: functions short enough to read (none over 80 lines in fastgpt/, bench/, kernels/),
and the trainer's order of work."""

from __future__ import annotations

import ast

import pytest
import torch

from conftest import ROOT
from fastgpt import distributed, train, warmup
from fastgpt.config import parse_train_args
from fastgpt.start import resolve

LIMIT = 80


@pytest.mark.parametrize("package", ["fastgpt", "bench", "kernels"])
def test_no_function_is_over_80_lines(package):
    long = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > LIMIT:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_the_fallback_probe_leaves_the_run_as_it_was(small_corpus, tmp_path):
    """On CUDA the trainer runs one eager forward before compiling, so that an op `auto` sends to its
    reference can say so; that forward changes nothing a resumed run would notice."""
    cfg, given = parse_train_args([f"--data_file={small_corpus}", f"--data_dir={tmp_path}", f"--out_dir={tmp_path}",
                                   "--device=cpu", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16",
                                   "--batch_size=4", "--dropout=0.1"], False)
    run = train.setup(resolve(cfg, given), distributed.init(cfg.device))
    try:
        rng, batches = torch.get_rng_state(), run.train_batches.generator.get_state()
        weights = {k: v.clone() for k, v in run.raw_model.state_dict().items()}
        warmup.say_fallbacks(run)
        assert torch.equal(torch.get_rng_state(), rng) and torch.equal(run.train_batches.generator.get_state(), batches)
        assert run.raw_model.training and all(p.grad is None for p in run.raw_model.parameters())
        assert all(torch.equal(v, weights[k]) for k, v in run.raw_model.state_dict().items())
    finally:
        run.metrics.close()
