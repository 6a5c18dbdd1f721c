"""The character tokenizer, the corpus (its split, its cache, the Tiny Shakespeare download) and the
batches."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from fastgpt.cli import UserError
from fastgpt.data import Batches, load_corpus
from fastgpt.text import tiny_shakespeare
from fastgpt.tokenizer import CharTokenizer

CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------------
# CharTokenizer


def test_tokenizer_vocab_is_sorted_distinct_characters():
    tok = CharTokenizer.from_text("hello, wörld ☃ 😀\n")
    assert tok.vocab == "\n ,dehlorwö☃😀"
    assert tok.vocab_size == 13


@pytest.mark.parametrize("text", ["", "a", "hello, wörld", "naïve café — ☃ 😀 日本語\n\ttabs"])
def test_tokenizer_round_trip(text):
    tok = CharTokenizer.from_text("naïve café — ☃ 😀 日本語\n\ttabs hello, wörld")
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and ids.shape == (len(text),)
    assert [tok.vocab[i] for i in ids] == list(text)
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text


def test_tokenizer_ids_are_vocab_positions():
    tok = CharTokenizer("\nabcé")
    assert tok.encode("cab\né").tolist() == [3, 1, 2, 0, 4]


def test_tokenizer_unknown_lists_missing_characters_sorted_once():
    tok = CharTokenizer.from_text("abc")
    assert tok.unknown("abcabc") == []
    assert tok.unknown("zaéz b😀y") == [" ", "y", "z", "é", "😀"]


@pytest.mark.parametrize("text", ["abd", "d", "é", "`", "~", "a\x00"])  # inside, before and after the vocab
def test_tokenizer_encode_rejects_unknown_characters(text):
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(ValueError, match="characters outside the vocabulary"):
        tok.encode(text)


# ---------------------------------------------------------------------------------------------------
# load_corpus


def test_load_corpus_splits_90_10(small_corpus, tmp_path):
    text = small_corpus.read_text(encoding="utf-8")
    corpus = load_corpus(str(small_corpus), tmp_path / "data")
    assert corpus.source == small_corpus
    assert corpus.tokenizer.vocab == "".join(sorted(set(text)))
    assert "é" in corpus.tokenizer.vocab
    assert len(corpus.train) == int(len(text) * 0.9)
    assert len(corpus.train) + len(corpus.val) == len(text)
    assert corpus.tokenizer.decode(corpus.train) + corpus.tokenizer.decode(corpus.val) == text
    assert corpus.train.dtype == np.uint8 and corpus.val.dtype == np.uint8


def test_load_corpus_large_vocab_uses_uint16(tmp_path):
    text = "".join(chr(0x100 + i) for i in range(300)) * 3
    path = tmp_path / "wide.txt"
    path.write_text(text, encoding="utf-8")
    corpus = load_corpus(str(path), tmp_path / "data")
    assert corpus.tokenizer.vocab_size == 300
    assert corpus.train.dtype == np.uint16
    assert corpus.tokenizer.decode(np.concatenate([corpus.train, corpus.val])) == text


@pytest.fixture
def count_encodes(monkeypatch):
    """Counts CharTokenizer.encode calls: the cache's whole point is to skip them."""
    calls = []
    encode = CharTokenizer.encode

    def counting(self, text):
        calls.append(len(text))
        return encode(self, text)

    monkeypatch.setattr(CharTokenizer, "encode", counting)
    return calls


def test_second_load_reads_the_cache(small_corpus, tmp_path, count_encodes):
    first = load_corpus(str(small_corpus), tmp_path / "data")
    assert len(count_encodes) == 1
    assert len(list((tmp_path / "data" / "cache").glob(f"{first.sha256}-char-*.bin"))) == 1
    second = load_corpus(str(small_corpus), tmp_path / "data")
    assert len(count_encodes) == 1  # not encoded again
    assert second.tokenizer.vocab == first.tokenizer.vocab
    assert second.sha256 == first.sha256
    np.testing.assert_array_equal(second.train, first.train)
    np.testing.assert_array_equal(second.val, first.val)
    assert second.train.dtype == first.train.dtype


def test_second_load_works_with_encode_broken(small_corpus, tmp_path, monkeypatch):
    first = load_corpus(str(small_corpus), tmp_path / "data")

    def broken(self, text):
        raise AssertionError("encoded again despite the cache")

    monkeypatch.setattr(CharTokenizer, "encode", broken)
    second = load_corpus(str(small_corpus), tmp_path / "data")
    np.testing.assert_array_equal(second.train, first.train)


def test_changed_file_is_encoded_again(small_corpus, tmp_path, count_encodes):
    first = load_corpus(str(small_corpus), tmp_path / "data")
    small_corpus.write_text(small_corpus.read_text(encoding="utf-8") + "NEW: the zebra ü!\n", encoding="utf-8")
    second = load_corpus(str(small_corpus), tmp_path / "data")
    assert len(count_encodes) == 2
    assert second.sha256 != first.sha256
    assert set("Wzbü!") <= set(second.tokenizer.vocab)
    assert second.tokenizer.decode(np.concatenate([second.train, second.val])).endswith("the zebra ü!\n")


def damage(path: Path, how: str) -> None:
    raw = path.read_bytes()
    path.write_bytes({"garbage": b"this is not a token file", "empty": b"", "truncated": raw[:len(raw) // 2],
                      "flipped byte": raw[:100] + bytes([raw[100] ^ 0xFF]) + raw[101:]}[how])


@pytest.mark.parametrize("suffix", [".bin", ".json"])
@pytest.mark.parametrize("how", [
    "garbage",
    "empty",
    "truncated",
    "flipped byte",
])
def test_damaged_cache_is_rebuilt(small_corpus, tmp_path, count_encodes, how, suffix):
    first = load_corpus(str(small_corpus), tmp_path / "data")
    (cache,) = (tmp_path / "data" / "cache").glob(f"*{suffix}")
    damage(cache, how)
    second = load_corpus(str(small_corpus), tmp_path / "data")
    np.testing.assert_array_equal(second.train, first.train)
    np.testing.assert_array_equal(second.val, first.val)
    assert len(count_encodes) == 2
    load_corpus(str(small_corpus), tmp_path / "data")  # and the rebuilt cache is whole again
    assert len(count_encodes) == 2


def test_cache_keeps_a_nul_only_vocabulary(tmp_path):
    path = tmp_path / "nul.txt"
    path.write_text("\x00" * 50, encoding="utf-8")
    assert load_corpus(str(path), tmp_path / "data").tokenizer.vocab == "\x00"
    assert load_corpus(str(path), tmp_path / "data").tokenizer.vocab == "\x00"


def test_cache_keeps_a_vocabulary_starting_with_nul(tmp_path):
    path = tmp_path / "nul.txt"
    path.write_text("\x00ab\x00ba" * 20, encoding="utf-8")
    assert load_corpus(str(path), tmp_path / "data").tokenizer.vocab == "\x00ab"
    assert load_corpus(str(path), tmp_path / "data").tokenizer.vocab == "\x00ab"


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"", "is empty"),
    (b"\xff\xfe abc", r"is not UTF-8 text \(bad byte at offset 0\)"),
    (b"abc\n\xc3(", r"is not UTF-8 text \(bad byte at offset 4\)"),
    ("directory", "is not a regular file"),
])
def test_bad_data_files_are_user_errors(tmp_path, content, message):
    path = tmp_path / "input.txt"
    if content == "directory":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=f"{message}.*--data_file"):
        load_corpus(str(path), tmp_path / "data")


# ---------------------------------------------------------------------------------------------------
# Tiny Shakespeare


def test_tiny_shakespeare_download(shakespeare_path, tmp_path, capsys):
    path = tiny_shakespeare(tmp_path / "data", url=shakespeare_path.as_uri())
    assert path == tmp_path / "data" / "tinyshakespeare" / "input.txt"
    assert path.read_bytes() == shakespeare_path.read_bytes()
    assert "downloading Tiny Shakespeare" in capsys.readouterr().out
    # a second call finds the verified file and does not download again
    assert tiny_shakespeare(tmp_path / "data", url=(tmp_path / "nowhere.txt").as_uri()) == path
    assert capsys.readouterr().out == ""


def test_tiny_shakespeare_download_with_the_wrong_content(small_corpus, tmp_path):
    with pytest.raises(UserError, match=r"is not Tiny Shakespeare \(sha256 mismatch\).*--data_file=PATH"):
        tiny_shakespeare(tmp_path / "data", url=small_corpus.as_uri())
    assert not (tmp_path / "data" / "tinyshakespeare" / "input.txt").exists()


def test_tiny_shakespeare_failed_download(tmp_path):
    with pytest.raises(UserError, match=r"could not download Tiny Shakespeare from file:.*--data_file=PATH"):
        tiny_shakespeare(tmp_path / "data", url=(tmp_path / "missing.txt").as_uri())
    assert not (tmp_path / "data" / "tinyshakespeare" / "input.txt").exists()


def test_tiny_shakespeare_existing_wrong_file(small_corpus, shakespeare_path, tmp_path):
    path = tmp_path / "data" / "tinyshakespeare" / "input.txt"
    path.parent.mkdir(parents=True)
    path.write_bytes(small_corpus.read_bytes())
    with pytest.raises(UserError, match=f"{path} is not Tiny Shakespeare.*delete it.*--data_file"):
        tiny_shakespeare(tmp_path / "data", url=shakespeare_path.as_uri())
    assert path.read_bytes() == small_corpus.read_bytes()  # left alone


def test_tiny_shakespeare_path_that_is_a_directory(shakespeare_path, tmp_path):
    (tmp_path / "data" / "tinyshakespeare" / "input.txt").mkdir(parents=True)
    with pytest.raises(UserError, match="--data_file"):
        tiny_shakespeare(tmp_path / "data", url=shakespeare_path.as_uri())


def test_load_corpus_defaults_to_tiny_shakespeare_in_data_dir(shakespeare_path, tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    path = tmp_path / "data" / "tinyshakespeare" / "input.txt"
    path.parent.mkdir(parents=True)
    path.write_bytes(shakespeare_path.read_bytes())
    corpus = load_corpus("", tmp_path / "data")
    assert corpus.source == path
    assert corpus.tokenizer.vocab_size == 65
    assert len(corpus.train) == 1_003_854 and len(corpus.val) == 111_540  # nanoGPT's shakespeare_char split


# ---------------------------------------------------------------------------------------------------
# Batches


def test_batch_shapes_and_shift(small_corpus, tmp_path):
    corpus = load_corpus(str(small_corpus), tmp_path / "data")
    x, y = Batches(corpus.train, block_size=16, batch_size=5, device=CPU, seed=0).next()
    assert x.shape == y.shape == (5, 16)
    assert x.dtype == y.dtype == torch.int64
    torch.testing.assert_close(x[:, 1:], y[:, :-1])


def test_batches_are_windows_of_the_data():
    data = np.arange(1000, dtype=np.int32)  # every token unique: a window's first token is its start
    batches = Batches(data, block_size=8, batch_size=32, device=CPU, seed=3)
    for _ in range(3):
        x, y = batches.next()
        for row_x, row_y in zip(x.numpy(), y.numpy()):
            start = row_x[0]
            np.testing.assert_array_equal(row_x, data[start:start + 8])
            np.testing.assert_array_equal(row_y, data[start + 1:start + 9])


def test_batches_reach_every_window():
    data = np.arange(13, dtype=np.uint8)
    batches = Batches(data, block_size=8, batch_size=16, device=CPU, seed=0)
    starts = {int(s) for _ in range(20) for s in batches.next()[0][:, 0]}
    assert starts == set(range(5))  # 0 .. len - block_size - 1: the last window ends on the last token


def test_smallest_split_gives_its_one_window():
    data = np.arange(9, dtype=np.uint8)
    x, y = Batches(data, block_size=8, batch_size=2, device=CPU, seed=0).next()
    assert x.tolist() == [list(range(8))] * 2
    assert y.tolist() == [list(range(1, 9))] * 2


def test_same_seed_same_batches():
    data = np.arange(500, dtype=np.int32)
    a, b, c = (Batches(data, 8, 4, CPU, seed=s) for s in (7, 7, 8))
    for _ in range(3):
        xa, ya = a.next()
        xb, yb = b.next()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a.next()[0], c.next()[0])


def test_generator_state_restores_the_stream():
    data = np.arange(500, dtype=np.int32)
    batches = Batches(data, 8, 4, CPU, seed=7)
    batches.next()
    state = batches.generator.get_state()
    expected = [batches.next() for _ in range(2)]
    fresh = Batches(data, 8, 4, CPU, seed=99)
    fresh.generator.set_state(state)
    for x, y in expected:
        nx, ny = fresh.next()
        assert torch.equal(nx, x) and torch.equal(ny, y)


def test_split_shorter_than_a_window_is_a_user_error():
    with pytest.raises(UserError, match=r"the val split has 8 tokens but --block_size=8 needs at least 9"):
        Batches(np.arange(8, dtype=np.uint8), block_size=8, batch_size=2, device=CPU, seed=0, name="val")
