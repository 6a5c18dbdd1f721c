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

from dataclasses import dataclass
from pathlib import Path

from fastgpt.checkpoint import load_checkpoint, save_checkpoint
from fastgpt.cli import UserError, parse_command, run_main
from fastgpt.files import LOCK_FILE, out_dir_lock
from fastgpt.nanogpt import from_nanogpt, read_nanogpt, to_nanogpt

FORMATS = ("hf", "nanogpt", "fastgpt")


@dataclass
class ExportConfig:
    checkpoint: str = ""  # what to convert: a fastgpt checkpoint (hf, nanogpt) or nanoGPT's ckpt.pt (fastgpt)
    format: str = ""  # hf (a transformers GPT-2 folder), nanogpt (ckpt.pt and meta.pkl), fastgpt (from nanoGPT's)
    out: str = ""  # the folder to write into (created if missing)
    meta: str = ""  # with --format=fastgpt: nanoGPT's meta.pkl (a character vocabulary); none = GPT-2's encoding
    force: bool = False  # write into an --out folder that already holds files, replacing those the export writes


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
