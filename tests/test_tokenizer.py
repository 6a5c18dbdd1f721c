"""Tokenizers: the byte-level BPE round-trips unseen text and encodes alike in one piece or many, the
checkpoint state rebuilds each kind, and a missing extra or GPT-2's files offline end in one line."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from conftest import one_line_error

from fastgpt import tokenizer as tk
from fastgpt.cli import UserError
from fastgpt.tokenizer import BPETokenizer, CharTokenizer, from_state, pieces, split_safely

pytest.importorskip("tokenizers")

TRAIN_TEXT = "".join(f"{who}: the {what} is {how}, my lord.\nAnd so {how} a {what}!\n\n"
                     for who in ("ROMEO", "JULIET", "NURSE") for what in ("night", "rose", "sword")
                     for how in ("bright", "sweet", "cold", "kind"))

UNSEEN = [
    "ROMEO: a completely new sentence, with words never seen: zebra, quixotic.\n",
    "naïve café — ☃ 😀 日本語 Ünïcödé",
    "  leading spaces,\ttabs,\r\nwindows line ends and   runs   of spaces  \n\n\n",
    "x" * 5000 + " " + "y" * 3,
    "'s 't 're contractions isn't it? 12345 67.89",
    "\x00\x01 control characters \x7f and a lone \u200b zero-width space",
    "",
]


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train([TRAIN_TEXT], vocab_size=300)


@pytest.mark.parametrize("text", UNSEEN)
def test_bpe_round_trips_unseen_text(bpe, text):
    ids = bpe.encode(text)
    assert ids.dtype == np.int64 and (len(ids) == 0) == (text == "")
    assert ((0 <= ids) & (ids < bpe.vocab_size)).all()
    assert bpe.decode(ids) == text


def test_bpe_learns_merges_up_to_its_vocabulary(bpe):
    assert 256 < bpe.vocab_size <= 300
    text = "ROMEO: the rose is sweet, my lord.\n"
    assert len(bpe.encode(text)) < len(text.encode("utf-8")) / 2  # seen words take few tokens


def test_bpe_encodes_alike_in_one_piece_or_many(bpe, monkeypatch):
    text = TRAIN_TEXT * 3 + "".join(UNSEEN)
    whole = np.array(bpe._tok.encode(text).ids)
    for size in (7, 64, 1000):
        monkeypatch.setattr(tk, "PIECE_CHARS", size)
        got = np.concatenate([bpe.encode(p) for p in pieces(text, size)])
        np.testing.assert_array_equal(got, whole)
        np.testing.assert_array_equal(bpe.encode(text), whole)


def test_pieces_cover_the_text_and_cut_before_whitespace(monkeypatch):
    text = "abc def\n\nghi  jkl " * 50
    parts = list(pieces(text, 10))
    assert "".join(parts) == text and len(parts) > 10
    assert all(p[-1:].strip() and not parts[i + 1][:1].strip() for i, p in enumerate(parts[:-1]))
    assert list(pieces("x" * 25, 10)) == ["x" * 25]  # no boundary: one piece
    monkeypatch.setattr(tk, "MAX_RUN", 5)
    assert list(pieces("x" * 25, 10)) == ["x" * 15, "x" * 10]  # until the run is too long
    assert list(pieces("")) == [""]


def test_split_safely_keeps_a_tail_that_may_continue():
    head, tail = split_safely("first line\nsecond wor")
    assert head + tail == "first line\nsecond wor"
    assert head == "first line\nsecond" and tail == " wor"
    assert split_safely("nospaces") == ("", "nospaces")


def test_bpe_is_the_same_after_a_round_trip_through_its_state(bpe):
    again = from_state(bpe.state())
    text = "".join(UNSEEN)
    np.testing.assert_array_equal(again.encode(text), bpe.encode(text))
    assert again.vocab_size == bpe.vocab_size and again.kind == "bpe"


def test_bpe_training_is_deterministic():
    a = BPETokenizer.train([TRAIN_TEXT], vocab_size=280)
    b = BPETokenizer.train(iter([TRAIN_TEXT[:500], TRAIN_TEXT[500:]]), vocab_size=280)
    assert a.serialized == BPETokenizer.train([TRAIN_TEXT], vocab_size=280).serialized
    assert a.vocab_size == b.vocab_size


@pytest.mark.parametrize("state", [None, "bpe", {"kind": "sentencepiece"}, {"kind": "char", "vocab": ""},
                                   {"kind": "char", "vocab": 3}, {"kind": "bpe", "json": "{not json"},
                                   {"kind": "bpe"}])
def test_damaged_tokenizer_states_are_user_errors(state):
    with pytest.raises(UserError):
        from_state(state)


def test_char_state_round_trips():
    tok = CharTokenizer.from_text("hello wörld 😀\n")
    again = from_state(tok.state())
    assert again.vocab == tok.vocab and again.kind == "char" and not again.byte_level


def test_char_encode_handles_every_code_point_range():
    tok = CharTokenizer("\x00a\x7f\xffĀ☃\U0001F600\U0010FFFF")
    text = "\U0010FFFF\x00\x7fa\xffĀ☃\U0001F600" * 3
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and tok.decode(ids) == text
    for outside in ("b", "\x80", "\U0010FFFE", "Ɓ"):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tok.encode("a" + outside)


@pytest.mark.parametrize("module, make", [("tokenizers", lambda: BPETokenizer.train(["abc"], 260)),
                                          ("tiktoken", tk.GPT2Tokenizer)])
def test_a_missing_extra_names_it(monkeypatch, module, make):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    with pytest.raises(UserError, match=rf'needs the {module} package: pip install -e "\.\[bpe\]"'):
        make()


def test_gpt2_offline_is_one_line_and_exit_2(tmp_path, cli, small_corpus):
    pytest.importorskip("tiktoken")
    # no cached files, and every download refused at once (this machine may have no network at all)
    env = {"TIKTOKEN_CACHE_DIR": str(tmp_path / "tiktoken"), "HTTPS_PROXY": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "NO_PROXY": ""}
    result = cli("fastgpt.train", "--tokenizer=gpt2", f"--data_file={small_corpus}", f"--data_dir={tmp_path}",
                 f"--out_dir={tmp_path / 'out'}", "--max_iters=1", env=env, timeout=120)
    line = one_line_error(result)
    assert "GPT-2's encoding" in line and "TIKTOKEN_CACHE_DIR" in line and "internet" in line
