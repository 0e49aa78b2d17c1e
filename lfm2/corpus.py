"""A byte-level text corpus that exists on every machine: the Python standard library's sources.

Every Python installation carries its standard library as `.py` files (code, comments and
docstrings: English prose and code, ~30 MB for CPython 3.11), so language-model training and
the LM quality proxy need no download. The corpus is read from `sysconfig`'s `stdlib` path,
skipping installed third-party packages (`site-packages`, `dist-packages`) and caches.

Determinism: files are taken in sorted order of their path relative to the stdlib root, and
each file goes to train or validation by a hash of that relative path alone, so the split
of a given file never changes between runs or machines. The *contents* differ between
Python versions (3.11 and 3.12 ship different stdlibs): `Corpus.fingerprint` hashes the
exact bytes of both splits, and `python_version` says which stdlib it was, so results
computed on different corpora are never mixed up silently.

    >>> from lfm2.corpus import stdlib_corpus
    >>> corpus = stdlib_corpus()               # the whole stdlib, read once per process
    >>> corpus.train.dtype, len(corpus.validation) > 0
    (dtype('uint8'), True)
    >>> x = corpus.random_windows("train", batch_size=8, length=257, seed=0)  # int64 [8, 257]

`python_sources_corpus()` adds the `.py` files of the installed packages (~370 MB where
lfm2-nas and its pinned dependencies are installed): text for runs long enough to over-fit
the stdlib alone (a 300 M-byte run is ~10 passes over it). `corpus_by_name` picks either by
the name settings use ("stdlib", "python-sources").
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lfm2.errors import UserError

#: Folders never read: third-party packages installed into the stdlib tree, and caches.
EXCLUDED_FOLDERS = frozenset({"site-packages", "dist-packages", "__pycache__"})
#: Byte placed between files, so that one file's end never reads as the next one's start.
FILE_SEPARATOR = b"\n\x00\n"
#: Share of files (by the hash of their relative path) that form the validation split.
VALIDATION_PERCENT = 10
#: Bytes are the tokens: a byte-level model needs a vocabulary of 256.
BYTE_VOCAB_SIZE = 256


class CorpusError(UserError):
    """The corpus cannot be read or a request for it is out of range."""


@dataclass(frozen=True, eq=False)
class Corpus:
    """Train and validation bytes, with the facts needed to know which corpus they are.

    `train`, `validation`: read-only `np.uint8` arrays (the concatenated files, joined by
    `FILE_SEPARATOR`). `fingerprint`: 16 hex digits of a sha256 over both splits' bytes.
    """

    name: str
    train: np.ndarray
    validation: np.ndarray
    train_files: tuple[str, ...]
    validation_files: tuple[str, ...]
    python_version: str
    source_root: str
    fingerprint: str = field(default="")

    def split(self, name: str) -> np.ndarray:
        if name == "train":
            return self.train
        if name in ("validation", "val"):
            return self.validation
        raise CorpusError(f"unknown split {name!r}; use 'train' or 'validation'")

    def random_windows(self, split: str, batch_size: int, length: int, seed: int | np.random.Generator = 0) -> np.ndarray:
        """`batch_size` windows of `length` consecutive bytes at random offsets, int64 [B, length].

        Train on `window[:, :-1]` -> `window[:, 1:]`. `seed` may be a numpy Generator to draw
        a stream of batches."""
        data = self.split(split)
        if length > len(data):
            raise CorpusError(f"window length {length} exceeds the {split} split ({len(data)} bytes); use a shorter window or a larger max_bytes")
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        starts = rng.integers(0, len(data) - length + 1, size=batch_size)
        return np.stack([data[s : s + length] for s in starts]).astype(np.int64)

    def evaluation_windows(self, length: int, max_windows: int | None = None, split: str = "validation") -> np.ndarray:
        """Non-overlapping windows of `length` bytes, evenly spread over a split, int64 [N, length].

        Deterministic: the same corpus and arguments give the same windows on every call."""
        data = self.split(split)
        count = len(data) // length
        if count == 0:
            raise CorpusError(f"the {split} split ({len(data)} bytes) is shorter than one window of {length}; use a shorter window")
        if max_windows is not None and max_windows < count:
            index = np.linspace(0, count - 1, max_windows).round().astype(np.int64)
        else:
            index = np.arange(count)
        windows = data[: count * length].reshape(count, length)
        return windows[index].astype(np.int64)

    @classmethod
    def from_documents(cls, name: str, train: list[bytes], validation: list[bytes], source_root: str = "") -> Corpus:
        """A corpus of documents (a training run's text files, split by `load_corpus`),
        joined by `FILE_SEPARATOR` like the named corpora, with the same fingerprint rule."""
        train_bytes, validation_bytes = FILE_SEPARATOR.join(train), FILE_SEPARATOR.join(validation)
        return cls(
            name=name,
            train=np.frombuffer(train_bytes, dtype=np.uint8),
            validation=np.frombuffer(validation_bytes, dtype=np.uint8),
            train_files=(),
            validation_files=(),
            python_version=platform.python_version(),
            source_root=source_root,
            fingerprint=_fingerprint(train_bytes, validation_bytes),
        )

    def documents(self, split: str) -> list[bytes]:
        """The split's documents (files), without the separator between them: what a
        tokenizer is trained on and encodes (each document ends with end-of-text)."""
        return [d for d in self.split(split).tobytes().split(FILE_SEPARATOR) if d]

    @property
    def train_bytes(self) -> int:
        return int(len(self.train))

    @property
    def validation_bytes(self) -> int:
        return int(len(self.validation))

    def describe(self) -> dict:
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "python_version": self.python_version,
            "train_bytes": int(len(self.train)),
            "validation_bytes": int(len(self.validation)),
            "train_files": len(self.train_files),
            "validation_files": len(self.validation_files),
        }


def stdlib_root() -> Path:
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise CorpusError(f"the Python standard library folder {root} does not exist; run with a full CPython installation")
    return root


def stdlib_files(root: Path | None = None) -> tuple[str, ...]:
    """Relative paths (POSIX form) of the stdlib's `.py` files, sorted."""
    root = root or stdlib_root()
    return _python_files(str(root))


@functools.lru_cache(maxsize=4)
def _python_files(root: str) -> tuple[str, ...]:
    files: list[str] = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in EXCLUDED_FOLDERS)  # the stdlib walk never enters site-packages
        relative_folder = Path(folder).relative_to(root)
        files.extend((relative_folder / name).as_posix() for name in names if name.endswith(".py"))
    return tuple(sorted(files))


def site_roots() -> tuple[Path, ...]:
    """The installation's package folders (`purelib`, `platlib`; one folder on most systems)."""
    paths = sysconfig.get_paths()
    roots = []
    for key in ("purelib", "platlib"):
        root = Path(paths[key])
        if root.is_dir() and root not in roots:
            roots.append(root)
    return tuple(roots)


def is_validation_file(relative_path: str) -> bool:
    """The split rule: a file is in validation when the hash of its relative path says so."""
    digest = hashlib.sha256(relative_path.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < VALIDATION_PERCENT


def _fingerprint(train: bytes, validation: bytes) -> str:
    h = hashlib.sha256()
    h.update(len(train).to_bytes(8, "big"))
    h.update(train)
    h.update(validation)
    return h.hexdigest()[:16]


def _check_max_bytes(max_bytes: int | None) -> None:
    if max_bytes is not None and max_bytes < 1000:
        raise CorpusError(f"max_bytes must be at least 1000 (or None for the whole corpus), got {max_bytes}")


@functools.lru_cache(maxsize=4)
def stdlib_corpus(max_bytes: int | None = None) -> Corpus:
    """The stdlib corpus; `max_bytes` caps its size (for tests), split 90/10 by file.

    With `max_bytes`, files are read in sorted order until the train split holds at least
    `max_bytes * 0.9` bytes and validation `max_bytes * 0.1` (each then truncated to that),
    so a capped corpus is a deterministic prefix-by-file of the full one. Cached per process.
    """
    _check_max_bytes(max_bytes)
    root = stdlib_root()
    files = [(root, relative, relative) for relative in stdlib_files(root)]
    if not files:
        raise CorpusError(f"no .py files under {root}; run with a full CPython installation")
    return _read_corpus("stdlib", files, max_bytes, str(root), deduplicate=False)


@functools.lru_cache(maxsize=2)
def python_sources_corpus(max_bytes: int | None = None) -> Corpus:
    """The stdlib and every `.py` file of the installed packages (site-packages): ~10x the
    stdlib where lfm2-nas and its pinned dependencies are installed (~370 MB against ~30 MB),
    for training runs long enough to over-fit the stdlib alone.

    Stdlib files keep their stdlib names (so their split is the stdlib corpus's); package
    files are named `site-packages/<relative path>`. A file whose bytes equal an earlier
    file's (vendored copies) is skipped, so no text sits in both splits under two names.
    What is installed differs between machines: `fingerprint` says which corpus it was."""
    _check_max_bytes(max_bytes)
    root = stdlib_root()
    sites = site_roots()
    files = [(root, relative, relative) for relative in stdlib_files(root)]
    for site in sites:
        files += [(site, relative, f"site-packages/{relative}") for relative in _python_files(str(site))]
    return _read_corpus("python-sources", files, max_bytes, os.pathsep.join(map(str, (root, *sites))), deduplicate=True)


#: Corpora by the name settings and command lines give them.
CORPORA = {"stdlib": stdlib_corpus, "python-sources": python_sources_corpus}


def corpus_by_name(name: str, max_bytes: int | None = None) -> Corpus:
    if name not in CORPORA:
        raise CorpusError(f"unknown corpus {name!r}; use one of {', '.join(CORPORA)}")
    return CORPORA[name](max_bytes)


def _is_full(size: int, cap: int | None) -> bool:
    return cap is not None and size >= cap


def _read_corpus(name: str, files: list[tuple[Path, str, str]], max_bytes: int | None, source_root: str, deduplicate: bool) -> Corpus:
    """Read `files` ((root, path under root, name that decides the split)) in order into the
    two splits, capped as `stdlib_corpus` describes."""
    train_cap = validation_cap = None
    if max_bytes is not None:
        validation_cap = max(1, max_bytes * VALIDATION_PERCENT // 100)
        train_cap = max_bytes - validation_cap
    parts: dict[str, list[bytes]] = {"train": [], "validation": []}
    sizes = {"train": 0, "validation": 0}
    names: dict[str, list[str]] = {"train": [], "validation": []}
    caps = {"train": train_cap, "validation": validation_cap}
    seen: set[bytes] = set()
    for root, relative, split_name in files:
        split = "validation" if is_validation_file(split_name) else "train"
        cap = caps[split]
        if cap is not None and sizes[split] >= cap:
            if all(_is_full(sizes[s], caps[s]) for s in caps):
                break
            continue
        try:
            text = (root / relative).read_bytes()
        except OSError:  # a package file that vanished or cannot be read: skipped, the fingerprint tells
            continue
        if deduplicate:
            digest = hashlib.sha256(text).digest()
            if digest in seen:
                continue
            seen.add(digest)
        parts[split].append(text)
        names[split].append(split_name)
        sizes[split] += len(text) + len(FILE_SEPARATOR)
    train = FILE_SEPARATOR.join(parts["train"])[:train_cap]
    validation = FILE_SEPARATOR.join(parts["validation"])[:validation_cap]
    if not train or not validation:
        raise CorpusError(f"the {name} corpus under {source_root} gave an empty split (train {len(train)} B, validation {len(validation)} B); use a larger max_bytes")
    train_array = np.frombuffer(train, dtype=np.uint8)
    validation_array = np.frombuffer(validation, dtype=np.uint8)  # read-only views: safe to share from the cache
    return Corpus(
        name=name if max_bytes is None else f"{name}[:{max_bytes}]",
        train=train_array,
        validation=validation_array,
        train_files=tuple(names["train"]),
        validation_files=tuple(names["validation"]),
        python_version=platform.python_version(),
        source_root=source_root,
        fingerprint=_fingerprint(train, validation),
    )


# -- a training run's corpus: a named one, or text files ---------------------------------------


def _read_text_files(path: Path) -> list[bytes]:
    """The UTF-8 text files under `path` (or `path` itself), in a stable order. Binary files
    (a NUL byte, or not UTF-8) and hidden or cache folders are skipped."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    documents = []
    for file in files:
        relative = file.relative_to(path).parts if file != path else ()
        if any(part.startswith(".") or part == "__pycache__" for part in relative):
            continue
        data = file.read_bytes()
        if not data or b"\x00" in data:
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        documents.append(data)
    return documents


def _split_documents(documents: list[bytes], val_fraction: float) -> tuple[list[bytes], list[bytes]]:
    """The last `val_fraction` of the bytes (in document order) become the validation split;
    the document on the boundary is cut at a newline near it."""
    total = sum(map(len, documents))
    boundary = total - max(1, int(total * val_fraction))
    train, validation, seen = [], [], 0
    for doc in documents:
        if seen + len(doc) <= boundary:
            train.append(doc)
        elif seen >= boundary:
            validation.append(doc)
        else:
            cut = boundary - seen
            newline = doc.find(b"\n", cut)
            cut = newline + 1 if 0 <= newline < len(doc) - 1 else cut
            train.append(doc[:cut])
            validation.append(doc[cut:])
        seen += len(doc)
    return [d for d in train if d], [d for d in validation if d]


def load_corpus(source: str, val_fraction: float = 0.05) -> Corpus:
    """A corpus by name (`stdlib[:MAX_BYTES]`: the Python standard library;
    `python-sources[:MAX_BYTES]`: it and the installed packages' sources, ~10x larger) or a
    text file or folder of text files (split by `val_fraction` of the bytes), as
    `lfm2-nas train --corpus` takes it."""
    name, _, cap = source.partition(":")
    if name in CORPORA:
        max_bytes = None
        if cap:
            try:
                max_bytes = int(float(cap))
            except ValueError:
                raise UserError(f"--corpus {source}: write {name} or {name}:MAX_BYTES (e.g. {name}:2000000); corpora: {', '.join(CORPORA)}") from None
        return corpus_by_name(name, max_bytes)
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"--corpus {source}: no such file or folder; give a text file, a folder of text files, or one of {', '.join(CORPORA)}")
    documents = _read_text_files(path)
    if not documents:
        raise UserError(f"--corpus {source}: found no UTF-8 text files there")
    train, validation = _split_documents(documents, val_fraction)
    resolved = str(path.resolve())
    return Corpus.from_documents(resolved, train, validation, source_root=resolved)


__all__ = ["Corpus", "CorpusError", "CORPORA", "load_corpus", "corpus_by_name", "stdlib_corpus", "python_sources_corpus", "stdlib_files", "site_roots", "is_validation_file", "BYTE_VOCAB_SIZE", "FILE_SEPARATOR"]
