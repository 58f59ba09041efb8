"""Exceptions raised by :mod:`quiver.client`, built from the server's error body::

    QuiverClientError (Exception)
    ├── TransportError                  the server could not be reached or timed out
    └── APIError                        the server returned an error status
        ├── UnauthorizedError           401: the bearer token is missing or wrong
        ├── NotFoundError (KeyError)    404: no such expert or route
        ├── ConflictError               409: the expert name is taken
        ├── InvalidRequestError (ValueError)
        │   │                           422: invalid request or expert; ``problems`` lists them
        │   ├── InvalidExpertError      422: the uploaded adapter cannot be served
        │   └── UploadTooLargeError     413: the upload is over the server's size limit
        ├── OverloadedError             503 or 429: the queue is full (retried) or the request timed out
        ├── HubError                    the server's Hugging Face Hub request failed (``hub_*`` codes)
        └── ServerError                 other 5xx
"""

from __future__ import annotations

import httpx


class QuiverClientError(Exception):
    """Base class of every error raised by the Quiver client."""


class TransportError(QuiverClientError):
    """The request did not reach the server, or no response came in time."""


class APIError(QuiverClientError):
    """The server returned an error status.

    Attributes:
        status_code: the HTTP status.
        code: the server's machine-readable error code.
        detail: the server's message.
        problems: every problem found, for invalid requests and experts.
        request_id: the id the server logged the request under.
        retry_after: seconds the server asked the client to wait (``Retry-After``), if it did.
    """

    def __init__(
        self,
        status_code: int,
        code: str,
        detail: str,
        problems: list[str] | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.status_code = status_code
        self.retry_after = retry_after
        self.code = code
        self.detail = detail
        self.problems = problems or []
        self.request_id = request_id
        super().__init__(f"{status_code} {code}: {detail}")

    def __str__(self) -> str:
        return f"{self.status_code} {self.code}: {self.detail}"


class UnauthorizedError(APIError):
    """401: the server requires a bearer token (its QUIVER_API_TOKEN) that was missing or wrong."""


class NotFoundError(APIError, KeyError):
    """404: the expert or route does not exist."""


class ConflictError(APIError):
    """409: an expert of that name already exists."""


class InvalidRequestError(APIError, ValueError):
    """422: the request or its parameters are invalid."""


class InvalidExpertError(InvalidRequestError):
    """422: the uploaded adapter cannot adapt the served base model."""


class UploadTooLargeError(InvalidRequestError):
    """413: the request body is larger than the server accepts (QUIVER_MAX_UPLOAD_MB)."""


class OverloadedError(APIError):
    """503 or 429: the server's queue is full, or the request did not finish within its timeout.

    The clients retry a full queue (``code == "overloaded"``) and 429 with backoff. They do not
    retry a request that timed out, because it would most likely time out again.
    """

    @property
    def retryable(self) -> bool:
        return self.status_code == 429 or self.code == "overloaded"


class HubError(APIError):
    """The server's request to the Hugging Face Hub failed: a missing repo or revision, a refused token, or an unreachable Hub."""


class ServerError(APIError):
    """5xx: the server failed."""


def error_from_response(response: httpx.Response) -> APIError:
    """Build the matching :class:`APIError` from an error response."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {"detail": response.text or response.reason_phrase, "code": "http_error"}

    error = body.get("error")
    if isinstance(error, dict):  # the OpenAI-shaped errors of /v1/ routes
        body = {"detail": error.get("message"), "code": error.get("code"), "request_id": body.get("request_id")}
    detail = str(body.get("detail") or response.reason_phrase)
    code = str(body.get("code") or "http_error")
    arguments = (response.status_code, code, detail, body.get("problems"), body.get("request_id"), _retry_after(response))

    status = response.status_code
    if code.startswith("hub_"):
        return HubError(*arguments)
    if status == 401:
        return UnauthorizedError(*arguments)
    if status == 429 or (status == 503 and code in ("overloaded", "request_timeout")):
        return OverloadedError(*arguments)
    if status == 404:
        return NotFoundError(*arguments)
    if status == 409:
        return ConflictError(*arguments)
    if status == 422 and code == "invalid_expert":
        return InvalidExpertError(*arguments)
    if status == 413:
        return UploadTooLargeError(*arguments)
    if status in (400, 422):
        return InvalidRequestError(*arguments)
    if status >= 500:
        return ServerError(*arguments)
    return APIError(*arguments)


def _retry_after(response: httpx.Response) -> float | None:
    """Return the ``Retry-After`` header in seconds, or None when it is missing or a date."""
    try:
        return max(0.0, float(response.headers["Retry-After"]))
    except (KeyError, ValueError):
        return None
