"""A point timed after several loads of the model in one process (`Protocol.loads`), and the
measuring process's allocations in transparent huge pages (`Protocol.huge_pages`).

Why loads: where the weights land in memory moves an anchored decode ratio from one load to
the next as much as from one fresh process to the next (BENCHMARKS.md, "Load to load"), and a
reload costs a fraction of a process. The loads' figures are combined as processes' are
(devices.processes), so the arithmetic is tested there; here: the protocol, the child doing
the reloads for real, the stopping rule, the wire, and the huge-pages switch reaching glibc.
"""

from __future__ import annotations

import ctypes.util
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from devices.measure import child_env, measure
from devices.processes import combine_point
from devices.protocol import Protocol
from lfm2.errors import UserError
from testkit.anchored import QUICK, anchored_stats, compile_pair, one_core_limits

pytestmark = pytest.mark.usefixtures("private_core_locks")


def test_the_protocol_keeps_one_load_and_no_huge_pages_out_of_its_key_and_refuses_bad_values():
    one = Protocol(prompt_lengths=(8,), decode_depths=(6,))
    assert "loads" not in one.to_dict() and "huge_pages" not in one.to_dict()  # keys and the wire form of before
    three = Protocol(prompt_lengths=(8,), decode_depths=(6,), loads=3, huge_pages=True)
    assert Protocol.from_dict(three.to_dict()) == three and three.key != one.key
    assert Protocol(prompt_lengths=(8,), decode_depths=(6,), huge_pages=True).key != one.key
    for bad in (0, 2.5, True):
        with pytest.raises(UserError, match="loads"):
            Protocol(loads=bad)
    with pytest.raises(UserError, match="huge_pages must be true or false"):
        Protocol(huge_pages="yes")  # type: ignore[arg-type]


def test_loads_combine_as_processes_do_and_say_which_they_were():
    loads = [anchored_stats(1.10, 0.03), anchored_stats(1.20, 0.03), anchored_stats(1.15, 0.03)]
    combined = combine_point(loads, ci_target=0.02, trim_fraction=0.2, over="loads")
    assert combined.processes is None and [entry["ratio"] for entry in combined.loads] == [1.10, 1.20, 1.15]
    assert 1.10 < combined.anchor_ratio < 1.20 and "loads' ratios" in combined.anchor["combined"]
    assert combined.anchor["ratio_tau"] > 0  # they disagree beyond their own intervals: the load effect
    # a process whose figure combines loads keeps them in its summary when processes are combined
    over_processes = combine_point([combined, anchored_stats(1.12, 0.03)], ci_target=0.02, trim_fraction=0.2)
    assert over_processes.processes[0]["loads"] == combined.loads and "loads" not in over_processes.processes[1]
    with pytest.raises(ValueError, match="processes or loads"):
        combine_point(loads, ci_target=0.02, trim_fraction=0.2, over="threads")


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return compile_pair(tmp_path_factory.mktemp("cache"))


def test_an_unsure_point_is_timed_after_each_load_and_the_loads_combined(artifacts):
    protocol = Protocol(**{**QUICK.to_dict(), "loads": 3, "ci_target": 0.0})  # never sure: every load is timed
    result = measure(artifacts["larger"], protocol, one_core_limits(), anchor=artifacts["small"])
    assert result.ok, result.error
    assert result.stack["loads"] == 3 and "processes" not in result.stack  # one process did it
    assert result.footprint_bytes and result.footprint_bytes > 0  # the first load's memory pass
    for stats in [*result.prefill.values(), *result.decode.values()]:
        assert len(stats.loads) == 3 and stats.processes is None
        ratios = [entry["ratio"] for entry in stats.loads]
        assert min(ratios) <= stats.anchor_ratio <= max(ratios)
        assert stats.anchor["ratio_ci_low"] <= stats.anchor_ratio <= stats.anchor["ratio_ci_high"]
        assert stats.noisy  # a target of 0 is never met
        kept = [entry for entry in stats.loads if not entry["disturbed"]] or stats.loads  # a disturbed load is left out when another is clean
        assert len(stats.samples_ms) == sum(entry["samples"] for entry in kept)


def test_a_point_sure_after_two_loads_takes_no_third_and_one_load_is_never_enough_to_stop(artifacts):
    protocol = Protocol(**{**QUICK.to_dict(), "loads": 3, "ci_target": 10.0})  # any interval is sure enough
    result = measure(artifacts["larger"], protocol, one_core_limits(), anchor=artifacts["small"])
    assert result.ok, result.error
    # one load cannot see the load effect, so the second is always timed; then the point is sure
    assert result.stack["loads"] == 2
    assert all(len(stats.loads) == 2 and not stats.noisy for stats in [*result.prefill.values(), *result.decode.values()])


def test_an_agent_times_several_loads_over_a_real_socket_and_bounds_the_count(artifacts, tmp_path):
    import httpx

    from devices.agent import start_local_agent
    from devices.agent.service import API_VERSION

    protocol = Protocol(**{**QUICK.to_dict(), "loads": 2, "ci_target": 0.0, "huge_pages": True})
    with start_local_agent(name="loads", workdir=tmp_path / "agent", job_timeout_s=300) as handle, handle.client() as client:
        measurement = client.measure(artifacts["larger"], protocol, timeout=300, anchor=artifacts["small"])
        sha = next(job["artifact_sha256"] for job in client.jobs())
        headers = {"Authorization": f"Bearer {handle.token}"}
        too_many = httpx.post(f"{handle.url}/{API_VERSION}/jobs", json={"artifact_sha256": sha, "protocol": {**protocol.to_dict(), "loads": 17}}, headers=headers, timeout=30)
        not_a_switch = httpx.post(f"{handle.url}/{API_VERSION}/jobs", json={"artifact_sha256": sha, "protocol": {**protocol.to_dict(), "huge_pages": "yes"}}, headers=headers, timeout=30)
    assert measurement.ok, measurement.error
    assert measurement.protocol["loads"] == 2 and measurement.protocol["huge_pages"] is True
    assert measurement.stack["huge_pages"]["asked"] is True
    assert all(len(stats.loads) == 2 for stats in [*measurement.prefill.values(), *measurement.decode.values()])
    assert too_many.status_code == 422 and "loads" in too_many.text
    assert not_a_switch.status_code == 422 and "huge_pages" in not_a_switch.text


def _thp_mode() -> str | None:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text[text.index("[") + 1 : text.index("]")]


def _glibc_at_least(major: int, minor: int) -> bool:
    name, version = platform.libc_ver()
    return name == "glibc" and tuple(int(part) for part in version.split(".")[:2]) >= (major, minor)


# What a measuring child would do with a large weight buffer: malloc it and touch every page.
_MALLOC_AND_TOUCH = """
import ctypes, ctypes.util
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
size = 64 << 20
buffer = libc.malloc(size)
ctypes.memset(buffer, 1, size)
from devices import stack
print(stack.anon_huge_pages_bytes())
"""


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always") or not _glibc_at_least(2, 35) or not ctypes.util.find_library("c"),
                    reason="needs the kernel's transparent huge pages (madvise or always) and glibc >= 2.35's malloc.hugetlb tunable")
def test_huge_pages_reach_glibc_in_the_measuring_childs_environment():
    """The switch is an environment variable the child's glibc reads when it starts: a large
    malloc'd buffer is then in huge pages, which /proc says (and the child records)."""
    env = child_env(1, huge_pages=True)
    assert "glibc.malloc.hugetlb=1" in env["GLIBC_TUNABLES"]
    assert child_env(1).get("GLIBC_TUNABLES") == os.environ.get("GLIBC_TUNABLES")  # off: glibc as the caller set it
    done = subprocess.run([sys.executable, "-c", _MALLOC_AND_TOUCH], env=env, capture_output=True, text=True, check=True, timeout=120)
    assert int(done.stdout.strip()) >= 32 << 20  # most of the 64 MiB buffer in 2 MiB pages
