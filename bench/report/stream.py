"""A pytest plugin that writes each result as it happens: `pytest -p bench.report.stream` with FASTGPT_STREAM=FILE.

pytest's junit XML and pytest-benchmark's JSON are written when the session ends, so a run killed at a
time limit leaves neither. This plugin appends one JSON line per test to FILE as soon as the test is
decided: {"kind": "test", "nodeid", "outcome" (passed, failed, skipped), "seconds", "message"} and, for a
test that used pytest-benchmark's fixture, {"kind": "benchmark", "name", "group", "median_ms", ...its
extra_info}. Lines are flushed one by one, so whatever was decided before a kill is on disk. Under
pytest-xdist the test lines come from the controller (one writer); benchmarks are not run under xdist.
"""

from __future__ import annotations

import json
import os

import pytest


def _write(record: dict) -> None:
    path = os.environ.get("FASTGPT_STREAM")
    if not path:
        return
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()


def _message(report) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])
    text = str(report.longrepr or "")
    # the assertion or exception line, not the whole traceback
    errors = [line[2:].strip() for line in text.splitlines() if line.startswith("E ")]
    return (" | ".join(errors[:3]) or text.strip().splitlines()[-1] if text.strip() else "")[:600]


_worker = False


def pytest_configure(config) -> None:
    global _worker
    _worker = hasattr(config, "workerinput")  # an xdist worker: its controller writes the test lines


def pytest_runtest_logreport(report) -> None:
    """One line per test: at its call, or at a setup that failed or skipped it, or at a failed teardown."""
    if _worker:
        return
    decided = report.when == "call" or (report.when == "setup" and not report.passed) or (
        report.when == "teardown" and report.failed)
    if decided:
        _write({"kind": "test", "nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                "seconds": round(report.duration, 3), "message": _message(report) if not report.passed else ""})


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    yield
    if call.when != "call":
        return
    fixture = getattr(item, "funcargs", {}).get("benchmark")
    stats = getattr(getattr(fixture, "stats", None), "stats", None)
    if stats is None:
        return
    _write({"kind": "benchmark", "name": item.name, "group": item.nodeid.split("::")[0],
            "median_ms": stats.median * 1e3, "rounds": stats.rounds, **fixture.extra_info})
