"""Large corpora: how long the trainer takes to start on one, and at what peak memory, first (reading,
training a BPE, encoding) and second (the cached tokens); and each stage's throughput.

    python -m bench.corpus --mb=600 --out=bench/results [--tokenizers=char,bpe] [--vocab_size=4096] [--rounds=3]

The corpus is Tiny Shakespeare repeated to `--mb` MB (the issue's 600 MB case is 540 copies), written
under `--work` (default: a temporary directory, removed after). Each start is `python -m fastgpt.train`
with one iteration, in a subprocess whose peak resident set the kernel reports (`wait4`); it counts the
pages of the token file that the batches map, which are page cache the kernel can reclaim. Stage
throughputs are measured in this process: reading (sha256, UTF-8 check, the character set), training
the BPE, encoding, each on the whole corpus. Each round starts from an empty cache; the figures are the
medians over `--rounds`, every round kept in the JSON. Writes `<date>-corpus-<MB>mb.json` and `.md` to
`--out`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fastgpt import data
from fastgpt import text as corpus_text
from fastgpt.cli import UserError, run_main
from fastgpt.files import atomic_write
from fastgpt.text import TINY_SHAKESPEARE_SHA256
from fastgpt.tokenizer import make_tokenizer

ROOT = Path(__file__).resolve().parent.parent


def make_corpus(path: Path, mb: int, source: Path) -> None:
    base = source.read_bytes()
    with path.open("wb") as f:
        for _ in range(max(1, round(mb * 1_000_000 / len(base)))):
            f.write(base)


def start(corpus: Path, data_dir: Path, out_dir: Path, tokenizer: str, vocab_size: int) -> dict:
    """One trainer start (one iteration): wall seconds and peak resident MB of the process."""
    flags = [f"--data_file={corpus}", f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--overwrite",
             "--max_iters=1", "--eval_iters=1", "--sample_chars=0", "--device=cpu", f"--tokenizer={tokenizer}"]
    if tokenizer == "bpe":
        flags.append(f"--vocab_size={vocab_size}")
    began = time.perf_counter()
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: nothing blocks the trainer's progress lines
        proc = subprocess.Popen([sys.executable, "-m", "fastgpt.train", *flags], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
        seconds = time.perf_counter() - began
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"bench.corpus: the trainer failed:\n{stderr[-2000:]}")
    return {"seconds": round(seconds, 2), "peak_mb": round(usage.ru_maxrss / 1024)}


def stages(corpus: Path, work: Path, tokenizer: str, vocab_size: int) -> dict:
    """MB/s of reading, (training the BPE,) and encoding the whole corpus, in this process."""
    files = corpus_text.corpus_files(str(corpus), work)
    mb = files[0].stat().st_size / 1e6
    began = time.perf_counter()
    text = corpus_text.scan(files, want_chars=tokenizer == "char")
    result = {"read_mb_s": round(mb / (time.perf_counter() - began), 1)}
    began = time.perf_counter()
    tok = make_tokenizer(tokenizer, text, work / "stages", vocab_size, None, False, str(corpus))
    if tokenizer == "bpe":
        result["bpe_train_mb_s"] = round(mb * corpus_text.TRAIN_FRACTION / (time.perf_counter() - began), 1)
    began = time.perf_counter()
    data.write_tokens(work / "stages" / "tokens", text, tok)
    result["encode_mb_s"] = round(mb / (time.perf_counter() - began), 1)
    return result


def one_round(corpus: Path, work: Path, tokenizer: str, vocab_size: int) -> dict:
    """A first start (empty cache), a second start (the cache it left), and the stage throughputs."""
    data_dir = work / f"data-{tokenizer}"
    shutil.rmtree(data_dir, ignore_errors=True)
    row = {"first": start(corpus, data_dir, work / "out", tokenizer, vocab_size),
           "second": start(corpus, data_dir, work / "out", tokenizer, vocab_size)}
    shutil.rmtree(work / "stages", ignore_errors=True)
    return row | stages(corpus, work, tokenizer, vocab_size)


def median_row(rounds: list[dict]) -> dict:
    """Each figure's median over the rounds."""
    row = {}
    for key, value in rounds[0].items():
        if isinstance(value, dict):
            row[key] = {k: statistics.median(r[key][k] for r in rounds) for k in value}
        else:
            row[key] = statistics.median(r[key] for r in rounds)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.corpus", description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=600)
    parser.add_argument("--tokenizers", default="char,bpe")
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--source", default="", help="Tiny Shakespeare (default: data/ or ../shared/data/)")
    parser.add_argument("--work", default="", help="where the corpus and caches go (default: a temp dir)")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--force", action="store_true", help="replace a report of the same day and size in --out")
    args = parser.parse_args(argv)
    check_args(args)
    source = Path(args.source) if args.source else next(
        (p for p in (ROOT / "data/tinyshakespeare/input.txt", ROOT.parent / "shared/data/tinyshakespeare/input.txt")
         if p.is_file()), None)
    if source is None or not source.is_file():
        raise UserError(f"no Tiny Shakespeare at {source or 'data/tinyshakespeare/input.txt'}: pass its path "
                        f"with --source=PATH")
    stem = Path(args.out) / f"{datetime.date.today().isoformat()}-corpus-{args.mb}mb"
    if stem.with_suffix(".json").exists() and not args.force:
        raise UserError(f"{stem}.json exists: pass another --out, or --force to replace it")
    work = Path(args.work or tempfile.mkdtemp(prefix="fastgpt-corpus-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"shakespeare-{args.mb}mb.txt"
    make_corpus(corpus, args.mb, source)
    report = {"date": datetime.date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores", "command": "python -m bench.corpus " + " ".join(sys.argv[1:]),
              "corpus_mb": round(corpus.stat().st_size / 1e6, 1), "source_sha256": TINY_SHAKESPEARE_SHA256,
              "vocab_size": args.vocab_size, "rounds": args.rounds, "results": {}}
    try:
        for tokenizer in args.tokenizers.split(","):
            rounds = [one_round(corpus, work, tokenizer, args.vocab_size) for _ in range(args.rounds)]
            row = median_row(rounds) | {"rounds": rounds}
            report["results"][tokenizer] = row
            print(tokenizer, json.dumps(row), flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    atomic_write(stem.with_suffix(".json"), lambda f: f.write((json.dumps(report, indent=1) + "\n").encode()))
    atomic_write(stem.with_suffix(".md"), lambda f: f.write(markdown(report).encode()))
    print(f"wrote {stem}.json and .md")
    return 0


def check_args(args) -> None:
    """The sizes and names a user passes, checked before any work: one line naming the fix."""
    if not 1 <= args.mb <= 100_000:
        raise UserError(f"--mb must be between 1 and 100000 (MB of corpus to build), got {args.mb}")
    if not 1 <= args.rounds <= 100:
        raise UserError(f"--rounds must be between 1 and 100, got {args.rounds}")
    unknown = [t for t in args.tokenizers.split(",") if t not in ("char", "bpe")]
    if unknown or not args.tokenizers:
        raise UserError(f"--tokenizers takes char and/or bpe, comma-separated, got {args.tokenizers!r}")
    if not 257 <= args.vocab_size <= 1 << 20:
        raise UserError(f"--vocab_size must be between 257 and 1048576, got {args.vocab_size}")
    where = Path(args.work or tempfile.gettempdir()).resolve()
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    if args.mb * 3e6 > free:  # the corpus, its token cache and the BPE's
        raise UserError(f"--mb={args.mb} needs about {args.mb * 3 / 1e3:.1f} GB of disk and {free / 1e9:.1f} GB "
                        f"are free: pass a smaller --mb, or a --work on a larger disk")


def markdown(report: dict) -> str:
    lines = [f"# Trainer start on a {report['corpus_mb']:,} MB corpus ({report['date']})", "",
             f"Machine: {report['machine']}. Command: `{report['command']}`. The corpus is Tiny Shakespeare "
             f"repeated; the BPE has {report['vocab_size']} tokens. Peak memory is the start's peak resident "
             f"set (wait4), which includes token-file pages the batches map (page cache). Medians of "
             f"{report['rounds']} rounds, each from an empty cache (every round in the JSON).", "",
             "| tokenizer | first start | peak | second start | peak | read | BPE training | encoding |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in report["results"].items():
        lines.append(f"| {name} | {r['first']['seconds']} s | {r['first']['peak_mb']} MB | {r['second']['seconds']} s "
                     f"| {r['second']['peak_mb']} MB | {r['read_mb_s']} MB/s | "
                     f"{str(r['bpe_train_mb_s']) + ' MB/s' if 'bpe_train_mb_s' in r else '-'} | {r['encode_mb_s']} MB/s |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_main(main, "bench.corpus")
