"""Python client for a Quiver server. It needs only httpx and pydantic, never torch.

    from quiver.client import Client

    with Client(base_url="http://127.0.0.1:8000") as client:
        client.upload_expert("adapters/reverse", name="reverse", task="reverse the words")
        answer = client.generate("Reverse the words: red apple\\nAnswer:", max_new_tokens=16)
        print(answer.generated_text, answer.details.routing)
        for event in client.generate_stream("The capital of France is", max_new_tokens=16):
            if not event.token.special:
                print(event.token.text, end="", flush=True)

:class:`AsyncClient` has the same methods for asyncio. The exception tree is in
:mod:`quiver.client.errors`.
"""

from ._client import AsyncClient, Client
from .errors import (
    APIError,
    ConflictError,
    HubError,
    InvalidExpertError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    QuiverClientError,
    ServerError,
    TransportError,
    UnauthorizedError,
    UploadTooLargeError,
)
from .models import (
    ErrorBody,
    Expert,
    ExpertList,
    GenerateDetails,
    GenerateParameters,
    GenerateRequest,
    GenerateResponse,
    Health,
    MergedAdapters,
    RoutingParameters,
    StreamDetails,
    StreamResponse,
    Token,
)

__all__ = [
    "APIError",
    "AsyncClient",
    "Client",
    "ConflictError",
    "ErrorBody",
    "Expert",
    "ExpertList",
    "GenerateDetails",
    "GenerateParameters",
    "GenerateRequest",
    "GenerateResponse",
    "Health",
    "HubError",
    "InvalidExpertError",
    "InvalidRequestError",
    "MergedAdapters",
    "NotFoundError",
    "OverloadedError",
    "QuiverClientError",
    "RoutingParameters",
    "ServerError",
    "StreamDetails",
    "StreamResponse",
    "Token",
    "TransportError",
    "UnauthorizedError",
    "UploadTooLargeError",
]
