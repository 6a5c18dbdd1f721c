"""Pictures of training runs: `python -m fastgpt.plot RUN_DIR [RUN_DIR ...] --out=FILE.png`.

`--force` replaces an existing --out. Four panels from each run's metrics.jsonl: train and val loss against iteration, val loss against
training seconds, the learning rate, tokens/s. Several runs are overlaid; each one's legend is the
settings in which it differs from the others (from its ckpt.pt's train config: `reference=True`,
`seed=2`, ...), or its directory's name. matplotlib draws off screen (no display needed); it is the
`plot` extra. `fastgpt.compare` draws its chart with `compare_figure`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastgpt.cli import ShowHelp, UserError, run_main
from fastgpt.files import atomic_write

EXTRA = "plot"
# settings that tell runs apart in a legend, in this order; others (paths, intervals) do not
LEGEND_FIELDS = ("model", "reference", "tokenizer", "vocab_size", "seed", "dtype", "compile", "compile_mode",
                 "n_layer", "n_head", "n_embd", "block_size", "batch_size", "learning_rate", "dropout", "device",
                 "max_iters", "data_file", "init_from")


def require_matplotlib():
    """matplotlib's Figure (no pyplot: nothing global, no display), or a UserError naming the extra."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError(f'pictures need the matplotlib package: pip install -e ".[{EXTRA}]"') from None
    return Figure


@dataclass
class Run:
    """One run's records from metrics.jsonl, and its train config when its ckpt.pt has one."""

    path: Path
    steps: list[dict] = field(default_factory=list)  # the log-interval records
    evals: list[dict] = field(default_factory=list)  # the evaluation records
    config: dict = field(default_factory=dict)
    label: str = ""


NUMBERS = ("loss", "val_loss", "train_loss", "lr", "tokens_per_sec", "mfu", "train_seconds", "ms_per_iter")


def parse_metrics(text: str) -> tuple[list[dict], list[dict]]:
    """The log-interval and evaluation records of a metrics.jsonl's text; a line cut short by a crash, a
    damaged or foreign record and the summary are skipped."""
    steps, evals = [], []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or type(record.get("iter")) is not int or record.get("summary"):
            continue
        if not all(isinstance(v, (int, float)) for k, v in record.items() if k in NUMBERS and v is not None):
            continue  # plotted values are numbers
        if "sample" in record and not isinstance(record["sample"], str):
            record = {k: v for k, v in record.items() if k != "sample"}
        (evals if "val_loss" in record else steps if "loss" in record else []).append(record)
    return steps, evals


def train_config(path: Path) -> dict:
    """The train config in a run's ckpt.pt ({} when there is none, or it cannot be read: a label then
    falls back to the directory's name)."""
    ckpt = path / "ckpt.pt"
    if not ckpt.is_file():
        return {}
    try:
        # memory-mapped: only the pickled configs are read, not the weights and optimizer state
        config = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True).get("train_config") or {}
    except Exception:  # damaged or foreign
        return {}
    return config if isinstance(config, dict) else {}


def read_run(path: Path) -> Run:
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{path} has no metrics.jsonl: pass the --out_dir of a fastgpt.train run")
    run = Run(path)
    run.steps, run.evals = parse_metrics(metrics.read_bytes().decode("utf-8", errors="replace"))
    if not run.steps and not run.evals:
        raise UserError(f"{metrics} has no training records yet: plot it after the run has logged a step")
    run.config = train_config(path)
    return run


def label_runs(runs: list[Run]) -> None:
    """Each run's legend: the settings in which the runs differ, else the directory names (made unique)."""
    differing = [name for name in LEGEND_FIELDS
                 if len({json.dumps(r.config.get(name)) for r in runs}) > 1 and all(name in r.config for r in runs)]
    for r in runs:
        parts = [f"{name}={r.config[name]}" for name in differing[:3]]
        r.label = ", ".join(parts) if parts else r.path.name or str(r.path)
    if len({r.label for r in runs}) < len(runs):
        for r in runs:
            r.label = str(r.path)


def series(records: list[dict], key: str, x: str = "iter") -> tuple[list, list]:
    points = [(r[x], r[key]) for r in records if isinstance(r.get(key), (int, float)) and r.get(x) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def runs_figure(runs: list[Run]):
    """The four-panel figure of the runs."""
    Figure = require_matplotlib()
    fig = Figure(figsize=(11, 7.5), layout="constrained")
    ax_loss, ax_time, ax_lr, ax_speed = fig.subplots(2, 2).flat
    for i, r in enumerate(runs):
        color = f"C{i % 10}"
        ax_loss.plot(*series(r.steps, "loss"), color=color, alpha=0.4, linewidth=1)  # unlabelled: the title says
        ax_loss.plot(*series(r.evals, "val_loss"), color=color, marker="o", markersize=3, label=r.label)
        ax_time.plot(*series(r.evals, "val_loss", x="train_seconds"), color=color, marker="o", markersize=3,
                     label=r.label)
        ax_lr.plot(*series(r.steps, "lr"), color=color, label=r.label)
        ax_speed.plot(*series(r.steps, "tokens_per_sec"), color=color, label=r.label)
    speeds = [v for r in runs for v in series(r.steps, "tokens_per_sec")[1] if v > 0]
    if speeds and max(speeds) > 20 * min(speeds):  # models of very different sizes: each visible
        ax_speed.set_yscale("log")
    for ax, title, xlabel, ylabel in ((ax_loss, "loss (faint: train, each log interval; dots: val)", "iteration",
                                       "cross-entropy"),
                                      (ax_time, "val loss against training time", "training seconds", "val loss"),
                                      (ax_lr, "learning rate", "iteration", "lr"),
                                      (ax_speed, "throughput", "iteration", "tokens/s")):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def compare_figure(rows: list[dict], runs: list[Run], note: str | None = None):
    """fastgpt.compare's chart: every model's val loss against iteration, and a bar of each final one,
    with `note` (why two curves coincide) under them."""
    Figure = require_matplotlib()
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    ax_curves, ax_bars = fig.subplots(1, 2, width_ratios=(3, 2))
    for i, (row, run) in enumerate(zip(rows, runs)):
        ax_curves.plot(*series(run.evals, "val_loss"), color=f"C{i}", marker="o", markersize=3, label=row["model"])
    ax_curves.set(title="val loss of the lecture's models", xlabel="iteration", ylabel="val loss")
    ax_curves.grid(alpha=0.3)
    ax_curves.legend(fontsize="small")
    names, finals = [r["model"] for r in rows], [r["val_loss"] for r in rows]
    bars = ax_bars.bar(names, finals, color=[f"C{i}" for i in range(len(rows))])
    ax_bars.bar_label(bars, fmt="%.3f", fontsize="small")
    ax_bars.set(title="final val loss", ylabel="val loss")
    ax_bars.tick_params(axis="x", labelrotation=30)
    if note:
        fig.supxlabel("Note: " + note, fontsize="small", wrap=True)
    return fig


def save(fig, out: Path, force: bool) -> None:
    """Write the picture whole or not at all; an existing file is replaced only with `force`."""
    if out.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise UserError(f"--out={out} needs a picture's suffix: .png, .svg or .pdf")
    if out.exists() and not force:
        raise UserError(f"--out={out} exists: choose another path, or pass --force to replace it")
    try:
        atomic_write(out, lambda f: fig.savefig(f, dpi=110, format=out.suffix.lower()[1:]))
    except OSError as e:
        raise UserError(f"cannot write --out={out} ({e.strerror}): choose a writable path") from None


def main(argv: list[str]) -> int:
    if "--help" in argv or "-h" in argv:
        raise ShowHelp(__doc__.strip())
    if not argv:
        raise UserError("pass one or more run directories and --out=FILE.png (see --help)")
    dirs, out, force = [], None, False
    for arg in argv:
        if arg.startswith("--out="):
            out = Path(arg.partition("=")[2])
        elif arg == "--force":
            force = True
        elif arg.startswith("--"):
            raise UserError(f"unknown flag {arg}: fastgpt.plot takes run directories, --out=FILE.png and --force")
        else:
            dirs.append(Path(arg))
    if not dirs or out is None or not str(out):
        raise UserError("pass one or more run directories and --out=FILE.png")
    runs = [read_run(d) for d in dirs]
    label_runs(runs)
    save(runs_figure(runs), out, force)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_main(main, "fastgpt.plot")
