"""Train every model of the lecture's progression on the same budget and data, and compare them:
`python -m fastgpt.compare [--preset NAME] [--key=value ...]`.

Takes the trainer's flags (not --model, --resume or --init_from) and trains bigram, attention, multihead,
feedforward, blocks and gpt in turn, each into out_dir/<model>; then prints a markdown table
(parameters, final train and val loss, training tokens/s, a 100-character sample) and writes it to
out_dir/compare.md and out_dir/compare.json, and draws out_dir/compare.png: the models' val loss curves
on one chart and a bar of each final val loss (with matplotlib, the `plot` extra; without it the chart is
skipped with a note).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from fastgpt import train
from fastgpt.checkpoint import load_checkpoint, model_from_checkpoint
from fastgpt.config import PRESETS, TrainConfig, parse_train_args
from fastgpt.cli import ShowHelp, UserError, format_help, run_main
from fastgpt.files import atomic_write
from fastgpt.tokenizer import default_prompt
from fastgpt.model import MODELS
from fastgpt.plot import compare_figure, read_run, save
from fastgpt.sample import complete

DEFAULT_OUT_DIR = "out-compare"
SAMPLE_CHARS = 100
# gpt is blocks plus dropout: without dropout (the cpu preset) the two are one model from one seed
COINCIDE = ("gpt = blocks + dropout, and this run has --dropout=0 (the cpu preset's): the two are the same model "
            "from the same seed, so their curves and losses coincide; with dropout (shakespeare_char's 0.2) gpt "
            "trains slower and generalises better")


def summarize(name: str, out_dir: Path, seed: int) -> dict:
    """The figures of one trained model: from its metrics and its final checkpoint."""
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    final_eval = [r for r in records if "val_loss" in r][-1]
    steps = [r for r in records if "ms_per_iter" in r]
    tokens_per_iter = steps[0]["tokens_per_sec"] * steps[0]["ms_per_iter"] / 1000 if steps else 0.0
    mean_ms = sum(r["ms_per_iter"] for r in steps) / len(steps) if steps else float("nan")
    model, tokenizer = model_from_checkpoint(load_checkpoint(out_dir / "ckpt.pt"), out_dir / "ckpt.pt")
    prompt = default_prompt(tokenizer)
    (text,) = complete(model, tokenizer, prompt, SAMPLE_CHARS, seed)
    return {"model": name, "parameters": model.get_num_params(), "iter": final_eval["iter"],
            "train_loss": final_eval["train_loss"], "val_loss": final_eval["val_loss"],
            "tokens_per_sec": tokens_per_iter / (mean_ms / 1000) if steps else None,
            "sample": text[len(prompt):]}


def markdown(rows: list[dict], note: str | None = None) -> str:
    lines = ["| model | parameters | train loss | val loss | tokens/s | sample (↵ = newline) |",
             "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        sample = r["sample"].replace("\\", "\\\\").replace("|", "\\|").replace("\n", "↵")
        speed = f"{r['tokens_per_sec']:,.0f}" if r["tokens_per_sec"] else "n/a"
        lines.append(f"| {r['model']} | {r['parameters']:,} | {r['train_loss']:.3f} | {r['val_loss']:.3f} "
                     f"| {speed} | `{sample}` |")
    return "\n".join(lines + ([f"\nNote: {note}."] if note else []))


def main(argv: list[str]) -> int:
    if "--help" in argv or "-h" in argv:
        preset = "shakespeare_char" if torch.cuda.is_available() else "cpu"
        defaults = dataclasses.replace(PRESETS[preset], out_dir=DEFAULT_OUT_DIR)
        raise ShowHelp(__doc__.strip() + "\n\n" + format_help(
            TrainConfig, "fastgpt.compare", defaults,
            f"  --preset NAME  one of {', '.join(PRESETS)}; defaults below are {preset}'s"))
    cfg, given = parse_train_args(argv, torch.cuda.is_available())
    if "model" in given or cfg.resume or cfg.init_from:
        raise UserError("compare trains every --model itself and starts fresh: drop --model, --resume "
                        "and --init_from")
    out_root = Path(cfg.out_dir if "out_dir" in given else DEFAULT_OUT_DIR)
    passthrough, args = [], list(argv)
    while args:  # everything but --out_dir, in either form
        arg = args.pop(0)
        if arg in ("--out_dir", "--out-dir"):
            args.pop(0)
        elif not arg.startswith(("--out_dir=", "--out-dir=")):
            passthrough.append(arg)
    rows = []
    for name in MODELS:
        print(f"=== {name} ===", flush=True)
        code = train.main([*passthrough, f"--model={name}", f"--out_dir={out_root / name}", "--sample_chars=0"])
        if code:
            return code
        rows.append(summarize(name, out_root / name, cfg.seed))
    note = COINCIDE if cfg.dropout == 0 else None
    table = markdown(rows, note)
    atomic_write(out_root / "compare.md", lambda f: f.write((table + "\n").encode()))
    atomic_write(out_root / "compare.json", lambda f: f.write((json.dumps({"argv": argv, "rows": rows}, indent=2)
                                                               + "\n").encode()))
    print(table)
    written = [out_root / "compare.md", out_root / "compare.json"]
    try:
        # this run's own chart, beside the six runs it just trained into out_root
        save(compare_figure(rows, [read_run(out_root / r["model"]) for r in rows], note), out_root / "compare.png",
             True)
        written.append(out_root / "compare.png")
    except UserError as e:  # no matplotlib: the table is the result, the chart a note
        print(f"fastgpt.compare: no chart: {e}", file=sys.stderr)
    print(f"written to {', '.join(map(str, written))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_main(main, "fastgpt.compare")
