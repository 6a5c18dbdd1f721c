"""The corpus, the character tokenizer and the batches.

Tiny Shakespeare is downloaded on first use into `data_dir` and checked against its sha256; any UTF-8
text file can be used instead. The vocabulary is the sorted set of the corpus' characters (or a
checkpoint's, when resuming or fine-tuning); the first 90% of the encoded corpus is the train split,
the rest the val split. Encoded splits are cached in `data_dir/cache`, keyed by the corpus' sha256
and the vocabulary, so a second start does not re-encode. Batches are random windows drawn with a
seeded `torch.Generator` from the encoded corpus held on the training device.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastgpt.config import UserError

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TRAIN_FRACTION = 0.9
CACHE_VERSION = 2  # bump when the cached layout or the split changes


def atomic_write(path: Path, write) -> None:
    """Write a file through `write(fileobj)` so that it appears whole or not at all: a temp file in
    the same directory, fsync, then os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide checkpoints from other users
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def tiny_shakespeare(data_dir: str | Path, url: str = TINY_SHAKESPEARE_URL) -> Path:
    """Path of Tiny Shakespeare in data_dir, downloading and verifying it on first use."""
    path = Path(data_dir) / "tinyshakespeare" / "input.txt"
    fix = "download it yourself and pass --data_file=PATH"
    if path.exists():
        if not path.is_file():
            raise UserError(f"{path} is not a file: remove it, or {fix}")
        if hashlib.sha256(path.read_bytes()).hexdigest() != TINY_SHAKESPEARE_SHA256:
            raise UserError(f"{path} is not Tiny Shakespeare (sha256 mismatch): delete it, or {fix}")
        return path
    print(f"downloading Tiny Shakespeare from {url} to {path}")
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            raw = response.read()
    except (OSError, ValueError) as e:
        raise UserError(f"could not download Tiny Shakespeare from {url} ({e}); {fix}") from None
    if hashlib.sha256(raw).hexdigest() != TINY_SHAKESPEARE_SHA256:
        raise UserError(f"the download from {url} is not Tiny Shakespeare (sha256 mismatch); {fix}")
    atomic_write(path, lambda f: f.write(raw))
    return path


class CharTokenizer:
    """Characters <-> token ids. The vocabulary is a string of distinct characters: sorted for a
    corpus of its own, and a checkpoint's vocabulary plus new characters when fine-tuning extends it."""

    def __init__(self, vocab: str):
        self.vocab = vocab
        self._stoi = {c: i for i, c in enumerate(vocab)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def unknown(self, text: str) -> list[str]:
        """The distinct characters of `text` that are not in the vocabulary, sorted."""
        return sorted(set(text) - set(self._stoi))

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text` (which must use only vocabulary characters), as int64."""
        codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        distinct, inverse = np.unique(codepoints, return_inverse=True)  # a dict lookup per character kind
        try:
            ids = np.array([self._stoi[chr(c)] for c in distinct.tolist()], dtype=np.int64)
        except KeyError:
            raise ValueError(f"text has characters outside the vocabulary: {self.unknown(text)!r}") from None
        return ids[inverse.reshape(-1)]

    def decode(self, ids) -> str:
        return "".join(self.vocab[i] for i in ids)


def default_prompt(tokenizer: CharTokenizer) -> str:
    """What generation starts from when no prompt is given: a newline, as nanoGPT, or the first
    character of a vocabulary that has none."""
    return "\n" if "\n" in tokenizer.vocab else tokenizer.vocab[0]


@dataclass
class Corpus:
    source: Path
    sha256: str
    tokenizer: CharTokenizer
    train: np.ndarray  # token ids, smallest unsigned dtype that holds the vocabulary
    val: np.ndarray


def read_text_file(path: Path, flag: str = "--data_file") -> tuple[str, str]:
    """The file's text and the sha256 of its bytes; a missing, empty or non-UTF-8 file is a UserError
    that names the command-line `flag` the path came from."""
    try:
        if not path.exists():
            raise UserError(f"{path} does not exist: pass an existing UTF-8 text file with {flag}")
        if not path.is_file():
            raise UserError(f"{path} is not a regular file: pass a UTF-8 text file with {flag}")
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}): check the path and its permissions") from None
    if not raw:
        raise UserError(f"{path} is empty: pass a UTF-8 text file with some text in it with {flag}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        source = "UTF-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "LATIN1"  # a BOM names UTF-16
        raise UserError(
            f"{path} is not UTF-8 text (bad byte at offset {e.start}): convert it, e.g. with "
            f"iconv -f {source} -t UTF-8, and pass it with {flag}"
        ) from None
    return text, hashlib.sha256(raw).hexdigest()


def load_corpus(data_file: str = "", data_dir: str | Path = "data", vocab: str | None = None,
                extend_vocab: bool = False, expected_sha256: str | None = None) -> Corpus:
    """Read, tokenize and split a corpus (Tiny Shakespeare when data_file is empty), using the cache.

    The vocabulary is the corpus' own sorted characters, or `vocab` (a checkpoint's, when resuming or
    fine-tuning): then characters outside it are a UserError, unless `extend_vocab` appends them.
    A resumed run passes `expected_sha256`, the corpus its checkpoint was trained on.
    """
    path = Path(data_file) if data_file else tiny_shakespeare(data_dir)
    text, sha = read_text_file(path)
    if expected_sha256 is not None and sha != expected_sha256:
        raise UserError(f"{path} is not the corpus the checkpoint was trained on: resume with the same "
                        f"--data_file")
    chars = sorted(set(text))
    if vocab is None:
        vocab = "".join(chars)
    else:
        missing = [c for c in chars if c not in set(vocab)]
        if missing and not extend_vocab:
            shown = " ".join(repr(c) for c in missing[:30])
            if len(missing) > 30:
                shown += f" and {len(missing) - 30} more"
            raise UserError(f"{path} has characters the checkpoint's vocabulary lacks: {shown}; pass "
                            f"--extend_vocab to add them")
        vocab += "".join(missing)
    tokenizer = CharTokenizer(vocab)
    vocab_key = hashlib.sha256(vocab.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    cache = Path(data_dir) / "cache" / f"{sha}-{vocab_key}-v{CACHE_VERSION}.npz"
    if cache.exists():
        try:
            with np.load(cache) as z:
                return Corpus(path, sha, tokenizer, z["train"], z["val"])
        except Exception:  # numpy/zipfile raise many types for a damaged file: rebuild it below
            pass
    dtype = np.uint8 if tokenizer.vocab_size <= 256 else np.int32
    ids = tokenizer.encode(text).astype(dtype)
    n_train = int(len(ids) * TRAIN_FRACTION)
    corpus = Corpus(path, sha, tokenizer, ids[:n_train], ids[n_train:])
    try:
        atomic_write(cache, lambda f: np.savez(f, train=corpus.train, val=corpus.val))
    except OSError as e:
        print(f"warning: could not cache the encoded corpus in {cache.parent} ({e.strerror})",
              file=sys.stderr)
    return corpus


class Batches:
    """Random (x, y) windows of one split: x is (batch_size, block_size) token ids, y is x shifted by
    one. The split lives on `device`; the offsets come from a seeded generator on that device, so a
    batch costs no host work and the stream can be saved and restored exactly."""

    def __init__(self, data: np.ndarray, block_size: int, batch_size: int, device: torch.device,
                 seed: int, name: str = "split"):
        if len(data) < block_size + 1:
            raise UserError(
                f"the {name} split has {len(data)} tokens but --block_size={block_size} needs at least "
                f"{block_size + 1}: use a longer text or a smaller --block_size"
            )
        self.data = torch.from_numpy(data).to(device)
        self.block_size = block_size
        self.batch_size = batch_size
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self._offsets = torch.arange(block_size, device=device)

    def next(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch from this split's generator, or from `generator` (evaluation draws its own
        fixed batches without disturbing the training stream)."""
        starts = torch.randint(len(self.data) - self.block_size, (self.batch_size, 1),
                               generator=generator or self.generator, device=self.data.device)
        index = starts + self._offsets  # (B, T)
        return self.data[index].long(), self.data[index + 1].long()
