"""The agent's ASGI middlewares, which run before any routing or body parsing: `BearerAuth`
(the token: a request without it learns nothing and costs nothing) and `JsonBodyLimit` (a
JSON body is small; uploads bound their own). `devices.agent.service.create_app` installs
both, the token check outermost."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import HTTPException
from fastapi.responses import JSONResponse

from devices.agent.auth import bearer_token, token_matches

#: The largest JSON request body (uploads are bounded by the agent's --max-upload instead).
MAX_JSON_BODY = 256 << 10


class BearerAuth:
    """ASGI middleware: every path but `open_paths` needs `Authorization: Bearer <token>`."""

    def __init__(self, app: Any, token: str, open_paths: frozenset[str]):
        self.app = app
        self.token = token
        self.open_paths = open_paths

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            given = [value for name, value in scope["headers"] if name == b"authorization"]
            if len(given) > 1:  # which one counts would be up to each proxy and server on the way: refuse
                response = JSONResponse({"detail": "send one Authorization header, not several"}, status_code=400)
                return await response(scope, receive, send)
            presented = bearer_token((given[0] if given else b"").decode("latin-1"))
            if not token_matches(presented, self.token):
                reason = "missing" if presented is None else "wrong"
                response = JSONResponse(
                    {"detail": f"{reason} bearer token: send `Authorization: Bearer <token>` with the token from the agent's --token-file"},
                    status_code=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class JsonBodyLimit:
    """ASGI middleware: a body over `MAX_JSON_BODY` is refused (413), by its declared length
    or as it arrives; PUTs under `upload_prefix` (the streamed uploads) pass through."""

    def __init__(self, app: Any, upload_prefix: str):
        self.app = app
        self.upload_prefix = upload_prefix

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"].startswith(self.upload_prefix) and scope["method"] == "PUT":
            return await self.app(scope, receive, send)  # the upload route bounds its own body
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_JSON_BODY):
            response = JSONResponse({"detail": f"request body over {MAX_JSON_BODY} bytes; JSON requests are small"}, status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def bounded_receive() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > MAX_JSON_BODY:
                raise HTTPException(413, f"request body over {MAX_JSON_BODY} bytes; JSON requests are small")
            return message

        return await self.app(scope, bounded_receive, send)


__all__ = ["BearerAuth", "JsonBodyLimit", "MAX_JSON_BODY"]
