"""Registered device agents: the user's `devices.toml`.

    [devices.pixel8]
    url = "http://192.168.1.20:7341"
    token_file = "/home/me/.config/lfm2-nas/pixel8.token"

The file lives at `$LFM2_NAS_CONFIG` if set, else `~/.config/lfm2-nas/devices.toml`.
Only the token file's path is kept here, never the token. Writes are atomic (a
temporary file renamed over the old one).
"""

from __future__ import annotations

import json
import os
import re
import stat
import tempfile
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lfm2.errors import UserError

ENV_VAR = "LFM2_NAS_CONFIG"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def config_path() -> Path:
    override = os.environ.get(ENV_VAR)
    if override:
        return Path(override).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config"))
    return base / "lfm2-nas" / "devices.toml"


@dataclass(frozen=True)
class RegisteredDevice:
    name: str
    url: str
    token_file: str

    def token(self) -> str:
        from devices.agent.auth import read_token

        return read_token(self.token_file)

    def client(self, **kwargs: Any):
        """An `AgentClient` for this device."""
        from devices.agent.client import AgentClient

        return AgentClient(self.url, self.token(), name=self.name, **kwargs)

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "url": self.url, "token_file": self.token_file}


def _check_name(name: str) -> None:
    if not _NAME.match(name or ""):
        raise UserError(f"device name {name!r} must be letters, digits, '.', '_' or '-' (at most 64), e.g. pixel8 or pi5-desk")


def _check_url(url: str) -> str:
    if not re.match(r"^https?://[^/\s]+(/[^\s]*)?$", url or ""):
        raise UserError(f"device URL {url!r} must look like http://HOST:PORT (the address `lfm2-nas agent serve` prints)")
    return url.rstrip("/")


def load_registry(path: str | Path | None = None) -> dict[str, RegisteredDevice]:
    path = Path(path) if path else config_path()
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"device registry {path} is not valid TOML ({exc}); fix it or remove it (set ${ENV_VAR} to use another file)") from None
    devices: dict[str, RegisteredDevice] = {}
    for name, table in (data.get("devices") or {}).items():
        if not isinstance(table, dict) or not isinstance(table.get("url"), str) or not isinstance(table.get("token_file"), str):
            raise UserError(f"device {name!r} in {path} needs url and token_file strings; fix it or `lfm2-nas devices remove {name}`")
        devices[name] = RegisteredDevice(name=name, url=table["url"], token_file=table["token_file"])
    return devices


def _toml_string(value: str) -> str:
    # JSON string escapes (\", \\, \n, \uXXXX) are valid TOML basic-string escapes
    return json.dumps(value, ensure_ascii=True)


def save_registry(devices: dict[str, RegisteredDevice], path: str | Path | None = None) -> Path:
    path = Path(path) if path else config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# lfm2-nas device agents: edit with `lfm2-nas devices add|remove`", ""]
    for name in sorted(devices):
        device = devices[name]
        lines += [f"[devices.{_toml_string(name)}]", f"url = {_toml_string(device.url)}", f"token_file = {_toml_string(device.token_file)}", ""]
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".devices-", suffix=".toml")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write("\n".join(lines))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def add_device(name: str, url: str, token_file: str | Path, path: str | Path | None = None, replace: bool = False) -> RegisteredDevice:
    """Register an agent. The token file must be readable now (it is read at each use)."""
    from devices.agent.auth import read_token

    _check_name(name)
    url = _check_url(url)
    token_path = Path(token_file).expanduser().resolve()
    read_token(token_path)  # fail now, not at search time
    mode = stat.S_IMODE(token_path.stat().st_mode)
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        # the agent refuses such a file on its side (devices.agent.auth.ensure_token): a
        # token that others on this machine can read protects nothing here either
        raise UserError(f"token file {token_path} is readable by others (mode {mode:o}); run `chmod 600 {token_path}` and add the device again")
    devices = load_registry(path)
    if name in devices and not replace:
        raise UserError(f"a device named {name!r} is registered already ({devices[name].url}); `lfm2-nas devices remove {name}` first, or use --replace")
    devices[name] = RegisteredDevice(name=name, url=url, token_file=str(token_path))
    save_registry(devices, path)
    return devices[name]


def remove_device(name: str, path: str | Path | None = None) -> RegisteredDevice:
    devices = load_registry(path)
    if name not in devices:
        raise UserError(f"no device named {name!r} is registered; registered: {', '.join(sorted(devices)) or 'none'}")
    removed = devices.pop(name)
    save_registry(devices, path)
    return removed


def not_registered_message(name: str, known: list[str]) -> str:
    return (
        f"no device agent named {name!r} is registered (registered: {', '.join(known) or 'none'}). "
        f"Start one on the device, or on the host it is plugged into: `lfm2-nas agent serve --name {name} --profile {name} --host 0.0.0.0`; "
        f"copy its token file here and register it: `lfm2-nas devices add {name} --url http://HOST:7341 --token-file {name}.token`. "
        f"Or emulate it on this machine (its thread count and memory cap; every result says emulated) with `--emulate`."
    )


def get_device(name: str, path: str | Path | None = None) -> RegisteredDevice:
    devices = load_registry(path)
    if name not in devices:
        raise UserError(not_registered_message(name, sorted(devices)))
    return devices[name]


def probe_device(device: RegisteredDevice, timeout_s: float = 3.0) -> dict[str, Any]:
    """What `devices list` shows: online or offline, busy, queue, profile, emulated."""
    from devices.agent.client import AgentAuthError, AgentClient, AgentError

    row: dict[str, Any] = {**device.to_dict(), "online": False, "status": "offline", "busy": None, "queue_length": None, "profile": None, "emulated": None, "error": None}
    try:
        token = device.token()
    except UserError as exc:
        row.update(status="no token", error=str(exc))
        return row
    try:
        with AgentClient(device.url, token, timeout_s=timeout_s, retry_for_s=0, name=device.name) as client:
            client.health(retry_for_s=0)
            row.update(online=True, status="online")
            info = client.info(retry_for_s=0)
    except AgentAuthError as exc:
        row.update(status="token refused", error=str(exc))
        return row
    except AgentError as exc:
        if not row["online"]:
            row["error"] = str(exc)
        else:
            row.update(status="error", error=str(exc))
        return row
    row.update(
        busy=info.get("busy"),
        state=info.get("state"),
        queue_length=info.get("queue_length"),
        profile=(info.get("profile") or {}).get("name"),
        emulated=info.get("emulated"),
        agent_name=info.get("name"),
        agent_version=info.get("agent_version"),
        fingerprint=info.get("fingerprint"),
    )
    return row


def probe_all(devices: dict[str, RegisteredDevice] | None = None, timeout_s: float = 3.0) -> list[dict[str, Any]]:
    devices = load_registry() if devices is None else devices
    if not devices:
        return []
    with ThreadPoolExecutor(max_workers=min(16, len(devices))) as pool:
        return list(pool.map(lambda d: probe_device(d, timeout_s), [devices[n] for n in sorted(devices)]))


__all__ = ["RegisteredDevice", "config_path", "load_registry", "save_registry", "add_device", "remove_device", "get_device", "probe_device", "probe_all", "not_registered_message"]
