"""Exceptions raised by :mod:`quiver.client`, built from the server's error body::

    QuiverClientError (Exception)
    ├── TransportError                  the server could not be reached or timed out
    └── APIError                        the server returned an error status
        ├── NotFoundError (KeyError)    404: no such expert or route
        ├── ConflictError               409: the expert name is taken
        ├── InvalidRequestError (ValueError)
        │   │                           422: invalid request or expert; ``problems`` lists them
        │   ├── InvalidExpertError      422: the uploaded adapter cannot be served
        │   └── UploadTooLargeError     413: the upload is over the server's size limit
        └── ServerError                 5xx
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
    """

    def __init__(self, status_code: int, code: str, detail: str, problems: list[str] | None = None, request_id: str | None = None) -> None:
        self.status_code = status_code
        self.code = code
        self.detail = detail
        self.problems = problems or []
        self.request_id = request_id
        super().__init__(f"{status_code} {code}: {detail}")

    def __str__(self) -> str:
        return f"{self.status_code} {self.code}: {self.detail}"


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

    detail = str(body.get("detail", response.reason_phrase))
    code = str(body.get("code", "http_error"))
    arguments = (response.status_code, code, detail, body.get("problems"), body.get("request_id"))

    status = response.status_code
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
