"""Watch runs learn: `python -m fastgpt.dashboard RUN_DIR [RUN_DIR ...] [--port=7860] [--host=127.0.0.1]`.

A local web page, live while the runs train (new evaluations appear without a reload), with for each run:
  - its loss curves (train and val against iteration, val against training seconds), tokens/s and MFU,
    runs overlaid and labelled by the settings they differ in (as `fastgpt.plot` labels them);
  - the samples the trainer keeps at each evaluation (`--eval_sample`, on by default): the same prompt and
    seed every time, so the text turns from noise into Shakespeare iteration by iteration;
  - attention maps of a prompt you type, per layer and head, from the latest or the best checkpoint;
  - a generation box (prompt, temperature, top-k, seed), the tokens streamed as they are sampled;
  - its settings. A `fastgpt.compare` folder shows the lecture's six models side by side.
It is built on Gradio, whose front end ships inside its Python package: the page needs no network (the
`dashboard` extra: pip install -e ".[dashboard]"). It binds 127.0.0.1 unless --host says otherwise, reads
only the folders it was given (a request names a run by its number and a checkpoint by its kind, never by a
path), loads checkpoints as the rest of fastgpt does (weights_only, validated), and a folder that is empty,
half-written or damaged shows a message in place of its data. The models run on --device (the CPU by
default, leaving a GPU to the training).
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastgpt.checkpoint import load_checkpoint, model_from_checkpoint, read_tokenizer
from fastgpt.cli import UserError, parse_command, run_main
from fastgpt.compare import COINCIDE
from fastgpt.model import MODELS
from fastgpt.plot import LEGEND_FIELDS, Run, label_runs, parse_metrics, train_config
from fastgpt.tokenizer import check_prompt, default_prompt

EXTRA = "dashboard"
CHECKPOINTS = {"latest (ckpt.pt)": "ckpt.pt", "best val (best.pt)": "best.pt"}
SAMPLES_SHOWN = 40  # evaluations per run on the samples tab, newest first
MAX_NEW_TOKENS = 2000
MODELS_KEPT = 2  # loaded models kept for the attention and generation tabs
NICENESS = 10  # the dashboard's scheduling priority below the training it watches
KEEPALIVE_S = 60.0  # a tab that heard nothing for this long is sent an empty update (Gradio ends a closed tab's)
CHART_SECONDS = 10.0  # a tab's charts are redrawn at most this often between evaluations
MAX_POINTS = 500  # points per series on a chart: longer series are thinned evenly (the last point kept)


@dataclass
class DashboardConfig:
    port: int = 7860  # the page's port
    host: str = "127.0.0.1"  # the address it binds: 127.0.0.1 is this machine only; 0.0.0.0 every network
    refresh: float = 2.0  # seconds between looks at the run folders (a tab hears only of changes)
    device: str = "cpu"  # where the attention and generation tabs run the model
    open_browser: bool = False  # open the page in this machine's browser


def require_gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # it would call home, and the page is offline
    try:
        import gradio
    except ImportError:
        raise UserError(f'the dashboard needs the gradio package: pip install -e ".[{EXTRA}]"') from None
    return gradio


# ---------------------------------------------------------------------------------------------------
# the folders: what the page shows, read on demand and cached by each file's size and time


@dataclass
class Folder:
    """One run folder given on the command line (or one model's folder inside a compare folder)."""

    path: Path
    label: str = ""
    _metrics: tuple = field(default=(None, [], []), repr=False)  # (signature, steps, evals)
    _config: tuple = field(default=(None, {}), repr=False)

    def signature(self, name: str) -> tuple | None:
        try:
            st = (self.path / name).stat()
        except OSError:
            return None
        return st.st_size, st.st_mtime_ns

    def records(self) -> tuple[list[dict], list[dict]]:
        """(log-interval records, evaluation records) of metrics.jsonl, re-read only when it changed."""
        sig = self.signature("metrics.jsonl")
        if sig != self._metrics[0]:
            try:
                text = (self.path / "metrics.jsonl").read_bytes().decode("utf-8", errors="replace")
            except OSError:
                text = ""
            self._metrics = (sig, *parse_metrics(text))
        return self._metrics[1], self._metrics[2]

    def config(self) -> dict:
        """The train config of its ckpt.pt ({} without one)."""
        sig = self.signature("ckpt.pt")
        if sig != self._config[0]:
            self._config = (sig, train_config(self.path))
        return self._config[1]

    def status(self) -> str:
        """One line: where the run is, or why nothing can be shown yet."""
        if not self.path.is_dir():
            return f"**{self.label}**: {self.path} is not a folder (any more)"
        steps, evals = self.records()
        if not (self.path / "metrics.jsonl").is_file():
            return f"**{self.label}**: no metrics.jsonl yet: waiting for the run's first record"
        if not steps and not evals:
            return f"**{self.label}**: metrics.jsonl has no readable record yet"
        last = max((r["iter"] for r in steps + evals), default=0)
        parts = [f"**{self.label}**: iter {last:,}"]
        if evals:
            parts.append(f"val loss {evals[-1]['val_loss']:.4f} (iter {evals[-1]['iter']:,})")
        if steps and isinstance(steps[-1].get("tokens_per_sec"), (int, float)):
            parts.append(f"{steps[-1]['tokens_per_sec']:,.0f} tokens/s")
        if steps and isinstance(steps[-1].get("mfu"), (int, float)):
            parts.append(f"MFU {100 * steps[-1]['mfu']:.1f}%")
        sig = self.signature("metrics.jsonl")
        if sig:  # the wall-clock time of the last record: the line changes only when the run does
            parts.append(f"last record {time.strftime('%H:%M:%S', time.localtime(sig[1] / 1e9))}")
        return ", ".join(parts)


def folders_of(dirs: list[str]) -> tuple[list[Folder], list[Path]]:
    """The run folders of the command line's directories, and the compare folders among them: a
    directory that holds a run (metrics.jsonl or ckpt.pt), or is empty (a run about to start), is one;
    a `fastgpt.compare` folder (subfolders named after the lecture's models) gives its models in order."""
    folders, compares = [], []
    for d in dirs:
        path = Path(d).resolve()
        if not path.is_dir():
            raise UserError(f"{d} is not a folder: pass the --out_dir of a fastgpt.train run (or of fastgpt.compare)")
        models = [path / m for m in MODELS if (path / m).is_dir()]
        if models and not (path / "metrics.jsonl").exists() and not (path / "ckpt.pt").exists():
            compares.append(path)
            folders += [Folder(m, m.name) for m in models]
        else:
            folders.append(Folder(path))
    if not folders:
        raise UserError("pass one or more run folders (see --help)")
    return folders, compares


def label_folders(folders: list[Folder]) -> None:
    """Each folder's label: what tells the runs apart (fastgpt.plot's legend rule), else its name."""
    runs = [Run(f.path, config=f.config()) for f in folders]
    label_runs(runs)
    seen: dict[str, int] = {}
    for f, r in zip(folders, runs):
        label = f.label or r.label or f.path.name
        seen[label] = seen.get(label, 0) + 1
        f.label = label if seen[label] == 1 else f"{label} ({seen[label]})"


# ---------------------------------------------------------------------------------------------------
# what each tab shows, as plain data (tested without a browser)


def thinned(records: list[dict]) -> list[dict]:
    """At most MAX_POINTS of the records, evenly spaced, the first and last kept."""
    if len(records) <= MAX_POINTS:
        return records
    step = (len(records) - 1) / (MAX_POINTS - 1)
    return [records[round(i * step)] for i in range(MAX_POINTS)]


def curves(folders: list[Folder]):
    """Four pandas DataFrames for the charts: loss against iteration (train and val), val loss against
    training seconds, tokens/s and MFU (%) against iteration; each row names its series ("run · val")."""
    import pandas as pd

    loss, timed, speed, mfu = [], [], [], []
    for f in folders:
        steps, evals = (thinned(records) for records in f.records())
        for r in steps:
            loss.append({"iteration": r["iter"], "loss": r["loss"], "series": f"{f.label} · train"})
            if isinstance(r.get("tokens_per_sec"), (int, float)):
                speed.append({"iteration": r["iter"], "tokens/s": r["tokens_per_sec"], "series": f.label})
            if isinstance(r.get("mfu"), (int, float)):
                mfu.append({"iteration": r["iter"], "MFU %": 100 * r["mfu"], "series": f.label})
        for r in evals:
            loss.append({"iteration": r["iter"], "loss": r["val_loss"], "series": f"{f.label} · val"})
            if isinstance(r.get("train_seconds"), (int, float)):
                timed.append({"training seconds": r["train_seconds"], "val loss": r["val_loss"], "series": f.label})

    def frame(rows, columns):
        return pd.DataFrame(rows, columns=columns)

    return (frame(loss, ["iteration", "loss", "series"]), frame(timed, ["training seconds", "val loss", "series"]),
            frame(speed, ["iteration", "tokens/s", "series"]), frame(mfu, ["iteration", "MFU %", "series"]))


def samples_html(folders: list[Folder], prompts: dict[int, str]) -> str:
    """Each run's evaluation samples, newest first, side by side; all text escaped (a sample is the
    model's output, and the model may have learnt to write markup)."""
    columns = []
    for i, f in enumerate(folders):
        _, evals = f.records()
        kept = [r for r in evals if isinstance(r.get("sample"), str)][-SAMPLES_SHOWN:]
        prompt = html.escape(prompts.get(i, ""))
        if kept:
            items = "".join(
                f"<div class='fg-sample'><div class='fg-sample-head'>iter {r['iter']:,} · val loss "
                f"{r['val_loss']:.3f}</div><pre><b>{prompt}</b>{html.escape(r['sample'])}</pre></div>"
                for r in reversed(kept))
        else:
            items = ("<p>No samples yet: the trainer keeps one at each evaluation (<code>--eval_sample</code>, on by "
                     "default; runs from before it have none).</p>")
        columns.append(f"<div class='fg-run'><h3>{html.escape(f.label)}</h3>{items}</div>")
    return f"<div class='fg-samples'>{''.join(columns)}</div>"


def settings_rows(folders: list[Folder]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the runs' settings: the legend's fields first, then the rest, those that differ
    marked with a bullet."""
    configs = [f.config() for f in folders]
    names = [n for n in LEGEND_FIELDS if any(n in c for c in configs)]
    names += sorted({n for c in configs for n in c} - set(names))
    rows = []
    for n in names:
        values = [repr(c[n]) if n in c else "" for c in configs]
        rows.append([("• " if len(set(values)) > 1 else "") + n, *values])
    return ["setting", *[f.label for f in folders]], rows


COINCIDE_NOTE = f"**Why `blocks` and `gpt` may coincide:** {COINCIDE}."


def compare_markdown(compares: list[Path]) -> str:
    parts = []
    for path in compares:
        table = path / "compare.md"
        try:
            text = table.read_text(encoding="utf-8", errors="replace") if table.is_file() else ""
        except OSError:
            text = ""
        parts.append(f"### {path.name}\n\n" + (text or "_compare.md is written when the six runs are done._"))
    return "\n\n".join(parts + [COINCIDE_NOTE]) if parts else ""


class Models:
    """The checkpoints' models for the attention and generation tabs: loaded on first use (validated,
    weights_only), reloaded when the file changes, at most MODELS_KEPT held. Only the names in
    CHECKPOINTS are ever opened, inside the folders given."""

    def __init__(self, folders: list[Folder], device: torch.device):
        self.folders, self.device = folders, device
        self.cache: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    def get(self, run: int, which: str):
        """(model, tokenizer) or a UserError saying why not."""
        if not isinstance(run, int) or not 0 <= run < len(self.folders):
            raise UserError("choose one of the runs listed")
        if which not in CHECKPOINTS.values():
            raise UserError(f"choose a checkpoint: {', '.join(CHECKPOINTS)}")
        folder = self.folders[run]
        path = folder.path / which
        sig = folder.signature(which)
        if sig is None:
            raise UserError(f"{folder.label} has no {which} yet: a run writes it at its first evaluation")
        with self.lock:
            key = (run, which)
            if key in self.cache and self.cache[key][0] == sig:
                self.cache.move_to_end(key)
                return self.cache[key][1]
            model, tokenizer = model_from_checkpoint(load_checkpoint(path), path)
            entry = (model.to(self.device).eval(), tokenizer)
            self.cache[key] = (sig, entry)
            while len(self.cache) > MODELS_KEPT:
                self.cache.popitem(last=False)
            return entry


def prompt_ids(tokenizer, prompt: str, block_size: int) -> list[int]:
    if not prompt:
        raise UserError("type a prompt of at least one character")
    check_prompt(tokenizer, prompt)
    ids = tokenizer.encode(prompt).tolist()
    if not ids:
        raise UserError("type a prompt of at least one token")
    if len(ids) > block_size:
        raise UserError(f"the prompt is {len(ids)} tokens, longer than the model's block_size {block_size}: "
                        f"shorten it")
    return ids


def attention_plot(models: Models, run: int, which: str, prompt: str, layer: str, head: str):
    """The attention figure of one layer and head (or all heads, or all layers), as matplotlib draws it
    for fastgpt.attention_maps."""
    from fastgpt.attention_maps import attention_figure, attention_probabilities, token_labels

    model, tokenizer = models.get(run, which)
    ids = prompt_ids(tokenizer, prompt, model.config.block_size)
    maps = [m.cpu() for m in attention_probabilities(model, torch.tensor([ids], device=models.device))]
    layers = range(len(maps)) if layer == "all" else [int(layer)]
    if any(not 0 <= i < len(maps) for i in layers):
        raise UserError(f"the model has {len(maps)} attention layer(s)")
    heads = maps[0].shape[0]
    if head != "all" and not 0 <= int(head) < heads:
        raise UserError(f"the model has {heads} head(s) per layer")
    chosen = [maps[i] if head == "all" else maps[i][int(head):int(head) + 1] for i in layers]
    title = (f"{models.folders[run].label}, {which}: layer {layer}, head {head} over {prompt!r} "
             f"(each row: where that token looks)")
    return attention_figure(chosen, token_labels(tokenizer, ids), title)


def stream_text(models: Models, run: int, which: str, prompt: str, max_new_tokens: int, temperature: float,
                top_k: int, seed: int):
    """The prompt and the text sampled so far, after each new token."""
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise UserError(f"generate between 1 and {MAX_NEW_TOKENS} tokens")
    if not temperature > 0:
        raise UserError("the temperature must be above 0")
    model, tokenizer = models.get(run, which)
    ids = prompt_ids(tokenizer, prompt, model.config.block_size)
    generator = torch.Generator(device=models.device).manual_seed(int(seed))
    idx = torch.tensor([ids], device=models.device)
    new: list[int] = []
    from fastgpt import kernels

    with kernels.backend("reference"):
        for token in model.stream(idx, int(max_new_tokens), float(temperature), int(top_k) if top_k else None,
                                  generator):
            new.append(token.item())
            yield prompt + tokenizer.decode(new)


# ---------------------------------------------------------------------------------------------------
# the page


CSS = """
.fg-samples {display: flex; gap: 12px; overflow-x: auto;}
.fg-run {flex: 1 1 0; min-width: 240px;}
.fg-sample {margin-bottom: 10px;}
.fg-sample-head {font-size: 0.85em; opacity: 0.75;}
.fg-sample pre {white-space: pre-wrap; margin: 2px 0; font-size: 0.85em;}
.fg-gone {display: none !important;}
"""


def message(e: Exception) -> str:
    return f"⚠ {e}"


PARTS = ("loss", "timed", "speed", "mfu", "samples", "settings", "compare")  # the parts an update may redraw


def digest(value) -> str:
    """A short fingerprint of what a part of the page shows: equal for equal contents."""
    def plain(v):
        if hasattr(v, "to_json"):  # a pandas DataFrame
            return v.to_json()
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return v
    return hashlib.sha1(json.dumps(plain(value), sort_keys=True, default=repr).encode()).hexdigest()[:16]


class Live:
    """What every tab of the page shares: the folders, their models, and the page's parts (charts, samples,
    settings, compare table), built once per change for all tabs; `stream` sends a tab its updates."""

    def __init__(self, gr, folders: list[Folder], compares: list[Path], models: Models, refresh: float = 2.0):
        self.gr, self.folders, self.compares, self.models, self.refresh = gr, folders, compares, models, refresh
        self.prompts: dict[int, str] = {}
        self.shared: tuple = (None, {}, {})  # (signature, {part: value}, {part: digest})
        self.watching: set[str] = set()  # the sessions (tabs) being sent updates
        self.hidden: set[str] = set()  # those of them whose browser does not show them
        self.closed: set[str] = set()  # those of them closed, their streams not yet ended
        self.lock = threading.Lock()

    def run_prompt(self, i: int) -> str:
        """The prompt of a run's evaluation samples: its tokenizer's default prompt, once the checkpoint is
        readable (until then the samples show without it). Only the tokenizer is read, not the weights."""
        if i not in self.prompts:
            try:
                self.prompts[i] = default_prompt(read_tokenizer(self.folders[i].path / "ckpt.pt"))
            except Exception:  # no checkpoint yet, or damaged: the attention and generation tabs say which
                return ""
        return self.prompts[i]

    def payload(self, signature) -> tuple[dict, dict]:
        """({part: value}, {part: digest}) as of `signature`, built once for every tab."""
        with self.lock:
            if self.shared[0] != signature:
                folders = self.folders
                header, rows = settings_rows(folders)
                for i in range(len(folders)):
                    self.run_prompt(i)
                loss, timed, speed, mfu = curves(folders)
                values = dict(zip(PARTS, (
                    loss, timed, speed, self.gr.update(value=mfu, visible=len(mfu) > 0),
                    samples_html(folders, self.prompts),
                    {"headers": header, "data": rows or [["(no ckpt.pt yet)", *[""] * len(folders)]]},
                    compare_markdown(self.compares))))
                self.shared = (signature, values, {part: digest(v) for part, v in values.items()})
            return self.shared[1], self.shared[2]

    def status(self, seen: dict, force: bool = False) -> str | None:
        """The status lines when they changed since the tab's `seen`, else None."""
        lines = "  \n".join(f.status() for f in self.folders)
        if lines == seen.get("lines") and not force:
            return None
        seen["lines"] = lines
        return lines

    def parts(self, seen: dict, force: bool = False) -> list | None:
        """The PARTS a tab is to redraw now, gr.skip() for those whose contents did not change, or None when
        none did; `seen` is the tab's record of what it shows. A part is redrawn at once for a new evaluation
        or checkpoint, else at most every CHART_SECONDS (a tab redraws a chart whole)."""
        signature = tuple(f.signature("metrics.jsonl") for f in self.folders)
        evaluations = tuple((len(f.records()[1]), f.signature("ckpt.pt")) for f in self.folders) + tuple(
            Folder(c).signature("compare.md") for c in self.compares)
        now = time.monotonic()
        if not (force or evaluations != seen.get("evaluations") or (
                signature != seen.get("signature") and now - seen.get("at", 0.0) >= CHART_SECONDS)):
            return None
        seen.update(signature=signature, evaluations=evaluations, at=now)
        values, digests = self.payload((signature, evaluations))
        shown = seen.setdefault("shown", {})
        changed = [part for part in PARTS if force or shown.get(part) != digests[part]]
        shown.update((part, digests[part]) for part in changed)
        return [values[part] if part in changed else self.gr.skip() for part in PARTS] if changed else None

    def update(self, seen: dict, force: bool = False) -> tuple | None:
        """(status, *PARTS) for a tab, gr.skip() for what did not change; None when nothing did. Gradio's
        page handles an update for every component it names, even one left as it is, so only what changed
        is named."""
        status, parts = self.status(seen, force), self.parts(seen, force)
        if status is None and parts is None:
            return None
        return (self.gr.skip() if status is None else status, *(parts or [self.gr.skip()] * len(PARTS)))

    def look(self, seen: dict, force: bool = False) -> tuple | None:
        """`update`, or when the folders could not be read (a file changing under the page), a status line
        that says so; the next look starts the tab afresh."""
        try:
            return self.update(seen, force)
        except Exception as e:
            text = f"⚠ could not read the runs ({type(e).__name__}: {e}): looking again every {self.refresh:g} s"
            said = seen.get("failure") == text
            seen.clear()  # what the tab shows is not known: the next look that succeeds sends it all
            seen["failure"] = text
            return None if said else (text, *[self.gr.skip()] * len(PARTS))

    def shown(self, state: str, request) -> None:
        """A tab says whether its browser shows it (document.visibilityState): a hidden tab hears nothing
        until it is shown again, and then at once of all that changed meanwhile."""
        session = getattr(request, "session_hash", None)
        if state == "hidden" and session in self.watching:
            self.hidden.add(session)
        else:
            self.hidden.discard(session)

    def telling(self):
        """The event handler by which a tab says whether it is shown (see `shown`)."""
        def told(state, request):
            self.shown(state, request)

        told.__annotations__ = {"state": str, "request": self.gr.Request}  # Gradio passes the request by type
        return told

    def closing(self):
        """The handler of Gradio's unload event (a tab closed or reloaded): its stream ends."""
        def unload(request):
            session = getattr(request, "session_hash", None)
            if session in self.watching:
                self.closed.add(session)

        unload.__annotations__ = {"request": self.gr.Request}
        return unload

    def stream(self):
        """The event that sends a tab its updates for as long as it is open: the folders are looked at every
        `refresh` seconds (not while the tab is hidden), and the tab hears only of what changed. One
        streamed event per tab, no request per look: an open tab costs nothing while its runs stand still."""
        import asyncio

        async def watch(request):
            session, seen = getattr(request, "session_hash", None), {}
            self.watching.add(session)
            try:
                update = await asyncio.to_thread(self.look, seen, True)
                said = time.monotonic()
                while session not in self.closed:
                    if update is None and time.monotonic() - said >= KEEPALIVE_S:
                        update = (self.gr.skip(),) * (1 + len(PARTS))  # lets Gradio end it if the tab is gone
                    if update is not None:
                        yield update
                        said = time.monotonic()
                    await asyncio.sleep(self.refresh)
                    update = None if session in self.hidden else await asyncio.to_thread(self.look, seen)
            finally:
                for sessions in (self.watching, self.hidden, self.closed):
                    sessions.discard(session)

        watch.__annotations__ = {"request": self.gr.Request}  # Gradio passes the request by this type
        return watch


# the page tells the server when its browser hides or shows it (and at once if it opens hidden)
VISIBILITY_JS = """() => {
  const say = () => document.querySelector("button#fg-visibility-go, #fg-visibility-go button")?.click();
  document.addEventListener("visibilitychange", say);
  if (document.visibilityState === "hidden") say();
}"""


def curves_tab(gr) -> list:
    with gr.Tab("Curves"):
        with gr.Row():
            loss = gr.LinePlot(x="iteration", y="loss", color="series", elem_id="fg-loss", height=320,
                               title="loss (train: each log interval; val: each evaluation)")
            timed = gr.LinePlot(x="training seconds", y="val loss", color="series", elem_id="fg-time", height=320,
                                title="val loss against training time")
        with gr.Row():
            speed = gr.LinePlot(x="iteration", y="tokens/s", color="series", title="throughput", elem_id="fg-speed",
                                height=260)
            mfu = gr.LinePlot(x="iteration", y="MFU %", color="series", elem_id="fg-mfu", height=260,
                              title="model FLOPs utilisation (on a GPU with a known peak)")
    return [loss, timed, speed, mfu]


def attention_tab(gr, names: list, models: Models) -> None:
    with gr.Tab("Attention"):
        with gr.Row():
            run = gr.Dropdown(names, value=0, label="run", elem_id="fg-attn-run")
            which = gr.Radio(list(CHECKPOINTS.items()), value="ckpt.pt", label="checkpoint")
            layer = gr.Dropdown(["all", *map(str, range(32))], value="all", label="layer")
            head = gr.Dropdown(["all", *map(str, range(32))], value="all", label="head")
        prompt = gr.Textbox("ROMEO:", label="prompt (its tokens are both axes)", elem_id="fg-attn-prompt")
        button = gr.Button("Show attention", elem_id="fg-attn-go")
        note = gr.Markdown(elem_id="fg-attn-message")
        plot = gr.Plot(elem_id="fg-attn-plot", label="attention probabilities (PyTorch reference path)")

    def show(run, which, prompt, layer, head):
        try:
            return "", attention_plot(models, run, which, prompt, layer, head)
        except (UserError, ValueError) as e:
            return message(e), None

    button.click(show, [run, which, prompt, layer, head], [note, plot])


def generate_tab(gr, names: list, models: Models) -> None:
    with gr.Tab("Generate"):
        with gr.Row():
            run = gr.Dropdown(names, value=0, label="run", elem_id="fg-gen-run")
            which = gr.Radio(list(CHECKPOINTS.items()), value="ckpt.pt", label="checkpoint")
        prompt = gr.Textbox("ROMEO:", label="prompt", lines=2, elem_id="fg-gen-prompt")
        with gr.Row():
            temperature = gr.Slider(0.05, 2.0, value=0.8, step=0.05, label="temperature")
            top_k = gr.Number(0, precision=0, minimum=0, label="top-k (0: all tokens)")
            seed = gr.Number(1337, precision=0, label="seed")
            tokens = gr.Slider(1, MAX_NEW_TOKENS, value=300, step=1, label="new tokens")
        button = gr.Button("Generate", elem_id="fg-gen-go")
        note = gr.Markdown(elem_id="fg-gen-message")
        output = gr.Textbox(label="text (streamed as it is sampled)", lines=12, elem_id="fg-gen-output")

    def generate(run, which, prompt, temperature, top_k, seed, tokens):
        try:
            for text in stream_text(models, run, which, prompt, int(tokens), temperature, int(top_k or 0),
                                    int(seed or 0)):
                yield "", text
        except (UserError, ValueError) as e:
            yield message(e), ""

    button.click(generate, [run, which, prompt, temperature, top_k, seed, tokens], [note, output])


def build(folders: list[Folder], compares: list[Path], cfg: DashboardConfig):
    gr = require_gradio()
    models = Models(folders, torch.device(cfg.device))
    live = Live(gr, folders, compares, models, cfg.refresh)
    names = [(f.label, i) for i, f in enumerate(folders)]
    with gr.Blocks(title="fastgpt dashboard", analytics_enabled=False) as page:
        gr.Markdown("# fastgpt: watch it learn")
        status = gr.Markdown(elem_id="fg-status")
        charts = curves_tab(gr)
        with gr.Tab("Samples"):
            gr.Markdown("At each evaluation the trainer samples from the same prompt and seed, so the text below "
                        "changes only because the model learnt: newest first.")
            samples = gr.HTML(elem_id="fg-samples")
        attention_tab(gr, names, models)
        generate_tab(gr, names, models)
        with gr.Tab("Settings"):
            settings = gr.Dataframe(elem_id="fg-settings", wrap=True)
            compare = gr.Markdown(compare_markdown(compares), elem_id="fg-compare")
        # one streamed event per tab: it sends what changed, when it changed, and nothing in between
        page.load(live.stream(), outputs=[status, *charts, samples, settings, compare], show_progress="hidden",
                  concurrency_limit=None)
        # and nothing while the browser does not show the tab (a background tab, a minimised window)
        visibility = gr.Textbox(elem_id="fg-visibility", elem_classes="fg-gone", container=False)
        said = gr.Button(elem_id="fg-visibility-go", elem_classes="fg-gone")
        said.click(live.telling(), inputs=[visibility], js="() => document.visibilityState", show_progress="hidden",
                   queue=False)
        page.load(None, js=VISIBILITY_JS)
        page.unload(live.closing())
    return page


# Gradio's event queue looks for work every millisecond when it has none (1000 wake-ups a second), and the
# progress updates every 10 ms: 4% of a core on an idle page, taken from the training it watches. A
# dashboard's events can wait 50 ms.
QUEUE_POLL_S = 0.05


def unhurried(page) -> None:
    """The page's queue polls every QUEUE_POLL_S when idle (Gradio's private settings, left alone if a
    release renames them)."""
    queue = getattr(page, "_queue", None)
    for name in ("sleep_when_free", "progress_update_sleep_when_free"):
        if isinstance(getattr(queue, name, None), (int, float)):
            setattr(queue, name, max(getattr(queue, name), QUEUE_POLL_S))


# Gradio 6's page shows a spinner while it loads; the spinner's status tracker then counts the seconds
# of its "pending" state one animation frame at a time, and when the page is ready the tracker goes with the
# spinner but its frame loop does not (nothing stops it): an open tab asks for 60 frames a second for as
# long as it is open, 4-5% of a CPU core in the browser, taken from the training it watches. This script,
# put ahead of the page's scripts so that it runs before Gradio's, ends any frame loop of the status tracker
# that changes nothing on the page for a second (60 frames): a loop that counts seconds on screen changes
# the page every tenth of a second and runs on; a hidden one stops. Everything else's frames pass untouched.
IDLE_FRAMES_JS = """(() => {
  const request = window.requestAnimationFrame.bind(window);
  const tracker = /statustracker-[\\w-]*\\.js/, limit = 60, what = {subtree: true, childList: true,
    characterData: true, attributes: true};
  let unchanged = 0;
  window.requestAnimationFrame = (callback) => {
    if (!tracker.test(new Error().stack || "")) return request(callback);
    if (unchanged >= limit) { unchanged = 0; return 0; }
    return request((time) => {
      const seen = new MutationObserver(() => {});  // what the frame changes, as its updates land
      seen.observe(document, what);
      try { callback(time); } finally {
        queueMicrotask(() => queueMicrotask(() => {
          unchanged = seen.takeRecords().length ? 0 : unchanged + 1;
          seen.disconnect();
        }));
      }
    });
  };
})();"""


class HeadScript:
    """ASGI middleware: the HTML pages it serves get `script` ahead of their first script (in the <head>), so
    it runs before the page's own. Other responses pass through as they are, streamed ones included."""

    def __init__(self, app, script: str):
        self.app = app
        self.tag = f"<script>{script}</script>".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "GET":
            return await self.app(scope, receive, send)
        held: dict = {}

        async def edit(message):
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers", []))
                if headers.get(b"content-type", b"").startswith(b"text/html"):
                    held.update(start=message, body=[])
                    return
            if "start" not in held or message["type"] != "http.response.body":
                return await send(message)
            held["body"].append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(held["body"])
            head = body.find(b"<head>")
            at = body.find(b"<script", head)
            if head >= 0 and at >= 0:
                body = body[:at] + self.tag + body[at:]
            start = held["start"]
            headers = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, edit)


def theme():
    gr = require_gradio()
    # fonts shipped inside gradio's package: the default theme would fetch its own from the network
    return gr.themes.Default(font=[gr.themes.LocalFont("IBM Plex Sans"), "ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=[gr.themes.LocalFont("IBM Plex Mono"), "ui-monospace", "monospace"])


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(run folders, flags): the flags are --key=value or --key value."""
    dirs, flags, args = [], [], list(argv)
    while args:
        arg = args.pop(0)
        if arg.startswith("--"):
            flags.append(arg)
            name = arg[2:].split("=")[0].replace("-", "_")
            if "=" not in arg and name != "open_browser" and args and not args[0].startswith("--"):
                flags.append(args.pop(0))
        else:
            dirs.append(arg)
    return dirs, flags


def main(argv: list[str]) -> int:
    dirs, flags = split_argv(argv)
    cfg, _ = parse_command(DashboardConfig, flags + (["--help"] if "-h" in argv else []), DashboardConfig(),
                           "fastgpt.dashboard", __doc__.strip().splitlines()[0])
    if not 1 <= cfg.port <= 65535:
        raise UserError(f"--port must be between 1 and 65535, got {cfg.port}")
    if not 0.2 <= cfg.refresh <= 3600:
        raise UserError(f"--refresh must be between 0.2 and 3600 seconds, got {cfg.refresh}")
    try:
        device = torch.device(cfg.device)
    except RuntimeError:
        raise UserError(f"--device must be cpu, cuda, cuda:N or mps, got {cfg.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device=cuda but this machine has no CUDA GPU: use --device=cpu")
    gr = require_gradio()
    from starlette.middleware import Middleware  # gradio's web framework
    folders, compares = folders_of(dirs)
    try:
        os.nice(NICENESS)  # a run on this machine comes first: the page yields the CPU to it
    except (OSError, AttributeError):
        pass
    label_folders(folders)
    page = build(folders, compares, cfg)
    print(f"fastgpt.dashboard: {len(folders)} run(s) at http://{cfg.host}:{cfg.port} (Ctrl+C stops it)", flush=True)
    try:
        page.queue(default_concurrency_limit=2)
        unhurried(page)
        page.launch(
            server_name=cfg.host, server_port=cfg.port, inbrowser=cfg.open_browser, share=False, quiet=True,
            show_error=False, theme=theme(), css=CSS, footer_links=[], ssr_mode=False, mcp_server=False,
            enable_monitoring=False, app_kwargs={"middleware": [Middleware(HeadScript, script=IDLE_FRAMES_JS)]})
    except OSError as e:
        raise UserError(f"cannot serve on {cfg.host}:{cfg.port} ({e}): choose another --port") from None
    del gr
    return 0


if __name__ == "__main__":
    run_main(main, "fastgpt.dashboard")
