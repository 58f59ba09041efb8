"""Turn every failure into one JSON error body: ``detail``, ``code``, ``request_id`` (and ``problems``).

The body also carries ``error`` and ``error_type``, the fields TGI and LoRAX clients read. Under
``/v1/`` the body takes OpenAI's shape instead, ``{"error": {"message", "type", "code"}}``, so
that OpenAI clients show the message.

Library errors map to their HTTP status here, in one place, so routes simply raise:

====================================  ======  ===================
exception                             status  code
====================================  ======  ===================
ExpertNotFoundError                   404     expert_not_found
ModelNotFoundError                    404     model_not_found (an OpenAI model name)
ExpertExistsError                     409     expert_exists
InvalidExpertError                    422     invalid_expert
InvalidRoutingError, request schema   422     invalid_request
RequestTooLargeError                  422     request_too_large
ChatTemplateMissingError              422     no_chat_template
QueueFullError                        503     overloaded (with Retry-After)
RequestTimeoutError                   503     request_timeout (with Retry-After)
GenerationCancelledError              499     cancelled (the client is gone)
HubError                              its own status and code (hub_*)
request body over the upload limit    413     upload_too_large
any other exception                   500     internal_error
====================================  ======  ===================
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from quiver.client.models import ErrorBody
from quiver.library import ExpertExistsError, ExpertNotFoundError, InvalidExpertError, InvalidRoutingError
from quiver.library.hub import HubError

from .batching import GenerationCancelledError, QueueFullError, RequestTimeoutError
from .engine import ChatTemplateMissingError, ModelNotFoundError, RequestTooLargeError
from .limits import BODY_TOO_LARGE

logger = logging.getLogger(__name__)


def _error_type(status: int, code: str) -> str:
    """TGI's error category of a status: what its clients turn into exception classes."""
    if status in (400, 413, 422):
        return "validation"
    if status in (429, 503):
        return "overloaded"
    if status >= 500:
        return "generation"
    return code


def _openai_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    if status in (429, 503):
        return "rate_limit_error" if status == 429 else "server_overloaded"
    return "invalid_request_error" if status < 500 else "server_error"


def error_response(
    request: Request, status: int, code: str, detail: str, problems: list[str] | None = None, retry_after: int | None = None
) -> JSONResponse:
    request_id = getattr(request.state, "request_id", "-")
    if status < 500:
        logger.info("rejected request_id=%s %s %s status=%d code=%s: %s", request_id, request.method, request.url.path, status, code, detail.splitlines()[0])
    headers = {"X-Request-ID": request_id}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if request.url.path.startswith("/v1/"):
        body = {"error": {"message": detail, "type": _openai_type(status), "param": None, "code": code}, "request_id": request_id}
        return JSONResponse(body, status_code=status, headers=headers)
    body = ErrorBody(detail=detail, code=code, request_id=request_id, problems=problems, error=detail, error_type=_error_type(status, code))
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers)


def stream_error_payload(error: Exception) -> dict:
    """Return the server-sent event that ends a stream which failed after it started."""
    if isinstance(error, RequestTimeoutError):
        return {"error": str(error), "error_type": "overloaded", "code": "request_timeout"}
    logger.error("a streamed generation failed: %s", error, exc_info=error)
    return {"error": f"generation failed: {error}", "error_type": "generation", "code": "internal_error"}


def _describe_validation_error(error: dict) -> str:
    if error.get("type") == "json_invalid":
        reason = (error.get("ctx") or {}).get("error", "malformed JSON")
        return f"body: the request body is not valid JSON ({reason}); send a JSON object"
    location = ".".join(str(part) for part in error.get("loc", ()))
    message = error.get("msg", "invalid value")
    if "input" in error and error.get("type") != "missing":
        return f"{location}: {message} (got {error['input']!r})"
    return f"{location}: {message}"


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that give every error the same body shape."""

    @app.exception_handler(HubError)
    async def hub_failed(request: Request, error: HubError) -> JSONResponse:
        retry_after = None if error.retry_after is None else int(error.retry_after + 0.999)
        return error_response(request, error.status, error.code, str(error), retry_after=retry_after)

    @app.exception_handler(ModelNotFoundError)
    async def model_not_found(request: Request, error: ModelNotFoundError) -> JSONResponse:
        return error_response(request, 404, "model_not_found", str(error))

    @app.exception_handler(ExpertNotFoundError)
    async def not_found(request: Request, error: ExpertNotFoundError) -> JSONResponse:
        return error_response(request, 404, "expert_not_found", str(error))

    @app.exception_handler(ExpertExistsError)
    async def exists(request: Request, error: ExpertExistsError) -> JSONResponse:
        return error_response(request, 409, "expert_exists", str(error))

    @app.exception_handler(InvalidExpertError)
    async def invalid_expert(request: Request, error: InvalidExpertError) -> JSONResponse:
        return error_response(request, 422, "invalid_expert", str(error), error.problems)

    @app.exception_handler(InvalidRoutingError)
    async def invalid_routing(request: Request, error: InvalidRoutingError) -> JSONResponse:
        return error_response(request, 422, "invalid_request", str(error), [str(error)])

    @app.exception_handler(RequestTooLargeError)
    async def too_large(request: Request, error: RequestTooLargeError) -> JSONResponse:
        return error_response(request, 422, "request_too_large", str(error))

    @app.exception_handler(ChatTemplateMissingError)
    async def no_chat_template(request: Request, error: ChatTemplateMissingError) -> JSONResponse:
        return error_response(request, 422, "no_chat_template", str(error))

    @app.exception_handler(GenerationCancelledError)
    async def cancelled(request: Request, error: GenerationCancelledError) -> JSONResponse:
        # 499 "client closed request", as nginx logs it. The client is gone, so only the log shows it.
        return error_response(request, 499, "cancelled", str(error))

    @app.exception_handler(QueueFullError)
    async def overloaded(request: Request, error: QueueFullError) -> JSONResponse:
        return error_response(request, 503, "overloaded", str(error), retry_after=error.retry_after)

    @app.exception_handler(RequestTimeoutError)
    async def timed_out(request: Request, error: RequestTimeoutError) -> JSONResponse:
        return error_response(request, 503, "request_timeout", str(error), retry_after=1)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = [_describe_validation_error(item) for item in error.errors()]
        detail = "invalid request: " + "; ".join(problems)
        return error_response(request, 422, "invalid_request", detail, problems)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        if BODY_TOO_LARGE in request.scope:
            return error_response(request, 413, "upload_too_large", request.scope[BODY_TOO_LARGE])
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        detail = str(error.detail)
        if error.status_code in (404, 405):
            detail = f"no route {request.method} {request.url.path}; check the server URL and the path (every route is listed at /docs)"
        return error_response(request, error.status_code, code, detail)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        if BODY_TOO_LARGE in request.scope:
            return error_response(request, 413, "upload_too_large", request.scope[BODY_TOO_LARGE])
        request_id = getattr(request.state, "request_id", "-")
        logger.error("request %s failed: %s", request_id, error, exc_info=error)
        return error_response(request, 500, "internal_error", f"internal server error; the server log has the details under request id {request_id}")
