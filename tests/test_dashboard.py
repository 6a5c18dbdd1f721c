"""fastgpt.dashboard without a browser: which folders it reads and how, what each tab shows (as data), that
a request reaches no path it was not given, damaged folders as messages, and the trainer's per-evaluation
samples it shows. The page itself, in Chromium: tests/slow/test_dashboard_browser.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import SMALL_TRAINER
from fastgpt import dashboard, train
from fastgpt.checkpoint import load_checkpoint, model_from_checkpoint, read_tokenizer
from fastgpt.cli import UserError
from fastgpt.dashboard import Folder, Models, folders_of, label_folders
from fastgpt.sample import complete
from fastgpt.tokenizer import default_prompt


def evals(out_dir):
    return [r for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]


def test_the_trainer_keeps_a_sample_per_evaluation_from_one_prompt_and_seed(trained):
    """Each evaluation record holds --eval_sample tokens from the tokenizer's default prompt and the run's seed:
    the last one is what that checkpoint samples (the same generator)."""
    records = evals(trained)
    assert [r["iter"] for r in records] == [0, 5, 10]
    assert all(isinstance(r["sample"], str) and r["sample"] for r in records)
    model, tokenizer = model_from_checkpoint(load_checkpoint(trained / "ckpt.pt"), trained / "ckpt.pt")
    prompt = default_prompt(tokenizer)
    (text,) = complete(model, tokenizer, prompt, 100, 1337)
    assert records[-1]["sample"] == text[len(prompt):]


def test_no_samples_with_eval_sample_0(small_corpus, tmp_path):
    out = tmp_path / "run"
    assert train.main([*SMALL_TRAINER, f"--data_file={small_corpus}", f"--data_dir={tmp_path}", f"--out_dir={out}",
                       "--max_iters=5", "--eval_interval=5", "--eval_sample=0"]) == 0
    assert all("sample" not in r for r in evals(out))


def test_folders_runs_and_compare_folders(trained, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    compare = tmp_path / "cmp"
    for name in ("gpt", "bigram", "blocks"):  # listed in the lecture's order, whatever the file system's
        (compare / name).mkdir(parents=True)
    folders, compares = folders_of([str(trained), str(empty), str(compare)])
    assert [f.path for f in folders] == [trained.resolve(), empty.resolve()] + [
        (compare / n).resolve() for n in ("bigram", "blocks", "gpt")]
    assert compares == [compare.resolve()]
    label_folders(folders)
    assert [f.label for f in folders][2:] == ["bigram", "blocks", "gpt"]
    assert "compare.md is written when" in dashboard.compare_markdown(compares)
    (compare / "compare.md").write_text("| model | val loss |\n|---|---|\n| gpt | 1.77 |\n")
    text = dashboard.compare_markdown(compares)
    assert "| gpt | 1.77 |" in text and "Why `blocks` and `gpt` may coincide" in text
    with pytest.raises(UserError, match="is not a folder"):
        folders_of([str(tmp_path / "missing")])


def test_labels_are_the_settings_runs_differ_in(small_corpus, tmp_path):
    common = [*SMALL_TRAINER, f"--data_file={small_corpus}", f"--data_dir={tmp_path}", "--max_iters=2",
              "--eval_interval=2", "--eval_sample=0"]
    for seed in (1, 2):
        assert train.main([*common, f"--out_dir={tmp_path / f's{seed}'}", f"--seed={seed}"]) == 0
    folders, _ = folders_of([str(tmp_path / "s1"), str(tmp_path / "s2")])
    label_folders(folders)
    assert [f.label for f in folders] == ["seed=1", "seed=2"]


def test_damaged_and_unfinished_folders_say_so(tmp_path):
    empty, garbage, half = tmp_path / "empty", tmp_path / "garbage", tmp_path / "half"
    for d in (empty, garbage, half):
        d.mkdir()
    (garbage / "metrics.jsonl").write_bytes(b"\xff\xfe not json\n{\"iter\": \"x\"}\n[1, 2]\n")
    (garbage / "ckpt.pt").write_bytes(b"not a checkpoint")
    (half / "metrics.jsonl").write_text('{"iter": 10, "loss": 2.5, "tokens_per_sec": 100.0}\n{"iter": 20, "lo')
    folders = [Folder(empty, "empty"), Folder(garbage, "garbage"), Folder(half, "half")]
    assert "no metrics.jsonl yet" in folders[0].status()
    assert "no readable record yet" in folders[1].status()
    assert folders[2].status().startswith("**half**: iter 10") and "100 tokens/s" in folders[2].status()
    loss, timed, speed, mfu = dashboard.curves(folders)
    assert list(loss["iteration"]) == [10] and len(timed) == len(mfu) == 0 and list(speed["tokens/s"]) == [100.0]
    assert folders[1].config() == {}  # the damaged ckpt.pt: settings left out, not a traceback
    models = Models(folders, torch.device("cpu"))
    with pytest.raises(UserError, match="no ckpt.pt yet"):
        models.get(0, "ckpt.pt")
    with pytest.raises(UserError, match="garbage"):
        models.get(1, "ckpt.pt")
    html_text = dashboard.samples_html(folders, {})
    assert html_text.count("No samples yet") == 3


def test_curves_and_samples_of_a_run(trained):
    folders, _ = folders_of([str(trained)])
    label_folders(folders)
    loss, timed, speed, _ = dashboard.curves(folders)
    assert set(loss["series"]) == {f"{folders[0].label} · train", f"{folders[0].label} · val"}
    assert list(timed["val loss"]) == [r["val_loss"] for r in evals(trained)]
    text = dashboard.samples_html(folders, {0: "<b>ROMEO</b>"})
    assert text.index("iter 10") < text.index("iter 5") < text.index("iter 0")  # newest first
    assert "&lt;b&gt;ROMEO&lt;/b&gt;" in text and "<b>ROMEO</b>" not in text


def test_a_sample_is_shown_as_text_never_as_markup(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    record = {"iter": 0, "train_loss": 1.0, "val_loss": 1.0, "sample": "<script>alert(1)</script><img src=x onerror=y>"}
    (run / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    text = dashboard.samples_html([Folder(run, "run")], {})
    assert "<script>" not in text and "<img" not in text and "&lt;script&gt;" in text


def test_requests_name_runs_and_checkpoint_kinds_never_paths(trained, tmp_path):
    (tmp_path / "secret.pt").write_bytes(b"")
    models = Models(folders_of([str(trained)])[0], torch.device("cpu"))
    for run, which in ((1, "ckpt.pt"), (-1, "ckpt.pt"), ("0", "ckpt.pt"), (0, "../secret.pt"),
                       (0, str(tmp_path / "secret.pt")), (0, "metrics.jsonl")):
        with pytest.raises(UserError):
            models.get(run, which)
    model, tokenizer = models.get(0, "best.pt")
    assert models.get(0, "best.pt")[0] is model  # cached while the file is unchanged


def test_streamed_generation_is_the_sampler_s_text(trained):
    """The generation box streams the prompt and each new token; the whole is what fastgpt.sample gives for
    the same seed, temperature and top-k."""
    models = Models(folders_of([str(trained)])[0], torch.device("cpu"))
    steps = list(dashboard.stream_text(models, 0, "ckpt.pt", "ab", 12, 0.8, 5, 7))
    assert len(steps) == 12 and all(b.startswith(a) for a, b in zip(steps, steps[1:]))
    model, tokenizer = models.get(0, "ckpt.pt")
    assert steps[-1] == complete(model, tokenizer, "ab", 12, 7, temperature=0.8, top_k=5)[0]
    for bad, message in ((dict(max_new_tokens=0), "between 1 and"), (dict(temperature=0.0), "above 0"),
                         (dict(prompt=""), "at least one"), (dict(prompt="a" * 100), "longer than")):
        args = dict(prompt="ab", max_new_tokens=5, temperature=0.8) | bad
        with pytest.raises(UserError, match=message):
            list(dashboard.stream_text(models, 0, "ckpt.pt", args["prompt"], args["max_new_tokens"],
                                       args["temperature"], 0, 1))


def test_attention_of_one_head_or_all(trained):
    pytest.importorskip("matplotlib")
    models = Models(folders_of([str(trained)])[0], torch.device("cpu"))
    assert len(dashboard.attention_plot(models, 0, "ckpt.pt", "abc", "0", "1").axes) == 1
    assert len(dashboard.attention_plot(models, 0, "ckpt.pt", "abc", "all", "all").axes) == 1 * 2  # 1 layer x 2 heads
    with pytest.raises(UserError, match="attention layer"):
        dashboard.attention_plot(models, 0, "ckpt.pt", "abc", "3", "0")
    with pytest.raises(UserError, match="head"):
        dashboard.attention_plot(models, 0, "ckpt.pt", "abc", "0", "9")


def test_settings_mark_what_differs(trained, tmp_path):
    folders, _ = folders_of([str(trained)])
    header, rows = dashboard.settings_rows(folders)
    assert header[0] == "setting" and any(r[0] == "seed" and r[1] == "1337" for r in rows)


@pytest.mark.parametrize("argv, message", [
    (["--port=0"], "--port must be between 1 and 65535"),
    (["--refresh=0"], "--refresh must be between"),
    (["--device=tpu"], "--device must be"),
    (["--colour=red"], "colour"),
])
def test_bad_flags_are_one_line(trained, cli, argv, message):
    result = cli("fastgpt.dashboard", str(trained), *argv)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_a_missing_folder_is_one_line(tmp_path, cli):
    result = cli("fastgpt.dashboard", str(tmp_path / "nope"))
    assert result.returncode == 2 and "is not a folder" in result.stderr and "Traceback" not in result.stderr


def test_without_gradio_the_extra_is_named(trained, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_gradio(name, *args, **kwargs):
        if name == "gradio":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gradio)
    with pytest.raises(UserError, match=r'pip install -e "\.\[dashboard\]"'):
        dashboard.main([str(trained)])


def asgi_response(app, method="GET") -> tuple[dict, bytes]:
    """What an ASGI app sends for one request: the start message and the whole body."""
    import asyncio

    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app({"type": "http", "method": method, "path": "/", "headers": []}, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def page_app(content_type: bytes, chunks: list[bytes]):
    async def app(scope, receive, send):
        size = str(sum(map(len, chunks))).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", content_type), (b"content-length", size)]})
        for i, chunk in enumerate(chunks):
            await send({"type": "http.response.body", "body": chunk, "more_body": i < len(chunks) - 1})
    return app


def test_the_page_s_html_gets_the_script_ahead_of_its_own():
    page = [b"<!doctype html><html><head><meta charset='utf-8'><title>x</title>",
            b"<script>first()</script></head><body><script>later()</script></body></html>"]
    start, body = asgi_response(dashboard.HeadScript(page_app(b"text/html; charset=utf-8", page), "ours()"))
    assert body == page[0] + b"<script>ours()</script>" + page[1]  # across the chunks, before the first script
    assert dict(start["headers"])[b"content-length"] == str(len(body)).encode()
    for content_type, chunks in ((b"application/json", [b'{"a": "<head><script>"}']),
                                 (b"text/event-stream", [b"data: <head><script>\n\n", b"data: 2\n\n"])):
        assert asgi_response(dashboard.HeadScript(page_app(content_type, chunks), "ours()"))[1] == b"".join(chunks)
    assert asgi_response(dashboard.HeadScript(page_app(b"text/html", page), "ours()"), "POST")[1] == b"".join(page)


def test_the_idle_frames_script_names_a_file_of_the_installed_front_end():
    """IDLE_FRAMES_JS recognises the status tracker's frame requests by the name of the front end's file that
    makes them: a Gradio release that renames it, or stops asking for frames there, fails here."""
    import re

    gradio = pytest.importorskip("gradio")
    pattern = re.search(r"const tracker = /(.+?)/,", dashboard.IDLE_FRAMES_JS).group(1)
    assets = Path(gradio.__file__).parent / "templates" / "frontend" / "assets"
    trackers = [p for p in assets.glob("*.js") if re.search(pattern, p.name)]
    assert trackers and all("requestAnimationFrame" in p.read_text() for p in trackers), pattern


def test_a_tab_hears_only_of_what_changed(trained, tmp_path):
    gr = pytest.importorskip("gradio")
    folders, _ = folders_of([str(trained)])
    label_folders(folders)
    live = dashboard.Live(gr, folders, [], Models(folders, torch.device("cpu")))

    def skipped(value):
        return isinstance(value, dict) and value == gr.skip()

    seen = {}
    status, *parts = live.update(seen, True)  # a tab's first look: everything
    parts = dict(zip(dashboard.PARTS, parts))
    assert "iter 10" in status and not any(map(skipped, parts.values()))
    assert "iter 10" in parts["samples"] and parts["settings"]["data"]
    assert list(parts["timed"]["val loss"]) == [r["val_loss"] for r in evals(trained)]
    assert live.update(seen) is None  # nothing new: nothing sent
    with open(trained / "metrics.jsonl", "a") as f:  # a new evaluation: at once, and only what it changes
        f.write(json.dumps({**evals(trained)[-1], "iter": 15, "sample": "new"}) + "\n")
    status, *parts = live.update(seen)
    parts = dict(zip(dashboard.PARTS, parts))
    assert "iter 15" in status and "new" in parts["samples"] and 15 in list(parts["loss"]["iteration"])
    assert [p for p, v in parts.items() if not skipped(v)] == ["loss", "timed", "samples"]
    assert live.update(seen) is None
    assert not any(map(skipped, live.update({}, True)))  # another tab, opened now, gets everything


def test_a_hidden_tab_hears_nothing_until_it_is_shown_and_a_closed_one_ends(trained, monkeypatch):
    import asyncio
    from types import SimpleNamespace

    gr = pytest.importorskip("gradio")
    folders, _ = folders_of([str(trained)])
    label_folders(folders)
    live = dashboard.Live(gr, folders, [], Models(folders, torch.device("cpu")), refresh=0.01)
    tab, other = SimpleNamespace(session_hash="tab"), SimpleNamespace(session_hash="other")

    async def watch():
        stream, others = live.stream()(tab), live.stream()(other)
        assert "iter 10" in (await anext(stream))[0] and "iter 10" in (await anext(others))[0]
        live.shown("hidden", tab)
        with open(trained / "metrics.jsonl", "a") as f:
            f.write(json.dumps({**evals(trained)[-1], "iter": 15}) + "\n")
        assert "iter 15" in (await asyncio.wait_for(anext(others), 5))[0]  # a shown tab hears of it
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(pending := asyncio.ensure_future(anext(stream))), 0.5)
        live.shown("visible", tab)
        assert "iter 15" in (await asyncio.wait_for(pending, 5))[0]  # and it hears at once when shown
        live.closing()(tab)  # Gradio's unload: the tab was closed, its stream ends
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(anext(stream), 5)
        monkeypatch.setattr(dashboard, "KEEPALIVE_S", 0.05)  # nothing new for a while: an empty update
        assert all(u == gr.skip() for u in await asyncio.wait_for(anext(others), 5))
        await others.aclose()
        assert live.watching == live.hidden == live.closed == set()

    asyncio.run(watch())


def test_a_look_that_fails_is_a_message_and_the_next_starts_afresh(trained, monkeypatch):
    gr = pytest.importorskip("gradio")
    folders, _ = folders_of([str(trained)])
    live = dashboard.Live(gr, folders, [], Models(folders, torch.device("cpu")))
    seen = {}
    assert live.look(seen, True) is not None and live.look(seen) is None
    real = live.parts
    monkeypatch.setattr(live, "parts", lambda *a: (_ for _ in ()).throw(OSError("gone")))
    status, *parts = live.look(seen)
    assert "could not read the runs (OSError: gone)" in status and all(p == gr.skip() for p in parts)
    assert live.look(seen) is None  # said once
    monkeypatch.setattr(live, "parts", real)
    status, *parts = live.look(seen)  # readable again: everything redrawn
    assert "iter 10" in status and not any(isinstance(p, dict) and p == gr.skip() for p in parts)


def test_the_samples_prompt_comes_from_the_tokenizer_alone(trained, tmp_path, monkeypatch):
    gr = pytest.importorskip("gradio")
    folders, _ = folders_of([str(trained)])
    models = Models(folders, torch.device("cpu"))
    monkeypatch.setattr(models, "get", lambda *a: pytest.fail("a whole model loaded for the samples' prompt"))
    live = dashboard.Live(gr, folders, [], models)
    tokenizer = model_from_checkpoint(load_checkpoint(trained / "ckpt.pt"), trained / "ckpt.pt")[1]
    assert live.run_prompt(0) == default_prompt(tokenizer)
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "ckpt.pt").write_bytes((trained / "ckpt.pt").read_bytes()[:1000])
    assert dashboard.Live(gr, folders_of([str(damaged)])[0], [], models).run_prompt(0) == ""
    with pytest.raises(UserError, match="not a readable fastgpt checkpoint"):
        read_tokenizer(damaged / "ckpt.pt")
