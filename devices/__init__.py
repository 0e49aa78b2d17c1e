"""Compile (ExecuTorch, ONNX), the measurement protocol, device agents, profiles."""

# compile: `devices.compile(spec, backend, quant, max_context)` is the function; import the
# module's other names with `from devices.compile import ...`.
from devices.backends import open_runner  # noqa: E402
from devices.compile import CompileError, VerificationError, compile  # noqa: E402

# measure: `devices.measure(artifact, protocol, limits)` is the function (a fresh child process
# per artifact); `from devices.measure import supervise, own_cores` for the machinery.
from devices.measure import measure  # noqa: E402
from devices.protocol import Limits, Measurement, Protocol, Stats  # noqa: E402
from devices.stack import device_fingerprint, machine_facts  # noqa: E402

# device agents: the client, an agent for this machine, registered agents, profiles, sizes
from devices.agent import AgentClient, start_local_agent  # noqa: E402
from devices.profiles import DeviceProfile, get_profile, load_profiles  # noqa: E402
from devices.registry import get_device, load_registry  # noqa: E402
from lfm2.sizes import format_size, parse_size  # noqa: E402

__all__ = [
    "compile", "CompileError", "VerificationError", "open_runner",
    "measure", "Protocol", "Limits", "Measurement", "Stats", "device_fingerprint", "machine_facts",
    "AgentClient", "start_local_agent", "DeviceProfile", "get_profile", "load_profiles",
    "get_device", "load_registry", "format_size", "parse_size",
]  # fmt: skip
