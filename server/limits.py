"""The request body limit, enforced while the body streams in, before anything is parsed or stored."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

BODY_TOO_LARGE = "quiver.body_too_large"
"""Scope key set when a request body passes the limit, so the error handlers return 413 even
when the framework wrapped the error raised inside its body reader (multipart parsing reads in
a task group, and FastAPI reports any other failure there as a 400)."""


class UploadTooLargeError(HTTPException):
    """A request body beyond the server's upload limit (413)."""

    def __init__(self, detail: str) -> None:
        super().__init__(status_code=413, detail=detail)


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with a 413, without reading them whole.

    A declared ``Content-Length`` over the limit is refused on the first read, before any of the
    body is accepted; a body without one (chunked) is counted as it arrives and refused as soon
    as it passes the limit. Uploaded files below the limit are spooled to disk by the multipart
    parser, never held whole in memory.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int, setting: str = "QUIVER_MAX_UPLOAD_MB") -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.setting = setting

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        declared = _content_length(scope)
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            if declared is not None and declared > self.max_bytes:
                self._refuse(scope, f"the request declares {declared / 2**20:.1f} MiB")
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    self._refuse(scope, f"the request body passed {self.max_bytes / 2**20:g} MiB while streaming")
            return message

        await self.app(scope, limited_receive, send)

    def _refuse(self, scope: Scope, what: str) -> None:
        detail = (
            f"{what}; this server accepts at most {self.max_bytes / 2**20:g} MiB per request ({self.setting}); "
            "send a smaller adapter or raise the limit"
        )
        scope[BODY_TOO_LARGE] = detail
        raise UploadTooLargeError(detail)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope["headers"]:
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
