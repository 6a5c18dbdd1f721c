"""Paths only a CUDA GPU takes, each in seconds: the GPU report runs this file first in its kernel_tests
phase (bench/report/__init__.py), cheapest and most informative first. Without CUDA every test is skipped; the
CPU stand-ins of these paths are in the other test files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fastgpt import data, kernels, train
from fastgpt.checkpoint import load_checkpoint

from conftest import check_against_fp64, tiny_flags

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="these paths run on a CUDA GPU only")
CUDA = torch.device("cuda")


def cuda_flags(**changes) -> list[str]:
    return tiny_flags(**{"device": "cuda", "compile": False, "n_embd": 64, "n_head": 2, "block_size": 64,
                         "batch_size": 8, **changes})


def evals(out_dir) -> dict[int, float]:
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iter"]: r["val_loss"] for r in records if "val_loss" in r}


@pytest.mark.parametrize("n", [1536, 4096])
def test_layer_norm_wider_than_1024(n):
    torch.manual_seed(0)
    x, w, b = torch.randn(96, n, device=CUDA), torch.randn(n, device=CUDA), torch.randn(n, device=CUDA)
    inputs = tuple(t.to(torch.bfloat16).requires_grad_() for t in (x, w, b))
    with kernels.backend("triton"):
        check_against_fp64(["y", "dx", "dw", "db"], kernels.layer_norm, lambda *a: torch.nn.functional.layer_norm(
            a[0], (n,), a[1], a[2], 1e-5), inputs, (torch.randn(96, n, device=CUDA).to(torch.bfloat16),))


def test_attention_dropout_in_bf16_trains_like_the_reference():
    """The kernel's own dropout mask: not the reference's numbers, but the same expectation."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(8, 4, 128, 64, device=CUDA, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    with kernels.backend("triton"):
        out = kernels.causal_attention(q, k, v, dropout_p=0.1)
    out.float().square().mean().backward()
    assert torch.isfinite(out).all() and all(torch.isfinite(t.grad).all() for t in (q, k, v))
    with kernels.backend("reference"):
        plain = kernels.causal_attention(q.detach(), k.detach(), v.detach())
    # dropout scales the kept weights by 1/(1-p): the mean output keeps its expectation
    assert abs(out.float().mean().item() - plain.float().mean().item()) < 0.05


def test_the_tuner_inside_a_cuda_graph_capture_with_an_untuned_shape(tmp_path, monkeypatch):
    """An untuned linear_gelu shape met first inside a capture gets the fallback tile, untimed; the graph
    replays with the reference's numbers, and the next call outside a capture tunes it."""
    monkeypatch.setenv("FASTGPT_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    x, w, b = torch.randn(200, 96, device=CUDA), torch.randn(160, 96, device=CUDA), torch.randn(160, device=CUDA)
    stream = torch.cuda.Stream()
    with kernels.backend("triton"):
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            y = kernels.linear_gelu(x, w, b)
        graph.replay()
        torch.cuda.synchronize()
        expected = torch.nn.functional.gelu(x @ w.T + b)
        torch.testing.assert_close(y, expected, atol=2e-2, rtol=2e-2)  # TF32 matmul
        kernels.linear_gelu(x, w, b)
    assert list(tmp_path.glob("tuning-*.json"))


def test_training_on_a_host_gathered_split(small_corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "fits_on", lambda device, nbytes: False)
    out = tmp_path / "out"
    assert train.main([f"--data_file={small_corpus}", f"--data_dir={tmp_path}", f"--out_dir={out}",
                       *cuda_flags(max_iters=20, eval_interval=10, learning_rate=3e-3)]) == 0
    losses = evals(out)
    assert losses[20] < losses[0]


def test_fp16_with_the_gradient_scaler(small_corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert train.main([f"--data_file={small_corpus}", f"--data_dir={tmp_path}", f"--out_dir={out}",
                       *cuda_flags(max_iters=20, eval_interval=10, dtype="float16")]) == 0
    assert "fp16 loss scaling" in capsys.readouterr().out
    assert load_checkpoint(out / "ckpt.pt")["scaler"] is not None and np.isfinite(evals(out)[20])


def test_resume_on_cuda_continues_the_run(small_corpus, tmp_path):
    """Stopped at 10 and resumed to 20 against one run to 20: the same evaluations (to the GPU's
    non-deterministic summation orders)."""
    common = [f"--data_file={small_corpus}", f"--data_dir={tmp_path}", *cuda_flags(eval_interval=10, dropout=0.1)]
    assert train.main([*common, f"--out_dir={tmp_path / 'full'}", "--max_iters=20"]) == 0
    assert train.main([*common, f"--out_dir={tmp_path / 'part'}", "--max_iters=10"]) == 0
    assert train.main([*common, f"--out_dir={tmp_path / 'part'}", "--max_iters=20", "--resume"]) == 0
    full, part = evals(tmp_path / "full"), evals(tmp_path / "part")
    assert abs(full[20] - part[20]) < 2e-2, (full, part)


def test_sampling_on_cuda_with_and_without_the_cache():
    from fastgpt.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, block_size=64, n_layer=2, n_head=2, n_embd=64, dropout=0.0)).to(CUDA).eval()
    prompt = torch.zeros((2, 1), dtype=torch.long, device=CUDA)
    outs = []
    for use_cache in (True, False):
        generator = torch.Generator(device=CUDA).manual_seed(0)
        with torch.no_grad(), kernels.backend("auto"):
            outs.append(model.generate(prompt, 40, top_k=1, generator=generator, use_cache=use_cache))
    assert outs[0].shape == (2, 41) and int(outs[0].max()) < 65
    assert (outs[0] == outs[1]).float().mean() > 0.9  # greedy: the cache changes only summation orders


def test_the_whole_trainer_under_reduce_overhead(small_corpus, tmp_path):
    """CUDA graphs around the training step, with evaluation and checkpoints between replays."""
    out = tmp_path / "out"
    assert train.main([f"--data_file={small_corpus}", f"--data_dir={tmp_path}", f"--out_dir={out}",
                       *cuda_flags(compile=True, compile_mode="reduce-overhead", max_iters=20, eval_interval=10)]) == 0
    losses = evals(out)
    assert sorted(losses) == [0, 10, 20] and losses[20] < losses[0]
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] == 20


def test_gpt2_vocabulary_step_fused_under_bf16_compile_holds_a_fraction_of_the_memory():
    """The shakespeare_char GPT with GPT-2's vocabulary (padded to 50304 rows as the trainer does on CUDA),
    one compiled forward and backward under bf16 autocast: `auto` takes the fused Triton loss, whose loss
    matches the unfused one, and the step's peak memory is well under the unfused step's."""
    import importlib

    from fastgpt.model import GPTConfig, build_model

    lce = importlib.import_module("fastgpt.kernels.linear_cross_entropy")
    torch.manual_seed(0)
    model = build_model(GPTConfig(vocab_size=50257, dropout=0.0, pad_vocab=64)).to(CUDA)
    idx = torch.randint(50257, (64, 257), device=CUDA)
    compiled = torch.compile(model)

    def step():
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compiled(idx[:, :-1], idx[:, 1:])[1]
        loss.backward()
        torch.cuda.synchronize()
        return loss.item(), (torch.cuda.max_memory_allocated() - held) / 2**30

    assert lce.describe(64 * 256, 50304, CUDA).startswith("fused (Triton")
    fused_loss, fused_gib = step()
    original = lce.PLAIN_MAX_BYTES
    lce.PLAIN_MAX_BYTES = float("inf")
    try:
        torch._dynamo.reset()
        compiled = torch.compile(model)
        plain_loss, plain_gib = step()
    finally:
        lce.PLAIN_MAX_BYTES = original
    print(f"gpt2-vocabulary step, bf16, compiled: fused {fused_gib:.2f} GiB, unfused {plain_gib:.2f} GiB")
    assert abs(fused_loss - plain_loss) < 2e-2 * plain_loss
    assert fused_gib < 0.6 * plain_gib
