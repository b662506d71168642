"""The API token (keyring, or a 0600 file when there is no keyring) and the Host/token checks.

Keyring first: service "pollinate", user "engine-api-token". Headless Linux often has no keyring backend
(keyring.backends.fail raises, an empty chainer silently drops the password), so a token we cannot read
back from the keyring goes to `<data dir>/engine-api-token` with mode 0600 instead.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from contract import KEYRING_SERVICE, KEYRING_TOKEN_USER, TOKEN_FILE
from engine.api.errors import error_response

logger = logging.getLogger(__name__)

KEYRING_USER = KEYRING_TOKEN_USER
TOKEN_FILE_NAME = TOKEN_FILE
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "[::1]"})
PUBLIC_PATHS = frozenset({"/api/health"})


@dataclass(frozen=True)
class ApiToken:
    """The bearer token and where it is kept (for engine-state.json)."""

    value: str
    source: str  # "keyring" or "file"
    file: Path | None = None


def _new_token() -> str:
    return secrets.token_urlsafe(32)


def _from_keyring() -> str | None:
    """The token kept in the OS keyring (created if absent), or None when no working keyring exists."""
    try:
        import keyring
        from keyring.errors import KeyringError

        token = keyring.get_password(KEYRING_SERVICE, KEYRING_USER)
        if token:
            return token
        token = _new_token()
        keyring.set_password(KEYRING_SERVICE, KEYRING_USER, token)
        # Some backends (an empty chainer, the null backend) accept the password and keep nothing.
        if keyring.get_password(KEYRING_SERVICE, KEYRING_USER) == token:
            return token
        logger.info("the keyring backend did not keep the API token; using a file instead")
    except (KeyringError, RuntimeError, OSError, ImportError) as exc:
        logger.info("no usable keyring (%s); keeping the API token in a file", exc)
    return None


def _from_file(path: Path) -> str:
    """The token in `path` (created with mode 0600 if absent or empty)."""
    try:
        token = path.read_text().strip()
        if token:
            if os.name == "posix" and path.stat().st_mode & 0o077:
                path.chmod(0o600)
            return token
    except FileNotFoundError:
        pass
    token = _new_token()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + f".{os.getpid()}.tmp")
    # Create with 0600 from the start: the token is never readable by others, not even for a moment.
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token)
    os.replace(temporary, path)
    return token


def load_or_create_token(data_dir: Path, *, use_keyring: bool = True) -> ApiToken:
    """The engine's API token: from the keyring when one works, else from a 0600 file in `data_dir`."""
    if use_keyring:
        token = _from_keyring()
        if token:
            return ApiToken(token, "keyring")
    path = Path(data_dir) / TOKEN_FILE_NAME
    return ApiToken(_from_file(path), "file", path)


def host_is_loopback(host_header: str | None) -> bool:
    """True for Host headers naming 127.0.0.1, localhost or [::1], with or without a port."""
    if not host_header:
        return False
    host = host_header.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        name, rest = host[: end + 1], host[end + 1 :]
    else:
        name, colon, port = host.partition(":")
        rest = colon + port
    if rest and not (rest.startswith(":") and rest[1:].isdigit()):
        return False
    return name in LOOPBACK_HOSTS


class SecurityMiddleware:
    """ASGI middleware: 403 for a foreign Host header (DNS rebinding), then 401 without the right token.

    It runs before routing and body parsing, so no handler ever sees an unchecked request.
    """

    def __init__(self, app, token: str):
        self.app = app
        self._expected = f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        host = headers.get(b"host", b"").decode("latin-1")
        if not host_is_loopback(host):
            response = error_response(
                403,
                "forbidden_host",
                "The engine API answers only requests addressed to 127.0.0.1 or localhost.",
            )
            return await response(scope, receive, send)
        if scope.get("path") not in PUBLIC_PATHS or scope.get("method") != "GET":
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                response = error_response(
                    401,
                    "unauthorized",
                    "Missing or wrong API token: send 'Authorization: Bearer <token>' "
                    "(the token is in the keyring or the file named in engine-state.json).",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)
