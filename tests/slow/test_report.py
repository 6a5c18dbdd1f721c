"""`python -m bench.report`, the GPU report, run on the CPU (`--device=cpu`: every subprocess is kept off
any GPU, so these tests mean the same on a GPU machine): its phases, the time budget, results streamed as
they are measured, reports made over several commands, and its one-line refusals."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, checkout_copy, fresh_venv, pip_install, run_module, tiny_flags

TINY = tiny_flags(device=None, n_layer=1, eval_iters=None, sample_chars=None, log_interval=None, eval_interval=10)


def report_json(out: Path) -> tuple[Path, dict]:
    (path,) = out.glob("*.json")
    return path, json.loads(path.read_text())


def test_time_to_target_reads_the_time_to_every_target_off_the_runs(small_corpus, tmp_path):
    # run from elsewhere with a relative corpus path: the trainer, started in the repository, still finds it
    proc = run_module("bench.report", "--device=cpu", "--phases=time_to_target", "--budget_s=200", "--max_iters=30",
                      "--target_val_loss=2.9", "--targets=3.5", "--eval_iters=2", f"--data_file={small_corpus.name}",
                      f"--out={tmp_path / 'out'}", f"--cache_dir={tmp_path / 'cache'}",
                      *[f"--train_flag={flag}" for flag in TINY], cwd=small_corpus.parent, env={"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    path, report = report_json(tmp_path / "out")
    assert report["targets"] == [3.5, 2.9] and not report["complete"]  # the other phases are missing
    phase = report["phases"]["time_to_target"]
    assert phase["status"] == "done" and [r["kernels"].split()[0] for r in phase["runs"]] == ["auto", "reference"]
    for r in phase["runs"]:
        assert r["status"] == "done" and r["device"] == "cpu" and "--eval_iters=2 --sample_chars=0" in r["command"]
        curve = r["val_curve"]
        assert curve[0][:2] == [0, 0.0] and [c[1] for c in curve] == sorted(c[1] for c in curve)
        # the time to a target is the training time before the first evaluation at or below it
        first = next(c for c in curve if c[2] <= 3.5)
        assert r["reached"]["3.5"] == {"iter": first[0], "train_seconds": pytest.approx(first[1], abs=0.01)}
        assert r["reached"]["2.9"] is None or r["reached"]["2.9"]["iter"] == r["iters"]
        assert r["tokens_per_sec"] > 0
    markdown = path.with_suffix(".md").read_text()
    assert "## Time to target (cpu)" in markdown and "| to 3.5 | to 2.9 |" in markdown
    assert "--reference" in markdown and path.with_suffix(".log").read_text().count("$ ") == 2


def test_a_report_made_over_several_commands_keeps_every_phase(tmp_path):
    """Two calls, the second into another directory with --merge: the report has both calls' phases, its
    benchmarks merged by name (the second call's replacing the first's), and both logs."""
    first, second = tmp_path / "first", tmp_path / "second"
    common = ["--device=cpu", "--budget_s=300", f"--cache_dir={tmp_path / 'cache'}"]
    proc = run_module("bench.report", *common, "--phases=kernel_bench",
                      "--bench_filter=cpu-reference-B4-T256 or cpu-reference-cache", f"--out={first}")
    assert proc.returncode == 0, proc.stderr
    path, report = report_json(first)
    proc = run_module("bench.report", *common, "--phases=kernel_bench,smoke", "--bench_filter=cpu-reference-cache",
                      f"--merge={path}", f"--out={second}")
    assert proc.returncode == 0, proc.stderr
    merged_path, merged = report_json(second)
    bench = merged["phases"]["kernel_bench"]
    assert sorted(r["name"] for r in bench["results"]) == ["test_attention[cpu-reference-B4-T256-causal-fwd+bwd]",
                                                          "test_sample[cpu-reference-cache]"]
    assert bench["command"].count("pytest bench/") == 2 and len(merged["commands"]) == 2
    assert [r["name"] for r in merged["phases"]["smoke"]["results"]] == [
        "gpt", "layer_norm", "add_layer_norm", "linear_gelu", "causal_attention", "linear_cross_entropy"]
    assert all(r["ok"] for r in merged["phases"]["smoke"]["results"])
    assert merged_path.with_suffix(".log").read_text().startswith(path.with_suffix(".log").read_text())
    assert "Made by:" in merged_path.with_suffix(".md").read_text()

    # a report of another machine or software is not folded in
    other = json.loads(path.read_text())
    other["environment"]["device"] = "NVIDIA H200"
    (tmp_path / "other.json").write_text(json.dumps(other))
    proc = run_module("bench.report", *common, "--phases=smoke", f"--merge={tmp_path / 'other.json'}",
                      f"--out={tmp_path / 'third'}")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "was measured with device 'NVIDIA H200'" in proc.stderr


def test_a_report_merged_into_its_own_file_keeps_its_log(tmp_path):
    out = tmp_path / "out"
    common = ["--device=cpu", "--budget_s=60", f"--out={out}", f"--cache_dir={tmp_path / 'cache'}",
              "--phases=kernel_tests"]
    assert run_module("bench.report", *common).returncode == 0
    path, _ = report_json(out)
    before = path.read_bytes()
    refused = run_module("bench.report", *common)  # the same name again, neither merged nor forced
    assert refused.returncode == 2 and "exists: fold this call into it with --merge=" in refused.stderr
    assert path.read_bytes() == before
    assert run_module("bench.report", *common, f"--merge={path}").returncode == 0
    _, report = report_json(out)
    log = path.with_suffix(".log").read_text()
    assert len(report["commands"]) == 2 and log.count("# call ") == 2 and log.index("# call 1:") < log.index("# call 2:")


def gpu_machine_stand_in(tmp_path: Path, corpus: Path) -> tuple[Path, str, dict]:
    """What a GPU machine gets: a copy of the checkout with only the corpus added under data/ (no .git),
    installed offline as the README says, and a PATH without git (every other command kept)."""
    src = checkout_copy(tmp_path / "checkout")
    (src / "data" / "tinyshakespeare").mkdir(parents=True)
    shutil.copy(corpus, src / "data" / "tinyshakespeare" / "input.txt")
    exe = fresh_venv(tmp_path / "venv")
    pip_install(exe, "-e", str(src))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for directory in os.environ["PATH"].split(os.pathsep):
        for tool in Path(directory).glob("*") if Path(directory).is_dir() else []:
            if tool.name != "git" and not (bin_dir / tool.name).exists():
                (bin_dir / tool.name).symlink_to(tool)
    env = {**os.environ, "PATH": str(bin_dir)}
    assert shutil.which("git", path=env["PATH"]) is None
    return src, exe, env


def report_command(exe: str, tmp_path: Path, budget_s: int) -> list[str]:
    return [exe, "-m", "bench.report", "--device=cpu", f"--budget_s={budget_s}", f"--out={tmp_path / 'out'}",
            f"--cache_dir={tmp_path / 'cache'}", "--max_iters=100000", "--train_flag=--eval_interval=50",
            # a target no run reaches: the small corpus stands in for Tiny Shakespeare and is learnt fast
            "--target_val_loss=0.001", "--data_file=data/tinyshakespeare/input.txt"]


def test_the_budget_holds_from_a_fresh_checkout_without_git(tmp_path, small_corpus):
    """Every phase asked for in 40 seconds, which cannot hold them all (the trainer alone would run for
    minutes), from a copy of the checkout with no git: the report ends within a few seconds of the budget,
    each phase took at most its share, every phase is recorded (those cut short with what they measured,
    those never started as cut), and the sources are identified by their digest."""
    src, exe, env = gpu_machine_stand_in(tmp_path, small_corpus)
    started = time.monotonic()
    proc = subprocess.run(report_command(exe, tmp_path, 40), cwd=src, env=env, capture_output=True, text=True)
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert 30 < seconds < 46, seconds
    _, report = report_json(tmp_path / "out")
    assert report["environment"]["commit"] is None and len(report["environment"]["sources"]) == 16
    phases = report["phases"]
    assert list(phases) == ["smoke", "kernel_tests", "train_step", "kernel_bench", "time_to_target"]
    assert phases["kernel_tests"]["status"] == "skipped" and "need CUDA" in phases["kernel_tests"]["reason"]
    assert phases["time_to_target"]["status"] == "cut" and not report["complete"]
    for phase in phases.values():
        assert phase["status"] in ("done", "skipped", "cut")
        assert phase.get("seconds", 0) <= phase.get("share_s", 40) + 2


def test_a_report_killed_at_any_moment_leaves_a_readable_report(tmp_path, small_corpus):
    src, exe, env = gpu_machine_stand_in(tmp_path, small_corpus)
    json_path = None
    for delay in (0.0, 2.0, 6.0, 11.0):
        proc = subprocess.Popen(report_command(exe, tmp_path, 60), cwd=src, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while not list((tmp_path / "out").glob("*.json")) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        json_path, report = report_json(tmp_path / "out")
        assert set(report) >= {"environment", "phases", "commands"} and report["complete"] is False
        assert json_path.with_suffix(".md").read_text().startswith("# fastgpt GPU report")
        shutil.rmtree(tmp_path / "out")
    assert json_path is not None


def test_a_pytest_phase_cut_at_its_limit_keeps_the_results_it_had(tmp_path):
    """The tests stream their results as they are decided: killed at the time limit, the phase keeps them."""
    from bench.report import Phases

    tests = tmp_path / "test_slow.py"
    tests.write_text("import time\n\ndef test_quick():\n    pass\n\ndef test_fails():\n    assert 1 == 2\n\n"
                     "def test_hangs():\n    time.sleep(600)\n")
    with open(tmp_path / "log", "w") as log:
        phases = Phases(argparse.Namespace(device="cpu"), tmp_path, log,
                        {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, "")
        started = time.monotonic()
        record, lines = phases._pytest("t", [str(tests)], [], timeout=12)
    assert time.monotonic() - started < 20
    assert record["status"] == "cut"
    assert [(r["nodeid"].split("::")[1], r["outcome"]) for r in lines] == [("test_quick", "passed"),
                                                                          ("test_fails", "failed")]
    assert "assert 1 == 2" in lines[1]["message"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_the_report_needs_device_cpu(tmp_path):
    proc = run_module("bench.report", "--budget_s=60", f"--out={tmp_path}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "bench.report: error: no CUDA GPU here, and the report measures one: pass --device=cpu to run its machinery "
        "on the CPU"]


def test_report_rejects_a_missing_corpus(tmp_path):
    proc = run_module("bench.report", "--device=cpu", "--budget_s=60", f"--data_file={tmp_path / 'nope.txt'}",
                      f"--out={tmp_path}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"bench.report: error: --data_file={tmp_path / 'nope.txt'} is not a file: pass the corpus path"]


def test_report_stops_before_any_phase_when_it_cannot_get_the_corpus(tmp_path):
    """Without --data_file the corpus is fetched first, so an offline machine stops before the tests and
    benchmarks, not after them (here data/tinyshakespeare/input.txt is a directory, which fails the same way)."""
    (tmp_path / "tinyshakespeare" / "input.txt").mkdir(parents=True)
    proc = run_module("bench.report", "--device=cpu", "--budget_s=60", f"--data_dir={tmp_path}",
                      f"--out={tmp_path / 'out'}")
    assert proc.returncode == 2 and not (tmp_path / "out").exists()
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("bench.report: error: ") and "pass --data_file=PATH" in line


@pytest.mark.parametrize("flags, message", [
    (["--phases=smoke,typo"], "--phases takes some of smoke, kernel_tests, train_step, kernel_bench, "
                              "time_to_target, got typo"),
    (["--budget_s=0"], "--budget_s must be a number of seconds above 0 (and below a week), got 0"),
    (["--budget_s=nan"], "--budget_s must be a number of seconds above 0 (and below a week), got nan"),
    (["--targets=1.5,x"], "--targets takes comma-separated val losses, got '1.5,x'"),
    (["--targets=nan"], "--targets and --target_val_loss must be finite val losses above 0, got nan"),
    (["--target_val_loss=inf"], "--targets and --target_val_loss must be finite val losses above 0, got inf"),
    (["--max_iters=-1"], "--max_iters and --eval_iters must be >= 1, got -1 and 50"),
    (["--eval_iters=0"], "--max_iters and --eval_iters must be >= 1, got 5000 and 0"),
    (["--preset=nope"], "unknown --preset=nope: choose one of shakespeare_char, cpu, finetune"),
    (["--merge=/etc/passwd"], "--merge=/etc/passwd is not a bench.report JSON: pass the .json a report wrote"),
])
def test_bad_flags_are_one_line(tmp_path, flags, message):
    proc = run_module("bench.report", "--device=cpu", "--budget_s=60", f"--out={tmp_path}", *flags)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"bench.report: error: {message}"]


def test_smoke_records_a_case_that_raises_and_runs_the_rest(tmp_path, monkeypatch, capsys):
    from bench.report import smoke

    cases = smoke.op_cases

    def broken(shape, device):
        ops = cases(shape, device)
        triton_fn, *rest = ops["layer_norm"]
        ops["layer_norm"] = (lambda *a: (_ for _ in ()).throw(RuntimeError("kernel exploded")), *rest)
        return {name: ops[name] for name in ("layer_norm", "add_layer_norm")}

    monkeypatch.setattr(smoke, "op_cases", broken)
    monkeypatch.setattr(smoke, "model_case", lambda *a: {"name": "gpt", "ok": True})
    out = tmp_path / "smoke.jsonl"
    assert smoke.main([f"--out={out}", "--device=cpu"]) == 1
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["name"], r["ok"]) for r in lines] == [("gpt", True), ("layer_norm", False), ("add_layer_norm", True)]
    assert lines[1]["error"] == "RuntimeError: kernel exploded" and "Traceback" in lines[1]["traceback"]
    assert "smoke layer_norm: FAILED" in capsys.readouterr().out


def test_smoke_needs_the_interpreter_on_the_cpu(tmp_path):
    proc = run_module("bench.report.smoke", f"--out={tmp_path / 's.jsonl'}", "--device=cpu", env={"TRITON_INTERPRET": "0"})
    assert proc.returncode == 2 and "set TRITON_INTERPRET=1" in proc.stderr


def test_inductor_caches_are_kept_per_version_of_the_kernels(tmp_path, monkeypatch):
    """A changed op file (a fixed backward, say) gets a fresh Inductor cache: its cache keys a graph by the
    forward and would serve one that calls the old backward; Triton's own cache keys each kernel's source."""
    from bench import report

    kernels = tmp_path / "kernels"
    kernels.mkdir()
    (kernels / "op.py").write_text("def backward(): return 1\n")
    monkeypatch.setattr(report, "ROOT", tmp_path)
    args = argparse.Namespace(cache_dir=str(tmp_path / "cache"), device="cpu")
    first = report.subprocess_env(args)
    (kernels / "op.py").write_text("def backward(): return 2\n")
    second = report.subprocess_env(args)
    assert first["TORCHINDUCTOR_CACHE_DIR"] != second["TORCHINDUCTOR_CACHE_DIR"]
    assert first["TRITON_CACHE_DIR"] == second["TRITON_CACHE_DIR"] == str(tmp_path / "cache" / "triton")
    assert second["CUDA_VISIBLE_DEVICES"] == "" and second["FASTGPT_CACHE_DIR"] == str(tmp_path / "cache" / "fastgpt")
