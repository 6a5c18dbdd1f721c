"""A run's record: metrics.jsonl (a JSON object per log interval, per evaluation, and a summary), the same
scalars as TensorBoard event files with `--tensorboard`, and the clocks that keep training time apart
from evaluation and compilation (time-to-target figures are read off them)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from fastgpt.cli import UserError
from fastgpt.files import atomic_write

# metrics.jsonl's fields and their TensorBoard tags
TENSORBOARD_TAGS = {"loss": "train/loss", "val_loss": "val/loss", "train_loss": "train/eval_loss", "lr": "lr",
                    "grad_norm": "grad_norm", "tokens_per_sec": "tokens_per_sec", "mfu": "mfu",
                    "ms_per_iter": "ms_per_iter"}


def summary_writer_class():
    """torch's SummaryWriter, or a UserError naming the extra that installs TensorBoard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError('--tensorboard needs the tensorboard package: pip install -e ".[tensorboard]"') from None
    return SummaryWriter


def open_tensorboard(log_dir: Path, resumed_at: int | None):
    """A SummaryWriter into log_dir: a new run starts it empty, a resumed one drops the events from
    `resumed_at` on (TensorBoard's purge_step: the steps after its checkpoint's)."""
    SummaryWriter = summary_writer_class()
    if resumed_at is None:
        for old in log_dir.glob("events.out.tfevents.*"):  # an earlier run's, replaced by this one
            old.unlink()
    return SummaryWriter(log_dir=str(log_dir), purge_step=resumed_at, flush_secs=10)


def kept_record(line: str, iter_num: int) -> bool:
    """Whether a metrics.jsonl line belongs to the steps a resumed checkpoint holds (a line cut short by
    a crash is dropped)."""
    try:
        return json.loads(line)["iter"] <= iter_num
    except (ValueError, KeyError, TypeError):
        return False


class Metrics:
    """metrics.jsonl and TensorBoard on rank 0 (nothing on the others), and the run's clocks.

    A new run starts metrics.jsonl empty; a resumed one (`resumed_at`, its checkpoint's iteration) keeps
    the records of the steps its checkpoint holds, the file replaced whole or not at all."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, resumed_at: int | None):
        self.file = self.tensorboard = None
        self.compile_seconds = 0.0  # before the clock starts
        self.eval_seconds = 0.0  # evaluation time, kept apart from training time
        self.clock_start = self.last_log_time = 0.0
        self.last_log_iter = 0
        if not enabled:
            return
        path = out_dir / "metrics.jsonl"
        if resumed_at is not None and path.exists():
            text = path.read_bytes().decode("utf-8", errors="replace")
            kept = "".join(line + "\n" for line in text.splitlines() if kept_record(line, resumed_at))
            atomic_write(path, lambda f: f.write(kept.encode()))
        elif resumed_at is None:
            atomic_write(path, lambda f: None)
        self.file = path.open("a")
        if tensorboard:
            self.tensorboard = open_tensorboard(out_dir / "tb", resumed_at + 1 if resumed_at is not None else None)

    def record(self, **fields) -> None:
        if self.file is not None:
            self.file.write(json.dumps(fields) + "\n")
            self.file.flush()
        if self.tensorboard is not None and "iter" in fields:
            for name, tag in TENSORBOARD_TAGS.items():
                if isinstance(fields.get(name), (int, float)):
                    self.tensorboard.add_scalar(tag, fields[name], fields["iter"])
            if isinstance(fields.get("sample"), str):  # the evaluation's sample, under TensorBoard's Text tab
                self.tensorboard.add_text("sample", fields["sample"], fields["iter"])

    def start_clock(self, iter_num: int) -> None:
        self.clock_start = self.last_log_time = time.perf_counter()
        self.last_log_iter = iter_num

    def logged(self, iter_num: int, now: float) -> None:
        """A log interval (or an evaluation) ended at `now`: the next interval's time counts from there."""
        self.last_log_iter, self.last_log_time = iter_num, now

    def train_seconds(self, now: float) -> float:
        """Training time from the clock's start to `now`, evaluation left out."""
        return now - self.clock_start - self.eval_seconds

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
