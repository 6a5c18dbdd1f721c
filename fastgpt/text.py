"""A corpus' text: Tiny Shakespeare (downloaded on first use and checked against its sha256) or any UTF-8
text, a file, a directory of .txt files or a glob, read as one text. Read in chunks, whatever its size:
one pass hashes it, checks it is UTF-8 (a bad byte is named by its offset) and collects its characters;
later passes decode it chunk by chunk, a character split across a chunk's edge decoded whole."""

from __future__ import annotations

import codecs
import glob
import hashlib
import itertools
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastgpt.cli import UserError
from fastgpt.files import Progress, atomic_write


TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


TRAIN_FRACTION = 0.9


CHUNK_BYTES = 1 << 20  # text read, decoded and encoded at a time: the encoders hold up to ~40 bytes a byte


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


def corpus_files(data_file: str, data_dir: str | Path, flag: str = "--data_file") -> list[Path]:
    """The files of `--data_file`: Tiny Shakespeare when it is empty, a file, a directory's .txt files
    (sorted by name), or the files a glob matches (sorted; `**` recurses). Empty files of a directory or
    a glob are left out."""
    if not data_file:
        return [tiny_shakespeare(data_dir)]
    try:
        return _corpus_files(Path(data_file), data_file, flag)
    except OSError as e:
        raise UserError(f"cannot read {data_file} ({e.strerror}): check the path and its permissions") from None


def _corpus_files(path: Path, data_file: str, flag: str) -> list[Path]:
    if path.is_dir():
        files = distinct(sorted(p for p in path.iterdir() if p.suffix == ".txt" and p.is_file()))
        what = (f"{path} is not a regular file and holds no .txt files: pass a UTF-8 text file, or a directory "
                f"of them named *.txt, with {flag}")
    elif not path.exists() and set("*?[") & set(data_file):
        files = distinct(sorted(Path(p) for p in glob.glob(data_file, recursive=True) if Path(p).is_file()))
        what = f"{flag}={data_file} matches no files: check the pattern (quote it, so the shell leaves it alone)"
    else:
        check_file(path, flag)
        return [path]
    if not files:
        raise UserError(what)
    nonempty = [p for p in files if p.stat().st_size > 0]
    if not nonempty:
        raise UserError(f"{flag}={data_file}: its {len(files)} file(s) are all empty: pass some UTF-8 text")
    return nonempty


def distinct(files: list[Path]) -> list[Path]:
    """Each file once, at its first place: links to one file, and a `**` glob that follows a loop of
    symbolic links through the same files again and again, must not read them twice (val text in train)."""
    seen: set[Path] = set()
    kept = []
    for path in files:
        real = path.resolve()
        if real not in seen:
            seen.add(real)
            kept.append(path)
    return kept


def check_file(path: Path, flag: str) -> None:
    """A UserError naming `flag` unless path is an existing regular file."""
    if not path.exists():
        raise UserError(f"{path} does not exist: pass an existing UTF-8 text file with {flag}")
    if not path.is_file():
        raise UserError(f"{path} is not a regular file: pass a UTF-8 text file with {flag}")


def not_utf8(path: Path, offset: int, head: bytes, flag: str) -> UserError:
    source = "UTF-16" if head[:2] in (b"\xff\xfe", b"\xfe\xff") else "LATIN1"  # a BOM names UTF-16
    return UserError(f"{path} is not UTF-8 text (bad byte at offset {offset}): convert it, e.g. with "
                     f"iconv -f {source} -t UTF-8, and pass it with {flag}")


def read_text_file(path: Path, flag: str = "--data_file") -> tuple[str, str]:
    """A small file's text and the sha256 of its bytes (a prompt file); a missing, empty or non-UTF-8
    file is a UserError that names the command-line `flag` the path came from."""
    try:
        check_file(path, flag)
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}): check the path and its permissions") from None
    if not raw:
        raise UserError(f"{path} is empty: pass a UTF-8 text file with some text in it with {flag}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise not_utf8(path, e.start, raw, flag) from None
    return text, hashlib.sha256(raw).hexdigest()


@dataclass
class Text:
    """A corpus' files read as one text: their sizes, the sha256 of their bytes in order, and (when asked
    for) the sorted distinct characters."""

    files: list[Path]
    sizes: list[int]
    sha256: str
    chars: str | None = None

    @property
    def nbytes(self) -> int:
        return sum(self.sizes)


def read_chunks(path: Path, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
    """The bytes [start, stop) of a file in chunks of CHUNK_BYTES; an unreadable file is a UserError."""
    size = CHUNK_BYTES
    try:
        with path.open("rb") as f:
            f.seek(start)
            left = (stop if stop is not None else float("inf")) - start
            while left > 0:
                chunk = f.read(int(min(size, left)))
                if not chunk:
                    if stop is not None:
                        raise UserError(f"{path} changed while it was being read: start again")
                    return
                left -= len(chunk)
                yield chunk
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}): check the path and its permissions") from None


def scan(files: list[Path], want_chars: bool, flag: str = "--data_file") -> Text:
    """One pass over the files: the sha256 of their bytes, each checked to be UTF-8, and the distinct
    characters (a table of every code point seen) when `want_chars`."""
    sha = hashlib.sha256()
    seen = np.zeros(0x110000, dtype=bool) if want_chars else None
    sizes = []
    progress = Progress("reading the corpus", sum(p.stat().st_size for p in files))
    for path in files:
        decoder, offset, head = codecs.getincrementaldecoder("utf-8")(), 0, b""
        for chunk in itertools.chain(read_chunks(path), [b""]):
            head = head or chunk[:2]
            sha.update(chunk)
            pending = len(decoder.getstate()[0])  # the bytes of a character the last chunk cut
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:  # e.start counts from the pending bytes
                raise not_utf8(path, offset - pending + e.start, head, flag) from None
            if seen is not None and text:
                seen[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)] = True
            offset += len(chunk)
            progress.update(len(chunk))
        if offset == 0:
            raise UserError(f"{path} is empty: pass a UTF-8 text file with some text in it with {flag}")
        sizes.append(offset)
    progress.close()
    chars = "".join(map(chr, np.flatnonzero(seen).tolist())) if seen is not None else None
    return Text(files, sizes, sha.hexdigest(), chars)


def text_chunks(text: Text, start: int = 0, stop: int | None = None,
                progress: Progress | None = None, sha=None) -> Iterator[str]:
    """The decoded text of the bytes [start, stop) of the files read as one, in chunks; `start` and `stop`
    fall on character boundaries, and a character split across a chunk's edge is decoded whole. `sha`, a
    hashlib object, is fed the bytes as they are read."""
    stop = text.nbytes if stop is None else stop
    pos = 0
    for path, size in zip(text.files, text.sizes):
        lo, hi = max(start, pos), min(stop, pos + size)
        if lo < hi:
            decoder = codecs.getincrementaldecoder("utf-8")()
            try:
                for chunk in read_chunks(path, lo - pos, hi - pos):
                    if sha is not None:
                        sha.update(chunk)
                    yield decoder.decode(chunk)
                    if progress is not None:
                        progress.update(len(chunk))
                tail = decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                raise UserError(f"{path} changed while it was being read: start again") from None
            if tail:
                yield tail
        pos += size


def split_point(text: Text) -> int:
    """The byte offset of the val split of a byte-level tokenizer's corpus: the first character boundary
    at or after TRAIN_FRACTION of the bytes."""
    target = int(text.nbytes * TRAIN_FRACTION)
    pos = 0
    for path, size in zip(text.files, text.sizes):
        if pos + size > target:
            tail = b"".join(read_chunks(path, target - pos, min(size, target - pos + 4)))
            skip = next((i for i, b in enumerate(tail) if b & 0xC0 != 0x80), len(tail))  # past continuation bytes
            return target + skip
        pos += size
    return target
