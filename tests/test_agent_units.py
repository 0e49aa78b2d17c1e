"""The agent's parts on their own: sizes, profiles, tokens, bundles, the artifact store,
the durable job store, agent configuration and the device registry. Fast; no server."""

from __future__ import annotations

import os
import stat
import tarfile
import time
from pathlib import Path

import pytest
from testkit.agent import artifact_members, handmade_artifact, link, regular, sha256, tar_bytes

from devices.agent.auth import bearer_token, ensure_token, read_token, token_matches
from devices.agent.bundle import BundleError, bundle_bytes, extract_bundle, pack_bundle
from devices.agent.config import build_config, parse_cpus, usable_cpus
from devices.agent.jobs import JobConflict, JobStore
from devices.agent.store import ArtifactStore, BadBundle, HashMismatch, UploadTooLarge
from devices.artifact import ArtifactError
from devices.profiles import get_profile, load_profiles
from devices.protocol import Measurement, Protocol
from devices.registry import add_device, get_device, load_registry, remove_device
from lfm2.sizes import format_size, parse_size
from lfm2.errors import UserError

# -- sizes ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [("2GB", 2_000_000_000), ("1.5GiB", 1536 << 20), ("800M", 800 << 20), ("512k", 512 << 10), ("1048576", 1 << 20), (" 3 mib ", 3 << 20), ("10b", 10), (".5G", 512 << 20)],
)
def test_parse_size_spellings(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "2 parsecs", "-1G", "1e3", "2 G B", "nan"])
def test_parse_size_says_what_is_accepted(text):
    with pytest.raises(UserError, match="800M, 1.5GiB, 2GB"):
        parse_size(text, "--memory-limit")


def test_format_size():
    assert format_size(1536 << 20) == "1.50 GiB"
    assert format_size(100) == "100 B"


# -- profiles ---------------------------------------------------------------------------------


def test_builtin_profiles_have_what_the_issue_asks():
    profiles = load_profiles()
    for name in ("local", "pixel8", "galaxy-s24", "raspberry-pi-5"):
        profile = profiles[name]
        assert profile.big_cores >= 1 and profile.little_cores >= 0
        assert 0 < profile.memory_budget_bytes <= profile.ram_bytes
        assert profile.threads >= 1
    assert profiles["pixel8"].cores == 9 and profiles["pixel8"].affinity is not None
    assert profiles["local"].affinity is None and profiles["local"].big_cores == len(usable_cpus())


def test_user_profiles_extend_and_override(tmp_path, monkeypatch):
    mine = tmp_path / "mine.toml"
    mine.write_text('[profiles.pixel8-lowmem]\nextends = "pixel8"\nmemory_budget = "1GiB"\nthreads = 2\n')
    monkeypatch.setenv("LFM2_NAS_PROFILES", str(mine))
    profile = get_profile("pixel8-lowmem")
    assert profile.memory_budget_bytes == 1 << 30 and profile.threads == 2 and profile.ram_bytes == get_profile("pixel8").ram_bytes
    assert profile.source == str(mine)


def test_bad_profiles_are_refused_with_a_reason(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[profiles.x]\nextends = "pixel8"\nthreads = 0\n')
    with pytest.raises(UserError, match="threads must be an integer >= 1"):
        load_profiles([bad])
    with pytest.raises(UserError, match="known: .*pixel8"):
        get_profile("iphone-99")


# -- tokens -----------------------------------------------------------------------------------


def test_token_file_is_made_0600_and_reused(tmp_path):
    path = tmp_path / "sub" / "token"
    token = ensure_token(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(token) >= 40 and ensure_token(path) == token == read_token(path)


def test_token_file_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "token"
    path.write_text("abc\n")
    path.chmod(0o644)
    with pytest.raises(UserError, match="chmod 600"):
        ensure_token(path)


def test_token_comparison():
    assert token_matches("s3cret", "s3cret")
    assert not token_matches("s3cre", "s3cret") and not token_matches(None, "s3cret") and not token_matches("sécret", "s3cret")
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None and bearer_token("Bearer") is None and bearer_token(None) is None


# -- bundles ----------------------------------------------------------------------------------


def test_bundle_is_deterministic_and_round_trips(tmp_path):
    artifact = handmade_artifact(tmp_path / "a")
    sha, data = bundle_bytes(artifact)
    os.utime(artifact.path / "model.bin", (1, 1))  # metadata does not change the bundle
    (artifact.path / "stray.log").write_text("not in the manifest: not in the bundle")
    assert bundle_bytes(artifact)[0] == sha
    with open(tmp_path / "b.tar", "wb") as out:
        assert pack_bundle(artifact.path, out) == (sha, len(data))
    extracted = extract_bundle(tmp_path / "b.tar", tmp_path / "x")
    assert extracted.key == artifact.key and (tmp_path / "x" / "model.bin").read_bytes() == (artifact.path / "model.bin").read_bytes()
    assert not (tmp_path / "x" / "stray.log").exists()


def _hostile_cases(artifact):
    honest = artifact_members(artifact)

    def swapped(member):  # the honest bundle with model.bin replaced by `member`
        return [member if m[0].name == "model.bin" else m for m in honest]

    device = tarfile.TarInfo("dev")
    device.type = tarfile.CHRTYPE
    fifo = tarfile.TarInfo("fifo")
    fifo.type = tarfile.FIFOTYPE
    return {
        "dotdot": (honest + [regular("../escaped", b"x")], "'..'"),
        "nested dotdot": (honest + [regular("sub/../../escaped", b"x")], "'..'"),
        "absolute": (honest + [regular("/tmp/escaped-absolute", b"x")], "absolute"),
        "symlink": (swapped(link("model.bin", "/etc/passwd")), "link"),
        "symlinked dir": (honest + [link("sub", "/tmp"), regular("sub/escaped", b"x")], "link"),
        "hardlink": (honest + [link("hard", "/etc/passwd", hard=True)], "link"),
        "device": (honest + [(device, None)], "not a regular file"),
        "fifo": (honest + [(fifo, None)], "not a regular file"),
        "duplicate": (honest + [regular("model.bin", b"evil")], "twice"),
        "extra file": (honest + [regular("extra.py", b"print(1)")], "does not list"),
        "odd name": (honest + [regular("a\nb", b"x")], "path component"),
        "tampered": (swapped(regular("model.bin", b"tampered")), "sha256|bytes"),
        "no manifest": ([m for m in honest if m[0].name != "manifest.json"], "no manifest"),
    }


def test_extract_refuses_hostile_bundles_and_writes_nothing_outside(tmp_path):
    artifact = handmade_artifact(tmp_path / "a")
    outside_before = set(Path("/tmp").iterdir())
    for case, (members, message) in _hostile_cases(artifact).items():
        bundle = tmp_path / f"{case}.tar"
        bundle.write_bytes(tar_bytes(members))
        with pytest.raises((BundleError, ArtifactError), match=message):
            extract_bundle(bundle, tmp_path / f"out-{case.replace(' ', '-')}")
    assert not any(p.name.startswith("escaped") for p in set(Path("/tmp").iterdir()) - outside_before)
    assert not (tmp_path / "escaped").exists()


def test_extract_refuses_what_is_not_an_uncompressed_tar(tmp_path):
    import gzip

    artifact = handmade_artifact(tmp_path / "a")
    _, data = bundle_bytes(artifact)
    for name, content in (("gz", gzip.compress(data)), ("junk", b"not a tar at all" * 100)):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(BundleError):
            extract_bundle(tmp_path / name, tmp_path / f"out-{name}")


# -- the artifact store -----------------------------------------------------------------------


def _upload(store: ArtifactStore, data: bytes, sha: str):
    upload = store.begin()
    upload.write(data)
    return store.commit(upload, sha)


def test_store_installs_verified_uploads_once(tmp_path):
    store = ArtifactStore(tmp_path / "w", max_upload=1 << 20)
    sha, data = bundle_bytes(handmade_artifact(tmp_path / "a"))
    path, created = _upload(store, data, sha)
    assert created and store.has(sha) and store.describe(sha)["backend"] == "eager"
    assert _upload(store, data, sha) == (path, False)
    assert list(store.tmp.iterdir()) == []


def test_store_refuses_bad_uploads_and_keeps_nothing(tmp_path):
    store = ArtifactStore(tmp_path / "w", max_upload=16 << 10)  # a tiny bundle is 10 KiB (tar records)
    artifact = handmade_artifact(tmp_path / "a")
    sha, data = bundle_bytes(artifact)
    with pytest.raises(HashMismatch):
        _upload(store, data, "0" * 64)
    with pytest.raises(UploadTooLarge):
        _upload(store, data + b"\0" * (16 << 10), sha)
    evil = tar_bytes(artifact_members(artifact) + [link("sub", "/etc")])
    with pytest.raises(BadBundle, match="link"):
        _upload(ArtifactStore(tmp_path / "w", max_upload=1 << 20), evil, sha256(evil))
    assert store.count() == 0 and [p for p in store.tmp.iterdir() if not p.name.startswith("upload-")] == []
    with pytest.raises(UploadTooLarge):
        store.check_room(17 << 10)


# -- the job store ----------------------------------------------------------------------------

SHA_A, SHA_B = "a" * 64, "b" * 64


def test_job_submission_is_idempotent_by_id(tmp_path):
    jobs = JobStore(tmp_path / "jobs.sqlite")
    protocol = Protocol(prompt_lengths=(16,), decode_depths=(8,))
    job, created = jobs.submit("j1", SHA_A, protocol)
    assert created and job.state == "queued" and job.queue_position == 0
    again, created_again = jobs.submit("j1", SHA_A, Protocol.from_dict(protocol.to_dict()))
    assert not created_again and again.seq == job.seq
    with pytest.raises(JobConflict, match="different request"):
        jobs.submit("j1", SHA_B, protocol)
    with pytest.raises(JobConflict):
        jobs.submit("j1", SHA_A, Protocol(prompt_lengths=(32,), decode_depths=(8,)))
    assert jobs.counts() == {"queued": 1, "running": 0, "done": 0}


def test_jobs_run_fifo_and_survive_a_restart(tmp_path):
    path = tmp_path / "jobs.sqlite"
    jobs = JobStore(path)
    for i in range(4):
        jobs.submit(f"j{i}", SHA_A, Protocol(prompt_lengths=(16 + i,)))
    assert jobs.get("j3").queue_position == 3
    first = jobs.claim_next()
    assert first.id == "j0" and first.state == "running" and first.attempts == 1
    jobs.finish("j0", Measurement(status="oom", error="over the cap"))
    assert jobs.claim_next().id == "j1"  # j1 is RUNNING when the "agent dies"
    jobs.close()

    reopened = JobStore(path)
    assert reopened.get("j0").measurement["status"] == "oom"
    assert reopened.recover() == ["j1"]
    j1 = reopened.get("j1")
    assert j1.state == "queued" and j1.events[-1]["event"] == "requeued"
    assert [reopened.claim_next().id for _ in range(3)] == ["j1", "j2", "j3"]
    assert reopened.claim_next() is None


def test_a_job_that_keeps_killing_the_agent_is_given_up(tmp_path):
    jobs = JobStore(tmp_path / "jobs.sqlite")
    jobs.submit("boom", SHA_A, Protocol())
    for attempt in range(1, 4):
        assert jobs.claim_next().attempts == attempt
        requeued = jobs.recover(max_attempts=3)
    assert requeued == []
    job = jobs.get("boom")
    assert job.state == "done" and job.measurement["status"] == "error" and "3 times" in job.measurement["error"]


# -- agent configuration ----------------------------------------------------------------------


def test_emulation_takes_the_profiles_threads_and_memory_budget(tmp_path):
    config = build_config("emu", workdir=tmp_path, profile="pixel8", emulate=True)
    pixel8 = get_profile("pixel8")
    assert config.limits.threads == pixel8.threads and config.limits.memory_bytes == pixel8.memory_budget_bytes
    assert config.limits.cpus == usable_cpus()[: min(pixel8.threads, len(usable_cpus()))]
    facts = config.device_facts()
    assert facts["emulated"] is True and facts["profile"] == "pixel8" and facts["name"] == "emu"
    real = build_config("real", workdir=tmp_path, profile="pixel8")
    assert real.limits.memory_bytes is None and real.fingerprint != config.fingerprint


def test_agent_flags_are_checked(tmp_path):
    assert parse_cpus("0-2,5,1") == (0, 1, 2, 5)
    config = build_config("a", workdir=tmp_path, cpus="0", threads=1, memory_limit="800M")
    assert config.limits.cpus == (0,) and config.limits.memory_bytes == 800 << 20
    for kwargs, message in (
        ({"emulate": True}, "--emulate needs a --profile"),
        ({"cpus": "9999"}, "cannot use"),
        ({"cpus": "3-1"}, "backwards"),
        ({"memory_limit": "lots"}, "--memory-limit"),
        ({"profile": "nokia-3310"}, "unknown device profile"),
    ):
        with pytest.raises(UserError, match=message):
            build_config("a", workdir=tmp_path, **kwargs)
    with pytest.raises(UserError, match="agent name"):
        build_config("../etc", workdir=tmp_path)


# -- the registry -----------------------------------------------------------------------------


def test_registry_add_list_remove(tmp_path, monkeypatch):
    monkeypatch.setenv("LFM2_NAS_CONFIG", str(tmp_path / "cfg" / "devices.toml"))
    token = tmp_path / "pixel8.token"
    ensure_token(token)
    added = add_device("pixel8", "http://192.0.2.7:7341/", token)
    assert added.url == "http://192.0.2.7:7341" and load_registry() == {"pixel8": added}
    assert get_device("pixel8").token() == read_token(token)
    with pytest.raises(UserError, match="registered already"):
        add_device("pixel8", "http://192.0.2.8:7341", token)
    with pytest.raises(UserError, match="does not exist"):
        add_device("pi", "http://192.0.2.9:7341", tmp_path / "missing.token")
    with pytest.raises(UserError, match="http://HOST:PORT"):
        add_device("pi", "192.0.2.9:7341", token)
    remove_device("pixel8")
    assert load_registry() == {}
    with pytest.raises(UserError) as error:
        get_device("pixel8")
    for hint in ("lfm2-nas agent serve", "lfm2-nas devices add", "--emulate"):
        assert hint in str(error.value)


# -- the worker -------------------------------------------------------------------------------


def test_worker_runs_jobs_in_order_with_a_cool_down_between_them(tmp_path):
    """The worker's own path, with artifacts that are not on the agent: each job ends at
    once as `error` (no measurement child), so only the queue, the order and the pause show."""
    from devices.agent.jobs import Worker
    from devices.protocol import Limits

    jobs = JobStore(tmp_path / "jobs.sqlite")
    for i in range(3):
        jobs.submit(f"w{i}", SHA_A, Protocol(prompt_lengths=(16 + i,)))
    worker = Worker(jobs, artifact_path=lambda sha: None, limits=Limits(threads=1), device={"name": "unit", "emulated": False}, cooldown_s=0.3)
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while jobs.counts()["done"] < 3:
            assert time.monotonic() < deadline and worker.alive
            time.sleep(0.05)
    finally:
        worker.stop()
    done = [jobs.get(f"w{i}") for i in range(3)]
    assert all(job.measurement["status"] == "error" and "no longer on the agent" in job.measurement["error"] for job in done)
    assert all(job.measurement["device"]["name"] == "unit" and job.attempts == 1 for job in done)
    assert done[0].started_at < done[1].started_at < done[2].started_at
    assert done[0].measurement["thermal"]["cooldown_before_s"] == 0
    for before, after in zip(done, done[1:]):
        assert after.measurement["thermal"]["cooldown_before_s"] > 0  # it paused before this one
        assert after.started_at >= before.finished_at


# -- issue 20: manifest paths, job errors, log rate limit ------------------------------------------


def test_artifact_file_opens_only_listed_members_inside_the_folder(tmp_path):
    artifact = handmade_artifact(tmp_path / "a")
    assert artifact.file("model.bin") == artifact.path / "model.bin"
    for name in ("/etc/passwd", "../a/model.bin", "other.bin", "a\\b", "", "sub/../model.bin"):
        with pytest.raises(ArtifactError):
            artifact.file(name)
    # a listed name that is a link out of the folder (a bundle cannot make one; a disk can)
    (tmp_path / "outside.bin").write_bytes(b"x")
    (artifact.path / "model.bin").unlink()
    (artifact.path / "model.bin").symlink_to(tmp_path / "outside.bin")
    with pytest.raises(ArtifactError, match="outside the artifact"):
        artifact.file("model.bin")


def test_manifest_paths_must_be_listed_member_names(tmp_path):
    from devices.artifact import check_manifest_paths

    files = {"w.bin": {"sha256": "0" * 64, "bytes": 1}}
    check_manifest_paths({"backend": "onnx", "files": files, "onnx": {"weights": "w.bin"}})
    for weights, message in (("/etc/shadow", "absolute"), ("../w.bin", "climbs"), ("x.bin", "not one of its listed files"), (["w.bin"], "malformed")):
        with pytest.raises(ArtifactError, match=message):
            check_manifest_paths({"backend": "onnx", "files": files, "onnx": {"weights": weights}})
    with pytest.raises(ArtifactError, match="lists itself"):
        check_manifest_paths({"backend": "eager", "files": {"manifest.json": files["w.bin"]}})


def test_public_error_is_one_short_line_without_server_paths():
    from devices.agent.jobs import MAX_ERROR_CHARS, public_error

    text = public_error("child_failed", "the measurement child raised (ValueError) during load\nTraceback ...\nsecret bytes", ("/srv/agent",))
    assert text == "child_failed: the measurement child raised (ValueError) during load"
    text = public_error("refused", "/srv/agent/artifacts/abc/model.bin has 3 bytes; compile it again", ("/srv/agent/artifacts/abc", "/srv/agent"))
    assert text == "refused: model.bin has 3 bytes; compile it again"
    assert len(public_error("refused", "x" * 5000)) <= MAX_ERROR_CHARS + len("refused: ")


def test_log_lines_are_rate_limited_per_template():
    import logging

    from devices.agent.guard import RateLimitedLog

    limiter = RateLimitedLog(burst=3, window_s=0.2)

    def record(msg: str, level: int = logging.WARNING, name: str = "uvicorn.error") -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, msg, ("1.2.3.4",), None)

    passed = [limiter.filter(record("closed a connection from %s")) for _ in range(10)]
    assert passed == [True] * 3 + [False] * 7
    assert limiter.filter(record("another template %s"))
    assert all(limiter.filter(record("job %s: measuring", logging.INFO, "lfm2_nas.agent")) for _ in range(10))  # a job's own lines pass
    time.sleep(0.25)
    later = record("closed a connection from %s")
    assert limiter.filter(later) and "7 more like this suppressed" in later.getMessage()


def test_connection_cap_follows_the_fd_limit():
    from devices.agent.guard import MAX_CONNECTIONS, connection_cap, server_settings

    assert connection_cap(1024) == MAX_CONNECTIONS and connection_cap(160) == 48 and connection_cap(10) == 4
    settings = server_settings(160)
    assert settings["backlog"] == 12 and settings["limit_concurrency"] == 96 and settings["timeout_keep_alive"] > 0


def test_a_full_queue_refuses_new_jobs_but_not_a_resent_one(tmp_path):
    from devices.agent.jobs import QueueFull

    jobs = JobStore(tmp_path / "jobs.sqlite")
    for i in range(3):
        jobs.submit(f"j{i}", "a" * 64, Protocol(), max_queued=3)
    with pytest.raises(QueueFull) as full:
        jobs.submit("j3", "a" * 64, Protocol(), max_queued=3, retry_after_s=7)
    assert full.value.retry_after_s == 7
    assert jobs.submit("j0", "a" * 64, Protocol(), max_queued=3)[1] is False  # the same job again is no new one
    jobs.close()
