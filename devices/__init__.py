"""Compile (ExecuTorch, ONNX), the measurement protocol, device agents, profiles."""

# compile: `devices.compile(spec, backend, quant, max_context)` is the function; import the
# module's other names with `from devices.compile import ...`.
from devices.backends import open_runner  # noqa: E402
from devices.compile import CompileError, VerificationError, compile  # noqa: E402

# device agents: the client, an agent for this machine, registered agents, profiles, sizes
from devices.agent import AgentClient, start_local_agent  # noqa: E402
from devices.profiles import DeviceProfile, get_profile, load_profiles  # noqa: E402
from devices.registry import get_device, load_registry  # noqa: E402
from devices.sizes import format_size, parse_size  # noqa: E402
