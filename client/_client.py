"""The synchronous HTTP client for a Quiver server."""

from __future__ import annotations

import logging
import os
import tempfile
import zipfile
from pathlib import Path
from typing import IO, Any

import httpx

from .errors import QuiverClientError, TransportError, error_from_response
from .models import Expert, ExpertList, GenerateRequest, GenerateResponse, Health

logger = logging.getLogger(__name__)

_CONFIG_FILE = "adapter_config.json"
_WEIGHTS_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_EXPORTED_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")


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

    def upload_expert(
        self,
        path: str | os.PathLike[str],
        name: str,
        task: str | None = None,
        description: str | None = None,
        *,
        replace: bool = False,
    ) -> Expert:
        """Upload the PEFT LoRA adapter in folder ``path`` as expert ``name``.

        The folder contains ``adapter_config.json`` and ``adapter_model.safetensors`` (or the older
        ``adapter_model.bin``). With ``replace``, an existing expert of that name is swapped for
        this one; otherwise an existing name raises :class:`ConflictError`.
        """
        folder = Path(path)
        if not folder.exists():
            raise FileNotFoundError(f"adapter folder {folder} not found; pass the folder that PEFT's save_pretrained wrote")
        weights = next((folder / file for file in _WEIGHTS_FILES if (folder / file).is_file()), None)
        if not (folder / _CONFIG_FILE).is_file() or weights is None:
            raise FileNotFoundError(
                f"{folder} is not a PEFT LoRA adapter folder: it needs {_CONFIG_FILE} and {' or '.join(_WEIGHTS_FILES)}"
            )
        with open(folder / _CONFIG_FILE, "rb") as config, open(weights, "rb") as stream:
            files = {
                "adapter_config": (_CONFIG_FILE, config, "application/json"),
                "adapter_model": (weights.name, stream, "application/octet-stream"),
            }
            return self._upload(name, files, task=task, description=description, replace=replace)

    def replace_expert(self, path: str | os.PathLike[str], name: str, task: str | None = None, description: str | None = None) -> Expert:
        """Swap expert ``name`` for the adapter in folder ``path`` in one step; the next request uses the new weights."""
        return self.upload_expert(path, name, task, description, replace=True)

    def import_mttl(
        self,
        checkpoint: str | os.PathLike[str],
        name: str,
        task: str | None = None,
        description: str | None = None,
        *,
        replace: bool = False,
    ) -> Expert:
        """Upload an MTTL expert checkpoint file; the server converts it to a PEFT LoRA adapter."""
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise FileNotFoundError(f"{checkpoint} is not a file; pass the path of an MTTL expert checkpoint")
        with open(checkpoint, "rb") as stream:
            files = {"mttl_checkpoint": (checkpoint.name, stream, "application/octet-stream")}
            return self._upload(name, files, task=task, description=description, replace=replace)

    def import_from_hub(
        self,
        repo_id: str,
        name: str,
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        replace: bool = False,
    ) -> Expert:
        """Import the PEFT adapter at ``repo_id``/``subfolder`` from the Hub as expert ``name``.

        The server downloads it with its own token and checks it like an upload. A branch
        ``revision`` (default ``main``) is followed by every sync of the server; a commit sha is pinned.
        """
        body = {"source": "hub", "repo_id": repo_id, "name": name, "subfolder": subfolder, "revision": revision, "replace": replace}
        return Expert.model_validate(self._request("POST", "/experts", json=body))

    def library_status(self) -> dict[str, Any]:
        """Return the library's revision, experts and Hub sync status."""
        return self._request("GET", "/library")

    def sync(self) -> dict[str, Any]:
        """Ask the server to pull its Hub repo and push queued changes; return the sync report."""
        return self._request("POST", "/library/sync")

    def export_expert(self, name: str, directory: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Save expert ``name`` as a PEFT adapter folder in ``directory`` and return its path.

        The folder loads with ``PeftModel.from_pretrained``. ``directory`` is created if needed;
        an adapter already there raises ``FileExistsError`` unless ``overwrite`` is true.
        """
        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise NotADirectoryError(f"{directory} is a file; choose a folder to export to")
        if not overwrite and any((directory / file).exists() for file in _EXPORTED_FILES):
            raise FileExistsError(f"{directory} already contains an adapter; choose another folder or overwrite it (overwrite=True, --overwrite in the CLI)")
        with tempfile.TemporaryFile() as archive:
            self._download(f"/experts/{name}/adapter", archive)
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

    def delete_expert(self, name: str) -> None:
        self._request("DELETE", f"/experts/{name}")

    def generate(self, inputs: str, **parameters: Any) -> GenerateResponse:
        """Generate a continuation of ``inputs``.

        ``parameters`` are those of :class:`~quiver.client.models.GenerateParameters`, for example
        ``max_new_tokens=32, routing={"top_k": 2, "experts": ["reverse", "add"]}``.
        """
        body = GenerateRequest(inputs=inputs, parameters=parameters)
        return GenerateResponse.model_validate(self._request("POST", "/generate", json=body.model_dump(exclude_none=True)))

    def _upload(self, name: str, files: dict, *, task: str | None, description: str | None, replace: bool) -> Expert:
        data = {"name": name}
        if task is not None:
            data["task"] = task
        if description is not None:
            data["description"] = description
        if replace:
            data["replace"] = "true"
        return Expert.model_validate(self._request("POST", "/experts", data=data, files=files))

    def _download(self, path: str, stream: IO[bytes]) -> None:
        try:
            with self._http.stream("GET", path) as response:
                if response.is_error:
                    response.read()
                    raise error_from_response(response)
                for chunk in response.iter_bytes():
                    stream.write(chunk)
        except httpx.TimeoutException as error:
            raise TransportError(f"GET {path} timed out: {error}; raise the client's timeout or check the server") from error
        except httpx.TransportError as error:
            raise TransportError(f"GET {path} failed: cannot reach {self._http.base_url} ({error}); is the server running (quiver serve)?") from error

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as error:
            raise TransportError(f"{method} {path} timed out: {error}; raise the client's timeout or check the server") from error
        except httpx.TransportError as error:
            raise TransportError(f"{method} {path} failed: cannot reach {self._http.base_url} ({error}); is the server running (quiver serve)?") from error
        logger.debug("%s %s -> %d", method, path, response.status_code)
        if response.is_error:
            raise error_from_response(response)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()
