"""The GPU report: what a GPU teaches in the minutes it is lent, measured within a time budget.

    python -m bench.report --out=DIR --budget_s=540 --data_file=PATH [--phases=...] [--merge=FILE]

Phases, in the order of what they teach (`--phases` picks some, in this order):
  smoke           one forward and backward of each op and of the whole GPT at the shakespeare_char shapes
                  in bf16: error against the reference and GPU milliseconds (bench/report/smoke.py; a minute at most)
  kernel_tests    the kernel tests run natively (bf16 included), in parallel (pytest-xdist) with a per-test
                  timeout (pytest-timeout), and the CUDA training test
  train_step      the training step (bench/test_train_step.py): Triton kernels and the reference, each under
                  torch.compile's default mode and reduce-overhead (CUDA graphs): tokens/s, MFU, peak memory
  kernel_bench    the kernel benchmarks at the presets' shapes (`--bench_filter`), and sampling
  time_to_target  two trainer runs, on the kernels and with --reference, until val <= --target_val_loss
                  (default 1.47), with cheap evaluation; the time to every --targets value is read off
                  their evaluation records

It never runs past `--budget_s`: each phase and each subprocess gets a timeout from the time left, a phase
cut short is recorded as cut with what it had measured (every subprocess streams its results to disk
as it goes), and a phase there was no time for is recorded as cut without running. DIR receives
`<date>-<device>.json` (every figure, the device, versions and commands), `.md` (the tables) and
`.log` (the subprocesses' output), rewritten as each phase ends. `--merge=FILE` folds in an earlier
report (from any path; same device and versions) so one report is built over several commands. The
compilation caches (Triton's, Inductor's, the linear_gelu tuner's) go under `--cache_dir`, so a second
command on the same machine starts warm. `--device=cpu` runs the same machinery on the CPU (the Triton
phases skipped with their reason, the kernels of the smoke phase in the Triton interpreter), which is how
CI tests it; without `--device`, a machine without CUDA is refused.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.util import find_spec
from pathlib import Path

import torch
import triton

from fastgpt.config import PRESETS

from fastgpt.cli import UserError
from fastgpt.text import tiny_shakespeare

ROOT = Path(__file__).resolve().parents[2]
PHASES = ("smoke", "kernel_tests", "train_step", "kernel_bench", "time_to_target")
# the CUDA-only paths first (seconds each), then the ops' own tests, then the training tests on the kernels
KERNEL_TESTS = ["tests/test_cuda.py", "tests/test_corpus.py::test_host_batches_reach_the_gpu_whole", "tests/kernels",
                "tests/slow/test_convergence.py",
                "tests/test_train.py::test_cuda_trains_compiled_on_the_kernels_in_bf16_and_reports_mfu"]
KERNEL_BENCH = ["bench/test_layer_norm.py", "bench/test_linear_gelu.py", "bench/test_attention.py",
                "bench/test_linear_cross_entropy.py",
                "bench/test_train_step.py::test_sample"]
# the presets' shapes in the run's dtype: (64*256, 384) rows, the (64, 6, 256, 64) attention, sampling
BENCH_FILTER = {"cuda": "(16384x384 or B64-T256 or test_sample) and not float32",
                "cpu": "(16384x384 or B4-T256 or test_sample) and not bfloat16"}
# each phase's share of the budget: a phase may take its weight's part of the time left, over the weights
# of the phases still to run, so what one phase leaves unused goes to the next
SHARES = {"smoke": 1.5, "kernel_tests": 2.0, "train_step": 2.5, "kernel_bench": 1.5, "time_to_target": 2.5}
GRACE_S = 5  # a subprocess gets SIGTERM this long before its time is up (a trainer saves its checkpoint), then SIGKILL
GRACE_SHARE = 0.1  # ... or this share of its time, when that is less: a short phase is not spent waiting
MARGIN_S = 3  # kept for writing the report
MIN_PHASE_S = 5  # a phase is not started with less than this left
PER_TEST_TIMEOUT_S = 300


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or "cpu")


class Budget:
    """The time left of --budget_s, less the margin for writing the report."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds - MARGIN_S

    def left(self) -> float:
        return self.deadline - time.monotonic()


def run(command: list[str], log, timeout: float, env: dict) -> tuple[int | None, float, bool]:
    """Run a command from the repository root in a process group of its own, its output going to the log,
    for at most `timeout` seconds: a grace before that (GRACE_S, or GRACE_SHARE of a short timeout) the
    group gets SIGTERM, at the end SIGKILL.
    Returns (exit code, seconds, cut)."""
    log.write(f"$ {shlex.join(command)}\n")
    log.flush()
    print(f"$ {shlex.join(command)}", flush=True)
    started = time.monotonic()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    cut, grace = False, min(GRACE_S, max(timeout, 0) * GRACE_SHARE)
    try:
        proc.wait(timeout=max(timeout - grace, 0))
    except subprocess.TimeoutExpired:
        cut = True
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                proc.wait()
                break
        log.write(f"[bench.report: cut at its time limit of {timeout:.0f} s]\n")
    return proc.returncode, time.monotonic() - started, cut


def read_lines(path: Path) -> list[dict]:
    """The JSON lines a subprocess streamed (a line cut short by a kill is dropped)."""
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                pass
    return records


def status(code: int | None, cut: bool) -> str:
    return "cut" if cut else "done" if code == 0 else "failed"


class Phases:
    """Runs the phases: each is a method returning its record, given the seconds it may take."""

    def __init__(self, args, work: Path, log, env: dict, data_file: str):
        self.args, self.work, self.log, self.env, self.data_file = args, work, log, env, data_file
        self.cuda = args.device == "cuda"

    def _pytest(self, name: str, targets: list[str], extra: list[str], timeout: float,
                env: dict | None = None) -> tuple[dict, list]:
        stream = self.work / f"{name}.jsonl"
        command = [sys.executable, "-m", "pytest", *targets, "-q", "-p", "no:cacheprovider", "-p", "bench.report.stream",
                   *extra]
        code, seconds, cut = run(command, self.log, timeout, {**self.env, **(env or {}), "FASTGPT_STREAM": str(stream)})
        # pytest's exit code 5: no test matched the selection, which is not a failure of the code
        return ({"status": "done" if code == 5 and not cut else status(code, cut), "exit_code": code,
                 "seconds": seconds, "command": shlex.join(command[1:])}, read_lines(stream))

    def smoke(self, timeout: float) -> dict:
        stream = self.work / "smoke.jsonl"
        command = [sys.executable, "-m", "bench.report.smoke", f"--out={stream}", f"--device={self.args.device}"]
        env = self.env if self.cuda else {**self.env, "TRITON_INTERPRET": "1"}
        code, seconds, cut = run(command, self.log, timeout, env)
        return {"status": status(code, cut), "exit_code": code, "seconds": seconds,
                "command": shlex.join(command[1:]).replace(str(stream), "FILE"), "results": read_lines(stream)}

    def kernel_tests(self, timeout: float) -> dict:
        if not self.cuda:
            return {"status": "skipped", "reason": "natively the kernel tests need CUDA; on the CPU `pytest` runs "
                                                   "them in the Triton interpreter (CI does)"}
        extra = ["-k", "not aot"]  # ahead-of-time compilation needs no GPU: CI runs it
        if find_spec("xdist"):
            # a file per worker: no two workers compile the same specialisations or tune the same shapes
            extra += ["-n", str(max(1, min(4, (os.cpu_count() or 2) // 4))), "--dist", "loadfile"]
        if find_spec("pytest_timeout"):
            extra += [f"--timeout={min(PER_TEST_TIMEOUT_S, max(30, timeout / 2)):.0f}"]
        # tunings chosen while other workers share the GPU are noise: kept apart from the timed phases'
        env = {"FASTGPT_CACHE_DIR": str(self.work / "kernel-tests-tuning")}
        record, lines = self._pytest("kernel_tests", KERNEL_TESTS, extra, timeout, env)
        tests = [r for r in lines if r.get("kind") == "test"]
        counts = {outcome: sum(r["outcome"] == outcome for r in tests) for outcome in ("passed", "failed", "skipped")}
        failures = [{"test": r["nodeid"], "message": r["message"]} for r in tests if r["outcome"] == "failed"]
        return {**record, **counts, "failures": failures}

    def train_step(self, timeout: float) -> dict:
        # one case may not take the phase: each compiles cold (the reduce-overhead ones too: Inductor keys a
        # graph by its config, triton.cudagraphs included, so they miss the default cases' cache entries)
        extra = [f"--timeout={max(30, timeout * 0.4):.0f}"] if find_spec("pytest_timeout") else []
        record, lines = self._pytest("train_step", ["bench/test_train_step.py::test_train_step"], extra, timeout)
        return {**record, "results": [r for r in lines if r.get("kind") == "benchmark"],
                "skipped": [r for r in lines if r.get("kind") == "test" and r["outcome"] == "skipped"]}

    def kernel_bench(self, timeout: float) -> dict:
        expression = self.args.bench_filter if self.args.bench_filter is not None else BENCH_FILTER[self.args.device]
        record, lines = self._pytest("kernel_bench", KERNEL_BENCH, ["-k", expression] if expression else [], timeout)
        return {**record, "filter": expression, "results": [r for r in lines if r.get("kind") == "benchmark"]}

    def time_to_target(self, timeout: float) -> dict:
        runs, started = [], time.monotonic()
        for reference in (False, True):
            left = timeout - (time.monotonic() - started)
            # the kernels' run may take half of the phase; the reference's run gets whatever is left
            runs.append(self._train(reference, left / 2 if not reference else left))
        states = [r["status"] for r in runs]
        return {"status": "failed" if "failed" in states else "cut" if "cut" in states else "done",
                "seconds": time.monotonic() - started, "runs": runs}

    def _train(self, reference: bool, timeout: float) -> dict:
        args = self.args
        out_dir = self.work / ("train-reference" if reference else "train-kernels")
        command = [sys.executable, "-m", "fastgpt.train", f"--preset={args.preset}", f"--data_file={self.data_file}",
                   f"--out_dir={out_dir}", "--overwrite", f"--target_val_loss={args.target_val_loss}",
                   f"--max_iters={args.max_iters}", f"--eval_iters={args.eval_iters}", "--sample_chars=0",
                   "--save_checkpoints=False",
                   f"--device={args.device}", *(["--reference"] if reference else []), *args.train_flag]
        if timeout < MIN_PHASE_S:
            code, seconds, cut = None, 0.0, True
        else:
            code, seconds, cut = run(command, self.log, timeout, self.env)
        shown = [c if not c.startswith("--out_dir=") else "--out_dir=DIR" for c in command[1:]]
        return {"status": status(code, cut), "exit_code": code, "process_seconds": seconds,
                "command": shlex.join(shown), "kernels": "reference" if reference else "triton" if self.cuda
                else "auto (the CPU runs the references)", **summarise_run(out_dir / "metrics.jsonl", args.targets)}


def summarise_run(metrics: Path, targets: list[float]) -> dict:
    """A trainer run's figures from its metrics.jsonl, whole or cut short: the val curve with the training
    seconds before each evaluation, the time to each target, the steps' median speed and the summary."""
    records = read_lines(metrics)
    summary = next((r for r in reversed(records) if r.get("summary")), {})
    steps = [r for r in records if "tokens_per_sec" in r]
    evals = [r for r in records if "val_loss" in r]
    mfus = [r["mfu"] for r in steps if r.get("mfu") is not None]
    reached = {}
    for target in targets:
        first = next((r for r in evals if r["val_loss"] <= target), None)
        reached[str(target)] = None if first is None else {"iter": first["iter"], "train_seconds": first["train_seconds"]}
    return {
        "device": summary.get("device"), "dtype": summary.get("dtype"), "compile": summary.get("compile"),
        "iters": summary.get("iter", evals[-1]["iter"] if evals else None), "stopped_by": summary.get("stopped_by"),
        "train_seconds": summary.get("train_seconds"), "eval_seconds": summary.get("eval_seconds"),
        "compile_seconds": summary.get("compile_seconds"),
        "best_val_loss": min((r["val_loss"] for r in evals), default=None), "reached": reached,
        "tokens_per_sec": statistics.median([r["tokens_per_sec"] for r in steps]) if steps else None,
        "ms_per_iter": statistics.median([r["ms_per_iter"] for r in steps]) if steps else None,
        "mfu": statistics.median(mfus) if mfus else None,
        "val_curve": [[r["iter"], round(r.get("train_seconds", 0.0), 2), r["val_loss"]] for r in evals],
    }


# ---------------------------------------------------------------------------------------------------
# merging and writing


def merge_phase(name: str, earlier: dict | None, now: dict) -> dict:
    """A phase measured now over the same phase of an earlier report: benchmarks are merged by name (this
    call's replacing the earlier one's), everything else is this call's."""
    if not earlier or name not in ("train_step", "kernel_bench") or now.get("status") == "skipped":
        return now
    names = {r["name"] for r in now.get("results", [])}
    kept = [r for r in earlier.get("results", []) if r["name"] not in names]
    return {**now, "results": kept + now.get("results", []),
            "command": f"{earlier.get('command', '')}; {now.get('command', '')}".strip("; ")}


def load_merge(path: str, environment: dict) -> dict:
    try:
        earlier = json.loads(Path(path).read_bytes())
    except OSError as e:
        raise UserError(f"--merge={path}: cannot read it ({e.strerror}): pass the .json a report wrote") from None
    except (ValueError, RecursionError):
        earlier = None
    if not isinstance(earlier, dict) or not isinstance(earlier.get("phases"), dict) or not isinstance(
            earlier.get("environment"), dict) or not isinstance(earlier.get("commands"), list):
        raise UserError(f"--merge={path} is not a bench.report JSON: pass the .json a report wrote")
    theirs = earlier.get("environment", {})
    for key in ("device", "torch", "triton", "cuda"):
        if theirs.get(key) != environment[key]:
            raise UserError(f"--merge={path} was measured with {key} {theirs.get(key)!r} and this call has "
                            f"{environment[key]!r}: merge only reports of one machine and software")
    return earlier


def complete(report: dict) -> bool:
    """Every phase there and whole (done, or skipped for a stated reason)."""
    return all(report["phases"].get(p, {}).get("status") in ("done", "skipped") for p in PHASES)


def write(report: dict, stem: Path) -> None:
    from bench.report.markdown import markdown

    report["complete"] = complete(report)
    for suffix, text in ((".json", json.dumps(report, indent=1) + "\n"), (".md", markdown(report))):
        tmp = stem.with_name(stem.name + suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, stem.with_name(stem.name + suffix))


# ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the directory the report is written to")
    parser.add_argument("--budget_s", type=float, required=True, help="seconds this call may take, all included")
    parser.add_argument("--data_file", default="", help="the corpus; default: Tiny Shakespeare in --data_dir, "
                                                        "downloaded if missing (before any phase)")
    parser.add_argument("--data_dir", default=str(ROOT / "data"))
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {', '.join(PHASES)}")
    parser.add_argument("--merge", default="", help="an earlier report's .json to fold into this one")
    parser.add_argument("--force", action="store_true", help="replace a report of the same name in --out "
                                                              "(without --merge of it)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="cuda (the default where there is one) or cpu (to test the machinery)")
    parser.add_argument("--cache_dir", default=str(ROOT / ".cache" / "report"),
                        help="Triton's, Inductor's and the tuner's caches (kept between commands)")
    parser.add_argument("--preset", default=None, help="trainer preset of time_to_target (default: "
                                                       "shakespeare_char on CUDA, cpu on the CPU)")
    parser.add_argument("--target_val_loss", type=float, default=1.47, help="time_to_target stops here")
    parser.add_argument("--targets", default="1.55,1.5", help="val losses whose training time is reported")
    parser.add_argument("--max_iters", type=int, default=5000)
    parser.add_argument("--eval_iters", type=int, default=50, help="batches per evaluation in time_to_target")
    parser.add_argument("--train_flag", action="append", default=[], help="extra trainer flag (repeatable)")
    parser.add_argument("--bench_filter", default=None, help="pytest -k for kernel_bench ('' = every case; "
                                                             "default: the presets' shapes in the run's dtype)")
    args = parser.parse_args(argv)
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in args.phases if p not in PHASES]
    if unknown or not args.phases:
        raise UserError(f"--phases takes some of {', '.join(PHASES)}, got {', '.join(unknown) or 'none'}")
    try:
        args.targets = sorted({float(t) for t in args.targets.split(",") if t.strip()} | {args.target_val_loss},
                              reverse=True)
    except ValueError:
        raise UserError(f"--targets takes comma-separated val losses, got {args.targets!r}") from None
    bad = [t for t in args.targets if not 0 < t < float("inf")]
    if bad:
        raise UserError(f"--targets and --target_val_loss must be finite val losses above 0, got "
                        f"{', '.join(f'{t:g}' for t in bad)}")
    if args.max_iters < 1 or args.eval_iters < 1:
        raise UserError(f"--max_iters and --eval_iters must be >= 1, got {args.max_iters} and {args.eval_iters}")
    if args.preset is not None and args.preset not in PRESETS:
        raise UserError(f"unknown --preset={args.preset}: choose one of {', '.join(PRESETS)}")
    if not (0 < args.budget_s < 7 * 86400):
        raise UserError(f"--budget_s must be a number of seconds above 0 (and below a week), got {args.budget_s:g}")
    if args.device is None:
        if not torch.cuda.is_available():
            raise UserError("no CUDA GPU here, and the report measures one: pass --device=cpu to run its "
                            "machinery on the CPU")
        args.device = "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device=cuda, but torch sees no CUDA GPU here: run on a GPU machine or pass --device=cpu")
    args.preset = args.preset or ("shakespeare_char" if args.device == "cuda" else "cpu")
    return args


def corpus(args) -> str:
    """The corpus' absolute path (the trainer runs from the repository root), fetched before any phase so
    an offline machine stops here, not after the tests and benchmarks."""
    if args.data_file:
        if not Path(args.data_file).is_file():
            raise UserError(f"--data_file={args.data_file} is not a file: pass the corpus path")
        return str(Path(args.data_file).resolve())
    if "time_to_target" not in args.phases:
        return ""
    return str(tiny_shakespeare(Path(args.data_dir).resolve()))


SOURCES = ("fastgpt", "kernels", "bench", "tests")


def source_digest() -> str:
    """A digest of the sources that decide the figures (the packages' and tests' .py files and
    pyproject.toml), the same with or without git: the checkout that travels to a GPU machine may have no
    .git, or the machine no git."""
    digest = hashlib.sha256()
    paths = [p for top in SOURCES for p in sorted((ROOT / top).rglob("*.py"))] + [ROOT / "pyproject.toml"]
    for path in paths:
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def git_commit() -> str | None:
    """The checkout's commit (with "+changes" when the tracked files differ from it), or None without git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=30)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0 or not head.stdout.strip():
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def environment(device: str) -> dict:
    return {"device": device_name(device), "torch": torch.__version__, "triton": triton.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version(), "commit": git_commit(),
            "sources": source_digest()}


def kernels_digest() -> str:
    """A digest of the op files' source. Inductor's and AOTAutograd's caches key a graph by its forward,
    not by a custom op's autograd code: after a fix to a kernel's backward (the GPU workflow: run, fix,
    run again) they could serve the graph that calls the old one, so their directory is per digest."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "kernels").glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def subprocess_env(args) -> dict:
    cache = Path(args.cache_dir).resolve()
    inductor = cache / f"inductor-{kernels_digest()}"
    # a report run from a pytest-xdist worker (its own tests) must not hand the worker's variables on:
    # pytest-benchmark reads PYTEST_XDIST_WORKER as "parallel" and disables every benchmark
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}
    env = {**inherited, "TRITON_CACHE_DIR": str(cache / "triton"), "TORCHINDUCTOR_CACHE_DIR": str(inductor),
           # Inductor's compiled graphs and AOTAutograd's joint graphs, reused by a later process
           "TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1",
           "FASTGPT_CACHE_DIR": str(cache / "fastgpt"), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # --device=cpu means the CPU in every subprocess, GPU or not
    return env


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    env_info = environment(args.device)
    earlier = load_merge(args.merge, env_info) if args.merge else None
    data_file = corpus(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = [p for p in PHASES if p in args.phases]
    # a call of some phases names them, so that two calls of one day, a second for what the first left, differ
    stem = out / "-".join([datetime.date.today().isoformat(), slug(env_info["device"]),
                           *(chosen if len(chosen) < len(PHASES) else [])])
    merging_itself = bool(args.merge) and Path(args.merge).resolve() == stem.with_suffix(".json").resolve()
    if stem.with_suffix(".json").exists() and not (merging_itself or args.force):
        raise UserError(f"{stem}.json exists: fold this call into it with --merge={stem}.json, write to another "
                        f"--out, or pass --force to replace it")
    command = shlex.join(["python", "-m", "bench.report", *(argv if argv is not None else sys.argv[1:])])
    report = {"environment": env_info, "preset": args.preset, "targets": args.targets,
              "commands": (earlier or {}).get("commands", []) + [command],
              "phases": dict((earlier or {}).get("phases", {}))}
    earlier_log = Path(args.merge).with_suffix(".log") if args.merge else None
    earlier_text = earlier_log.read_text() if earlier_log is not None and earlier_log.is_file() else ""
    failed = False
    with tempfile.TemporaryDirectory(prefix="fastgpt-report-") as tmp, open(f"{stem}.log", "w") as log:
        log.write(earlier_text)  # read first: the earlier report may be this one's own file
        log.write(f"# call {len(report['commands'])}: {command}\n")
        log.flush()
        phases = Phases(args, Path(tmp), log, subprocess_env(args), data_file)
        write(report, stem)
        todo = [p for p in PHASES if p in args.phases]
        for name in list(todo):
            share = budget.left() * SHARES[name] / sum(SHARES[p] for p in todo)
            todo.remove(name)
            if share < MIN_PHASE_S:
                result = {"status": "cut", "ran": False, "reason": f"no time left in --budget_s={args.budget_s:g}"}
            else:
                result = getattr(phases, name)(share) | {"share_s": round(share)}
            result |= {"commit": env_info["commit"], "sources": env_info["sources"], "call": len(report["commands"])}
            report["phases"][name] = merge_phase(name, report["phases"].get(name), result)
            failed |= result["status"] == "failed"
            print(f"bench.report: {name}: {result['status']} ({result.get('seconds', 0):.0f} s)", flush=True)
            write(report, stem)
    print(f"wrote {stem}.json, .md and .log; complete: {report['complete']}")
    return 1 if failed else 0

