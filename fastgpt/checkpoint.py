"""Checkpoints: written atomically, read with `torch.load(weights_only=True)`.

The payload is tensors and plain types only: the model's state dict (taken from the un-compiled model,
so no `_orig_mod.` prefixes), its config as a dict, the tokenizer's state (fastgpt.tokenizer: a kind and
strings; a character tokenizer's vocabulary is also stored as `vocab`, as before), and for a resumable
checkpoint the optimizer state, the train config, the iteration, the best val loss and every RNG state
(torch's, CUDA's, the batch generator's) needed to continue bit-exactly.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

from fastgpt.cli import UserError
from fastgpt.files import atomic_write
from fastgpt.memory import check_model
from fastgpt.model import GPTConfig, LanguageModel, build_model
from fastgpt.tokenizer import Tokenizer, from_state

FORMAT = "fastgpt-checkpoint"
VERSION = 1


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """Write `payload` (plus the format marker) to path atomically: whole or not at all."""
    try:
        atomic_write(Path(path), lambda f: torch.save({"format": FORMAT, "version": VERSION, **payload}, f))
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[0][:120]
        raise UserError(f"could not write {path} ({reason}); the previous checkpoint is intact: free disk "
                        f"space or choose a writable --out_dir") from None


def open_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """A fastgpt checkpoint as stored, its format and version checked (its contents are check_contents'
    work): read onto the CPU, or with `mmap` memory-mapped (a tensor is read only when used). A missing,
    truncated or foreign file is a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}: train one with python -m fastgpt.train, or give the "
                        f"path of an existing one")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except PermissionError as e:
        raise UserError(f"cannot read {path} ({e.strerror}): check its permissions") from None
    except Exception:  # torch raises many types for damaged files; all mean the same to a user
        raise UserError(f"{path} is not a readable fastgpt checkpoint (truncated, damaged or another "
                        f"kind of file): use another checkpoint or train a new one") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not a fastgpt checkpoint: use one written by python -m fastgpt.train")
    if ckpt.get("version") != VERSION:
        raise UserError(f"{path} is a version {ckpt.get('version')} checkpoint; this fastgpt reads "
                        f"version {VERSION}: use a matching fastgpt")
    return ckpt


def load_checkpoint(path: str | Path) -> dict:
    """Read a fastgpt checkpoint onto the CPU, validated (check_contents); a missing, truncated, foreign
    or damaged file is a UserError."""
    ckpt = open_checkpoint(path)
    check_contents(ckpt, Path(path))
    return ckpt


def field_type_ok(value: object, annotation: str) -> bool:
    """Whether a stored config value is of its field's annotated type ("int", "float | None", ...): an int
    where a float belongs is fine, a float must be finite."""
    allowed = {part.strip() for part in str(annotation).split("|")}
    if value is None:
        return "None" in allowed
    if type(value) is bool:
        return "bool" in allowed
    if type(value) is int:
        return "int" in allowed or "float" in allowed
    if type(value) is float:
        return "float" in allowed and math.isfinite(value)
    return type(value) is str and "str" in allowed


def check_config(stored: object, cls, path: Path, what: str) -> None:
    """A stored dataclass config (model_config, train_config): a dict of the class' own fields, each of
    its field's type (missing fields take their defaults: older checkpoints lack newer ones)."""
    if not isinstance(stored, dict):
        raise UserError(f"{path} is damaged (its {what} is not a mapping): use another checkpoint")
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    for name, value in stored.items():
        if name not in types:
            raise UserError(f"{path}'s {what} has a setting this fastgpt does not know ({name}), so it does not fit "
                            f"this fastgpt: use the fastgpt that wrote it")
        if not field_type_ok(value, types[name]):
            raise UserError(f"{path} is damaged ({what} {name}={value!r:.40} has the wrong type): use another "
                            f"checkpoint")


def check_contents(ckpt: dict, path: Path) -> None:
    """What a checkpoint holds, checked when it is read, before anything is built from it: its model
    config (types and ranges), its train config's types, its tokenizer (and that the model has a row for
    every token), and its weights (floating-point, finite)."""
    from fastgpt.config import MAX_PAD_VOCAB, TrainConfig
    from fastgpt.model import MODELS

    if "model_config" in ckpt:
        check_config(ckpt["model_config"], GPTConfig, path, "model_config")
        config = GPTConfig(**ckpt["model_config"])
        sizes = (config.vocab_size, config.block_size, config.n_layer, config.n_head, config.n_embd)
        if min(sizes) < 1 or config.n_embd % config.n_head or not 0 <= config.dropout < 1 or (
                config.attn_window is not None and config.attn_window < 1) or config.model not in MODELS or not (
                1 <= config.pad_vocab <= MAX_PAD_VOCAB):
            raise UserError(f"{path} is damaged (its model_config describes no model: {ckpt['model_config']}): "
                            f"use another checkpoint")
        state = tokenizer_state(ckpt) if "tokenizer" in ckpt or "vocab" in ckpt else None
        if state is not None and not (isinstance(state, dict) and state.get("kind") == "gpt2"):  # GPT-2's: loaded
            tokens = from_state(state).vocab_size  # when used (tiktoken may have to fetch it)
            if tokens != config.vocab_size:
                raise UserError(f"{path} is inconsistent: vocabulary of {tokens} tokens for a model with "
                                f"vocab_size {config.vocab_size}: use another checkpoint")
    if "train_config" in ckpt:
        check_config(ckpt["train_config"], TrainConfig, path, "train_config")
    weights = ckpt.get("model")
    if weights is not None:
        if not isinstance(weights, dict) or not all(
                isinstance(t, torch.Tensor) and t.is_floating_point() for t in weights.values()):
            raise UserError(f"{path} is damaged (its weights are not floating-point tensors): use another checkpoint")
        bad = next((name for name, t in weights.items() if not torch.isfinite(t).all()), None)
        if bad is not None:
            raise UserError(f"{path} is damaged ({bad} holds non-finite values): use another checkpoint")


def require(ckpt: dict, path: str | Path, purpose: str, keys: tuple[str, ...]) -> dict:
    """`ckpt` if it holds every key that `purpose` needs; a UserError otherwise (e.g. resuming from a
    weights-only best.pt)."""
    # "vocab" stands for the tokenizer: a character vocabulary, or (since the BPE) a tokenizer state
    missing = [key for key in keys if key not in ckpt and not (key == "vocab" and "tokenizer" in ckpt)]
    if missing:
        hint = (": resume from the ckpt.pt a run writes, or fine-tune from this one with --init_from"
                if purpose == "resume" and "model" in ckpt else ": use a checkpoint written by fastgpt.train")
        raise UserError(f"cannot {purpose} {path}: it lacks {', '.join(missing)}{hint}")
    bad_tokenizer = (not isinstance(ckpt["tokenizer"], dict) if "tokenizer" in ckpt
                     else "vocab" in keys and not isinstance(ckpt["vocab"], str))
    if bad_tokenizer or ("rng" in keys and not isinstance(ckpt["rng"], list)):
        raise UserError(f"{path} is damaged (its vocabulary or RNG states have the wrong type): use "
                        f"another checkpoint")
    return ckpt


def tokenizer_state(ckpt: dict) -> dict:
    """The tokenizer a checkpoint was trained with, as its state (a checkpoint from before the BPE has a
    character vocabulary only)."""
    return ckpt["tokenizer"] if "tokenizer" in ckpt else {"kind": "char", "vocab": ckpt["vocab"]}


def read_tokenizer(path: str | Path) -> Tokenizer:
    """A fastgpt checkpoint's tokenizer with its weights left unread (memory-mapped): for what needs only
    the vocabulary. A missing, damaged or foreign file, or one without a tokenizer, is a UserError."""
    ckpt = open_checkpoint(path, mmap=True)
    if "tokenizer" not in ckpt and "vocab" not in ckpt:
        raise UserError(f"{path} holds no tokenizer: use a checkpoint written by python -m fastgpt.train")
    return from_state(tokenizer_state(ckpt))


def model_from_checkpoint(ckpt: dict, path: str | Path) -> tuple[LanguageModel, Tokenizer]:
    """The model (on the CPU, eval mode) and tokenizer stored in a loaded checkpoint."""
    try:
        config = GPTConfig(**ckpt["model_config"])
        check_model(config, torch.device("cpu"), str(path))  # built on the CPU first
        model = build_model(config)
        model.load_state_dict(ckpt["model"])
        tokenizer = from_state(tokenizer_state(ckpt))
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, AssertionError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{path} does not hold a valid fastgpt model ({reason[:160]}): "
                        f"use a checkpoint written by python -m fastgpt.train") from None
    if tokenizer.vocab_size != config.vocab_size:
        raise UserError(f"{path} is inconsistent: vocabulary of {tokenizer.vocab_size} tokens for a "
                        f"model with vocab_size {config.vocab_size}")
    return model.eval(), tokenizer


@torch.no_grad()
def load_weights(model: LanguageModel, state: dict, path: str | Path, vocab_size: int) -> None:
    """Copy a checkpoint's weights into `model`, which may have a larger vocabulary: a tensor that grew
    with it (embedding rows, output rows, a bigram table's columns) takes the checkpoint's values over
    their old extent and keeps its fresh initialisation beyond, so old tokens' logits are unchanged.
    `vocab_size` is the checkpoint's: no other size may differ."""
    own = model.state_dict()
    if set(state) != set(own):
        raise UserError(f"{path} holds weights of another architecture: fine-tune with a checkpoint of "
                        f"the same --model")
    old_vocab, new_vocab = vocab_size, model.config.vocab_size
    vocab_dims = model.vocab_dims()
    for name, tensor in state.items():
        target = own[name]
        grown = vocab_dims.get(name, ()) if old_vocab != new_vocab else ()
        # only the vocabulary may have grown (--extend_vocab): any other size must be the model's own; the
        # old tokens' rows are copied, the new ones (and the output layer's padding) keep their initialisation
        fits = isinstance(tensor, torch.Tensor) and tensor.dim() == target.dim() and all(
            (a >= old_vocab and b >= new_vocab > old_vocab) if d in grown else a == b
            for d, (a, b) in enumerate(zip(tensor.shape, target.shape)))
        if not fits:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise UserError(f"{path}: {name} has shape {shape}, which does not fit {tuple(target.shape)}: "
                            f"use a checkpoint of this architecture (--block_size, --n_embd, ... as it was trained)")
        for d in grown:
            tensor = tensor.narrow(d, 0, old_vocab)
        target[tuple(slice(0, n) for n in tensor.shape)] = tensor


def check_resumable_state(ckpt: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                          path: str | Path) -> None:
    """Everything `--resume` loads, checked against the model and optimizer it goes into before any of it
    is used: the weights' names and shapes (their types and finiteness were checked when the checkpoint
    was read: check_contents), the optimizer's groups and per-parameter moments (a moment of the wrong
    shape makes the fused AdamW read and write out of bounds), the iteration and the best val loss. A
    UserError names what is wrong."""
    def damaged(what: str) -> UserError:
        return UserError(f"{path} is damaged ({what}): resume from another checkpoint, or start afresh with "
                         f"--overwrite")

    weights, own = ckpt["model"], model.state_dict()
    if not isinstance(weights, dict) or set(weights) != set(own):
        raise damaged("its weights are not this model's")
    for name, tensor in weights.items():
        if tensor.shape != own[name].shape:
            raise damaged(f"{name} is not a tensor of shape {tuple(own[name].shape)}")
    state = ckpt["optimizer"]
    groups = state.get("param_groups") if isinstance(state, dict) else None
    moments = state.get("state") if isinstance(state, dict) else None
    ours = [group["params"] for group in optimizer.param_groups]
    if not isinstance(groups, list) or not isinstance(moments, dict) or len(groups) != len(ours) or any(
            not isinstance(g, dict) or not isinstance(g.get("params"), list) or len(g["params"]) != len(p)
            for g, p in zip(groups, ours)):
        raise damaged("its optimizer state does not match the model's parameter groups")
    params = {index: param for g, p in zip(groups, ours) for index, param in zip(g["params"], p)}
    for index, entry in moments.items():
        if index not in params or not isinstance(entry, dict):
            raise damaged(f"optimizer state for an unknown parameter {index!r}")
        for key, value in entry.items():
            if not isinstance(value, torch.Tensor):
                raise damaged(f"optimizer {key} of parameter {index} is not a tensor")
            expected = () if key == "step" else params[index].shape
            if value.shape != expected or not value.is_floating_point() or not torch.isfinite(value).all():
                raise damaged(f"optimizer {key} of parameter {index} has shape {tuple(value.shape)} or "
                              f"non-finite values, where {tuple(expected)} finite values belong")
    iter_num, best = ckpt["iter_num"], ckpt.get("best_val_loss")
    if isinstance(iter_num, bool) or not isinstance(iter_num, int) or not 0 <= iter_num < 2**62:
        raise damaged(f"iter_num {iter_num!r} is not a count of iterations")
    if isinstance(best, bool) or not isinstance(best, (int, float)) or best != best or best < 0:
        raise damaged(f"best_val_loss {best!r} is not a loss")


def exportable(ckpt: dict, path: Path, target: str):
    """The GPT model and tokenizer of a fastgpt checkpoint that `target` can hold; a UserError otherwise."""
    model, tokenizer = model_from_checkpoint(require(ckpt, path, f"export {target} from", ("model", "model_config",
                                                                                           "vocab")), path)
    config = model.config
    if config.model != "gpt":
        raise UserError(f"{path} holds a --model={config.model} model, a step of the lecture before the GPT: only "
                        f"--model=gpt exports to {target}")
    if config.attn_window is not None:
        raise UserError(f"{path} uses a sliding attention window (--attn_window={config.attn_window}), which "
                        f"{target}'s GPT-2 does not have: export a model trained without it")
    return model, tokenizer
