"""The agent's bearer token: made once, kept in a 0600 file, compared in constant time."""

from __future__ import annotations

import hmac
import os
import secrets
import stat
from pathlib import Path

from lfm2.errors import UserError

TOKEN_BYTES = 32


def read_token(path: str | Path) -> str:
    """The token in `path` (surrounding whitespace removed); a clear error if unusable."""
    path = Path(path).expanduser()
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        raise UserError(f"token file {path} does not exist; copy it from the agent's host (the agent prints where it keeps it)") from None
    except OSError as exc:
        raise UserError(f"cannot read token file {path}: {exc.strerror}; check its permissions") from None
    if not token or any(c.isspace() for c in token) or not token.isascii():
        raise UserError(f"token file {path} does not hold a token (one line of printable ASCII without spaces)")
    return token


def ensure_token(path: str | Path) -> str:
    """Read the token in `path`, or make a fresh one there (mode 0600) if it is absent.

    The file is created with O_EXCL and mode 0600 from the start, so the token is never
    readable by others, not even for a moment. An existing file readable by group or
    others is refused: a token anyone on the host can read protects nothing.
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise UserError(f"token file {path} is readable by others (mode {stat.S_IMODE(mode):o}); run `chmod 600 {path}`") from None
        return read_token(path)
    token = secrets.token_urlsafe(TOKEN_BYTES)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token


def token_matches(presented: str | None, expected: str) -> bool:
    """Constant-time comparison; a missing or non-ASCII token never matches."""
    if not presented or not presented.isascii():
        return False
    return hmac.compare_digest(presented.encode(), expected.encode())


def bearer_token(authorization: str | None) -> str | None:
    """The token in an `Authorization: Bearer <token>` header value, else None."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


__all__ = ["ensure_token", "read_token", "token_matches", "bearer_token"]
