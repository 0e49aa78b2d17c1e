"""Device agents: a daemon that measures artifacts where the model will run, and the
client, bundles and local launcher that talk to it (see service.py for the HTTP API).

Light on import: the FastAPI service is imported only by those who serve.
"""

from lfm2.lazy import lazy_attributes

# Loaded on first use (PEP 562): the client imports httpx (~0.3 s), which `lfm2-nas --help`
# (it imports `devices.agent.config` for the options' defaults, so this file) must not pay for.
_LAZY = {
    "ensure_token": "devices.agent.auth",
    "read_token": "devices.agent.auth",
    "BundleError": "devices.agent.bundle",
    "pack_bundle": "devices.agent.bundle",
    **dict.fromkeys(
        ("AgentAuthError", "AgentClient", "AgentError", "AgentRejected", "AgentUnreachable", "JobLost", "JobTimeout", "bundle_sha256"),
        "devices.agent.client",
    ),
    "LocalAgent": "devices.agent.local",
    "start_local_agent": "devices.agent.local",
}
__getattr__ = lazy_attributes(__name__, _LAZY)

__all__ = [
    "AgentClient",
    "AgentError",
    "AgentUnreachable",
    "AgentAuthError",
    "AgentRejected",
    "JobTimeout",
    "JobLost",
    "BundleError",
    "LocalAgent",
    "start_local_agent",
    "pack_bundle",
    "bundle_sha256",
    "ensure_token",
    "read_token",
]
