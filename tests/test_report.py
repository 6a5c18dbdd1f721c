"""`python -m bench.report`, the one-command GPU report, smoke-tested on the CPU with a tiny budget."""

from __future__ import annotations

import json

from conftest import ROOT, run_module


def test_report_writes_json_and_markdown(small_corpus, tmp_path):
    tiny = ["--device=cpu", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4",
            "--eval_iters=2", "--eval_interval=10", f"--data_dir={tmp_path}"]
    # run from elsewhere with a relative corpus path: the trainer, started in the repository, still finds it
    proc = run_module("bench.report", "--skip_tests", "--skip_bench", "--preset=cpu", "--max_iters=20",
                      "--target_val_loss=2.9", f"--data_file={small_corpus.name}", f"--out={tmp_path / 'out'}",
                      *[f"--train_flag={flag}" for flag in tiny], cwd=small_corpus.parent,
                      env={"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    (report_json,) = (tmp_path / "out").glob("*.json")
    report = json.loads(report_json.read_text())
    runs = report["time_to_target"]
    assert [r["kernels"].split()[0] for r in runs] == ["auto", "reference"]
    for r in runs:
        assert r["exit_code"] == 0 and r["iters"] is not None and r["train_seconds"] > 0
        assert r["val_curve"][0][0] == 0 and r["tokens_per_sec"] > 0
        assert r["command"].startswith("-m fastgpt.train --preset=cpu") and r["device"] == "cpu"
    markdown = report_json.with_suffix(".md").read_text()
    assert "## Time to target (cpu)" in markdown and "--reference" in markdown
    assert report["environment"]["torch"] and report["environment"]["triton"]
    assert not report["complete"]  # no kernel tests or benchmarks in it

    # a later call that skips the training keeps it: a report can be made one phase per call
    again = run_module("bench.report", "--skip_tests", "--skip_bench", "--skip_train", "--preset=cpu",
                       f"--out={tmp_path / 'out'}")
    assert again.returncode == 0, again.stderr
    merged = json.loads(report_json.read_text())
    assert merged["time_to_target"] == runs and len(merged["commands"]) == 2
    assert "Made in parts by" in report_json.with_suffix(".md").read_text()


def test_report_rejects_a_missing_corpus(tmp_path):
    proc = run_module("bench.report", f"--data_file={tmp_path / 'nope.txt'}", f"--out={tmp_path}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"bench.report: error: --data_file={tmp_path / 'nope.txt'} is not a file: pass the corpus path"]


def test_report_stops_before_any_phase_when_it_cannot_get_the_corpus(tmp_path):
    """Without --data_file the corpus is fetched first, so an offline machine stops before the tests and
    benchmarks, not after them (here data/tinyshakespeare/input.txt is a directory, which fails the same way)."""
    (tmp_path / "tinyshakespeare" / "input.txt").mkdir(parents=True)
    proc = run_module("bench.report", f"--data_dir={tmp_path}", f"--out={tmp_path / 'out'}")
    assert proc.returncode == 2 and not (tmp_path / "out").exists()
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("bench.report: error: ") and "pass --data_file=PATH" in line


def test_report_made_in_parts_keeps_earlier_benchmarks(tmp_path):
    """Two calls timing cheap CPU benchmarks, the second one of the first's two: the report holds both, once
    each (the second call's result replaces the first's of the same name)."""
    out = f"--out={tmp_path / 'out'}"
    for bench_filter in ("cpu-reference-B4-T256 or cpu-reference-cache", "cpu-reference-cache"):
        proc = run_module("bench.report", "--skip_tests", "--skip_train", f"--bench_filter={bench_filter}", out)
        assert proc.returncode == 0, proc.stderr
    (report_json,) = (tmp_path / "out").glob("*.json")
    bench = json.loads(report_json.read_text())["benchmarks"]
    names = [r["name"] for r in bench["results"]]
    assert sorted(names) == ["test_attention[cpu-reference-B4-T256-causal-fwd+bwd]",
                             "test_sample[cpu-reference-cache]"]
    assert bench["command"].count("pytest bench/") == 2
