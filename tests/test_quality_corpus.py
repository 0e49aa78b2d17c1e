"""The LM proxy's corpus: the Python stdlib, read offline, with a split that never moves."""

from __future__ import annotations

import numpy as np
import pytest

from lfm2.corpus import CorpusError, corpus_by_name, is_validation_file, python_sources_corpus, stdlib_corpus, stdlib_files, stdlib_root

MAX_BYTES = 300_000


def test_split_rule_is_a_fixed_function_of_the_relative_path():
    # Pinned: if these change, every stored LM-proxy score silently means something else.
    assert [is_validation_file(p) for p in ("os.py", "typing.py", "ast.py", "random.py", "json/__init__.py")] == [False, True, True, False, False]


def test_file_list_is_sorted_and_holds_no_third_party_code():
    files = stdlib_files()
    assert list(files) == sorted(files) and len(files) > 300
    assert "os.py" in files and not any("site-packages" in f or "__pycache__" in f for f in files)


def test_corpus_loads_offline_and_its_split_is_stable():
    corpus = stdlib_corpus(MAX_BYTES)
    assert corpus.train.dtype == np.uint8 and corpus.validation.dtype == np.uint8
    assert len(corpus.train) == MAX_BYTES * 9 // 10 and len(corpus.validation) == MAX_BYTES // 10
    assert not set(corpus.train_files) & set(corpus.validation_files)
    assert all(is_validation_file(f) for f in corpus.validation_files)
    assert not any(is_validation_file(f) for f in corpus.train_files)
    # read again from disk, not from the cache: the same bytes and fingerprint
    stdlib_corpus.cache_clear()
    again = stdlib_corpus(MAX_BYTES)
    assert again.fingerprint == corpus.fingerprint and len(corpus.fingerprint) == 16
    assert np.array_equal(again.train, corpus.train) and np.array_equal(again.validation, corpus.validation)
    # a capped corpus is the first files of each split, in the global order
    files = stdlib_files()
    assert list(corpus.train_files) == [f for f in files if not is_validation_file(f)][: len(corpus.train_files)]
    assert list(corpus.validation_files) == [f for f in files if is_validation_file(f)][: len(corpus.validation_files)]
    assert corpus.describe()["python_version"].count(".") == 2


def test_windows_are_seeded_and_evaluation_windows_fixed():
    corpus = stdlib_corpus(MAX_BYTES)
    a = corpus.random_windows("train", 4, 65, seed=3)
    assert a.shape == (4, 65) and a.dtype == np.int64 and a.max() < 256
    assert np.array_equal(a, corpus.random_windows("train", 4, 65, seed=3))
    e = corpus.evaluation_windows(129, 10)
    assert e.shape == (10, 129) and np.array_equal(e, corpus.evaluation_windows(129, 10))
    assert bytes(e[0].astype(np.uint8)) == bytes(corpus.validation[:129])


def test_bad_requests_say_what_to_do():
    with pytest.raises(CorpusError, match="max_bytes"):
        stdlib_corpus(10)
    with pytest.raises(CorpusError, match="split"):
        stdlib_corpus(MAX_BYTES).split("test")


def test_python_sources_add_the_installed_packages_without_moving_the_stdlib_split():
    """~10x the stdlib's text for long runs: the stdlib files keep their names and split,
    package files are named site-packages/..., and no file's bytes appear twice."""
    stdlib = stdlib_corpus()
    full = python_sources_corpus()
    root = stdlib_root()
    assert full.name == "python-sources" and len(full.train) > 3 * len(stdlib.train)  # pytest, torch, numpy... are installed here
    package_files = [f for f in full.train_files + full.validation_files if f.startswith("site-packages/")]
    assert any(f.startswith("site-packages/torch/") for f in package_files)
    assert all(is_validation_file(f) for f in full.validation_files) and not any(is_validation_file(f) for f in full.train_files)
    kept = set(full.train_files + full.validation_files)
    stdlib_names = stdlib.train_files + stdlib.validation_files
    kept_bytes = {(root / name).read_bytes() for name in stdlib_names if name in kept}
    dropped = [name for name in stdlib_names if name not in kept]  # duplicates, e.g. empty __init__.py files
    assert len(dropped) < len(stdlib_names) // 4 and all((root / name).read_bytes() in kept_bytes for name in dropped)
    assert set(full.train_files) & set(stdlib.validation_files) == set()  # a stdlib file never changes split
    assert len(set(full.train_files + full.validation_files)) == len(full.train_files) + len(full.validation_files)
    # read again from disk: the same corpus
    python_sources_corpus.cache_clear()
    assert python_sources_corpus().fingerprint == full.fingerprint
    assert corpus_by_name("python-sources", MAX_BYTES).name == f"python-sources[:{MAX_BYTES}]"
    with pytest.raises(CorpusError, match="unknown corpus 'enwik8'; use one of stdlib, python-sources"):
        corpus_by_name("enwik8")
