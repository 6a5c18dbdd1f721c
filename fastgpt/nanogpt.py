"""nanoGPT's checkpoint format, both ways: a fastgpt GPT as nanoGPT's ckpt.pt and meta.pkl, and a
nanoGPT ckpt.pt (with its meta.pkl, read as plain data only) as a fastgpt checkpoint."""

from __future__ import annotations

import dataclasses
import io
import pickle
from pathlib import Path

import torch

from fastgpt.checkpoint import exportable
from fastgpt.cli import UserError
from fastgpt.files import atomic_write
from fastgpt.model import GPTConfig, build_model
from fastgpt.tokenizer import CharTokenizer, GPT2Tokenizer


NANOGPT_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")


class PlainUnpickler(pickle.Unpickler):
    """Unpickles plain data only: every class or function a pickle names (the way a pickle runs code)
    is refused before it is looked up."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"it names {module}.{name}")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it refers to outside objects")


def load_plain_pickle(path: Path, flag: str) -> object:
    """A pickle file's plain data; anything else in it is a UserError, and none of it runs."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {flag}={path} ({e.strerror}): check the path") from None
    try:
        return PlainUnpickler(io.BytesIO(raw)).load()
    except pickle.UnpicklingError as e:
        raise UserError(f"{flag}={path} is not plain data ({e}): refusing to load it; a meta.pkl holds only "
                        f"dicts, strings and numbers") from None
    except Exception:  # truncated or not a pickle: EOFError, ValueError, KeyError, ...
        raise UserError(f"{flag}={path} is not a readable pickle (truncated or another kind of file): pass "
                        f"nanoGPT's meta.pkl") from None


def char_vocab_from_meta(meta: object, vocab_size: int, path: Path) -> str:
    """The vocabulary string (the character of each id in order) of a nanoGPT meta.pkl."""
    bad = UserError(f"--meta={path} is not a nanoGPT character vocabulary (a dict with itos: id -> character "
                    f"for ids 0..vocab_size-1): pass the meta.pkl of the checkpoint's dataset")
    itos = meta.get("itos") if isinstance(meta, dict) else None
    if not isinstance(itos, dict) or set(itos) != set(range(len(itos))):
        raise bad
    chars = [itos[i] for i in range(len(itos))]
    if not all(isinstance(c, str) and len(c) == 1 for c in chars) or len(set(chars)) != len(chars):
        raise bad
    if len(chars) != vocab_size:
        raise UserError(f"--meta={path} has {len(chars)} characters but the checkpoint's model has vocab_size "
                        f"{vocab_size}: pass the meta.pkl of the dataset it was trained on")
    return "".join(chars)


def best_val_loss(ckpt: dict) -> float:
    """A checkpoint's best val loss as a float (nanoGPT saves a tensor; inf when there is none)."""
    best = ckpt.get("best_val_loss")
    return float(best) if best is not None else float("inf")


def to_nanogpt(ckpt: dict, path: Path, out: Path) -> list[Path]:
    model, tokenizer = exportable(ckpt, path, "nanogpt")
    if tokenizer.kind == "bpe":
        raise UserError(f"{path} uses a trained BPE, and nanoGPT knows only characters (meta.pkl) and GPT-2's "
                        f"encoding: export it with --format=hf instead")
    config = model.config
    model_args = {name: getattr(config, name) for name in NANOGPT_ARGS}
    payload = {
        "model": {name: t.clone() for name, t in model.trimmed_state_dict().items()},
        "model_args": model_args,
        "iter_num": int(ckpt.get("iter_num", 0)),
        "best_val_loss": best_val_loss(ckpt),
        # nanoGPT's sample.py reads data/<dataset>/meta.pkl: an absolute dataset is this folder
        "config": {**(ckpt.get("train_config") or {}), **model_args, "dataset": str(out.resolve())},
    }
    written = [out / "ckpt.pt"]
    atomic_write(out / "ckpt.pt", lambda f: torch.save(payload, f))
    if tokenizer.kind == "char":
        meta = {"vocab_size": tokenizer.vocab_size, "itos": dict(enumerate(tokenizer.vocab)),
                "stoi": {c: i for i, c in enumerate(tokenizer.vocab)}}
        atomic_write(out / "meta.pkl", lambda f: pickle.dump(meta, f))
        written.append(out / "meta.pkl")
    return written


def read_nanogpt(path: Path) -> dict:
    """A nanoGPT checkpoint, loaded with weights_only=True; anything else is a UserError."""
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}: pass nanoGPT's out_dir/ckpt.pt with --checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # damaged, truncated, not a torch file, or objects weights_only refuses
        raise UserError(f"{path} is not a readable nanoGPT checkpoint (truncated, damaged, or holding more than "
                        f"tensors and plain data): pass nanoGPT's ckpt.pt") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict) or not isinstance(
            ckpt.get("model_args"), dict):
        hint = " (it is a fastgpt checkpoint already)" if isinstance(ckpt, dict) and "model_config" in ckpt else ""
        raise UserError(f"{path} is not a nanoGPT checkpoint{hint}: it needs model and model_args")
    return ckpt


def from_nanogpt(ckpt: dict, path: Path, meta_path: Path | None) -> dict:
    """The fastgpt checkpoint (weights only, like best.pt) of a loaded nanoGPT checkpoint."""
    args = ckpt["model_args"]
    try:
        config = GPTConfig(**{name: args[name] for name in NANOGPT_ARGS if name != "dropout"},
                           dropout=float(args.get("dropout", 0.0)), model="gpt")
    except (KeyError, TypeError) as e:
        raise UserError(f"{path}: its model_args lack {e} or have the wrong types: pass a nanoGPT ckpt.pt") from None
    prefix = "_orig_mod."
    state = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in ckpt["model"].items()}
    # nanoGPT without flash attention keeps its causal mask as a buffer named attn.bias
    state = {k: v for k, v in state.items() if not k.endswith(".attn.bias")}
    if meta_path is not None:
        tokenizer = CharTokenizer(char_vocab_from_meta(load_plain_pickle(meta_path, "--meta"), config.vocab_size,
                                                       meta_path))
    else:
        tokenizer = GPT2Tokenizer()
        n = tokenizer.vocab_size
        if config.vocab_size < n:
            raise UserError(f"{path} has a {config.vocab_size}-token vocabulary, smaller than GPT-2's {n}: pass its "
                            f"dataset's meta.pkl with --meta")
        if config.vocab_size > n:  # drop nanoGPT's padding rows (50257 -> 50304): no token has their ids
            state = {k: (v[:n] if k in ("transformer.wte.weight", "lm_head.weight") else v) for k, v in state.items()}
            config = dataclasses.replace(config, vocab_size=n)
    model = build_model(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[0][:160]
        raise UserError(f"{path}'s weights do not fit its model_args ({reason}): pass an unmodified nanoGPT "
                        f"ckpt.pt") from None
    payload = {"model": model.state_dict(), "model_config": dataclasses.asdict(config),
               "tokenizer": tokenizer.state(), "corpus_sha256": None, "iter_num": int(ckpt.get("iter_num", 0)),
               "best_val_loss": best_val_loss(ckpt), "source": "nanoGPT"}
    if tokenizer.kind == "char":
        payload["vocab"] = tokenizer.vocab
    return payload
