"""Compile (ExecuTorch, ONNX), the measurement protocol, device agents, profiles."""

from lfm2.lazy import lazy_attributes

# Loaded on first use (PEP 562): `import devices.x` runs this file, and the CLI, an agent or a
# measurement child must not pay for torch, numpy, FastAPI or the ONNX exporter it does not use.
#
# compile: `devices.compile(spec, backend, quant, max_context)` is the function; import the
# module's other names with `from devices.compile import ...`.
# measure: `devices.measure(artifact, protocol, limits)` is the function (a fresh child process
# per artifact); `from devices.measure import supervise, own_cores` for the machinery.
# device agents: the client, an agent for this machine, registered agents, profiles, sizes.
_LAZY = {
    "open_runner": "devices.backends",
    "CompileError": "devices.compile",
    "VerificationError": "devices.compile",
    "Limits": "devices.protocol",
    "Measurement": "devices.protocol",
    "Protocol": "devices.protocol",
    "Stats": "devices.protocol",
    "device_fingerprint": "devices.stack",
    "machine_facts": "devices.stack",
    "AgentClient": "devices.agent",
    "start_local_agent": "devices.agent",
    "DeviceProfile": "devices.profiles",
    "get_profile": "devices.profiles",
    "load_profiles": "devices.profiles",
    "get_device": "devices.registry",
    "load_registry": "devices.registry",
    "format_size": "lfm2.sizes",
    "parse_size": "lfm2.sizes",
}


# `compile` and `measure` are functions named like their modules: bound here, after the
# submodule import (which sets the attribute to the module), so that `devices.compile` is the
# function. Both modules are light (numpy, the standard library).
from devices.compile import compile  # noqa: E402
from devices.measure import measure  # noqa: E402


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = [
    "compile", "CompileError", "VerificationError", "open_runner",
    "measure", "Protocol", "Limits", "Measurement", "Stats", "device_fingerprint", "machine_facts",
    "AgentClient", "start_local_agent", "DeviceProfile", "get_profile", "load_profiles",
    "get_device", "load_registry", "format_size", "parse_size",
]  # fmt: skip
