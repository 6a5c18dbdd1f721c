"""Shared test set-up: the Triton interpreter on machines without CUDA, the corpus, CLI runners."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# @triton.jit reads TRITON_INTERPRET when a kernel is defined, so it must be set before `kernels` is
# imported: on a machine without a GPU, Triton kernels run in the interpreter.
try:
    import torch
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover - torch is a hard dependency
    pass

ROOT = Path(__file__).resolve().parent.parent

# The kernel tests: on a GPU the kernels run natively, bf16 included; on the CPU in the interpreter, which
# computes bf16 arithmetic wrongly, so bf16 is tested on GPUs only.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
SHAKESPEARE = Path(os.environ.get("FASTGPT_TINYSHAKESPEARE",
                                  ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"))


@pytest.fixture(autouse=True)
def _restore_tf32_flags():
    """The trainer turns TF32 on for the process on CUDA, as nanoGPT does; an in-process training test
    must not leave it on for the fp32 kernel tests that follow."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@pytest.fixture
def triton_kernels():
    """The Triton kernels selected, and tensors created on DEVICE unless a test says otherwise."""
    import kernels

    with kernels.backend("triton"), torch.device(DEVICE):
        yield


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    """Tiny Shakespeare on local disk (never downloaded by the tests)."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"Tiny Shakespeare not found at {SHAKESPEARE}; set FASTGPT_TINYSHAKESPEARE")
    return SHAKESPEARE


@pytest.fixture
def small_corpus(tmp_path: Path) -> Path:
    """A ~20 kB UTF-8 text with a small, learnable structure and a few non-ASCII characters."""
    lines = [f"{name}: the {thing} is {mood}, é.\n"
             for name in ("ROMEO", "JULIET", "NURSE", "MERCUTIO")
             for thing in ("night", "day", "rose", "moon", "sword")
             for mood in ("bright", "dark", "sweet", "cold", "kind", "lost")]
    path = tmp_path / "corpus.txt"
    path.write_text("".join(lines) * 6, encoding="utf-8")
    return path


def run_module(module: str, *args: str, cwd: Path | None = None, timeout: float = 300,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m module args...` and capture its output."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd or ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture
def cli():
    """`cli("fastgpt.train", "--max_iters=1", ...)` runs a module as a subprocess."""
    return run_module


# The kernels' accuracy rule (FlashAttention's): against the op computed in fp64, a kernel's error may be at
# most twice PyTorch's own error in the same input dtype, plus a floor of a few units in the last place of
# that dtype relative to the result's scale (PyTorch's CPU ops sometimes compute in higher precision).
ERROR_FLOOR = {torch.float32: 4e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def check_kernel_error(name: str, actual: torch.Tensor, exact: torch.Tensor, torch_lowp: torch.Tensor) -> None:
    """Assert `actual` (kernel, low precision) is as close to `exact` (fp64) as `torch_lowp` (PyTorch's
    reference in the same precision) is, within the rule above."""
    assert actual.shape == exact.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    exact = exact.double()
    error = (actual.double() - exact).abs().max().item() if exact.numel() else 0.0
    torch_error = (torch_lowp.double() - exact).abs().max().item() if exact.numel() else 0.0
    # results that are ~0 (the gradient of a query that sees one key) get the floor of a 0.01 scale
    scale = max(exact.abs().max().item() if exact.numel() else 0.0, 1e-2)
    bound = 2 * torch_error + ERROR_FLOOR[actual.dtype] * scale
    assert error <= bound, (f"{name}: max error {error:.3g} > {bound:.3g} (PyTorch's own {actual.dtype} error "
                            f"{torch_error:.3g}, scale {scale:.3g})")


@pytest.fixture
def kernel_error():
    """`kernel_error(name, actual, exact_fp64, torch_same_dtype)`: the accuracy rule above."""
    return check_kernel_error


def aot_table(rows: list[dict]) -> str:
    """Registers, spills and shared memory of AOT-compiled kernels, one line per kernel, config and arch."""
    lines = []
    for r in rows:
        tags = " ".join(f"{k}={v}" for k, v in r.items()
                        if k not in ("module", "kernel", "arch", "shared", "shared_limit", "regs", "spills",
                                     "error"))
        result = r.get("error") or f"regs={r['regs']:3d} spills={r['spills']} shared={r['shared']:6d}"
        lines.append(f"sm_{r['arch']} {r['kernel']:<30} {result}  {tags}")
    return "\n".join(lines)


@pytest.fixture(scope="session")
def aot_compile():
    """`aot_compile("kernels.layernorm")`: every configuration in the module's `aot_specs()` compiled
    for sm_90 and sm_80 without a GPU (tests/aot.py, in a subprocess), one dict per kernel and arch."""
    done: dict[str, list[dict]] = {}

    def compile_module(module: str) -> list[dict]:
        if module not in done:
            env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
            proc = subprocess.run([sys.executable, str(ROOT / "tests" / "aot.py"), module], cwd=ROOT,
                                  env=env, capture_output=True, text=True, timeout=1200)
            assert proc.returncode == 0, proc.stderr[-3000:]
            done[module] = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
            report = aot_table(done[module])
            print(f"\nAOT compilation of {module} (pytest -s shows this report):\n{report}")
            if os.environ.get("FASTGPT_AOT_REPORT"):
                out = Path(os.environ["FASTGPT_AOT_REPORT"]) / f"aot-{module}.txt"
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(report + "\n")
        return done[module]

    return compile_module

