"""What watching costs: a training run's speed alone and with the dashboard open in browser tabs, side by side.

    python -m bench.dashboard_overhead --data_file=PATH [--tabs=4] [--hidden=0] [--rounds=3] [--max_iters=1000]
        [--out=FILE.json]

Each round trains the cpu preset (`--max_iters`, one evaluation sample per evaluation as by default) three
ways, one after the other on the same machine: alone; alone with no evaluation samples (`--eval_sample=0`,
what the samples cost); and with `python -m fastgpt.dashboard` serving the run while `--tabs` headless
Chromium tabs (`--chromium`, else Debian's `chromium`; opened through its DevTools endpoint and left
alone, as a person's browser would be) watch it from before its first step, the page looking at the run
every `--refresh` seconds (the dashboard's default, 2); `--hidden` of them are background tabs (headless
Chromium shows every tab, so these are told they are hidden, as a browser tells a background tab). The
figures: the median ms/iter of the run's log lines, its training seconds over all its steps (the summary's
train_seconds: every step, evaluation excluded), its evaluation seconds, and the whole process' wall time;
each round is printed, then the medians."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = ("alone", "no samples", "watched")
SETTLE_S = 10


def train(out_dir: Path, args, extra: list[str]) -> dict:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fastgpt.train", "--preset=cpu", f"--max_iters={args.max_iters}",
                           f"--data_file={args.data_file}", f"--out_dir={out_dir}", "--sample_chars=0",
                           "--overwrite", *extra], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode:
        raise SystemExit(f"training failed:\n{proc.stderr[-2000:]}")
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    ms = [r["ms_per_iter"] for r in records if "ms_per_iter" in r][1:]  # the first interval holds warm-up
    summary = next(r for r in records if r.get("summary"))
    return {"ms_per_iter": statistics.median(ms), "train_s": summary["train_seconds"],
            "eval_s": summary["eval_seconds"], "wall_s": wall}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except (OSError, urllib.error.URLError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


# what a browser tells a page when it hides it (a background tab, a minimised window); headless Chromium
# shows every tab, so the background tabs are told so
HIDE = """Object.defineProperty(document, "visibilityState", {value: "hidden", configurable: true});
document.dispatchEvent(new Event("visibilitychange"));"""


def hide_tabs(devtools: int, n: int) -> None:
    """Tell `n` of the browser's tabs they are hidden, through its DevTools endpoint (Playwright connects,
    says it, and leaves: the tabs stay open and undriven)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.connect_over_cdp(f"http://127.0.0.1:{devtools}")
        pages = [page for context in browser.contexts for page in context.pages]
        if len(pages) < n:
            raise SystemExit(f"{len(pages)} tabs open, {n} to hide")
        for page in pages[:n]:
            page.evaluate(HIDE)
        browser.close()
    with urllib.request.urlopen(f"http://127.0.0.1:{devtools}/json/list", timeout=30) as r:
        if sum(t.get("type") == "page" for t in json.load(r)) < n:
            raise SystemExit("the hidden tabs closed when Playwright left")


def watched(out_dir: Path, args) -> dict:
    """The run trained while the dashboard serves it to `args.tabs` tabs of one headless Chromium, which
    is driven by nothing (the tabs are opened through its DevTools HTTP endpoint and left alone, as a
    person's browser would be: no automation driver receiving every event)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.jsonl", "ckpt.pt", "best.pt"):
        (out_dir / name).unlink(missing_ok=True)
    port, devtools = free_port(), free_port()
    server = subprocess.Popen([sys.executable, "-m", "fastgpt.dashboard", str(out_dir), f"--port={port}",
                               f"--refresh={args.refresh}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    profile = tempfile.mkdtemp()
    browser = None
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_http(url, 120)
        if args.tabs:
            browser = subprocess.Popen([args.chromium, "--headless=new", "--no-sandbox", "--no-first-run",
                                        f"--remote-debugging-port={devtools}", f"--user-data-dir={profile}", url],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
            wait_http(f"http://127.0.0.1:{devtools}/json/version", 60)
            for _ in range(args.tabs - 1):
                request = urllib.request.Request(f"http://127.0.0.1:{devtools}/json/new?{url}", method="PUT")
                urllib.request.urlopen(request, timeout=30).close()
        time.sleep(SETTLE_S)  # the pages' first render done: what is measured is watching, not loading
        if args.hidden:
            hide_tabs(devtools, args.hidden)
        return train(out_dir, args, [])
    finally:
        if browser is not None:  # Chromium's own processes with it
            os.killpg(browser.pid, signal.SIGTERM)
            browser.wait(timeout=30)
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.dashboard_overhead", description=__doc__.splitlines()[0])
    p.add_argument("--data_file", required=True)
    p.add_argument("--tabs", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max_iters", type=int, default=1000)
    p.add_argument("--refresh", type=float, default=2.0, help="the dashboard's --refresh")
    p.add_argument("--hidden", type=int, default=0, help="of the tabs, how many are background tabs")
    p.add_argument("--only", choices=CASES, help="run this case alone (each round)")
    p.add_argument("--chromium", default=shutil.which("chromium") or "")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    if not args.chromium:
        p.error("no chromium found: pass --chromium=PATH (Debian: apt-get install chromium)")
    if args.tabs < 0 or args.rounds < 1 or args.max_iters < 20 or not 0 <= args.hidden <= args.tabs:
        p.error("--tabs must be >= 0, --rounds >= 1, --max_iters >= 20, --hidden between 0 and --tabs")
    if args.out and os.path.exists(args.out):
        p.error(f"--out={args.out} exists: choose another file")
    results: dict[str, list[dict]] = {case: [] for case in CASES}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            cases = [args.only] if args.only else CASES
            for case in cases:
                results[case].append(train(Path(tmp) / "alone", args, []) if case == "alone" else
                                     train(Path(tmp) / "plain", args, ["--eval_sample=0"]) if case == "no samples"
                                     else watched(Path(tmp) / "watched", args))
            print(f"round {round_ + 1}: " + ", ".join(
                f"{c} {results[c][-1]['ms_per_iter']:.1f} ms/iter, training {results[c][-1]['train_s']:.1f} s, "
                f"evaluation {results[c][-1]['eval_s']:.1f} s, process {results[c][-1]['wall_s']:.1f} s"
                for c in cases), flush=True)
    if args.only:
        return 0
    keys = ("ms_per_iter", "train_s", "eval_s", "wall_s")
    medians = {c: {k: statistics.median(r[k] for r in results[c]) for k in keys} for c in CASES}
    print(f"\ncpu preset, {args.max_iters} iterations, {args.tabs} tab(s) ({args.hidden} hidden), {args.rounds} "
          f"round(s), medians:")
    print("| run | ms/iter | training (all steps) | vs alone | evaluation | whole process | vs alone |\n"
          "|---|---|---|---|---|---|---|")
    alone = medians["alone"]
    for c in CASES:
        m = medians[c]
        print(f"| {c} | {m['ms_per_iter']:.1f} | {m['train_s']:.1f} s | {m['train_s'] / alone['train_s']:.3f}x "
              f"| {m['eval_s']:.1f} s | {m['wall_s']:.1f} s | {m['wall_s'] / alone['wall_s']:.3f}x |")
    if args.out:
        with open(args.out, "x") as f:
            json.dump({"args": vars(args), "rounds": results, "medians": medians}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
