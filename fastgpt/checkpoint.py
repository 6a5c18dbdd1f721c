"""Checkpoints: written atomically, read with `torch.load(weights_only=True)`.

The payload is tensors and plain types only: the model's state dict (taken from the un-compiled model,
so no `_orig_mod.` prefixes), its config as a dict, the vocabulary as a string, and for a resumable
checkpoint the optimizer state, the train config, the iteration, the best val loss and every RNG state
(torch's, CUDA's, the batch generator's) needed to continue bit-exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastgpt.config import UserError
from fastgpt.data import CharTokenizer, atomic_write
from fastgpt.model import GPTConfig, LanguageModel, build_model

FORMAT = "fastgpt-checkpoint"
VERSION = 1


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """Write `payload` (plus the format marker) to path atomically: whole or not at all."""
    atomic_write(Path(path), lambda f: torch.save({"format": FORMAT, "version": VERSION, **payload}, f))


def load_checkpoint(path: str | Path) -> dict:
    """Read a fastgpt checkpoint onto the CPU; a missing, truncated or foreign file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}: train one with python -m fastgpt.train, or point "
                        f"--out_dir/--checkpoint at an existing one")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for damaged files; all mean the same to a user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a readable fastgpt checkpoint, it may be truncated or foreign "
                        f"({reason[:160]}): use another checkpoint or train a new one") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not a fastgpt checkpoint: use one written by python -m fastgpt.train")
    if ckpt.get("version") != VERSION:
        raise UserError(f"{path} is a version {ckpt.get('version')} checkpoint; this fastgpt reads "
                        f"version {VERSION}: use a matching fastgpt")
    return ckpt


def model_from_checkpoint(ckpt: dict, path: str | Path) -> tuple[LanguageModel, CharTokenizer]:
    """The model (on the CPU, eval mode) and tokenizer stored in a loaded checkpoint."""
    try:
        config = GPTConfig(**ckpt["model_config"])
        model = build_model(config)
        model.load_state_dict(ckpt["model"])
        tokenizer = CharTokenizer(ckpt["vocab"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0]
        raise UserError(f"{path} does not hold a valid fastgpt model ({reason[:160]}): "
                        f"use a checkpoint written by python -m fastgpt.train") from None
    if tokenizer.vocab_size != config.vocab_size:
        raise UserError(f"{path} is inconsistent: vocabulary of {tokenizer.vocab_size} characters for a "
                        f"model with vocab_size {config.vocab_size}")
    return model.eval(), tokenizer


@torch.no_grad()
def load_weights(model: LanguageModel, state: dict, path: str | Path) -> None:
    """Copy a checkpoint's weights into `model`, which may have a larger vocabulary: a tensor that grew
    with it (embedding rows, output rows, a bigram table's columns) takes the checkpoint's values over
    their old extent and keeps its fresh initialisation beyond, so old tokens' logits are unchanged."""
    own = model.state_dict()
    if set(state) != set(own):
        raise UserError(f"{path} holds weights of another architecture: fine-tune with a checkpoint of "
                        f"the same --model")
    for name, tensor in state.items():
        target = own[name]
        if tensor.dim() != target.dim() or any(a > b for a, b in zip(tensor.shape, target.shape)):
            raise UserError(f"{path}: {name} has shape {tuple(tensor.shape)}, which does not fit "
                            f"{tuple(target.shape)}: use a checkpoint of this architecture")
        target[tuple(slice(0, n) for n in tensor.shape)] = tensor
