"""Tokenizers: the lecture's characters, a byte-level BPE trained on the corpus, and GPT-2's encoding.

Each one turns text into token ids (numpy int64) and back, and has a `vocab_size`, a `kind` (the
`--tokenizer` value) and a `state()`: plain strings that a checkpoint stores (loadable with
`weights_only=True`) and `from_state` rebuilds. The BPE's state is its whole serialised form, so a
checkpoint samples and fine-tunes without the corpus; GPT-2's is its name (tiktoken holds the files).

The byte-level tokenizers (`bpe`, `gpt2`) encode any text; `unknown()` is for the character one.
Long texts are encoded in pieces cut where GPT-2's pre-tokenizer splits anyway (between a non-space
and a space), so a text encodes to the same ids in one call or in chunks of any size.
"""

from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np


from fastgpt.cli import UserError
from fastgpt.files import Progress, atomic_write, file_lock
from fastgpt.text import Text, split_point, text_chunks

KINDS = ("char", "bpe", "gpt2")  # the --tokenizer values

EXTRA = "bpe"  # the optional dependencies' extra: pip install -e ".[bpe]"
PIECE_CHARS = 1 << 16  # text per piece handed to the byte-level encoders (they encode pieces in parallel)
MAX_RUN = 1 << 16  # a piece ends within this many characters past its size, at a boundary if there is one
_CUT = re.compile(r"(?<=\S)(?=\s)")  # a boundary of GPT-2's pre-tokenizer: no token spans it


def require_module(name: str, purpose: str):
    """Import an optional dependency, or a UserError naming the extra that installs it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(f"{purpose} needs the {name} package: pip install -e \".[{EXTRA}]\" (or pip install "
                        f"{name})") from None


def pieces(text: str, size: int | None = None) -> Iterator[str]:
    """`text` in pieces of about `size` (PIECE_CHARS) characters, each cut at the first pre-tokenizer
    boundary past `size` (a run of MAX_RUN characters without one is cut where it ends)."""
    size = size or PIECE_CHARS
    start = 0
    while len(text) - start > size:
        m = _CUT.search(text, start + size, start + size + MAX_RUN)
        end = m.start() if m else start + size + MAX_RUN  # a run that long without a space: cut it
        yield text[start:end]
        start = end
    if start < len(text) or not text:
        yield text[start:]


def split_safely(text: str) -> tuple[str, str]:
    """(head, tail) of a text that arrives in chunks: head ends at the last pre-tokenizer boundary, so it
    encodes the same whatever follows; tail waits for the next chunk (all of it, with no boundary)."""
    last = None
    for last in _CUT.finditer(text, max(0, len(text) - PIECE_CHARS)):
        pass
    if last is None:
        return ("", text) if len(text) < 4 * PIECE_CHARS else (text, "")
    return text[:last.start()], text[last.start():]


class CharTokenizer:
    """Characters <-> token ids. The vocabulary is a string of distinct characters: sorted for a
    corpus of its own, and a checkpoint's vocabulary plus new characters when fine-tuning extends it."""

    kind = "char"
    byte_level = False

    def __init__(self, vocab: str):
        self.vocab = vocab
        self._stoi = {c: i for i, c in enumerate(vocab)}
        codepoints = np.array([ord(c) for c in vocab], dtype=np.int64)
        # codepoint -> id, -1 outside the vocabulary (and for the one code point past the largest): one
        # gather per character of a chunk
        self._table = np.full(max(int(codepoints.max(initial=0)) + 2, 256), -1, dtype=np.int64)
        self._table[codepoints] = np.arange(len(vocab))

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def state(self) -> dict:
        return {"kind": "char", "vocab": self.vocab}

    def unknown(self, text: str) -> list[str]:
        """The distinct characters of `text` that are not in the vocabulary, sorted."""
        return sorted(set(text) - set(self._stoi))

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text` (which must use only vocabulary characters), as int64."""
        if text.isascii():  # bytes index the table (which has at least 256 entries) directly
            ids = self._table[np.frombuffer(text.encode("ascii"), dtype=np.uint8)]
        else:
            codepoints = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
            ids = self._table[np.minimum(codepoints, len(self._table) - 1)]  # past the table: its final -1
        if len(ids) and ids.min() < 0:
            raise ValueError(f"text has characters outside the vocabulary: {self.unknown(text)!r}")
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.vocab[i] for i in ids)


class BPETokenizer:
    """A byte-level BPE (GPT-2's pre-tokenizer and byte alphabet) of the `tokenizers` library, trained on
    a corpus' train split: every text encodes, and decoding the ids of a text gives the text back."""

    kind = "bpe"
    byte_level = True

    def __init__(self, serialized: str):
        tokenizers = require_module("tokenizers", "--tokenizer=bpe")
        try:
            self._tok = tokenizers.Tokenizer.from_str(serialized)
        except Exception as e:  # the library raises its own exception type for a malformed file
            raise UserError(f"the BPE tokenizer does not load ({str(e)[:120]}): retrain it (delete the cached "
                            f"bpe-*.json in data_dir/cache) or use another checkpoint") from None
        self.serialized = serialized

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, show_progress: bool = False) -> BPETokenizer:
        """Train on the texts (an iterator of chunks, read once) to `vocab_size` tokens: the 256 bytes and
        the merges the corpus supports (fewer for a text too small to have that many)."""
        tokenizers = require_module("tokenizers", "--tokenizer=bpe")
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = tokenizers.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=show_progress, special_tokens=[],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator((p for text in texts for p in pieces(text)), trainer)
        return cls(tok.to_str())

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def state(self) -> dict:
        return {"kind": "bpe", "json": self.serialized}

    def unknown(self, text: str) -> list[str]:
        return []

    def encode(self, text: str) -> np.ndarray:
        encodings = self._tok.encode_batch_fast(list(pieces(text)))
        return np.array([i for e in encodings for i in e.ids], dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


class GPT2Tokenizer:
    """GPT-2's BPE (50257 tokens) through tiktoken, which downloads its files on first use and caches them
    (in TIKTOKEN_CACHE_DIR, or the temp directory)."""

    kind = "gpt2"
    byte_level = True

    def __init__(self):
        tiktoken = require_module("tiktoken", "--tokenizer=gpt2")
        try:
            self._enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # requests' errors when offline, a hash mismatch, a cache it cannot write
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:100]
            raise UserError(f"cannot load GPT-2's encoding ({reason}): tiktoken downloads it on first use, so "
                            f"run once with internet access, or set TIKTOKEN_CACHE_DIR to a directory holding "
                            f"its cached files") from None

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    def special_tokens(self) -> list[tuple[str, int]]:
        """GPT-2's special tokens (its end-of-text) and their ids, in id order."""
        return sorted(((name, self._enc.encode_single_token(name)) for name in self._enc.special_tokens_set),
                      key=lambda item: item[1])

    def mergeable_ranks(self) -> dict[bytes, int]:
        """Every ordinary token's bytes and id, which is its merge rank."""
        special = {rank for _, rank in self.special_tokens()}
        return {self._enc.decode_single_token_bytes(rank): rank for rank in range(self._enc.n_vocab)
                if rank not in special}

    def state(self) -> dict:
        return {"kind": "gpt2"}

    def unknown(self, text: str) -> list[str]:
        return []

    def encode(self, text: str) -> np.ndarray:
        batches = self._enc.encode_ordinary_batch(list(pieces(text)))
        return np.array([i for ids in batches for i in ids], dtype=np.int64)

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode(list(ids), errors="replace")


Tokenizer = CharTokenizer | BPETokenizer | GPT2Tokenizer


def from_state(state: object) -> Tokenizer:
    """The tokenizer a checkpoint stored; a malformed state is a UserError."""
    if isinstance(state, dict):
        kind = state.get("kind")
        if kind == "char" and isinstance(state.get("vocab"), str) and state["vocab"]:
            return CharTokenizer(state["vocab"])
        if kind == "bpe" and isinstance(state.get("json"), str):
            return BPETokenizer(state["json"])
        if kind == "gpt2":
            return GPT2Tokenizer()
    raise UserError("the checkpoint's tokenizer is damaged or of an unknown kind: use another checkpoint, "
                    "or one written by this fastgpt")


def check_prompt(tokenizer: Tokenizer, prompt: str) -> None:
    """A UserError for a prompt the model cannot take: an empty one, or characters outside a character
    vocabulary (the byte-level tokenizers take any text)."""
    if not prompt:
        raise UserError("the prompt is empty: pass at least one character with --prompt")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # bytes that are not UTF-8 reach Python as lone surrogates
        raise UserError(f"the prompt is not UTF-8 text (a bad byte at character {e.start}): pass UTF-8 text, "
                        f"or a UTF-8 file with --prompt_file") from None
    unknown = tokenizer.unknown(prompt)
    if unknown:
        raise UserError(f"the prompt has characters the model's vocabulary lacks: "
                        f"{' '.join(repr(c) for c in unknown)}; remove or replace them")


def default_prompt(tokenizer: Tokenizer) -> str:
    """What generation starts from when no prompt is given: a newline, as nanoGPT, or the first
    character of a character vocabulary that has none."""
    if tokenizer.byte_level or "\n" in tokenizer.vocab:
        return "\n"
    return tokenizer.vocab[0]


BPE_VERSION = 1  # bump when the BPE's training changes


def pretoken_chunks(chunks: Iterable[str]) -> Iterator[str]:
    """The chunks re-cut at pre-tokenizer boundaries, so that a byte-level BPE encodes them as it would
    the whole text."""
    carry = ""
    for chunk in chunks:
        head, carry = split_safely(carry + chunk)
        if head:
            yield head
    if carry:
        yield carry


def char_tokenizer(text: Text, vocab: str | None, extend_vocab: bool, where: str) -> CharTokenizer:
    """The corpus' own sorted characters, or a checkpoint's `vocab`: then characters outside it are a
    UserError, unless `extend_vocab` appends them."""
    if vocab is None:
        return CharTokenizer(text.chars)
    missing = [c for c in text.chars if c not in set(vocab)]
    if missing and not extend_vocab:
        shown = " ".join(repr(c) for c in missing[:30])
        if len(missing) > 30:
            shown += f" and {len(missing) - 30} more"
        raise UserError(f"{where} has characters the checkpoint's vocabulary lacks: {shown}; pass "
                        f"--extend_vocab to add them")
    return CharTokenizer(vocab + "".join(missing))


def trained_bpe(text: Text, data_dir: str | Path, vocab_size: int) -> BPETokenizer:
    """A byte-level BPE of `vocab_size` tokens trained on the corpus' train split, from the cache in
    data_dir/cache when an earlier start trained it."""
    path = Path(data_dir) / "cache" / f"bpe-{text.sha256}-{vocab_size}-v{BPE_VERSION}.json"
    with file_lock(path.with_suffix(".lock")):
        if path.is_file():
            try:
                return BPETokenizer(path.read_text(encoding="utf-8"))
            except (UserError, OSError, UnicodeDecodeError):
                pass  # damaged: trained again below
        stop = split_point(text)
        progress = Progress(f"training a BPE of {vocab_size} tokens", stop)
        tokenizer = BPETokenizer.train(pretoken_chunks(text_chunks(text, 0, stop, progress)),
                                       vocab_size)
        progress.close()
        try:
            atomic_write(path, lambda f: f.write(tokenizer.serialized.encode("utf-8")))
        except OSError as e:
            print(f"warning: could not cache the BPE in {path.parent} ({e.strerror})", file=sys.stderr)
    return tokenizer


def make_tokenizer(kind: str, text: Text, data_dir: str | Path, vocab_size: int, state: dict | None,
                   extend_vocab: bool, where: str) -> Tokenizer:
    """The run's tokenizer: a checkpoint's (its `state`, a char vocabulary extended when asked), or a new
    one of `kind` for this corpus."""
    if kind == "char":
        return char_tokenizer(text, state["vocab"] if state else None, extend_vocab, where)
    if state is not None:
        return from_state(state)
    if kind == "bpe":
        return trained_bpe(text, data_dir, vocab_size)
    return GPT2Tokenizer()
