"""Shared test set-up: the Triton interpreter on machines without CUDA, the corpus, CLI runners."""

from __future__ import annotations

import json
import os
import shutil
import site
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

from fastgpt.kernels.accuracy import compare  # noqa: E402  (after TRITON_INTERPRET is set)

ROOT = Path(__file__).resolve().parent.parent

# The kernel tests: on a GPU the kernels run natively, bf16 included; on the CPU in the interpreter, which
# computes bf16 arithmetic wrongly, so bf16 is tested on GPUs only.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
# Tiny Shakespeare on local disk, never downloaded by the tests: $FASTGPT_TINYSHAKESPEARE, else where the
# trainer keeps its download (data/tinyshakespeare/input.txt, also where a GPU machine is given it), else
# the development machines' shared copy
SHAKESPEARE_PLACES = [ROOT / "data" / "tinyshakespeare" / "input.txt",
                      ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"]
SHAKESPEARE = Path(os.environ["FASTGPT_TINYSHAKESPEARE"]) if os.environ.get("FASTGPT_TINYSHAKESPEARE") else next(
    (p for p in SHAKESPEARE_PLACES if p.is_file()), SHAKESPEARE_PLACES[0])


@pytest.fixture(autouse=True)
def _restore_tf32_flags():
    """The trainer turns TF32 on for the process on CUDA, as nanoGPT does; an in-process training test
    must not leave it on for the fp32 kernel tests that follow."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@pytest.fixture
def triton_kernels(request):
    """The Triton kernels selected, and tensors created on DEVICE unless a test says otherwise; a test
    marked `api` instead calls the public entry point as users do (backend auto, tensors where it makes
    them), against explicit fp64 maths."""
    from fastgpt import kernels

    if request.node.get_closest_marker("api"):
        with kernels.backend("auto"):
            yield
        return
    with kernels.backend("triton"), torch.device(DEVICE):
        yield


def rand(*shape, seed=0):
    """Seeded fp64 normal values on the CPU."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(autouse=True)
def restore_backend():
    """Each test starts and ends on the kernel backend it found, whatever it selects on the way."""
    from fastgpt import kernels

    previous = kernels.get_backend()
    yield
    kernels.set_backend(previous)


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    """Tiny Shakespeare on local disk (never downloaded by the tests)."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"Tiny Shakespeare not found at {' or '.join(map(str, SHAKESPEARE_PLACES))}; set "
                    f"FASTGPT_TINYSHAKESPEARE")
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


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The one line a command printed on stderr when it refused its input with exit code 2."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    return line


# 1-, 2-, 3- and 4-byte characters, so every chunk size lands inside some character
MIXED = "".join(f"line {i}: a é ☃ 😀 日本 {'x' * (i % 7)}\n" for i in range(400))


# a model that trains in seconds on the CPU, where every machine computes the same float32 numbers
TINY_TRAINER = {"device": "cpu", "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "batch_size": 4,
                "eval_iters": 2, "sample_chars": 0, "log_interval": 1}


def tiny_flags(**changes) -> list[str]:
    """The trainer flags of TINY_TRAINER, with `changes` (a value of None drops that flag)."""
    return [f"--{name}={value}" for name, value in {**TINY_TRAINER, **changes}.items() if value is not None]


# a smaller model still, for the tests that only need a run to exist
SMALL_TRAINER = tiny_flags(n_layer=1, n_embd=16, block_size=8, log_interval=5)


@pytest.fixture
def trained(small_corpus, tmp_path):
    """A finished 10-iteration run of SMALL_TRAINER (evaluated at 5 and 10): its out_dir."""
    from fastgpt import train

    out = tmp_path / "out"
    assert train.main([f"--data_file={small_corpus}", f"--data_dir={tmp_path}", f"--out_dir={out}",
                       *SMALL_TRAINER, "--max_iters=10", "--eval_interval=5"]) == 0
    return out


@pytest.fixture(scope="module")
def small_corpus_module(tmp_path_factory):
    """A ~10 kB text like small_corpus, one per test module (for fixtures of module scope)."""
    lines = [f"{name}: the {thing} is {mood}, é ☃.\n" for name in ("ROMEO", "JULIET", "NURSE")
             for thing in ("night", "day", "rose", "moon") for mood in ("bright", "dark", "sweet", "cold")]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("".join(lines) * 12, encoding="utf-8")
    return path


@pytest.fixture
def bpe_text(tmp_path):
    """MIXED three times over, for BPE tests (skipped without the bpe extra)."""
    pytest.importorskip("tokenizers")
    path = tmp_path / "text.txt"
    path.write_text(MIXED * 3, encoding="utf-8")
    return path


@pytest.fixture
def cli():
    """`cli("fastgpt.train", "--max_iters=1", ...)` runs a module as a subprocess."""
    return run_module


def check_kernel_error(name: str, actual: torch.Tensor, exact: torch.Tensor, torch_lowp: torch.Tensor) -> None:
    """Assert `actual` (kernel, low precision) is as close to `exact` (fp64) as `torch_lowp` (PyTorch's
    reference in the same precision) is, within the rule in kernels/accuracy.py."""
    result = compare(actual, exact, torch_lowp)
    assert "why" not in result, f"{name}: {result.get('why')}"
    assert result["ok"], (f"{name}: max error {result['error']:.3g} > {result['bound']:.3g} (PyTorch's own "
                          f"{actual.dtype} error {result['torch_error']:.3g}, scale {result['scale']:.3g})")


def outputs_and_grads(fn, inputs, cotangents) -> list[torch.Tensor]:
    """[fn's outputs..., the gradients of sum(output * cotangent) with respect to each input that is not
    None...], the inputs taken as fresh leaves (the products are summed in fp64)."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
    outputs = fn(*leaves)
    outputs = list(outputs) if isinstance(outputs, tuple) else [outputs]
    loss = sum((o.double() * c.to(o.device).double()).sum() for o, c in zip(outputs, cotangents))
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return [o.detach() for o in outputs] + list(grads)


def check_against_fp64(names, fn, reference, inputs, cotangents, check=None) -> list[torch.Tensor]:
    """Every output and gradient of fn (the kernels) against `reference` computed in fp64, next to
    `reference` in the inputs' own dtype, under the accuracy rule (`check`: check_kernel_error, or a
    stricter or looser variant of an op's). Returns fn's outputs and gradients."""
    got = outputs_and_grads(fn, inputs, cotangents)
    exact = outputs_and_grads(reference, [t.double() if t is not None else None for t in inputs], cotangents)
    same_dtype = outputs_and_grads(reference, inputs, cotangents)
    assert len(got) == len(names), (len(got), names)
    for name, g, e, t in zip(names, got, exact, same_dtype):
        (check or check_kernel_error)(name, g, e, t)
    return got


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
    """`aot_compile("fastgpt.kernels.layer_norm")`: every configuration in the module's `aot_specs()` compiled
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


@pytest.fixture
def stand_in_gpt2(monkeypatch):
    """tiktoken's get_encoding returns a small encoding of GPT-2's kind (its pattern, byte-level ranks and
    an end-of-text token): GPT-2's own files come from the network. The names asked for are returned."""
    tiktoken = pytest.importorskip("tiktoken")
    ranks = {bytes([i]): i for i in range(256)}
    for pair in (b"th", b"he", b"the", b" t", b" the", b"e ", b"in", b"an", b"er"):
        ranks.setdefault(pair, len(ranks))
    pattern = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    encoding = tiktoken.Encoding("gpt2-stand-in", pat_str=pattern, mergeable_ranks=ranks,
                                 special_tokens={"<|endoftext|>": len(ranks)})
    calls = []

    def get_encoding(name):
        calls.append(name)
        return encoding

    monkeypatch.setattr(tiktoken, "get_encoding", get_encoding)
    return calls


# ---------------------------------------------------------------------------------------------------
# a checkout as it travels to another machine, and virtualenvs beside this one


def fresh_venv(path: Path) -> str:
    """A virtualenv without pip whose own site-packages is empty; this environment's packages (torch,
    transformers, Hugging Face's kernels) are reachable after it through a path file, as if installed beside.
    The path file's lines only extend sys.path, so this environment's editable install of fastgpt (a finder
    registered by a .pth file in its own site-packages) is not active there."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    exe = str(path / "bin" / "python")
    purelib = subprocess.run([exe, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    ours = [p for p in site.getsitepackages() if Path(p).is_dir()]
    Path(purelib, "beside.pth").write_text("\n".join(ours) + "\n")
    return exe


def pip_install(exe: str, *args: str) -> None:
    """This environment's pip installing into the virtualenv of `exe`: offline, nothing but what is named."""
    result = subprocess.run([sys.executable, "-m", "pip", "--python", exe, "install", "--no-index", "--no-deps",
                             "--ignore-installed", "--no-build-isolation", "--disable-pip-version-check", "-q", *args],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def checkout_copy(dest: Path) -> Path:
    """The tracked files of the working tree, as they travel to a machine: no .git, data, caches or builds."""
    ignore = shutil.ignore_patterns(".git", "data", ".cache", "build", "*.egg-info", "__pycache__", "out*",
                                    ".benchmarks")
    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


# ---------------------------------------------------------------------------------------------------
# the tiers: everything under tests/slow/ is the full tier's alone (`pytest -m "not slow"` leaves it out)

SLOW = ROOT / "tests" / "slow"


def pytest_collection_modifyitems(items):
    for item in items:
        if Path(item.fspath).is_relative_to(SLOW):
            item.add_marker(pytest.mark.slow)
