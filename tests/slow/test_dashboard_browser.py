"""fastgpt.dashboard in a real browser: headless Chromium (Debian's `chromium`, which .ci/run installs) driven by
Playwright. The page is opened on an empty folder, a run then trains into it, and without a reload the page
shows its curves and samples, and once idle asks the browser for no animation frames, nor hears of
changes while hidden; an attention map and a streamed generation come from its checkpoint; nothing
is fetched from outside this machine; the server binds 127.0.0.1 and serves none of the run's files."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, SMALL_TRAINER


def chromium() -> str:
    path = os.environ.get("FASTGPT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        if os.environ.get("FASTGPT_REQUIRE_BROWSER"):
            pytest.fail("no chromium on PATH, and FASTGPT_REQUIRE_BROWSER is set (.ci/run installs it)")
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_addresses(port: int) -> set[str]:
    """The local IPv4/IPv6 addresses with a listening TCP socket on `port` (from /proc/net)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if int(hex_port, 16) == port and state == "0A":  # LISTEN
                found.add(address)
    return found


def wait_for(fn, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


# counts the page's requests for animation frames that reach the browser (the dashboard's own head script,
# which runs after this, sits in front of it)
FRAME_COUNTER = """(() => { const request = window.requestAnimationFrame.bind(window); window.fgFrames = 0;
  window.requestAnimationFrame = (callback) => { window.fgFrames++; return request(callback); }; })();"""

# what a browser does to a page it hides or shows again
SHOWN = """Object.defineProperty(document, "visibilityState", {value: "%s", configurable: true});
document.dispatchEvent(new Event("visibilitychange"));"""


def test_the_page_shows_a_run_learning_live_in_chromium(small_corpus, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    browser_path = chromium()
    run = tmp_path / "run"
    run.mkdir()
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen([sys.executable, "-m", "fastgpt.dashboard", str(run), f"--port={port}", "--refresh=0.5"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for(lambda: server.poll() is not None or listening_addresses(port), 90, "the dashboard to listen")
        assert server.poll() is None, server.stdout.read()
        assert listening_addresses(port) <= {"0100007F"}, listening_addresses(port)  # 127.0.0.1 only
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=browser_path, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            outside = []
            page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(
                (f"http://127.0.0.1:{port}", "data:", "blob:")) else None)
            page.add_init_script(FRAME_COUNTER)
            page.goto(url)
            wait_for(lambda: "no metrics.jsonl yet" in page.inner_text("#fg-status"), 60, "the empty folder's message")

            trainer = subprocess.run(
                [sys.executable, "-m", "fastgpt.train", f"--data_file={small_corpus}", f"--data_dir={tmp_path}",
                 f"--out_dir={run}", *SMALL_TRAINER, "--max_iters=20", "--eval_interval=10", "--overwrite"],
                cwd=ROOT, capture_output=True, text=True, timeout=300)
            assert trainer.returncode == 0, trainer.stderr[-2000:]
            # no reload: the page's timer brings the run in
            wait_for(lambda: "iter 20" in page.inner_text("#fg-status"), 60, "the run's last iteration")
            page.wait_for_selector("#fg-loss .vega-embed canvas, #fg-loss .vega-embed svg", timeout=30000)
            page.screenshot(path=str(tmp_path / "curves.png"))
            # watching costs the training nothing while nothing changes: no animation frames are asked for
            time.sleep(3)
            before = page.evaluate("window.fgFrames")
            time.sleep(3)
            assert page.evaluate("window.fgFrames") - before <= 3, "an idle page keeps asking for frames"
            # a tab its browser hides (a background tab) hears nothing until it is shown again
            page.evaluate(SHOWN % "hidden")
            time.sleep(1.5)
            step = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r][-1]
            with open(run / "metrics.jsonl", "a") as f:
                f.write(json.dumps({**step, "iter": 25}) + "\n")
            time.sleep(3)
            assert "iter 25" not in page.inner_text("#fg-status")
            page.evaluate(SHOWN % "visible")
            wait_for(lambda: "iter 25" in page.inner_text("#fg-status"), 15, "the update once the tab is shown")

            page.get_by_role("tab", name="Samples").click()
            page.wait_for_selector(".fg-sample pre", timeout=30000)
            heads = page.locator(".fg-sample-head").all_inner_texts()
            assert [h.split(" ·")[0] for h in heads] == ["iter 20", "iter 10", "iter 0"]
            assert all(len(t) > 20 for t in page.locator(".fg-sample pre").all_inner_texts())

            page.get_by_role("tab", name="Attention").click()
            page.fill("#fg-attn-prompt textarea, #fg-attn-prompt input", "ROMEO")  # block_size is 8
            page.click("#fg-attn-go")
            page.wait_for_selector("#fg-attn-plot img", timeout=60000)
            assert page.inner_text("#fg-attn-message").strip() == ""

            page.get_by_role("tab", name="Generate").click()
            page.fill("#fg-gen-prompt textarea", "JULIET:")
            page.click("#fg-gen-go")
            text = wait_for(lambda: (lambda v: v if len(v) >= len("JULIET:") + 300 else "")(
                page.input_value("#fg-gen-output textarea")), 120, "300 generated characters")  # the default
            assert text.startswith("JULIET:")

            page.fill("#fg-gen-prompt textarea", "")  # a bad input is a message on the page, not a traceback
            page.click("#fg-gen-go")
            wait_for(lambda: "at least one" in page.inner_text("#fg-gen-message"), 30, "the empty prompt's message")
            browser.close()
        assert outside == [], outside  # the page works offline: everything came from the dashboard
        # the run's files are not served, nor anything else on the machine
        for path in (run / "ckpt.pt", run / "metrics.jsonl", Path("/etc/passwd")):
            for route in ("gradio_api/file=", "file="):
                assert status(url + route + str(path)) in (403, 404), (route, path)
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
