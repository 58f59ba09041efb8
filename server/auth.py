"""Bearer-token access control: ``QUIVER_API_TOKEN`` protects writes, and with ``QUIVER_API_TOKEN_READS=1`` reads.

Writes are the requests that change the library: uploads, imports, deletes and syncs. Generation
is a read, since it changes nothing. ``/health`` stays open for load balancers and container
health checks, and ``/hub/webhook`` has its own secret. Tokens are compared in constant time
and never logged.
"""

from __future__ import annotations

import hmac
import json
import logging

from starlette.types import ASGIApp, Receive, Scope, Send

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/hub/webhook"})
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
GENERATION_PATHS = frozenset({"/", "/generate", "/generate_stream"})


def is_write(method: str, path: str) -> bool:
    """Return whether a request changes the library, so that it needs the token whenever one is set."""
    if method not in WRITE_METHODS:
        return False
    return path not in GENERATION_PATHS and not path.startswith("/v1/")


class BearerTokenMiddleware:
    """Reject with 401 the requests that need the token and lack it."""

    def __init__(self, app: ASGIApp, *, token: str, protect_reads: bool) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()
        self.protect_reads = protect_reads

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._needs_token(scope):
            await self.app(scope, receive, send)
            return
        supplied = next((value for key, value in scope["headers"] if key == b"authorization"), b"")
        if hmac.compare_digest(supplied, self.expected):
            await self.app(scope, receive, send)
            return
        await self._reject(scope, send, "missing" if not supplied else "invalid")

    def _needs_token(self, scope: Scope) -> bool:
        path = scope["path"]
        if path in OPEN_PATHS:
            return False
        return self.protect_reads or is_write(scope["method"], path)

    async def _reject(self, scope: Scope, send: Send, problem: str) -> None:
        request_id = scope.get("state", {}).get("request_id", "-")
        logger.info("rejected request_id=%s %s %s status=401: %s bearer token", request_id, scope["method"], scope["path"], problem)
        detail = (
            f"{problem} bearer token: this server requires 'Authorization: Bearer <token>' for "
            f"{scope['method']} {scope['path']}; pass the server's QUIVER_API_TOKEN (token= in the client, --token or QUIVER_API_TOKEN in the CLI)"
        )
        if scope["path"].startswith("/v1/"):
            body = {"error": {"message": detail, "type": "authentication_error", "param": None, "code": "unauthorized"}, "request_id": request_id}
        else:
            body = {"detail": detail, "code": "unauthorized", "request_id": request_id, "error": detail, "error_type": "unauthorized"}
        payload = json.dumps(body).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            (b"www-authenticate", b'Bearer realm="quiver"'),
            (b"x-request-id", request_id.encode()),
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
