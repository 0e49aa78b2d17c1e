"""Compile (ExecuTorch, ONNX), the measurement protocol, device agents, profiles."""

# compile: `devices.compile(spec, backend, quant, max_context)` is the function; import the
# module's other names with `from devices.compile import ...`.
from devices.backends import open_runner  # noqa: E402
from devices.compile import CompileError, VerificationError, compile  # noqa: E402
