"""The corpus, its tokens and the batches.

Tiny Shakespeare is downloaded on first use into `data_dir` and checked against its sha256; any UTF-8
text can be used instead: a file, a directory (its .txt files in sorted order) or a glob, read as one
text. Corpora of any size: the text is read in chunks (a character split across a chunk's edge is
decoded whole), encoded chunk by chunk and written to `data_dir/cache` as raw tokens of the smallest
unsigned type that holds the vocabulary, which training memory-maps. A second start finds them there,
keyed by the corpus' sha256 and the tokenizer (its vocabulary, its merges), and checks them against
their CRC-32.

Tokenizers (fastgpt.tokenizer): `char`, the sorted set of the corpus' characters (or a checkpoint's);
`bpe`, a byte-level BPE trained on the train split and cached in `data_dir/cache` keyed by the corpus'
sha256 and its size; `gpt2`, GPT-2's through tiktoken. The split: with characters, the first 90% of the
tokens train and the rest validate (as nanoGPT); with a BPE, the text is cut at the first character
boundary after 90% of its bytes, so the BPE is trained on the train split's text alone.

Batches are random windows drawn with a seeded `torch.Generator`: from the split on the training device
when it fits there (the CPU always: there the split is the memory-mapped file), or else gathered on the
host into pinned buffers and copied without blocking.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastgpt.cli import UserError
from fastgpt.files import Progress, atomic_write, file_lock
from fastgpt.text import TRAIN_FRACTION, Text, corpus_files, read_chunks, scan, split_point, text_chunks
from fastgpt.tokenizer import KINDS, Tokenizer, make_tokenizer, pretoken_chunks

CACHE_VERSION = 4  # bump when the cached layout or the split changes (4: the description's own checksum)
MAP_BYTES = 1 << 26  # token files larger than this are memory-mapped, smaller ones read


# ---------------------------------------------------------------------------------------------------
# the text: files, one pass to hash and check it, chunked reading


# ---------------------------------------------------------------------------------------------------
# the tokenizer


# ---------------------------------------------------------------------------------------------------
# the tokens: encoded once into data_dir/cache, memory-mapped


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every token id."""
    return np.dtype(np.uint8 if vocab_size <= 1 << 8 else np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def cache_stem(data_dir: str | Path, text: Text, tokenizer: Tokenizer) -> Path:
    state = json.dumps(tokenizer.state(), sort_keys=True, ensure_ascii=True)
    key = hashlib.sha256(state.encode("ascii")).hexdigest()[:16]
    return Path(data_dir) / "cache" / f"{text.sha256}-{tokenizer.kind}-{key}-v{CACHE_VERSION}"


def describe(meta: dict) -> int:
    """The CRC-32 of a cache entry's description: its checksum covers every field that is trusted (the
    split's length too, which no token's CRC can vouch for)."""
    fields = {k: meta[k] for k in ("dtype", "tokens", "train", "crc32", "sha256", "tokenizer")}
    return zlib.crc32(json.dumps(fields, sort_keys=True).encode())


def read_tokens(stem: Path, vocab_size: int, byte_level: bool) -> tuple[np.ndarray, int] | None:
    """The cached tokens (memory-mapped) and the train split's length; None when the entry is missing or
    fails any check (the description's own checksum, dtype, size, split, the tokens' CRC-32 and that every
    id is below vocab_size), so that a damaged entry is rebuilt, never trusted."""
    try:
        meta = json.loads(Path(f"{stem}.json").read_text())
        if not isinstance(meta, dict) or meta.get("check") != describe(meta):
            return None
        dtype, n, n_train = np.dtype(meta["dtype"]), meta["tokens"], meta["train"]
        path = Path(f"{stem}.bin")
        counts = type(n) is int and type(n_train) is int and 0 <= n_train <= n and n > 0
        if not counts or dtype != token_dtype(vocab_size):
            return None
        if path.stat().st_size != n * dtype.itemsize or (not byte_level and n_train != int(n * TRAIN_FRACTION)):
            return None
        crc, top, carry = 0, 0, b""  # the CRC and the largest id, in one pass that maps nothing
        for chunk in read_chunks(path):
            crc = zlib.crc32(chunk, crc)
            chunk = carry + chunk
            whole = len(chunk) - len(chunk) % dtype.itemsize
            if whole:
                top = max(top, int(np.frombuffer(chunk, dtype=dtype, count=whole // dtype.itemsize).max()))
            carry = chunk[whole:]
        if crc != meta["crc32"] or top >= vocab_size:  # damaged, or an id the model has no row for
            return None
        if path.stat().st_size <= MAP_BYTES:  # small: in memory, like any array
            tokens = np.fromfile(path, dtype=dtype, count=n)
        else:  # copy-on-write mapping: writable for torch.from_numpy, shared page cache, never written
            tokens = np.memmap(path, dtype=dtype, mode="c", shape=(n,))
            with contextlib.suppress(AttributeError, OSError):  # batches are random windows: no read-ahead
                tokens._mmap.madvise(mmap.MADV_RANDOM)
        return tokens, n_train
    except (OSError, ValueError, KeyError, TypeError, OverflowError, RecursionError, UserError):
        return None


def write_tokens(stem: Path, text: Text, tokenizer: Tokenizer) -> None:
    """Encode the corpus chunk by chunk into stem.bin (written whole or not at all) and describe it in
    stem.json, written after it."""
    dtype = token_dtype(tokenizer.vocab_size)
    progress = Progress(f"encoding the corpus ({tokenizer.kind})", text.nbytes)
    sha = hashlib.sha256()  # of the bytes encoded: a file edited meanwhile must not be cached as the original
    if tokenizer.byte_level:  # a BPE: each split's text encoded apart
        split = split_point(text)
        parts = [pretoken_chunks(text_chunks(text, 0, split, progress, sha)),
                 pretoken_chunks(text_chunks(text, split, None, progress, sha))]
    else:  # characters: one stream, split on tokens below
        parts = [text_chunks(text, progress=progress, sha=sha)]
    counts, crc = [], 0

    def write(f) -> None:
        nonlocal crc
        for chunks in parts:
            counts.append(0)
            for chunk in chunks:
                raw = tokenizer.encode(chunk).astype(dtype).tobytes()
                f.write(raw)
                crc = zlib.crc32(raw, crc)
                counts[-1] += len(raw) // dtype.itemsize
        if sha.hexdigest() != text.sha256:
            raise UserError(f"{text.files[0] if len(text.files) == 1 else 'the corpus'} changed while it was "
                            f"being encoded: start again once it is written")

    atomic_write(Path(f"{stem}.bin"), write)
    progress.close()
    count = sum(counts)
    n_train = counts[0] if tokenizer.byte_level else int(count * TRAIN_FRACTION)
    meta = {"dtype": dtype.name, "tokens": count, "train": n_train, "crc32": crc, "sha256": text.sha256,
            "tokenizer": tokenizer.kind, "files": [str(p) for p in text.files]}
    meta["check"] = describe(meta)
    atomic_write(Path(f"{stem}.json"), lambda f: f.write(json.dumps(meta, indent=1).encode()))


def cached_tokens(data_dir: str | Path, text: Text, tokenizer: Tokenizer) -> tuple[np.ndarray, int]:
    """The corpus' tokens and the train split's length, encoded on the first start and read back after."""
    stem = cache_stem(data_dir, text, tokenizer)
    found = read_tokens(stem, tokenizer.vocab_size, tokenizer.byte_level)
    if found is not None:
        return found
    try:
        with file_lock(Path(f"{stem}.lock")):
            found = read_tokens(stem, tokenizer.vocab_size, tokenizer.byte_level)  # built meanwhile by another
            if found is None:
                write_tokens(stem, text, tokenizer)
                found = read_tokens(stem, tokenizer.vocab_size, tokenizer.byte_level)
    except OSError as e:
        raise UserError(f"cannot write the encoded corpus to {stem.parent} ({e.strerror}): free disk space, "
                        f"or pass a writable --data_dir") from None
    if found is None:
        raise UserError(f"the encoded corpus in {stem.parent} does not read back: check the disk, or pass "
                        f"another --data_dir")
    return found


@dataclass
class Corpus:
    source: Path | str  # the file, or the directory or glob and its file count
    sha256: str
    tokenizer: Tokenizer
    train: np.ndarray  # token ids, smallest unsigned dtype that holds the vocabulary (memory-mapped)
    val: np.ndarray


def load_corpus(data_file: str = "", data_dir: str | Path = "data", vocab: str | None = None,
                extend_vocab: bool = False, expected_sha256: str | None = None, tokenizer: str = "char",
                vocab_size: int = 2048, tokenizer_state: dict | None = None) -> Corpus:
    """Read, tokenize and split a corpus (Tiny Shakespeare when data_file is empty), using the cache.

    The tokenizer is a new one of kind `tokenizer` (a BPE of `vocab_size`), or a checkpoint's:
    `tokenizer_state`, or `vocab` for a character one (when resuming or fine-tuning; characters outside
    it are a UserError unless `extend_vocab` appends them). A resumed run passes `expected_sha256`, the
    corpus its checkpoint was trained on.
    """
    if vocab is not None:
        tokenizer_state = {"kind": "char", "vocab": vocab}
    kind = tokenizer_state["kind"] if tokenizer_state else tokenizer
    if kind not in KINDS:
        raise UserError(f"unknown --tokenizer={kind}: choose one of {', '.join(KINDS)}")
    files = corpus_files(data_file, data_dir)
    source = files[0] if len(files) == 1 else f"{data_file} ({len(files)} files)"
    text = scan(files, want_chars=kind == "char")
    if expected_sha256 is not None and text.sha256 != expected_sha256:
        raise UserError(f"{source} is not the corpus the checkpoint was trained on: resume with the same "
                        f"--data_file")
    tok = make_tokenizer(kind, text, data_dir, vocab_size, tokenizer_state, extend_vocab, str(source))
    tokens, n_train = cached_tokens(data_dir, text, tok)
    return Corpus(source, text.sha256, tok, tokens[:n_train], tokens[n_train:])


# ---------------------------------------------------------------------------------------------------
# batches


def fits_on(device: torch.device, nbytes: int) -> bool:
    """Whether a split of `nbytes` lives on the device: always on the CPU (memory-mapped), on a GPU when it
    takes at most an eighth of the device's memory (a rule of the hardware, so a resumed run decides alike)."""
    if device.type == "cuda":
        return nbytes <= torch.cuda.get_device_properties(device).total_memory // 8
    if device.type == "mps":
        return nbytes <= 1 << 30
    return True


class Batches:
    """Random (x, y) windows of one split: x is (batch_size, block_size) token ids, y is x shifted by
    one. When the split fits on `device` it lives there and the offsets come from a seeded generator on
    that device, so a batch costs no host work; otherwise the windows are gathered on the host (a CPU
    generator) into one of two pinned buffers and copied without blocking. Either way the stream is
    saved and restored exactly with `generator`'s state."""

    def __init__(self, data: np.ndarray, block_size: int, batch_size: int, device: torch.device,
                 seed: int, name: str = "split"):
        if len(data) < block_size + 1:
            raise UserError(
                f"the {name} split has {len(data)} tokens but --block_size={block_size} needs at least "
                f"{block_size + 1}: use a longer text or a smaller --block_size"
            )
        device = torch.device(device)
        self.device = device
        self.block_size = block_size
        self.batch_size = batch_size
        self._mask = 0xFFFF if data.dtype == np.uint16 else None  # read as int16: torch indexes it everywhere
        signed = {np.dtype(np.uint16): np.int16, np.dtype(np.uint32): np.int32}.get(data.dtype)
        host = torch.from_numpy(data.view(signed) if signed else data)
        self.on_device = fits_on(device, data.nbytes)
        self.data = host.to(device) if self.on_device else host
        where = device if self.on_device else torch.device("cpu")
        self.generator = torch.Generator(device=where)
        self.generator.manual_seed(seed)
        self.eval_generator = torch.Generator(device=where)  # evaluation's fixed batches, reseeded each time
        self._offsets = torch.arange(block_size + (0 if self.on_device else 1), device=where)
        if not self.on_device:
            pin = device.type == "cuda"
            self._buffers = [torch.empty((batch_size, block_size + 1), dtype=host.dtype, pin_memory=pin)
                             for _ in range(2)]
            self._copied: list[torch.cuda.Event | None] = [None, None]
            self._turn = 0

    def _widen(self, t: torch.Tensor) -> torch.Tensor:
        t = t.long()
        return t & self._mask if self._mask is not None else t

    def seeded_generator(self, seed: int) -> torch.Generator:
        """A generator of its own for `next`, on the device this split draws its offsets on: the GPU for a
        split that lives there, the CPU for one gathered on the host (whatever the run's device)."""
        return torch.Generator(device=self._offsets.device).manual_seed(seed)

    def next(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch from this split's generator, or from `generator` (evaluation draws its own
        fixed batches without disturbing the training stream)."""
        starts = torch.randint(len(self.data) - self.block_size, (self.batch_size, 1),
                               generator=generator or self.generator, device=self._offsets.device)
        index = starts + self._offsets  # (B, T), or (B, T + 1) on the host
        if self.on_device:
            return self._widen(self.data[index]), self._widen(self.data[index + 1])
        buffer, copied = self._buffers[self._turn], self._copied[self._turn]
        if copied is not None:
            copied.synchronize()  # the copy out of this buffer two batches ago is done
        torch.index_select(self.data, 0, index.view(-1), out=buffer.view(-1))
        # asynchronous only out of pinned memory (CUDA), where the event below guards the buffer's reuse
        window = buffer.to(self.device, non_blocking=self.device.type == "cuda")
        if self.device.type == "cuda":
            self._copied[self._turn] = torch.cuda.Event()
            self._copied[self._turn].record()
        self._turn ^= 1
        window = self._widen(window)
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()
