"""Corpora of any size: chunked reading and encoding (characters split across chunk edges), directories
and globs, the BPE's split and cache, host-gathered batches, processes racing to build one cache, and
the memory of a 100 MB corpus (measured in a subprocess)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from fastgpt import data
from fastgpt import text as corpus_text
from fastgpt.cli import UserError
from fastgpt.data import Batches, load_corpus
from fastgpt.tokenizer import BPETokenizer

from conftest import MIXED

CPU = torch.device("cpu")


def tokens(corpus) -> np.ndarray:
    return np.concatenate([np.asarray(corpus.train), np.asarray(corpus.val)])


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 4096])
def test_chunk_edges_inside_characters_encode_like_the_whole_text(tmp_path, monkeypatch, tokenizer, chunk):
    if tokenizer == "bpe":
        pytest.importorskip("tokenizers")
    path = tmp_path / "mixed.txt"
    path.write_text(MIXED, encoding="utf-8")
    whole = load_corpus(str(path), tmp_path / "whole", tokenizer=tokenizer, vocab_size=300)
    monkeypatch.setattr(corpus_text, "CHUNK_BYTES", chunk)
    chunked = load_corpus(str(path), tmp_path / "chunked", tokenizer=tokenizer, vocab_size=300)
    np.testing.assert_array_equal(tokens(chunked), tokens(whole))
    assert len(chunked.train) == len(whole.train)
    assert chunked.tokenizer.state() == whole.tokenizer.state()
    assert chunked.tokenizer.decode(tokens(chunked)) == MIXED


@pytest.mark.parametrize("chunk", [1, 3, 4, 1 << 20])
@pytest.mark.parametrize("raw, offset", [(b"ab\xc3\xa9cd\xe2\x98(xyz", 6), (b"abcdefgh\xf0\x9f\x98", 8),
                                         (b"\xe2\x98\x83\xe2\x98\x83\x80", 6)])
def test_bad_utf8_is_reported_at_its_offset_whatever_the_chunks(tmp_path, monkeypatch, chunk, raw, offset):
    monkeypatch.setattr(corpus_text, "CHUNK_BYTES", chunk)
    path = tmp_path / "bad.txt"
    path.write_bytes(raw)
    with pytest.raises(UserError, match=rf"bad byte at offset {offset}\)"):
        load_corpus(str(path), tmp_path / "data")


def test_uint32_tokens_for_a_vocabulary_past_65536(tmp_path):
    text = "".join(chr(0x10000 + i) for i in range(70_000)) * 2
    path = tmp_path / "wide.txt"
    path.write_text(text, encoding="utf-8")
    corpus = load_corpus(str(path), tmp_path / "data")
    assert corpus.tokenizer.vocab_size == 70_000 and corpus.train.dtype == np.uint32
    assert corpus.tokenizer.decode(tokens(corpus)) == text
    x, y = Batches(corpus.val, 8, 4, CPU, seed=0).next()
    assert int(x.max()) < 70_000 and x.dtype == torch.int64


# ---------------------------------------------------------------------------------------------------
# --data_file: a directory or a glob


@pytest.fixture
def shelf(tmp_path):
    """A directory of .txt files (one empty, one in a subdirectory) and a file of another kind."""
    d = tmp_path / "shelf"
    (d / "sub").mkdir(parents=True)
    for name, text in [("b.txt", "second file ☃\n" * 50), ("a.txt", "first file é\n" * 50), ("c.txt", ""),
                       ("notes.md", "not text for training\n"), ("sub/d.txt", "nested 😀\n" * 50)]:
        (d / name).write_text(text, encoding="utf-8")
    return d


def test_a_directory_is_its_txt_files_in_sorted_order(shelf, tmp_path):
    corpus = load_corpus(str(shelf), tmp_path / "data")
    text = (shelf / "a.txt").read_text(encoding="utf-8") + (shelf / "b.txt").read_text(encoding="utf-8")
    assert corpus.tokenizer.decode(tokens(corpus)) == text
    assert corpus.sha256 == hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert "2 files" in str(corpus.source)


def test_a_glob_is_the_files_it_matches_in_sorted_order(shelf, tmp_path):
    corpus = load_corpus(str(shelf / "**" / "*.txt"), tmp_path / "data")
    names = ["a.txt", "b.txt", "sub/d.txt"]
    text = "".join((shelf / n).read_text(encoding="utf-8") for n in names)
    assert corpus.tokenizer.decode(tokens(corpus)) == text


@pytest.mark.parametrize("case, message", [
    ("empty dir", "holds no .txt files"),
    ("no match", "matches no files"),
    ("all empty", "all empty"),
    ("bad file in dir", r"b\.txt is not UTF-8 text \(bad byte at offset 3\)"),
])
def test_bad_directories_and_globs_are_user_errors(tmp_path, case, message):
    d = tmp_path / "d"
    d.mkdir()
    arg = str(d)
    if case == "no match":
        arg = str(d / "*.text")
    elif case == "all empty":
        (d / "a.txt").write_text("")
    elif case == "bad file in dir":
        (d / "a.txt").write_text("fine\n")
        (d / "b.txt").write_bytes(b"abc\xff")
    with pytest.raises(UserError, match=message):
        load_corpus(arg, tmp_path / "data")


# ---------------------------------------------------------------------------------------------------
# the BPE's split and cache


def test_bpe_splits_the_text_at_90_percent_of_its_bytes(bpe_text, tmp_path):
    corpus = load_corpus(str(bpe_text), tmp_path / "data", tokenizer="bpe", vocab_size=400)
    raw = bpe_text.read_bytes()
    cut = int(len(raw) * 0.9)
    while raw[cut] & 0xC0 == 0x80:  # to the next character's first byte
        cut += 1
    assert corpus.tokenizer.decode(corpus.train) == raw[:cut].decode("utf-8")
    assert corpus.tokenizer.decode(corpus.val) == raw[cut:].decode("utf-8")
    assert corpus.train.dtype == np.uint16 and corpus.tokenizer.vocab_size <= 400


def test_bpe_is_trained_on_the_train_split_only(tmp_path):
    pytest.importorskip("tokenizers")
    path = tmp_path / "text.txt"
    path.write_text("common words here\n" * 900 + "zyzzyva " * 100, encoding="utf-8")  # the last 10%: val
    corpus = load_corpus(str(path), tmp_path / "data", tokenizer="bpe", vocab_size=400)
    assert len(corpus.tokenizer.encode(" zyzzyva")) > 3  # never merged: the BPE did not see it
    assert len(corpus.tokenizer.encode("common")) == 1 and len(corpus.tokenizer.encode(" words")) == 1


def test_bpe_and_its_tokens_are_reused_by_a_second_start(bpe_text, tmp_path, monkeypatch):
    first = load_corpus(str(bpe_text), tmp_path / "data", tokenizer="bpe", vocab_size=400)

    def refuse(*args, **kwargs):
        raise AssertionError("trained or encoded again despite the cache")

    monkeypatch.setattr(BPETokenizer, "train", refuse)
    monkeypatch.setattr(BPETokenizer, "encode", refuse)
    second = load_corpus(str(bpe_text), tmp_path / "data", tokenizer="bpe", vocab_size=400)
    assert second.tokenizer.state() == first.tokenizer.state()
    np.testing.assert_array_equal(tokens(second), tokens(first))
    with pytest.raises(AssertionError, match="trained"):  # another size is another BPE
        load_corpus(str(bpe_text), tmp_path / "data", tokenizer="bpe", vocab_size=500)


def test_a_damaged_cached_bpe_is_trained_again(bpe_text, tmp_path):
    first = load_corpus(str(bpe_text), tmp_path / "data", tokenizer="bpe", vocab_size=400)
    (cached,) = (tmp_path / "data" / "cache").glob("bpe-*.json")
    cached.write_text("{damaged")
    again = load_corpus(str(bpe_text), tmp_path / "data", tokenizer="bpe", vocab_size=400)
    assert again.tokenizer.state() == first.tokenizer.state()


# ---------------------------------------------------------------------------------------------------
# batches gathered on the host (a split too large for the GPU)


@pytest.fixture
def on_host(monkeypatch):
    monkeypatch.setattr(data, "fits_on", lambda device, nbytes: False)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32])
def test_host_batches_are_windows_of_the_data(on_host, dtype):
    top = np.iinfo(dtype).max
    values = (np.arange(2000, dtype=np.int64) * 7919) % (int(top) + 1)  # up to the type's top bit
    tokens_ = values.astype(dtype)
    batches = Batches(tokens_, block_size=8, batch_size=16, device=CPU, seed=3)
    assert not batches.on_device
    seen = set()
    for _ in range(4):
        x, y = batches.next()
        assert x.shape == y.shape == (16, 8) and x.dtype == y.dtype == torch.int64
        for row_x, row_y in zip(x.numpy(), y.numpy()):
            (start,) = np.flatnonzero(values[:-8] == row_x[0])[:1]
            np.testing.assert_array_equal(row_x, values[start:start + 8])
            np.testing.assert_array_equal(row_y, values[start + 1:start + 9])
            seen.add(int(start))
    assert len(seen) > 16


def test_host_batches_follow_the_same_stream_as_device_ones(monkeypatch):
    """On the CPU both are drawn from a CPU generator: the same seed gives the same batches, and a saved
    generator state restores either."""
    values = np.arange(3000, dtype=np.uint16) + 60000  # past int16: read back through the mask
    device_batches = Batches(values, 16, 8, CPU, seed=5)
    monkeypatch.setattr(data, "fits_on", lambda device, nbytes: False)
    host_batches = Batches(values, 16, 8, CPU, seed=5)
    for _ in range(3):
        (xa, ya), (xb, yb) = device_batches.next(), host_batches.next()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert int(xa.min()) >= 60000
    state = host_batches.generator.get_state()
    expected = host_batches.next()
    host_batches.generator.set_state(state)
    assert all(torch.equal(a, b) for a, b in zip(host_batches.next(), expected))


def test_a_throwaway_batch_of_a_host_gathered_split_draws_on_the_host(monkeypatch):
    """A CUDA run whose split is too large for the GPU draws its offsets on the host with a CPU generator;
    the trainer's throwaway batch (the fallback probe, the compilation) must draw there too: with the GPU's
    generator every such run died at start. Stand-in without a GPU: a run on "cuda" whose host-gathered
    split copies to the CPU, CUDA's RNG state left out."""
    from types import SimpleNamespace

    from fastgpt import warmup

    monkeypatch.setattr(data, "fits_on", lambda device, nbytes: False)
    batches = Batches(np.arange(3000, dtype=np.uint16), 16, 8, CPU, seed=5)
    monkeypatch.setattr(warmup, "device_rng_state", lambda device: None)
    state = batches.generator.get_state()
    with warmup.throwaway_batch(SimpleNamespace(device=torch.device("cuda"), train_batches=batches)) as (x, y):
        assert x.shape == y.shape == (8, 16) and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(batches.generator.get_state(), state)  # the training stream is untouched
    assert batches.seeded_generator(0).device == batches.generator.device == CPU


def test_large_token_files_are_memory_mapped(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAP_BYTES", 100)
    path = tmp_path / "text.txt"
    path.write_text(MIXED, encoding="utf-8")
    mapped = load_corpus(str(path), tmp_path / "data")
    assert isinstance(mapped.train, np.memmap)
    monkeypatch.setattr(data, "MAP_BYTES", 1 << 30)
    read = load_corpus(str(path), tmp_path / "data")
    assert not isinstance(read.train, np.memmap)
    np.testing.assert_array_equal(tokens(mapped), tokens(read))


# ---------------------------------------------------------------------------------------------------
# bounded memory


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned buffers and non-blocking copies need CUDA")
def test_host_batches_reach_the_gpu_whole(monkeypatch):
    """A split too large for the GPU: windows gathered on the host, copied without blocking through two
    pinned buffers; every batch arrives whole on the device, however fast the next one is drawn."""
    cuda = torch.device("cuda")
    values = (np.arange(50_000, dtype=np.int64) * 7919) % 65536  # distinct (7919 is odd), up to the top bit
    monkeypatch.setattr(data, "fits_on", lambda device, nbytes: False)
    batches = Batches(values.astype(np.uint16), 64, 32, cuda, seed=0)
    assert not batches.on_device and batches._buffers[0].is_pinned()
    drawn = [batches.next() for _ in range(8)]  # queued before any is read
    table = torch.from_numpy(values).to(cuda)
    for x, y in drawn:
        assert x.device.type == "cuda" and x.dtype == torch.int64
        start = (x[:, :1] == table[None, :-64]).float().argmax(dim=1, keepdim=True)  # each row's first token
        windows = start + torch.arange(64, device=cuda)
        assert torch.equal(table[windows], x) and torch.equal(table[windows + 1], y)
