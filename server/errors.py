"""Turn every failure into one JSON error body: ``detail``, ``code``, ``request_id`` (and ``problems``).

Library errors map to their HTTP status here, in one place, so routes simply raise:

====================================  ======  ===================
exception                             status  code
====================================  ======  ===================
ExpertNotFoundError                   404     expert_not_found
ExpertExistsError                     409     expert_exists
InvalidExpertError                    422     invalid_expert
InvalidRoutingError, request schema   422     invalid_request
RequestTooLargeError                  422     request_too_large
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

from .engine import RequestTooLargeError
from .limits import BODY_TOO_LARGE

logger = logging.getLogger(__name__)


def error_response(request: Request, status: int, code: str, detail: str, problems: list[str] | None = None) -> JSONResponse:
    request_id = getattr(request.state, "request_id", "-")
    body = ErrorBody(detail=detail, code=code, request_id=request_id, problems=problems)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers={"X-Request-ID": request_id})


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
        response = error_response(request, error.status, error.code, str(error))
        if error.retry_after is not None:
            response.headers["Retry-After"] = str(int(error.retry_after + 0.999))
        return response

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
        return error_response(request, error.status_code, code, str(error.detail))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        if BODY_TOO_LARGE in request.scope:
            return error_response(request, 413, "upload_too_large", request.scope[BODY_TOO_LARGE])
        request_id = getattr(request.state, "request_id", "-")
        logger.error("request %s failed: %s", request_id, error, exc_info=error)
        return error_response(request, 500, "internal_error", f"internal server error; the server log has the details under request id {request_id}")
