"""The synchronous HTTP client for a Quiver server."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import httpx

from .errors import TransportError, error_from_response
from .models import Expert, ExpertList, GenerateRequest, GenerateResponse, Health

logger = logging.getLogger(__name__)

_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class Client:
    """A client for one Quiver server, usable as a context manager.

    Args:
        base_url: the server's address, for example ``http://127.0.0.1:8000``.
        timeout: seconds to wait for each response; generation on a CPU can take a while.
        transport: an httpx transport, for tests or custom networking.
    """

    def __init__(self, base_url: str = "http://127.0.0.1:8000", *, timeout: float = 300.0, transport: httpx.BaseTransport | None = None) -> None:
        self._http = httpx.Client(base_url=base_url, timeout=timeout, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def health(self) -> Health:
        return Health.model_validate(self._request("GET", "/health"))

    def list_experts(self) -> list[Expert]:
        return ExpertList.model_validate(self._request("GET", "/experts")).experts

    def get_expert(self, name: str) -> Expert:
        return Expert.model_validate(self._request("GET", f"/experts/{name}"))

    def upload_expert(self, path: str | os.PathLike[str], name: str, task: str | None = None, description: str | None = None) -> Expert:
        """Upload the PEFT LoRA adapter in folder ``path`` as expert ``name``."""
        folder = Path(path)
        missing = [file for file in _ADAPTER_FILES if not (folder / file).is_file()]
        if missing:
            raise FileNotFoundError(f"{folder} is not a PEFT LoRA adapter folder: {', '.join(missing)} missing")

        data = {"name": name}
        if task is not None:
            data["task"] = task
        if description is not None:
            data["description"] = description
        with open(folder / _ADAPTER_FILES[0], "rb") as config, open(folder / _ADAPTER_FILES[1], "rb") as weights:
            files = {"adapter_config": (_ADAPTER_FILES[0], config, "application/json"), "adapter_model": (_ADAPTER_FILES[1], weights, "application/octet-stream")}
            return Expert.model_validate(self._request("POST", "/experts", data=data, files=files))

    def delete_expert(self, name: str) -> None:
        self._request("DELETE", f"/experts/{name}")

    def generate(self, inputs: str, **parameters: Any) -> GenerateResponse:
        """Generate a continuation of ``inputs``.

        ``parameters`` are those of :class:`~quiver.client.models.GenerateParameters`, for example
        ``max_new_tokens=32, routing={"top_k": 2, "experts": ["reverse", "add"]}``.
        """
        body = GenerateRequest(inputs=inputs, parameters=parameters)
        return GenerateResponse.model_validate(self._request("POST", "/generate", json=body.model_dump(exclude_none=True)))

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as error:
            raise TransportError(f"{method} {path} timed out: {error}; raise the client's timeout or check the server") from error
        except httpx.TransportError as error:
            raise TransportError(f"{method} {path} failed: cannot reach {self._http.base_url} ({error})") from error
        logger.debug("%s %s -> %d", method, path, response.status_code)
        if response.is_error:
            raise error_from_response(response)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()
