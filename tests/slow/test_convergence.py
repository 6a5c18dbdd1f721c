"""Convergence: a tiny GPT trained on the Triton kernels (the interpreter on the CPU) follows the
references' loss curve, eager and under torch.compile(fullgraph=True)."""

from __future__ import annotations

import torch

from fastgpt.model import GPT, GPTConfig


def train_losses(backend: str, steps: int, compiled: bool = False) -> list[float]:
    """Per-step training losses of a tiny GPT (no dropout: the Triton attention's dropout mask is its
    own) from one init and one batch stream, on the given kernel backend. The text is a fixed random
    sequence of 40 tokens repeated: learnable, but only with context."""
    from fastgpt import kernels

    device = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter on the CPU
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.0,
                          bias=True)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step_model = torch.compile(model, fullgraph=True) if compiled else model
    g = torch.Generator().manual_seed(1)
    text = torch.randint(11, (40,), generator=g).repeat(4)
    losses = []
    with kernels.backend(backend):
        for _ in range(steps):
            starts = torch.randint(len(text) - 17, (4,), generator=g)
            idx = torch.stack([text[s:s + 17] for s in starts.tolist()]).to(device)
            _, loss = step_model(idx[:, :-1], idx[:, 1:])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses


def test_triton_kernels_train_like_the_references():
    """Convergence: 30 AdamW steps on the Triton LayerNorm, linear+GELU and attention kernels follow the
    references' loss curve to within 2e-3 (fp32: only summation orders differ) and learn as much."""
    ours, reference = train_losses("triton", 30), train_losses("reference", 30)
    assert max(abs(a - b) for a, b in zip(ours, reference)) < 2e-3, list(zip(ours, reference))
    assert reference[-1] < reference[0] - 0.5  # it did learn


def test_training_step_compiles_fullgraph_on_the_kernels():
    """torch.compile(fullgraph=True) traces the model, forward and backward, through the kernels' custom
    ops with no graph break; the compiled steps match eager ones."""
    torch._dynamo.reset()
    compiled, eager = train_losses("triton", 3, compiled=True), train_losses("triton", 3)
    assert max(abs(a - b) for a, b in zip(compiled, eager)) < 1e-4


def test_the_fused_loss_trains_like_the_unfused_one(monkeypatch):
    """Convergence of the fused linear + cross-entropy alone: the reference backend with the loss forced into
    chunks of 16 rows (of the 64 a batch has) follows the whole logits' curve for 30 steps (fp32: only
    summation orders differ). The Triton run above takes the fused kernel too (backend triton always does)."""
    import importlib

    lce = importlib.import_module("fastgpt.kernels.linear_cross_entropy")
    plain = train_losses("reference", 30)
    monkeypatch.setattr(lce, "PLAIN_MAX_BYTES", 0)
    monkeypatch.setattr(lce, "CHUNK_BYTES", 16 * 4 * 11)
    fused = train_losses("reference", 30)
    assert max(abs(a - b) for a, b in zip(fused, plain)) < 1e-4, list(zip(fused, plain))
    assert fused[-1] < fused[0] - 0.5
