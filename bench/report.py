"""One command for a GPU report: the kernel tests run natively, the benchmarks, and time-to-target runs of
the trainer with the kernels and with `--reference`, side by side, written to bench/results/.

    python -m bench.report --data_file=PATH/input.txt

On a CUDA machine (the point of it) this takes a few minutes on an H100; it needs no internet when the
corpus path is given (without one it downloads Tiny Shakespeare first, or stops before any phase if it
cannot). It writes `bench/results/<date>-<device>.json` (every figure and the commands that produced them)
and a `.md` with the tables, rewritten after each phase so that an interrupted report keeps what it
measured. Each phase can be skipped (`--skip_tests`, `--skip_bench`, `--skip_train`) or narrowed
(`--bench_filter=EXPR` is pytest's -k); a call keeps what an earlier report of the same day, device,
versions and commit measured and it does not (phases it skips, benchmarks outside its filter), so a report
can be made a phase, or a few benchmarks, per call. On the CPU it
runs too, as a smoke test of the report itself (the Triton benchmark cases are skipped there).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch
import triton

from bench.common import device_name
from fastgpt.config import UserError, run_main
from fastgpt.data import tiny_shakespeare

ROOT = Path(__file__).resolve().parent.parent
KERNEL_TESTS = ["tests/test_kernels.py", "tests/test_layernorm.py", "tests/test_mlp.py", "tests/test_attention.py"]
# the ahead-of-time compilation tests check sm_90 and sm_80 without a GPU: CI runs them, a GPU has no news
NATIVE_ONLY = "not aot"
PHASES = ("kernel_tests", "benchmarks", "time_to_target")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def run(command: list[str], log) -> tuple[int, float]:
    """Run a command from the repository root, its output going to the log; (exit code, seconds)."""
    print(f"$ {shlex.join(command)}", flush=True)
    started = time.perf_counter()
    code = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    return code, time.perf_counter() - started


# ---------------------------------------------------------------------------------------------------
# phases


def kernel_tests(work: Path, log) -> dict:
    junit = work / "tests.xml"
    command = [sys.executable, "-m", "pytest", *KERNEL_TESTS, "-q", "-p", "no:cacheprovider", "-k", NATIVE_ONLY,
               f"--junitxml={junit}"]
    code, seconds = run(command, log)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    if junit.exists():
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {key: int(suite.get(key, 0)) for key in counts}
        failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
                  if case.find("failure") is not None or case.find("error") is not None]
    return {"command": shlex.join(command[1:]), "exit_code": code, "seconds": seconds,
            "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": counts["failures"] + counts["errors"], "skipped": counts["skipped"], "failures": failed}


def benchmarks(work: Path, log, bench_filter: str | None) -> dict:
    out = work / "bench.json"
    command = [sys.executable, "-m", "pytest", "bench/", "-q", "-p", "no:cacheprovider",
               f"--benchmark-json={out}"] + (["-k", bench_filter] if bench_filter else [])
    code, seconds = run(command, log)
    results = []
    if out.exists():
        for b in json.loads(out.read_text())["benchmarks"]:
            results.append({"name": b["name"], "group": b["fullname"].split("::")[0],
                            "median_ms": b["stats"]["median"] * 1e3, **b["extra_info"]})
    return {"command": shlex.join(command[1:]), "exit_code": code, "seconds": seconds, "results": results}


def time_to_target(work: Path, log, data_file: str, preset: str, target: float, max_iters: int,
                   reference: bool, extra: list[str]) -> dict:
    out_dir = work / ("train-reference" if reference else "train-kernels")
    command = [sys.executable, "-m", "fastgpt.train", f"--preset={preset}", f"--data_file={data_file}",
               f"--out_dir={out_dir}", "--overwrite", f"--target_val_loss={target}", f"--max_iters={max_iters}",
               "--sample_chars=0", *(["--reference"] if reference else []), *extra]
    code, seconds = run(command, log)
    records = []
    metrics = out_dir / "metrics.jsonl"
    if metrics.exists():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    summary = next((r for r in reversed(records) if r.get("summary")), {})
    steps = [r for r in records if "tokens_per_sec" in r]
    evals = [r for r in records if "val_loss" in r]
    shown = [c if not c.startswith("--out_dir=") else "--out_dir=..." for c in command[1:]]
    return {
        "command": shlex.join(shown), "exit_code": code, "process_seconds": seconds,
        "kernels": "reference" if reference else (
            "triton" if summary.get("device", "cuda" if torch.cuda.is_available() else "cpu").startswith("cuda")
            else "auto (the CPU runs the references)"),
        "device": summary.get("device"), "dtype": summary.get("dtype"), "compile": summary.get("compile"),
        "target_val_loss": target,
        "reached_at_iter": summary.get("target_iter"), "iters": summary.get("iter"),
        "train_seconds": summary.get("train_seconds"), "eval_seconds": summary.get("eval_seconds"),
        "compile_seconds": summary.get("compile_seconds"), "best_val_loss": summary.get("best_val_loss"),
        "tokens_per_sec": statistics.median([r["tokens_per_sec"] for r in steps]) if steps else None,
        "ms_per_iter": statistics.median([r["ms_per_iter"] for r in steps]) if steps else None,
        "mfu": statistics.median([r["mfu"] for r in steps if r.get("mfu") is not None] or [float("nan")])
        if steps else None,
        "val_curve": [[r["iter"], r["val_loss"]] for r in evals],
    }


# ---------------------------------------------------------------------------------------------------
# the markdown report


def fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    return f"{value:,.{digits}f}" if isinstance(value, float) else str(value)


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# fastgpt GPU report: {env['device']}, {report['date']}", "",
             f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}, Python {env['python']}; "
             f"fastgpt commit {env['commit']}. " + ("Command: " if len(report["commands"]) == 1 else
                                                     "Made in parts by: ") +
             ", ".join(f"`{c}`" for c in report["commands"]), ""]
    tests = report.get("kernel_tests")
    if tests:
        lines += ["## Kernel tests, native", "", f"`{tests['command']}`: **{tests['passed']} passed, "
                  f"{tests['failed']} failed, {tests['skipped']} skipped** in {tests['seconds']:.0f} s", ""]
        lines += [f"- failed: `{name}`" for name in tests["failures"]] + ([""] if tests["failures"] else [])
    ttt = report.get("time_to_target")
    if ttt:
        lines += [f"## Time to target ({report['preset']})", "",
                  "| kernels | val <= target at iter | training s | compile s | eval s | tokens/s | ms/iter | MFU |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in ttt:
            mfu = f"{r['mfu'] * 100:.1f}%" if r.get("mfu") not in (None,) and r["mfu"] == r["mfu"] else "-"
            lines.append(f"| {r['kernels']} | {fmt(r['reached_at_iter'])} (target {r['target_val_loss']}) | "
                         f"{fmt(r['train_seconds'])} | {fmt(r['compile_seconds'])} | {fmt(r['eval_seconds'])} | "
                         f"{fmt(r['tokens_per_sec'], 0)} | {fmt(r['ms_per_iter'], 2)} | {mfu} |")
        if len(ttt) == 2 and ttt[0]["tokens_per_sec"] and ttt[1]["tokens_per_sec"]:
            lines += ["", f"Training tokens/s, kernels / reference: "
                          f"**{ttt[0]['tokens_per_sec'] / ttt[1]['tokens_per_sec']:.2f}x**"]
        lines += [""] + [f"- `python {r['command']}`" for r in ttt] + [""]
    bench = report.get("benchmarks")
    if bench:
        lines += ["## Benchmarks", "", f"`{bench['command']}` ({bench['seconds']:.0f} s). Wall ms: the median "
                  "call, launch overhead included; GPU ms: the kernels' own time (CUDA events, L2 flushed, "
                  "overhead excluded), from which the kernel figures are computed.", "",
                  "| benchmark | wall ms | GPU ms | figure |", "|---|---|---|---|"]
        for r in bench["results"]:
            figure = next((f"{r[k]:,.1f} {unit}" for k, unit in (("tflops", "TFLOP/s"), ("gb_per_s", "GB/s"),
                                                                    ("tokens_per_sec", "tokens/s")) if k in r), "")
            device_ms = f"{r['device_ms']:.3f}" if r.get("device_ms") is not None else "-"
            lines.append(f"| `{r['name']}` | {r['median_ms']:.3f} | {device_ms} | {figure} |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_file", default="",
                        help="the corpus (Tiny Shakespeare); default: data/tinyshakespeare/input.txt, downloaded "
                             "if missing")
    parser.add_argument("--data_dir", default=str(ROOT / "data"),
                        help="where Tiny Shakespeare is looked for (and downloaded to) without --data_file")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="where the report goes")
    parser.add_argument("--preset", default="shakespeare_char", help="trainer preset of the time-to-target runs")
    parser.add_argument("--target_val_loss", type=float, default=1.47)
    parser.add_argument("--max_iters", type=int, default=5000)
    parser.add_argument("--train_flag", action="append", default=[], help="extra trainer flag (repeatable)")
    parser.add_argument("--bench_filter", default="not float32",
                        help="pytest -k expression for bench/ (default: the bf16 and CPU-relevant cases, to keep "
                             "the report within minutes; '' runs every case)")
    parser.add_argument("--skip_tests", action="store_true")
    parser.add_argument("--skip_bench", action="store_true")
    parser.add_argument("--skip_train", action="store_true")
    args = parser.parse_args(argv)
    # absolute paths: the trainer runs from the repository root, the caller may be anywhere
    data_file = str(Path(args.data_file).resolve()) if args.data_file else ""
    if data_file and not Path(data_file).is_file():
        raise UserError(f"--data_file={args.data_file} is not a file: pass the corpus path")
    if not data_file and not args.skip_train:  # before any phase: an offline machine stops here, not at the end
        data_file = str(tiny_shakespeare(Path(args.data_dir).resolve()))

    started = time.perf_counter()
    date = datetime.date.today().isoformat()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{date}-{slug(device_name())}"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    command = shlex.join(["python", "-m", "bench.report", *(argv if argv is not None else sys.argv[1:])])
    report = {
        "date": date, "preset": args.preset, "commands": [command],
        "environment": {"device": device_name(), "torch": torch.__version__, "triton": triton.__version__,
                        "cuda": torch.version.cuda, "python": platform.python_version(), "commit": commit},
    }
    # A report can be made in parts (a phase, or a few benchmarks, per call, e.g. under a per-command time
    # limit): a call keeps what an earlier report of the same day, device, versions and commit measured and
    # it does not measure again; every phase records the commands that produced it.
    try:
        earlier = json.loads(Path(f"{stem}.json").read_text())
    except (OSError, ValueError):
        earlier = None
    merging = (isinstance(earlier, dict) and earlier.get("environment") == report["environment"]
               and earlier.get("preset") == args.preset)
    if merging:
        report.update({phase: earlier[phase] for phase in PHASES if phase in earlier})
        report["commands"] = earlier.get("commands", []) + [command]

    def save(done: bool) -> None:
        report["seconds"] = time.perf_counter() - started
        # every phase there, and whole (the two time-to-target runs)
        report["complete"] = done and all(phase in report for phase in PHASES) and len(
            report["time_to_target"]) == 2
        Path(f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
        status = "written" if done else "so far, still running"
        Path(f"{stem}.md").write_text(markdown(report) + f"\nReport {status}: {report['seconds']:.0f} s.\n")

    failed = False
    with tempfile.TemporaryDirectory() as tmp, open(f"{stem}.log", "a" if merging else "w") as log:
        work = Path(tmp)
        if not args.skip_tests:
            report["kernel_tests"] = kernel_tests(work, log)
            failed |= report["kernel_tests"]["exit_code"] != 0
            save(done=False)
        if not args.skip_bench:
            bench = benchmarks(work, log, args.bench_filter)
            if merging and "benchmarks" in report:  # the earlier results, with this call's replacing same names
                names = {r["name"] for r in bench["results"]}
                kept = [r for r in report["benchmarks"]["results"] if r["name"] not in names]
                bench = {**bench, "results": kept + bench["results"],
                         "command": f"{report['benchmarks']['command']}; {bench['command']}",
                         "seconds": report["benchmarks"]["seconds"] + bench["seconds"]}
            report["benchmarks"] = bench
            save(done=False)
        if not args.skip_train:
            report["time_to_target"] = []
            for reference in (False, True):
                run = time_to_target(work, log, data_file, args.preset, args.target_val_loss, args.max_iters,
                                     reference, args.train_flag)
                report["time_to_target"].append(run)
                failed |= run["exit_code"] != 0
                save(done=False)
    save(done=True)
    print(f"wrote {stem}.json, {stem}.md and {stem}.log ({report['seconds']:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    run_main(main, "bench.report")
