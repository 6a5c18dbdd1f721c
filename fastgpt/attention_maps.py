"""Where the model looks: `python -m fastgpt.attention_maps --checkpoint=PATH --prompt="ROMEO:" --out=attn.png`.

For each attention layer (rows) and head (columns), a heatmap of the attention weights over the prompt's
tokens: row i is the distribution query token i puts over the keys 0..i (nothing above the diagonal:
the attention is causal). The Triton kernels never materialise these probabilities (that is their
point), so this runs the PyTorch reference path and recomputes softmax(q k^T / sqrt(d)) from each
layer's own input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from fastgpt import kernels
from fastgpt.checkpoint import load_checkpoint, model_from_checkpoint
from fastgpt.cli import UserError, parse_command, run_main
from fastgpt.model import CausalSelfAttention
from fastgpt.plot import require_matplotlib, save
from fastgpt.tokenizer import check_prompt

SHOWN = {" ": "␣", "\n": "↵", "\t": "⇥"}


@dataclass
class AttentionConfig:
    checkpoint: str = "out/best.pt"  # the checkpoint whose attention to draw
    prompt: str = "ROMEO:"  # the tokens on both axes (at most block_size of them)
    out: str = "attn.png"  # the picture (.png, .svg or .pdf)
    force: bool = False  # replace --out if it exists


@torch.no_grad()
def attention_probabilities(model, idx: torch.Tensor) -> list[torch.Tensor]:
    """The attention probabilities (n_head, T, T) of each attention layer for token ids idx (1, T): the
    reference forward runs once, and each layer's q and k are recomputed from its input."""
    layers = [m for m in model.modules() if isinstance(m, CausalSelfAttention)]
    if not layers:
        raise UserError(f"a --model={model.config.model} model has no attention layer to draw: use a checkpoint "
                        f"of attention, multihead, feedforward, blocks or gpt")
    maps: list[torch.Tensor] = []

    def capture(layer: CausalSelfAttention, args) -> None:
        x = args[0]
        B, T, C = x.shape
        q, k, _ = layer.c_attn(x).split(C, dim=2)
        q = q.view(B, T, layer.n_head, C // layer.n_head).transpose(1, 2)
        k = k.view(B, T, layer.n_head, C // layer.n_head).transpose(1, 2)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(C // layer.n_head)  # (B, nh, T, T)
        i = torch.arange(T)
        allowed = i[None, :] <= i[:, None]
        if layer.window is not None:
            allowed &= i[:, None] - i[None, :] < layer.window
        maps.append(torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)[0])

    hooks = [layer.register_forward_pre_hook(capture) for layer in layers]
    try:
        with kernels.backend("reference"):
            model.eval()(idx)
    finally:
        for hook in hooks:
            hook.remove()
    return maps


def token_labels(tokenizer, ids: list[int]) -> list[str]:
    """Each token as text, with spaces and line ends made visible."""
    return ["".join(SHOWN.get(c, c) for c in tokenizer.decode([i])) or "?" for i in ids]


def attention_figure(maps: list[torch.Tensor], labels: list[str], title: str):
    Figure = require_matplotlib()
    layers, heads = len(maps), maps[0].shape[0]
    size = max(1.6, 0.22 * len(labels) + 0.8)
    fig = Figure(figsize=(size * heads + 0.6, size * layers + 0.6), layout="constrained")
    grid = fig.subplots(layers, heads, squeeze=False)
    for li, layer in enumerate(maps):
        for hi in range(heads):
            ax = grid[li][hi]
            ax.imshow(layer[hi].numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
            ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=90)
            ax.set_yticks(range(len(labels)), labels, fontsize=7)
            ax.set_title(f"layer {li} head {hi}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    return fig


def main(argv: list[str]) -> int:
    cfg, _ = parse_command(AttentionConfig, argv, AttentionConfig(), "fastgpt.attention_maps",
                           __doc__.strip().splitlines()[0])
    require_matplotlib()
    path = Path(cfg.checkpoint)
    model, tokenizer = model_from_checkpoint(load_checkpoint(path), path)
    check_prompt(tokenizer, cfg.prompt)
    ids = tokenizer.encode(cfg.prompt).tolist()
    if len(ids) > model.config.block_size:
        raise UserError(f"the prompt is {len(ids)} tokens, longer than the model's block_size "
                        f"{model.config.block_size}: shorten it")
    maps = attention_probabilities(model, torch.tensor([ids]))
    title = f"attention of {path} over {cfg.prompt!r} (PyTorch reference path: the kernels keep no probabilities)"
    save(attention_figure(maps, token_labels(tokenizer, ids), title), Path(cfg.out), cfg.force)
    print(f"wrote {cfg.out}: {len(maps)} layer(s) x {maps[0].shape[0]} head(s) over {len(ids)} tokens, computed "
          f"on the PyTorch reference path (the Triton kernels never materialise the attention probabilities)")
    return 0


if __name__ == "__main__":
    run_main(main, "fastgpt.attention_maps")
