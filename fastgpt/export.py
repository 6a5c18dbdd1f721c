"""Convert checkpoints: fastgpt's to nanoGPT's, and nanoGPT's to fastgpt's.

    python -m fastgpt.export --checkpoint=out/best.pt --format=nanogpt --out=DIR
    python -m fastgpt.export --checkpoint=nanoGPT/out/ckpt.pt --meta=nanoGPT/data/X/meta.pkl --format=fastgpt --out=DIR

`--format=nanogpt` writes DIR/ckpt.pt (model, model_args, iter_num, best_val_loss, config) and, for a
character model, DIR/meta.pkl (stoi, itos, vocab_size): nanoGPT's `sample.py --out_dir=DIR` loads both
(its config's `dataset` is DIR's absolute path, which nanoGPT's `data/<dataset>/meta.pkl` resolves to).
A gpt2-tokenizer model needs no meta.pkl: nanoGPT assumes GPT-2's encoding without one.

`--format=fastgpt` reads a nanoGPT checkpoint with `weights_only=True` (the `_orig_mod.` prefix of a
compiled model stripped) and its vocabulary from `--meta` with an unpickler that admits only plain data
(dicts, lists, tuples, strings, numbers): a pickle that names any class or function is refused, never
run. Without `--meta` the model is taken to use GPT-2's encoding, as nanoGPT's sample.py does. It writes
DIR/best.pt, which `fastgpt.sample --out_dir=DIR` samples and `fastgpt.train --init_from=DIR/best.pt`
fine-tunes.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from fastgpt.checkpoint import load_checkpoint, model_from_checkpoint, require, save_checkpoint

from fastgpt.files import LOCK_FILE, atomic_write, out_dir_lock
from fastgpt.cli import UserError, parse_command, run_main
from fastgpt.model import GPTConfig, build_model
from fastgpt.tokenizer import CharTokenizer, GPT2Tokenizer

FORMATS = ("hf", "nanogpt", "fastgpt")
NANOGPT_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")


@dataclass
class ExportConfig:
    checkpoint: str = ""  # what to convert: a fastgpt checkpoint (hf, nanogpt) or nanoGPT's ckpt.pt (fastgpt)
    format: str = ""  # hf (a transformers GPT-2 folder), nanogpt (ckpt.pt and meta.pkl), fastgpt (from nanoGPT's)
    out: str = ""  # the folder to write into (created if missing)
    meta: str = ""  # with --format=fastgpt: nanoGPT's meta.pkl (a character vocabulary); none = GPT-2's encoding
    force: bool = False  # write into an --out folder that already holds files, replacing those the export writes


# ---------------------------------------------------------------------------------------------------
# plain-data pickles


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


# ---------------------------------------------------------------------------------------------------
# fastgpt -> nanoGPT


def best_val_loss(ckpt: dict) -> float:
    """A checkpoint's best val loss as a float (nanoGPT saves a tensor; inf when there is none)."""
    best = ckpt.get("best_val_loss")
    return float(best) if best is not None else float("inf")


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


def to_nanogpt(ckpt: dict, path: Path, out: Path) -> list[Path]:
    model, tokenizer = exportable(ckpt, path, "nanogpt")
    if tokenizer.kind == "bpe":
        raise UserError(f"{path} uses a trained BPE, and nanoGPT knows only characters (meta.pkl) and GPT-2's "
                        f"encoding: export it with --format=hf instead")
    config = model.config
    model_args = {name: getattr(config, name) for name in NANOGPT_ARGS}
    payload = {
        "model": {name: t.clone() for name, t in model.state_dict().items()},
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


# ---------------------------------------------------------------------------------------------------
# nanoGPT -> fastgpt


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


# ---------------------------------------------------------------------------------------------------
# the command


def main(argv: list[str]) -> int:
    cfg, _ = parse_command(ExportConfig, argv, ExportConfig(), "fastgpt.export", __doc__.strip().splitlines()[0])
    if cfg.format not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {cfg.format!r}")
    if not cfg.checkpoint or not cfg.out:
        raise UserError("pass the checkpoint to convert with --checkpoint=PATH and the folder to write with --out=DIR")
    if cfg.meta and cfg.format != "fastgpt":
        raise UserError("--meta is nanoGPT's vocabulary, read when importing: use it with --format=fastgpt")
    path, out = Path(cfg.checkpoint), Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out={out} is a file: name a folder to write into")
    held = sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) if out.is_dir() else []
    if held and not cfg.force:
        raise UserError(f"--out={out} already holds {', '.join(held[:3])}{', ...' if len(held) > 3 else ''}: "
                        f"export into a new or empty folder, or pass --force to replace what the export writes")
    # a training run owns its out_dir: an export never writes into one that is running
    with out_dir_lock(out, "fastgpt.export"):
        if cfg.format == "fastgpt":
            payload = from_nanogpt(read_nanogpt(path), path, Path(cfg.meta) if cfg.meta else None)
            save_checkpoint(out / "best.pt", payload)
            written = [out / "best.pt"]
        elif cfg.format == "nanogpt":
            written = to_nanogpt(load_checkpoint(path), path, out)
        else:
            from fastgpt.hf import to_hf
            written = to_hf(load_checkpoint(path), path, out)
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


if __name__ == "__main__":
    run_main(main, "fastgpt.export")
