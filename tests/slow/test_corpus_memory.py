"""The memory of a 100 MB corpus, measured in a subprocess: read, encoded and cached in chunks, its peak
stays within a few chunks of a 1 MB corpus's, and drawing batches allocates nothing."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

PEAK = textwrap.dedent("""
    import sys, torch
    from fastgpt.data import Batches, load_corpus

    def status(key):  # kB, from the kernel's accounting of this process
        return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith(key + ":")))

    corpus = load_corpus(sys.argv[1], sys.argv[2], tokenizer=sys.argv[3], vocab_size=512)
    peak = status("VmHWM")  # the peak resident set: reading, (training,) encoding, caching, reading back
    anon = status("RssAnon")
    batches = Batches(corpus.train, 256, 64, torch.device("cpu"), seed=0)
    for _ in range(20):
        batches.next()
    # batches map pages of the token file (page cache, which the kernel reclaims), but allocate nothing
    print(len(corpus.train) + len(corpus.val), peak // 1024, (status("RssAnon") - anon) // 1024)
""")


def peak_mb(path, data_dir, tokenizer="char") -> tuple[int, int, int]:
    """(tokens, peak MB until the corpus is loaded, MB allocated by drawing batches) of a subprocess."""
    result = subprocess.run([sys.executable, "-c", PEAK, str(path), str(data_dir), tokenizer], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return tuple(int(v) for v in result.stdout.split())


def write_corpus(path, mb: int, shakespeare) -> None:
    """`mb` MB of Tiny Shakespeare with numbered, partly non-ASCII lines between its copies."""
    base = shakespeare.read_bytes()
    with path.open("wb") as f:
        for i in range(mb * 1_000_000 // len(base) + 1):
            f.write(base + f"\n{i}: Ünïcödé ☃ 😀 {i * 7919}\n".encode())


# whole-text reading holds the text and its ids many times over (8 bytes an id; a BPE's encoder ~40 bytes
# a byte of text), well past these bounds; chunked reading holds a few chunks (and a BPE's word counts)
@pytest.mark.parametrize("tokenizer, mb, bound_mb", [("char", 100, 40), ("bpe", 12, 80)])
def test_memory_of_a_large_corpus_stays_bounded(tmp_path, shakespeare_path, tokenizer, mb, bound_mb):
    if tokenizer == "bpe":
        pytest.importorskip("tokenizers")
    big = tmp_path / "big.txt"
    write_corpus(big, mb, shakespeare_path)
    _, baseline, _ = peak_mb(shakespeare_path, tmp_path / "small", tokenizer)  # imports, a 1 MB corpus
    n_first, first, grown_first = peak_mb(big, tmp_path / "data", tokenizer)  # reads, (trains,) encodes, caches
    n_second, second, grown_second = peak_mb(big, tmp_path / "data", tokenizer)  # reads the cache
    assert n_first == n_second > mb * 200_000
    assert first - baseline < bound_mb, (baseline, first)
    assert second - baseline < bound_mb, (baseline, second)
    assert grown_first < 8 and grown_second < 8
