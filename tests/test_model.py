"""The GPT: shapes, nanoGPT's names, size and init, the optimizer groups, the KV cache and generation."""

from __future__ import annotations

import math

import pytest
import torch

from fastgpt.model import GPT, GPTConfig

SHAKESPEARE_CHAR = GPTConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.2,
                             bias=False)


def tiny(seed: int = 0, dtype: torch.dtype = torch.float64, **overrides) -> GPT:
    """A small GPT in eval mode; float64 so that cached and uncached runs agree to ~1e-15."""
    config = dict(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0, bias=True)
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**config, **overrides})).to(dtype).eval()


def tokens(b: int, t: int, vocab: int = 11, seed: int = 1) -> torch.Tensor:
    return torch.randint(vocab, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def shakespeare_model() -> GPT:
    torch.manual_seed(0)
    return GPT(SHAKESPEARE_CHAR)


# ---------------------------------------------------------------------------------------------------
# forward


def test_forward_shapes_and_loss():
    model = tiny(dtype=torch.float32)
    idx, targets = tokens(3, 7), tokens(3, 7, seed=2)
    no_logits, loss = model(idx, targets)
    assert no_logits is None  # the loss is computed with the output layer: call without targets for logits
    assert loss.shape == () and loss.dtype == torch.float32
    # at init the logits are ~0, so the loss is ~ln(vocab)
    assert abs(loss.item() - math.log(11)) < 0.1
    logits, none = model(idx)
    assert none is None and logits.shape == (3, 7, 11)


def test_loss_is_the_mean_cross_entropy_of_the_logits():
    model = tiny()
    idx, targets = tokens(2, 5), tokens(2, 5, seed=2)
    loss = model(idx, targets)[1]
    log_probs = torch.log_softmax(model(idx)[0], dim=-1)
    torch.testing.assert_close(loss, -log_probs.gather(-1, targets[..., None]).mean())


def test_forward_is_causal():
    model = tiny()
    idx = tokens(1, 10)
    changed = idx.clone()
    changed[0, 6] = (idx[0, 6] + 1) % 11
    a, b = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_forward_longer_than_block_size_is_rejected():
    model = tiny()
    model(tokens(1, 16))
    with pytest.raises(ValueError, match="sequence of length 17 exceeds block_size 16"):
        model(tokens(1, 17))
    with pytest.raises(ValueError, match="sequence of length 17 exceeds block_size 16"):
        model(tokens(1, 2), cache=model.new_cache(), pos=15)


# ---------------------------------------------------------------------------------------------------
# nanoGPT's names, size and init


def test_weight_tying():
    model = tiny()
    assert model.transformer.wte.weight is model.lm_head.weight


def test_nanogpt_parameter_names():
    names = set(tiny(n_layer=2).state_dict())
    expected = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "lm_head.weight"}
    for i in range(2):
        expected |= {f"transformer.h.{i}.{name}" for name in (
            "ln_1.weight", "attn.c_attn.weight", "attn.c_proj.weight", "ln_2.weight", "mlp.c_fc.weight",
            "mlp.c_proj.weight")}
    assert expected <= names


def test_no_bias_config_has_no_biases():
    model = tiny(bias=False)
    assert not [name for name, _ in model.named_parameters() if name.endswith(".bias")]


def test_shakespeare_char_size_is_nanogpts(shakespeare_model):
    n = shakespeare_model.get_num_params()
    assert abs(n - 10.65e6) < 0.01e6  # nanoGPT: "number of parameters: 10.65M"
    layers, width, vocab = 6, 384, 65
    assert n == layers * (12 * width**2 + 2 * width) + width + vocab * width  # blocks, ln_f, tied wte
    assert shakespeare_model.get_num_params(non_embedding=False) == n + 256 * width


def test_init_std(shakespeare_model):
    """N(0, 0.02) everywhere, except the residual projections: 0.02 / sqrt(2 * n_layer)."""
    scaled = 0.02 / math.sqrt(2 * 6)
    for name, p in shakespeare_model.named_parameters():
        if p.dim() == 1:  # LayerNorm weights
            assert torch.equal(p, torch.ones_like(p)), name
            continue
        expected = scaled if name.endswith("c_proj.weight") else 0.02
        assert abs(p.std().item() - expected) < 0.03 * expected, name
        assert abs(p.mean().item()) < 0.05 * expected, name


def test_biases_start_at_zero():
    for name, p in tiny(bias=True).named_parameters():
        if name.endswith(".bias"):
            assert torch.equal(p, torch.zeros_like(p)), name


def test_configure_optimizers_decays_matrices_only():
    model = tiny(bias=True)
    optimizer = model.configure_optimizers(weight_decay=0.1, learning_rate=3e-4, betas=(0.9, 0.95),
                                           device_type="cpu")
    assert isinstance(optimizer, torch.optim.AdamW)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(no_decay["params"]) > 0
    assert any(p is model.transformer.wte.weight for p in decay["params"])
    grouped = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each parameter once, tied one too
    assert optimizer.defaults["lr"] == 3e-4 and optimizer.defaults["betas"] == (0.9, 0.95)


# ---------------------------------------------------------------------------------------------------
# KV cache and generation


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("chunks", [[16], [5] + [1] * 11, [1] * 16, [7, 4, 1, 3, 1]])
def test_cached_forward_matches_full_forward(window, chunks):
    model = tiny(attn_window=window)
    idx = tokens(2, 16)
    full, _ = model(idx)
    cache, pos, pieces = model.new_cache(), 0, []
    for size in chunks:
        logits, _ = model(idx[:, pos:pos + size], cache=cache, pos=pos)
        pieces.append(logits)
        pos += size
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-10)


def test_attn_window_changes_the_logits():
    idx = tokens(1, 16)
    assert not torch.allclose(tiny(attn_window=3)(idx)[0], tiny()(idx)[0])
    torch.testing.assert_close(tiny(attn_window=16)(idx)[0], tiny()(idx)[0])


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("prompt_len, new", [(1, 10), (3, 13), (5, 40), (20, 8)])
def test_generate_same_tokens_with_and_without_cache(window, prompt_len, new):
    """Within block_size (16), up to it exactly, well past it, and from a prompt already longer than it."""
    model = tiny(attn_window=window)
    idx = tokens(3, prompt_len)
    outs = []
    for use_cache in (True, False):
        generator = torch.Generator().manual_seed(5)
        outs.append(model.generate(idx, new, temperature=1.0, generator=generator, use_cache=use_cache))
    assert outs[0].shape == (3, prompt_len + new)
    assert torch.equal(outs[0][:, :prompt_len], idx)
    assert torch.equal(outs[0], outs[1])


def test_generate_depends_on_the_generator():
    model = tiny()
    a, b = (model.generate(tokens(2, 1), 30, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    assert not torch.equal(a, b)


def test_top_k_1_is_greedy():
    model = tiny()
    idx = tokens(2, 2)
    sampled = model.generate(idx, 25, temperature=1.5, top_k=1, generator=torch.Generator().manual_seed(0))
    greedy = idx
    for _ in range(25):
        logits, _ = model(greedy[:, -16:])
        greedy = torch.cat([greedy, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    assert torch.equal(sampled, greedy)


def test_top_k_only_samples_the_k_most_likely():
    model = tiny()
    idx = tokens(64, 3)
    logits, _ = model(idx)
    allowed = torch.topk(logits[:, -1], 3).indices
    out = model.generate(idx, 1, temperature=5.0, top_k=3, generator=torch.Generator().manual_seed(0))
    assert (out[:, -1:] == allowed).any(dim=1).all()


# ---------------------------------------------------------------------------------------------------
# the model on the Triton kernels (interpreter)
