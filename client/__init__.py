"""Python client for a Quiver server. It needs only httpx and pydantic, never torch.

    from quiver.client import Client

    with Client("http://127.0.0.1:8000") as client:
        client.upload_expert("adapters/reverse", name="reverse", task="reverse the words")
        answer = client.generate("Reverse the words: red apple\\nAnswer:", max_new_tokens=16)
        print(answer.generated_text, answer.details.routing)
"""

from ._client import Client
from .errors import (
    APIError,
    ConflictError,
    InvalidExpertError,
    InvalidRequestError,
    NotFoundError,
    QuiverClientError,
    ServerError,
    TransportError,
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
    RoutingParameters,
)

__all__ = [
    "APIError",
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
    "InvalidExpertError",
    "InvalidRequestError",
    "NotFoundError",
    "QuiverClientError",
    "RoutingParameters",
    "ServerError",
    "TransportError",
    "UploadTooLargeError",
]
