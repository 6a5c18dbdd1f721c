"""Sizes a user can pass, checked against what the machine can hold before anything is allocated.

The estimates are deliberately rough and generous to the user: a run is refused only when even its
weights, gradients, optimizer moments and activations together (or, for sampling, the KV cache) exceed
the device's whole memory, so nothing that could run is turned away, and a `--n_layer=10**9` or a
`--batch_size=10**6` ends in one line instead of growing until the machine dies.
"""

from __future__ import annotations

import os

import torch

from fastgpt.cli import UserError
from fastgpt.model import GPTConfig

MAX_BIGRAM_VOCAB = 8192  # the bigram model's table is vocab x vocab
FLOAT = 4  # bytes: weights and activations are counted in fp32, the widest the trainer uses


def device_bytes(device: torch.device) -> int | None:
    """The memory a run on `device` can use at most: the GPU's, or the machine's RAM (CPU, MPS); None
    when the platform does not say."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def parameters(config: GPTConfig) -> int:
    """An upper bound of the parameters of `config`'s model (the full GPT's; the lecture's earlier steps
    have fewer): the blocks' 12 C^2 each, the token and position tables."""
    if config.model == "bigram":
        return config.vocab_size ** 2
    c = config.n_embd
    return 12 * config.n_layer * c * c + (config.output_size + config.block_size) * c


def loss_floats(config: GPTConfig, tokens: int) -> int:
    """The floats the loss holds at once: the logits with their softmax and gradient, or with the fused
    loss (kernels.linear_cross_entropy, chosen by size) a chunk's logits and the weight's gradient."""
    from fastgpt.kernels.linear_cross_entropy import chunk_rows, plain_is_chosen

    width = config.output_size
    if config.model == "bigram" or plain_is_chosen(tokens, width):
        return 3 * tokens * width
    return 3 * chunk_rows(tokens, width) * width + (tokens + width) * config.n_embd


def gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def refuse(needed: int, device: torch.device, what: str, fix: str) -> None:
    have = device_bytes(device)
    if have is not None and needed > have:
        raise UserError(f"{what} needs about {gib(needed)}, more than the {gib(have)} this machine's {device.type} "
                        f"has: {fix}")


def check_model(config: GPTConfig, device: torch.device, source: str) -> None:
    """The weights alone must fit (a checkpoint that records an absurd size is refused before building)."""
    refuse(parameters(config) * FLOAT, device, f"the model of {source}",
           "use a checkpoint of a model this machine can hold")


def check_training(config: GPTConfig, batch_size: int, device: torch.device) -> None:
    """Weights, gradients and AdamW's two moments (4 floats a parameter), and one micro-batch's
    activations: per token and layer ~20 C floats and a row of attention probabilities (H x T, which the
    reference path materialises), and the loss's (`loss_floats`). The bigram model, a
    vocab x vocab table, is kept to MAX_BIGRAM_VOCAB tokens whatever the machine."""
    if config.model == "bigram" and config.vocab_size > MAX_BIGRAM_VOCAB:
        raise UserError(f"the bigram model is a vocab x vocab table: {config.vocab_size} tokens make it "
                        f"{config.vocab_size ** 2 / 1e6:,.0f}M parameters: train it on at most {MAX_BIGRAM_VOCAB} "
                        f"tokens (--tokenizer=char, or bpe with a smaller --vocab_size), or choose another --model")
    tokens = batch_size * config.block_size
    per_token = config.n_layer * (20 * config.n_embd + config.n_head * config.block_size)
    needed = (4 * parameters(config) + tokens * per_token + loss_floats(config, tokens)) * FLOAT
    refuse(needed, device, f"training this model ({config.n_layer} layers of {config.n_embd}, block "
           f"{config.block_size}) on batches of {batch_size}",
           "lower --batch_size or --block_size, or train a smaller model (--n_layer, --n_embd)")


def check_sampling(config: GPTConfig, num_samples: int, new_tokens: int, device: torch.device) -> None:
    """The weights, the KV cache of every sample (2 x layers x block x C), one step's logits, and the
    token ids generated."""
    cache = num_samples * config.n_layer * 2 * config.block_size * config.n_embd
    needed = (parameters(config) + cache + num_samples * config.vocab_size) * FLOAT + num_samples * new_tokens * 8
    refuse(needed, device, f"{num_samples} samples of {new_tokens} tokens", "lower --num_samples or --max_new_tokens")
