"""Choosing a kernel's tile configuration by timing the candidates, once per problem, remembered on disk.

Triton's own autotuner times every candidate the first time it meets a key, in every process, and it
synchronises and allocates while doing so: met for the first time inside a CUDA-graph capture
(`torch.compile(mode="reduce-overhead")`), that breaks the capture. `Tuner` does the same choice with
two differences:
- the choice is written to a JSON file under `cache_dir()` (keyed by the device, the Triton version,
  the kernel's source and the candidates), so a later process on the same machine starts tuned;
- under a CUDA-graph capture an untuned key gets the fallback configuration, untimed and unrecorded (the
  next call outside a capture tunes it).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path

import torch
import triton

try:
    import fcntl
except ImportError:  # Windows: concurrent tuners may drop each other's choices (a re-tune, no more)
    fcntl = None


def cache_dir() -> Path:
    """Where tuning choices are kept: $FASTGPT_CACHE_DIR, else ~/.cache/fastgpt."""
    return Path(os.environ.get("FASTGPT_CACHE_DIR") or Path.home() / ".cache" / "fastgpt")


def kernel_source(kernel) -> str:
    """A @triton.jit function's source (compiled or, under TRITON_INTERPRET=1, interpreted)."""
    return getattr(kernel, "src", None) or inspect.getsource(getattr(kernel, "fn", kernel))


def capturing() -> bool:
    """Whether the current CUDA stream is being captured into a CUDA graph (where nothing may sync)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


# what a candidate that does not fit the GPU raises when compiled or launched (it is then never chosen)
_UNFIT = tuple(getattr(module, name) for module, name in (
    (triton.runtime.errors, "OutOfResources"), (triton.runtime.errors, "PTXASError"),
    (triton.compiler.errors, "CompilationError")) if hasattr(module, name))


def _median_ms(launch: Callable[[], None]) -> float:
    return triton.testing.do_bench(launch, warmup=10, rep=40, return_mode="median")


class Tuner:
    """`Tuner(name, kernel_source(kernel)).pick(key, configs, launch)`: the fastest of `configs` for `key`, where
    `launch(config)` runs the kernel once with it. `source` (the kernel's source text) and the candidates
    enter the cache file's name, so a changed kernel or candidate list is tuned afresh."""

    def __init__(self, name: str, source: str, time_ms: Callable[[Callable[[], None]], float] = _median_ms):
        self.name = name
        self.source = source
        self.time_ms = time_ms
        self.timed = 0  # candidates timed by this process (tests read it)
        self._choices: dict[str, int] = {}
        self._loaded_from: Path | None = None
        self._paths: dict[tuple, Path] = {}

    def _path(self, configs: Sequence) -> Path:
        """The cache file of these candidates, worked out once per candidate list and cache directory (pick
        runs on every launch: no hashing or device query there)."""
        where = (tuple(configs), str(cache_dir()))
        if where not in self._paths:
            device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
            digest = hashlib.sha256("\n".join([device, triton.__version__, self.source, repr(list(configs))])
                                    .encode()).hexdigest()[:20]
            self._paths[where] = Path(where[1]) / f"tuning-{self.name}-{digest}.json"
        return self._paths[where]

    @staticmethod
    def _read(path: Path) -> dict[str, int]:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return {k: v for k, v in data.items() if isinstance(v, int)} if isinstance(data, dict) else {}

    def _write(self, path: Path, key: str, index: int) -> None:
        """Add one choice to the file, keeping what other processes wrote: the read, merge and write hold
        an exclusive lock on a file beside it (processes tuning at once, xdist workers say), and the write
        is atomic (a temporary file renamed over it). A cache that cannot be written only costs a later
        process a re-tune."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path.with_name(path.name + ".lock"), "a") as lock:
                if fcntl is not None:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                merged = {**self._read(path), key: index}
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
                with os.fdopen(fd, "w") as f:
                    json.dump(merged, f)
                os.replace(tmp, path)
        except OSError:
            pass

    def pick(self, key: Hashable, configs: Sequence, launch: Callable[[object], None], fallback: int = 0):
        path = self._path(configs)
        if self._loaded_from != path:
            self._choices = self._read(path)
            self._loaded_from = path
        text = repr(key)
        index = self._choices.get(text)
        if index is not None and 0 <= index < len(configs):
            return configs[index]
        if len(configs) == 1 or capturing():
            return configs[0 if len(configs) == 1 else fallback]
        times = []
        for config in configs:
            try:
                times.append(self.time_ms(lambda: launch(config)))
            except _UNFIT:
                times.append(float("inf"))
            self.timed += 1
        index = min(range(len(configs)), key=times.__getitem__)
        self._choices[text] = index
        self._write(path, text, index)
        return configs[index]
