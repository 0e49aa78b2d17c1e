"""Compile (ExecuTorch, ONNX), the measurement protocol, device agents, profiles."""
