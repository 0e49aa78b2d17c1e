"""`--device pixel8,rpi5,local` and `--budget pixel8=500MB,rpi5=1GB`: the devices of one
search and the memory budget each is held to.

A search on one device keeps the study layout it always had; with several, every device
gets its own objectives and its own memory constraint (nas/objectives.py says how).
"""

from __future__ import annotations

from lfm2.errors import UserError
from lfm2.sizes import parse_size


def parse_devices(text: str) -> list[str]:
    """The device names of `--device`, in order, each once."""
    names = [part.strip() for part in (text or "").split(",")]
    if not names or any(not name for name in names):
        raise UserError(f"--device {text!r}: give a device name, or several separated by commas (--device pixel8,rpi5,local)")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UserError(f"--device {text!r} names {', '.join(repeated)} more than once; list each device once")
    return names


def parse_budgets(text: str, devices: list[str]) -> tuple[int, dict[str, int]]:
    """(one budget for all, or 0; per-device budgets) from `--budget`.

    `500MB` holds every device to 500 MB; `pixel8=500MB,rpi5=1GB` gives each its own, and
    a bare size among them (`1GB,pixel8=500MB`) is the budget of the devices not named.
    Every size needs a unit (a bare `500` would be 500 bytes)."""
    default, per_device = 0, dict[str, int]()
    for part in (p.strip() for p in (text or "").split(",")):
        if not part:
            raise UserError(f"--budget {text!r} has an empty entry; write 500MB, or pixel8=500MB,rpi5=1GB")
        if "=" in part:
            name, size = (s.strip() for s in part.split("=", 1))
            if name not in devices:
                raise UserError(f"--budget names device {name!r}, which is not in --device ({', '.join(devices)}); budget only the devices searched")
            if name in per_device:
                raise UserError(f"--budget gives {name!r} two budgets; give each device one")
            per_device[name] = parse_size(size, what=f"--budget for {name}", require_unit=True)
        else:
            if default:
                raise UserError(f"--budget {text!r} has two budgets for all devices; give one, and NAME=SIZE for the others")
            default = parse_size(part, what="--budget", require_unit=True)
    missing = [name for name in devices if name not in per_device and not default]
    if missing:
        raise UserError(f"--budget gives no budget to {', '.join(missing)}; add {missing[0]}=SIZE, or one size for every device (--budget 500MB)")
    named = ([("all devices", default)] if default else []) + list(per_device.items())
    for who, budget in named:
        if budget <= 0:
            raise UserError(f"--budget for {who} must be a positive size such as 500MB")
    return default, per_device


__all__ = ["parse_devices", "parse_budgets"]
