"""The compile cache's upkeep: `lfm2-nas cache show|prune` on real (eager) artifacts."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time

import pytest

from devices.artifact import MANIFEST
from devices.cache_admin import list_artifacts, parse_duration, prune
from devices.compile import compile
from lfm2.errors import UserError
from lfm2.spec import ArchSpec


def _spec(width: int) -> ArchSpec:
    return ArchSpec(vocab_size=256, d_model=width, layers=("conv", "attn"), n_heads=4, n_kv_heads=2, ffn_dim=2 * width, max_seq_len=256)


@pytest.fixture
def cache(tmp_path):
    """Three compiled artifacts, last used 30, 20 and 10 days ago (oldest first)."""
    now = time.time()
    artifacts = []
    for age_days, width in ((30, 32), (20, 64), (10, 96)):
        artifact = compile(_spec(width), "eager", "fp32", 32, (8,), cache_dir=tmp_path, verify=False)
        stamp = now - age_days * 86400
        os.utime(artifact.path / MANIFEST, (stamp, stamp))
        artifacts.append(artifact)
    return tmp_path, artifacts, now


def test_listing_is_least_recently_used_first_with_sizes(cache):
    root, artifacts, _ = cache
    listed = list_artifacts(root)
    assert [a.name for a in listed] == [a.path.name for a in artifacts]
    assert all(a.complete and a.backend == "eager" and a.layout == "CA" and a.bytes > 0 for a in listed)


def test_a_cache_hit_counts_as_a_use(cache):
    root, artifacts, _ = cache
    compile(_spec(32), "eager", "fp32", 32, (8,), cache_dir=root, verify=False)  # the oldest, used again
    assert list_artifacts(root)[-1].name == artifacts[0].path.name


def test_prune_by_age_then_by_size(cache):
    root, artifacts, now = cache
    removed, busy = prune(root, older_than_s=parse_duration("25d"), now=now, dry_run=True)
    assert [a.name for a in removed] == [artifacts[0].path.name] and not busy and artifacts[0].path.exists()  # a dry run
    removed, _ = prune(root, older_than_s=parse_duration("25d"), now=now)
    assert not artifacts[0].path.exists() and artifacts[1].path.exists()
    newest = list_artifacts(root)[-1]
    removed, _ = prune(root, max_bytes=newest.bytes, now=now)  # only the most recently used still fits
    assert [a.name for a in removed] == [artifacts[1].path.name] and [a.name for a in list_artifacts(root)] == [newest.name]


def test_an_artifact_in_use_is_kept(cache):
    root, artifacts, now = cache
    lock_path = root / "artifacts" / f".{artifacts[0].path.name}.lock"
    # another process holds the compile lock of the oldest artifact (as compile() does)
    holder = subprocess.Popen([sys.executable, "-c", f"import fcntl, time; h = open({str(lock_path)!r}, 'a+'); fcntl.flock(h, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        removed, busy = prune(root, max_bytes=0, now=now)
        assert [a.name for a in busy] == [artifacts[0].path.name] and artifacts[0].path.exists()
        assert {a.name for a in removed} == {artifacts[1].path.name, artifacts[2].path.name}
    finally:
        holder.kill()
        holder.wait()
    with open(lock_path, "a+") as handle:  # released with its holder: free to take now
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_bad_requests_say_what_to_give():
    with pytest.raises(UserError, match="30d"):
        parse_duration("a month")
    with pytest.raises(UserError, match="--older-than"):
        prune("/nonexistent")


def test_the_cli_shows_and_prunes(cache, monkeypatch, capsys):
    root, artifacts, _ = cache
    from nas import cli as nas_cli

    def run(*args: str) -> int:
        with pytest.raises(SystemExit) as exit_:
            nas_cli.main(list(args))
        return exit_.value.code

    monkeypatch.setenv("LFM2_NAS_CACHE", str(root))
    assert run("cache", "show", "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["cache_dir"] == str(root) and len(shown["artifacts"]) == 3
    assert run("cache", "prune", "--older-than", "15d") == 0
    out = capsys.readouterr().out
    assert "removed 2 artifact(s)" in out and [a.name for a in list_artifacts(root)] == [artifacts[2].path.name]
    assert run("cache", "prune", "--max-size", "lots") == 2
    assert "lots" in capsys.readouterr().err
