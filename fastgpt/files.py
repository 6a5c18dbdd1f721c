"""Files every part of fastgpt writes the same way: atomically (whole or not at all), under locks
(a run's out_dir; a cache entry that several processes would build), with progress on stderr for long
reads."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from fastgpt.cli import UserError


def atomic_write(path: Path, write) -> None:
    """Write a file through `write(fileobj)` so that it appears whole or not at all: a temp file in
    the same directory, fsync, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide checkpoints from other users
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing), waiting for another holder: processes
    that would build the same cache entry take turns, and the later ones find it built."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the atomic writes still keep every entry whole
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Progress:
    """A progress line on stderr for work that takes more than `delay` seconds: redrawn in place on a
    terminal, a line per tenth otherwise (a log file)."""

    def __init__(self, label: str, total: int, delay: float = 3.0):
        self.label, self.total, self.delay = label, max(total, 1), delay
        self.done, self.start, self.shown, self.last = 0, time.monotonic(), False, 0.0
        self.tty = sys.stderr.isatty()

    def update(self, n: int) -> None:
        before, self.done = self.done, self.done + n
        now = time.monotonic()
        if now - self.start < self.delay:
            return
        tenth = self.done * 10 // self.total > before * 10 // self.total
        if (self.tty and now - self.last >= 0.2) or (not self.tty and (tenth or not self.shown)):
            self.last, self.shown = now, True
            print(("\r" if self.tty else "") + self._line(now), end="" if self.tty else "\n", file=sys.stderr,
                  flush=True)

    def _line(self, now: float) -> str:
        mb = 1e6
        rate = self.done / mb / max(now - self.start, 1e-9)
        return (f"{self.label}: {100 * self.done // self.total:3d}% ({self.done / mb:,.0f} of "
                f"{self.total / mb:,.0f} MB, {rate:.1f} MB/s)")

    def close(self) -> None:
        if self.shown:
            print(("\r" if self.tty else "") + self._line(time.monotonic()) + f" in "
                  f"{time.monotonic() - self.start:.1f} s", file=sys.stderr, flush=True)


LOCK_FILE = ".lock"


@contextlib.contextmanager
def out_dir_lock(out_dir: Path, who: str = "fastgpt.train") -> Iterator[None]:
    """Hold an exclusive lock on out_dir while the block runs: one run owns its out_dir. The lock is the
    operating system's (flock on out_dir/.lock), so it goes with the process however that ends: a killed
    run never blocks the next. A second holder is refused at once with a UserError naming the first,
    before anything in out_dir is written."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): runs are not kept apart
        yield
        return
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        f = open(out_dir / LOCK_FILE, "a+")  # created if missing, never truncated before the lock is ours
    except OSError as e:
        raise UserError(f"cannot use --out_dir={out_dir} ({e.strerror}): choose a writable directory") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise UserError(f"--out_dir={out_dir} is in use by {holder}: wait for that run to end (or stop it), "
                            f"or train into another --out_dir") from None
        f.seek(0)
        f.truncate()
        f.write(f"{who} process {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()  # nobody holds it now
            fcntl.flock(f, fcntl.LOCK_UN)
