"""Device agents: a daemon that measures artifacts where the model will run, and the
client, bundles and local launcher that talk to it (see service.py for the HTTP API).

Light on import: the FastAPI service is imported only by those who serve.
"""

from devices.agent.auth import ensure_token, read_token
from devices.agent.bundle import BundleError, pack_bundle
from devices.agent.client import (
    AgentAuthError,
    AgentClient,
    AgentError,
    AgentRejected,
    AgentUnreachable,
    JobLost,
    JobTimeout,
    bundle_sha256,
)
from devices.agent.local import LocalAgent, start_local_agent

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
