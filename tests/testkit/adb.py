"""A stand-in for `adb` and a phone, for tests with no phone (a TEST FIXTURE, never a product path).

`StandinPhone(tmp_path)` makes a sandbox folder that plays the phone's filesystem and writes
an `adb` program (Python) into `<sandbox>/host-bin`; put that folder first on PATH and the
product's `AdbTransport` runs unchanged against it. The stand-in implements the adb command
line the agent uses on this machine:

* `adb -s SERIAL get-state | devices | push L R | pull R L | shell CMD`;
* push = copy into the sandbox, shell = `sh -c CMD` run in the sandbox with the phone's paths
  (/data/local/tmp, /sys/class/thermal, /sys/devices/system/cpu, /proc/meminfo) mapped into it;
  `getprop` answers from the fixture's properties, `df` from its free space, and `taskset`
  records the mask asked for and pins the command to a core of this host (a Pixel 8's
  core 8 does not exist here);
* modes (the file `<sandbox>/mode`, changeable while an agent runs): `ok`, `no-device`,
  `unauthorized`, `offline`, `full-disk`, each answered with the messages adb 29 prints;
  `unplug_after_lines` (a file holding N): an interactive shell is cut after it forwarded N
  lines to its command, the command is killed and the phone is gone (mode `no-device`), as
  when a cable is pulled mid-run.
"""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

SERIAL = "STANDIN8"

ADB_SCRIPT = textwrap.dedent(
    r'''
    #!PYTHON
    """adb stand-in (test fixture): see tests/testkit/adb.py."""
    import os, re, shutil, signal, subprocess, sys, threading
    from pathlib import Path

    ROOT = Path(os.environ.get("ADB_STANDIN_ROOT") or Path(__file__).resolve().parent.parent)
    MAPPED = ("/data/local/tmp", "/sys/class/thermal", "/sys/devices/system/cpu", "/proc/meminfo")

    def mode():
        try:
            return (ROOT / "mode").read_text().strip() or "ok"
        except OSError:
            return "ok"

    def to_sandbox(path):
        for prefix in MAPPED:
            if path == prefix or path.startswith(prefix + "/"):
                return str(ROOT / "fs") + path
        return path

    def rewrite(command):
        for prefix in MAPPED:
            command = re.sub(r"(?<![\w/])" + re.escape(prefix) + r"(?=[/\s;'\"*]|$)", str(ROOT / "fs") + prefix, command)
        return command

    def fail(message, status=1):
        sys.stderr.write(message + "\n")
        sys.exit(status)

    args = sys.argv[1:]
    serial = None
    if args[:1] == ["-s"]:
        serial, args = args[1], args[2:]
    if not args:
        fail("adb: usage: no command specified")
    command, rest = args[0], args[1:]
    known = (ROOT / "serial").read_text().strip()
    if command == "devices":
        state = {"ok": "device", "full-disk": "device", "unauthorized": "unauthorized", "offline": "offline"}.get(mode())
        print("List of devices attached")
        if state:
            print(f"{known}\t{state}")
        print()
        sys.exit(0)
    if mode() == "no-device" or (serial is not None and serial != known):
        prefix = "adb: error: failed to get feature set: " if command in ("push", "pull") else "error: "
        fail(f"{prefix}device '{serial or known}' not found")
    if mode() == "unauthorized":
        fail("error: device unauthorized.\nThis adb server's $ADB_VENDOR_KEYS is not set\nTry 'adb kill-server' if that seems wrong.\nOtherwise check for a confirmation dialog on your device.")
    if mode() == "offline":
        fail("error: device offline")
    if command == "get-state":
        print("device")
        sys.exit(0)
    if command in ("push", "pull"):
        source, target = rest
        if command == "push":
            if mode() == "full-disk":
                fail(f"adb: error: failed to copy '{source}' to '{target}': remote write failed: No space left on device")
            target = to_sandbox(target)
        else:
            source = to_sandbox(source)
        if not Path(source).exists():
            fail(f"adb: error: cannot stat '{source}': No such file or directory")
        shutil.copyfile(source, target)
        print(f"{source}: 1 file {command}ed.")
        sys.exit(0)
    if command != "shell":
        fail(f"adb: unknown command {command}")
    env = dict(os.environ, PATH=f"{ROOT / 'phone-bin'}:{os.environ.get('PATH', '')}", ADB_STANDIN_ROOT=str(ROOT))
    child = subprocess.Popen(["sh", "-c", rewrite(" ".join(rest))], cwd=ROOT / "fs", env=env, stdin=subprocess.PIPE, start_new_session=True)
    limit_file = ROOT / "unplug_after_lines"
    limit = int(limit_file.read_text()) if limit_file.exists() else None

    def unplug():
        (ROOT / "mode").write_text("no-device")
        limit_file.unlink(missing_ok=True)
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os._exit(255)

    def forward():
        forwarded = 0
        for line in sys.stdin.buffer:
            if limit is not None and forwarded >= limit:
                unplug()
            try:
                child.stdin.write(line)
                child.stdin.flush()
            except (BrokenPipeError, OSError):
                return
            forwarded += 1
        try:
            child.stdin.close()
        except OSError:
            pass

    threading.Thread(target=forward, daemon=True).start()
    status = child.wait()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 - status if status < 0 else status)  # not sys.exit: the stdin reader thread may hold stdin's lock
    '''
).lstrip()

GETPROP = """#!/bin/sh
grep "^$1=" "$ADB_STANDIN_ROOT/props" | head -n 1 | cut -d= -f2-
"""

DF = """#!/bin/sh
# df -k PATH: one header and one line, with the fixture's free space (KiB)
echo "Filesystem 1K-blocks Used Available Use% Mounted on"
echo "/dev/block/dm-42 100000000 1 $(cat "$ADB_STANDIN_ROOT/free_kib") 1% /data"
"""

TASKSET = """#!/bin/sh
# taskset MASK COMMAND...: records the mask, pins COMMAND to a core of this host
echo "$1" >> "$ADB_STANDIN_ROOT/taskset.log"
shift
exec /usr/bin/taskset -c "$(cat "$ADB_STANDIN_ROOT/host_cpus")" "$@"
"""

PIXEL8_PROPS = {
    "ro.product.model": "Pixel 8",
    "ro.product.manufacturer": "Google",
    "ro.product.device": "shiba",
    "ro.soc.model": "Tensor G3",
    "ro.soc.manufacturer": "Google",
    "ro.hardware": "shiba",
    "ro.board.platform": "zuma",
    "ro.build.version.release": "14",
    "ro.build.version.sdk": "34",
    "ro.build.fingerprint": "google/shiba/shiba:14/STANDIN/1:user/release-keys",
}
#: Pixel 8 cores: 4x A510 1.70 GHz, 4x A715 2.37 GHz, 1x X3 2.91 GHz (kHz, as sysfs writes them)
PIXEL8_FREQS_KHZ = [1704000] * 4 + [2367000] * 4 + [2914000]


class StandinPhone:
    def __init__(self, root: Path, abi: str = "x86_64", temps_c: dict[str, float] | None = None, free_bytes: int = 50 << 30):
        self.root = Path(root)
        fs = self.root / "fs"
        (fs / "data/local/tmp").mkdir(parents=True, exist_ok=True)
        (fs / "proc").mkdir(parents=True, exist_ok=True)
        (fs / "proc/meminfo").write_text("MemTotal:        7849664 kB\nMemFree:          812344 kB\nMemAvailable:    3417468 kB\n")
        for core, khz in enumerate(PIXEL8_FREQS_KHZ):
            folder = fs / f"sys/devices/system/cpu/cpu{core}/cpufreq"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "cpuinfo_max_freq").write_text(f"{khz}\n")
        self.set_temps(temps_c or {"BIG": 35.0, "MID": 34.0, "LITTLE": 33.0, "battery": 30.0})
        (self.root / "serial").write_text(SERIAL)
        (self.root / "host_cpus").write_text(str(sorted(os.sched_getaffinity(0))[-1]))
        props = {**PIXEL8_PROPS, "ro.product.cpu.abi": abi, "ro.product.cpu.abilist": abi}
        (self.root / "props").write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        self.set_free_bytes(free_bytes)
        self.set_mode("ok")
        host_bin, phone_bin = self.root / "host-bin", self.root / "phone-bin"
        host_bin.mkdir(exist_ok=True)
        phone_bin.mkdir(exist_ok=True)
        for folder, name, text in ((host_bin, "adb", ADB_SCRIPT.replace("PYTHON", sys.executable, 1)), (phone_bin, "getprop", GETPROP), (phone_bin, "df", DF), (phone_bin, "taskset", TASKSET)):
            (folder / name).write_text(text)
            (folder / name).chmod(0o755)
        self.serial = SERIAL

    @property
    def bin_dir(self) -> Path:
        return self.root / "host-bin"

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment whose `adb` is this stand-in."""
        env = dict(base if base is not None else os.environ)
        env["PATH"] = f"{self.bin_dir}:{env.get('PATH', '')}"
        env["ADB_STANDIN_ROOT"] = str(self.root)
        env.pop("ADB", None)
        return env

    def set_mode(self, mode: str) -> None:
        (self.root / "mode").write_text(mode)

    def unplug_after_lines(self, lines: int) -> None:
        (self.root / "unplug_after_lines").write_text(str(lines))

    def set_free_bytes(self, free: int) -> None:
        (self.root / "free_kib").write_text(str(free // 1024))

    def set_temps(self, temps_c: dict[str, float]) -> None:
        """Zone i gets the i-th (type, temperature); files are replaced whole (os.replace), so
        a shell reading them while a test changes them never sees half a file."""
        thermal = self.root / "fs/sys/class/thermal"
        for index, (kind, celsius) in enumerate(temps_c.items()):
            zone = thermal / f"thermal_zone{index}"
            zone.mkdir(parents=True, exist_ok=True)
            for name, text in (("type", kind + "\n"), ("temp", f"{int(celsius * 1000)}\n")):
                (zone / f".{name}.tmp").write_text(text)
                os.replace(zone / f".{name}.tmp", zone / name)
        for zone in thermal.iterdir():  # zones beyond the new list stop being readable
            if int(zone.name.removeprefix("thermal_zone")) >= len(temps_c):
                (zone / "temp").unlink(missing_ok=True)

    def taskset_masks(self) -> list[str]:
        log = self.root / "taskset.log"
        return log.read_text().split() if log.exists() else []

    def files(self) -> list[Path]:
        """Every file pushed to /data/local/tmp."""
        return sorted(p for p in (self.root / "fs/data/local/tmp").rglob("*") if p.is_file())
