"""The HTTP clients for a Quiver server: :class:`Client` (blocking) and :class:`AsyncClient` (asyncio).

Both build the same requests and parse the same responses; only how they wait differs. Requests
refused because the server is overloaded (503 ``overloaded`` or 429) and requests that could not
connect are retried with exponential backoff, honouring ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import tempfile
import time
import zipfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

import httpx
from pydantic import ValidationError

from .errors import APIError, InvalidRequestError, OverloadedError, QuiverClientError, TransportError, error_from_response
from .models import Expert, ExpertList, GenerateRequest, GenerateResponse, Health, StreamResponse

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
TOKEN_VARIABLE = "QUIVER_API_TOKEN"
MAX_BACKOFF_SECONDS = 30.0

_CONFIG_FILE = "adapter_config.json"
_WEIGHTS_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_EXPORTED_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")

Progress = Callable[[int, int], None]
"""A callback given (bytes sent so far, total bytes) while an upload is sent."""


class _ProgressReader:
    """A read-only file wrapper that reports how much of the file has been read."""

    def __init__(self, stream: IO[bytes], progress: Progress) -> None:
        self._stream = stream
        self._progress = progress
        self._total = os.fstat(stream.fileno()).st_size

    def read(self, size: int = -1) -> bytes:
        chunk = self._stream.read(size)
        self._progress(self._stream.tell(), self._total)
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._stream.seek(offset, whence)

    def tell(self) -> int:
        return self._stream.tell()


def _adapter_files(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Return the config and weights files of the PEFT adapter folder ``path``."""
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"adapter folder {folder} not found; pass the folder that PEFT's save_pretrained wrote")
    weights = next((folder / file for file in _WEIGHTS_FILES if (folder / file).is_file()), None)
    if not (folder / _CONFIG_FILE).is_file() or weights is None:
        raise FileNotFoundError(f"{folder} is not a PEFT LoRA adapter folder: it needs {_CONFIG_FILE} and {' or '.join(_WEIGHTS_FILES)}")
    return folder / _CONFIG_FILE, weights


def _adapter_parts(files: ExitStack, path: str | os.PathLike[str], progress: Progress | None) -> dict[str, tuple]:
    """Open the adapter folder's files in ``files`` and return them as the multipart parts of an upload."""
    config, weights = _adapter_files(path)
    config_stream = files.enter_context(open(config, "rb"))
    weights_stream: Any = files.enter_context(open(weights, "rb"))
    if progress is not None:
        weights_stream = _ProgressReader(weights_stream, progress)
    return {
        "adapter_config": (_CONFIG_FILE, config_stream, "application/json"),
        "adapter_model": (weights.name, weights_stream, "application/octet-stream"),
    }


def _form(name: str, task: str | None, description: str | None, replace: bool) -> dict[str, str]:
    data = {"name": name}
    if task is not None:
        data["task"] = task
    if description is not None:
        data["description"] = description
    if replace:
        data["replace"] = "true"
    return data


def _generate_body(inputs: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """Check the parameters locally, so that a misspelt one fails before any request is sent.

    Raises:
        InvalidRequestError: a parameter is unknown or out of range, for which the server would return 422.
    """
    try:
        request = GenerateRequest(inputs=inputs, parameters=parameters)
    except ValidationError as error:
        problems = [f"{'.'.join(str(part) for part in item['loc'])}: {item['msg']} (got {item.get('input')!r})" for item in error.errors()]
        raise InvalidRequestError(422, "invalid_request", "invalid request: " + "; ".join(problems), problems) from None
    return request.model_dump(exclude_none=True, exclude_defaults=True) | {"inputs": inputs}


def _extract_export(name: str, archive: IO[bytes], directory: Path) -> Path:
    archive.seek(0)
    try:
        with zipfile.ZipFile(archive) as zipped:
            members = zipped.namelist()
            unexpected = [member for member in members if member not in _EXPORTED_FILES]
            if unexpected:
                raise QuiverClientError(f"the server's archive for {name!r} contains unexpected entries {unexpected}; not extracted")
            directory.mkdir(parents=True, exist_ok=True)
            for member in members:
                (directory / member).write_bytes(zipped.read(member))
    except zipfile.BadZipFile as error:
        raise QuiverClientError(f"the server's archive for {name!r} is not a valid zip file: {error}") from error
    return directory


def _check_export_target(directory: Path, overwrite: bool) -> None:
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} is a file; choose a folder to export to")
    if not overwrite and any((directory / file).exists() for file in _EXPORTED_FILES):
        raise FileExistsError(f"{directory} already contains an adapter; choose another folder or overwrite it (overwrite=True, --overwrite in the CLI)")


def _stream_event(line: str) -> StreamResponse | None:
    """Parse one server-sent event line of ``/generate_stream``; raise for an error event."""
    if not line.startswith("data:"):
        return None
    payload = json.loads(line[5:])
    if "error" in payload and "token" not in payload:
        raise APIError(200, str(payload.get("code", "stream_error")), str(payload["error"]))
    return StreamResponse.model_validate(payload)


class _Base:
    """The parts both clients share: settings, headers, retry delays and error translation."""

    def __init__(self, base_url: str, token: str | None, timeout: float, max_retries: int) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries is {max_retries}; expected 0 or more")
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url is {base_url!r}; expected an address starting with http:// or https://, such as {DEFAULT_BASE_URL}")
        if not timeout > 0:
            raise ValueError(f"timeout is {timeout!r}; expected a positive number of seconds")
        self.base_url = base_url
        self.max_retries = max_retries
        token = token if token is not None else os.environ.get(TOKEN_VARIABLE) or None
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = timeout

    def _retry_delay(self, attempt: int, error: Exception) -> float | None:
        """Seconds to wait before retrying after ``error``, or None when it is not retried."""
        if attempt >= self.max_retries:
            return None
        if isinstance(error, OverloadedError) and error.retryable:
            if error.retry_after is not None:
                return min(error.retry_after, MAX_BACKOFF_SECONDS)
        elif not isinstance(error, httpx.ConnectError):
            return None
        return min(0.5 * 2**attempt, MAX_BACKOFF_SECONDS) * random.uniform(0.8, 1.2)

    def _delay_or_raise(self, attempt: int, method: str, path: str, error: Exception) -> float:
        """Return the seconds to wait before retrying after ``error``, or raise it (a transport error as :class:`TransportError`)."""
        delay = self._retry_delay(attempt, error)
        if delay is not None:
            logger.info("%s %s: %s; retrying in %.1f s", method, path, error, delay)
            return delay
        if isinstance(error, httpx.HTTPError):
            raise self._transport_error(method, path, error) from error
        raise error

    def _transport_error(self, method: str, path: str, error: httpx.HTTPError) -> TransportError:
        if isinstance(error, httpx.TimeoutException):
            return TransportError(f"{method} {path} timed out: {error}; raise the client's timeout or check the server")
        return TransportError(f"{method} {path} failed: cannot reach {self.base_url} ({error}); is the server running (quiver serve)?")

    @staticmethod
    def _decode(response: httpx.Response) -> Any:
        if response.status_code == 204 or not response.content:
            return None
        return response.json()


class Client(_Base):
    """A blocking client for one Quiver server, usable as a context manager.

    Args:
        base_url: the server's address.
        token: the server's ``QUIVER_API_TOKEN``, sent as a bearer token; defaults to the
            ``QUIVER_API_TOKEN`` environment variable.
        timeout: seconds to wait for each response; generation on a CPU can take a while.
        max_retries: how many times a request refused as overloaded (503 or 429) or unable to
            connect is retried, with exponential backoff that honours ``Retry-After``.
        transport: an httpx transport, for tests or custom networking.
    """

    def __init__(
        self,
        *,
        base_url: str = DEFAULT_BASE_URL,
        token: str | None = None,
        timeout: float = 300.0,
        max_retries: int = 3,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, token, timeout, max_retries)
        self._http = httpx.Client(base_url=base_url, timeout=timeout, transport=transport, headers=self._headers)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- server ------------------------------------------------------------------------------

    def health(self) -> Health:
        """Return the server's status, base model, device and expert count."""
        return Health.model_validate(self._request("GET", "/health"))

    def info(self) -> dict[str, Any]:
        """Return the served model and the server's limits (TGI's ``/info``)."""
        return self._request("GET", "/info")

    # -- experts -----------------------------------------------------------------------------

    def list_experts(self) -> list[Expert]:
        return ExpertList.model_validate(self._request("GET", "/experts")).experts

    def get_expert(self, name: str) -> Expert:
        return Expert.model_validate(self._request("GET", f"/experts/{name}"))

    def upload_expert(
        self,
        path: str | os.PathLike[str],
        name: str,
        task: str | None = None,
        description: str | None = None,
        *,
        replace: bool = False,
        progress: Progress | None = None,
    ) -> Expert:
        """Upload the PEFT LoRA adapter in folder ``path`` as expert ``name``.

        The folder contains ``adapter_config.json`` and ``adapter_model.safetensors`` (or the older
        ``adapter_model.bin``). With ``replace``, an existing expert of that name is swapped for
        this one; otherwise an existing name raises :class:`ConflictError`. ``progress`` is called
        with (bytes sent, total bytes) as the weights are sent.
        """
        with ExitStack() as files:
            parts = _adapter_parts(files, path, progress)
            body = self._request("POST", "/experts", data=_form(name, task, description, replace), files=parts)
        return Expert.model_validate(body)

    def replace_expert(self, path: str | os.PathLike[str], name: str, task: str | None = None, description: str | None = None) -> Expert:
        """Swap expert ``name`` for the adapter in folder ``path`` in one step; the next request uses the new weights."""
        return self.upload_expert(path, name, task, description, replace=True)

    def import_mttl(
        self, checkpoint: str | os.PathLike[str], name: str, task: str | None = None, description: str | None = None, *, replace: bool = False
    ) -> Expert:
        """Upload an MTTL expert checkpoint file; the server converts it to a PEFT LoRA adapter."""
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise FileNotFoundError(f"{checkpoint} is not a file; pass the path of an MTTL expert checkpoint")
        with open(checkpoint, "rb") as stream:
            files = {"mttl_checkpoint": (checkpoint.name, stream, "application/octet-stream")}
            return Expert.model_validate(self._request("POST", "/experts", data=_form(name, task, description, replace), files=files))

    def import_from_hub(self, repo_id: str, name: str, *, subfolder: str | None = None, revision: str | None = None, replace: bool = False) -> Expert:
        """Import the PEFT adapter at ``repo_id``/``subfolder`` from the Hub as expert ``name``.

        The server downloads it with its own token and checks it like an upload. A branch
        ``revision`` (default ``main``) is followed by every sync of the server; a commit sha is pinned.
        """
        body = {"source": "hub", "repo_id": repo_id, "name": name, "subfolder": subfolder, "revision": revision, "replace": replace}
        return Expert.model_validate(self._request("POST", "/experts", json=body))

    def delete_expert(self, name: str) -> None:
        self._request("DELETE", f"/experts/{name}")

    def export_expert(self, name: str, directory: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Save expert ``name`` as a PEFT adapter folder in ``directory`` and return its path.

        The folder loads with ``PeftModel.from_pretrained``. ``directory`` is created if needed;
        an adapter already there raises ``FileExistsError`` unless ``overwrite`` is true.
        """
        directory = Path(directory)
        _check_export_target(directory, overwrite)
        with tempfile.TemporaryFile() as archive:
            self._download(f"/experts/{name}/adapter", archive)
            return _extract_export(name, archive, directory)

    # -- library -----------------------------------------------------------------------------

    def library_status(self) -> dict[str, Any]:
        """Return the library's revision, experts and Hub sync status."""
        return self._request("GET", "/library")

    def sync(self) -> dict[str, Any]:
        """Ask the server to pull its Hub repo and push queued changes; return the sync report."""
        return self._request("POST", "/library/sync")

    # -- generation --------------------------------------------------------------------------

    def generate(self, inputs: str, **parameters: Any) -> GenerateResponse:
        """Generate a continuation of ``inputs``.

        ``parameters`` are those of :class:`~quiver.client.models.GenerateParameters`, for example
        ``max_new_tokens=32, adapter_id="reverse"`` or ``routing={"top_k": 2, "experts": ["reverse", "add"]}``.
        """
        return GenerateResponse.model_validate(self._request("POST", "/generate", json=_generate_body(inputs, parameters)))

    def generate_stream(self, inputs: str, **parameters: Any) -> Iterator[StreamResponse]:
        """Generate like :meth:`generate`, yielding each token as the server sends it.

        The last event also carries ``generated_text`` and ``details``. Leaving the loop early
        closes the connection, which stops the generation on the server.
        """
        body = _generate_body(inputs, parameters)
        for attempt in range(self.max_retries + 1):
            try:
                with self._http.stream("POST", "/generate_stream", json=body) as response:
                    if response.is_error:
                        response.read()
                        raise error_from_response(response)
                    for line in response.iter_lines():
                        event = _stream_event(line)
                        if event is not None:
                            yield event
                return
            except (APIError, httpx.ConnectError) as error:
                time.sleep(self._delay_or_raise(attempt, "POST", "/generate_stream", error))
            except httpx.HTTPError as error:
                raise self._transport_error("POST", "/generate_stream", error) from error

    # -- plumbing ----------------------------------------------------------------------------

    def _download(self, path: str, stream: IO[bytes]) -> None:
        try:
            with self._http.stream("GET", path) as response:
                if response.is_error:
                    response.read()
                    raise error_from_response(response)
                for chunk in response.iter_bytes():
                    stream.write(chunk)
        except httpx.HTTPError as error:
            raise self._transport_error("GET", path, error) from error

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        for attempt in range(self.max_retries + 1):
            try:
                response = self._http.request(method, path, **kwargs)
                logger.debug("%s %s -> %d", method, path, response.status_code)
                if not response.is_error:
                    return self._decode(response)
                error: Exception = error_from_response(response)
            except httpx.HTTPError as transport_error:
                error = transport_error
            delay = self._delay_or_raise(attempt, method, path, error)
            _rewind(kwargs)
            time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover - the last attempt always raises or returns


class AsyncClient(_Base):
    """The asyncio version of :class:`Client`, with the same options and methods, awaited.

    ``generate_stream`` is an async iterator: ``async for event in client.generate_stream(...)``.
    """

    def __init__(
        self,
        *,
        base_url: str = DEFAULT_BASE_URL,
        token: str | None = None,
        timeout: float = 300.0,
        max_retries: int = 3,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, token, timeout, max_retries)
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout, transport=transport, headers=self._headers)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def health(self) -> Health:
        """Return the server's status, base model, device and expert count."""
        return Health.model_validate(await self._request("GET", "/health"))

    async def info(self) -> dict[str, Any]:
        """Return the served model and the server's limits (TGI's ``/info``)."""
        return await self._request("GET", "/info")

    async def list_experts(self) -> list[Expert]:
        return ExpertList.model_validate(await self._request("GET", "/experts")).experts

    async def get_expert(self, name: str) -> Expert:
        return Expert.model_validate(await self._request("GET", f"/experts/{name}"))

    async def upload_expert(
        self,
        path: str | os.PathLike[str],
        name: str,
        task: str | None = None,
        description: str | None = None,
        *,
        replace: bool = False,
        progress: Progress | None = None,
    ) -> Expert:
        """Upload the PEFT LoRA adapter in folder ``path`` as expert ``name`` (see :meth:`Client.upload_expert`)."""
        with ExitStack() as files:
            parts = _adapter_parts(files, path, progress)
            body = await self._request("POST", "/experts", data=_form(name, task, description, replace), files=parts)
        return Expert.model_validate(body)

    async def replace_expert(self, path: str | os.PathLike[str], name: str, task: str | None = None, description: str | None = None) -> Expert:
        """Swap expert ``name`` for the adapter in folder ``path`` in one step."""
        return await self.upload_expert(path, name, task, description, replace=True)

    async def import_mttl(
        self, checkpoint: str | os.PathLike[str], name: str, task: str | None = None, description: str | None = None, *, replace: bool = False
    ) -> Expert:
        """Upload an MTTL expert checkpoint file; the server converts it to a PEFT LoRA adapter."""
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise FileNotFoundError(f"{checkpoint} is not a file; pass the path of an MTTL expert checkpoint")
        with open(checkpoint, "rb") as stream:
            files = {"mttl_checkpoint": (checkpoint.name, stream, "application/octet-stream")}
            return Expert.model_validate(await self._request("POST", "/experts", data=_form(name, task, description, replace), files=files))

    async def import_from_hub(
        self, repo_id: str, name: str, *, subfolder: str | None = None, revision: str | None = None, replace: bool = False
    ) -> Expert:
        """Import the PEFT adapter at ``repo_id``/``subfolder`` from the Hub as expert ``name``."""
        body = {"source": "hub", "repo_id": repo_id, "name": name, "subfolder": subfolder, "revision": revision, "replace": replace}
        return Expert.model_validate(await self._request("POST", "/experts", json=body))

    async def delete_expert(self, name: str) -> None:
        await self._request("DELETE", f"/experts/{name}")

    async def export_expert(self, name: str, directory: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Save expert ``name`` as a PEFT adapter folder in ``directory`` and return its path."""
        directory = Path(directory)
        _check_export_target(directory, overwrite)
        with tempfile.TemporaryFile() as archive:
            try:
                async with self._http.stream("GET", f"/experts/{name}/adapter") as response:
                    if response.is_error:
                        await response.aread()
                        raise error_from_response(response)
                    async for chunk in response.aiter_bytes():
                        archive.write(chunk)
            except httpx.HTTPError as error:
                raise self._transport_error("GET", f"/experts/{name}/adapter", error) from error
            return _extract_export(name, archive, directory)

    async def library_status(self) -> dict[str, Any]:
        """Return the library's revision, experts and Hub sync status."""
        return await self._request("GET", "/library")

    async def sync(self) -> dict[str, Any]:
        """Ask the server to pull its Hub repo and push queued changes; return the sync report."""
        return await self._request("POST", "/library/sync")

    async def generate(self, inputs: str, **parameters: Any) -> GenerateResponse:
        """Generate a continuation of ``inputs`` (see :meth:`Client.generate`)."""
        return GenerateResponse.model_validate(await self._request("POST", "/generate", json=_generate_body(inputs, parameters)))

    async def generate_stream(self, inputs: str, **parameters: Any) -> AsyncIterator[StreamResponse]:
        """Generate like :meth:`generate`, yielding each token as the server sends it."""
        body = _generate_body(inputs, parameters)
        for attempt in range(self.max_retries + 1):
            try:
                async with self._http.stream("POST", "/generate_stream", json=body) as response:
                    if response.is_error:
                        await response.aread()
                        raise error_from_response(response)
                    async for line in response.aiter_lines():
                        event = _stream_event(line)
                        if event is not None:
                            yield event
                return
            except (APIError, httpx.ConnectError) as error:
                await asyncio.sleep(self._delay_or_raise(attempt, "POST", "/generate_stream", error))
            except httpx.HTTPError as error:
                raise self._transport_error("POST", "/generate_stream", error) from error

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        for attempt in range(self.max_retries + 1):
            try:
                response = await self._http.request(method, path, **kwargs)
                logger.debug("%s %s -> %d", method, path, response.status_code)
                if not response.is_error:
                    return self._decode(response)
                error: Exception = error_from_response(response)
            except httpx.HTTPError as transport_error:
                error = transport_error
            delay = self._delay_or_raise(attempt, method, path, error)
            _rewind(kwargs)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover - the last attempt always raises or returns


def _rewind(kwargs: dict[str, Any]) -> None:
    """Move uploaded files back to their start, so that a retried request sends them whole."""
    for part in (kwargs.get("files") or {}).values():
        part[1].seek(0)
