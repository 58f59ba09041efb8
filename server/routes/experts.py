"""``/experts``: list, read, upload, replace, export and delete experts."""

from __future__ import annotations

import logging
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Request, Response, UploadFile
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from quiver.client.models import Expert, ExpertList
from quiver.library import InvalidExpertError
from quiver.library.adapter import CONFIG_FILE, PICKLE_WEIGHTS_FILE, WEIGHTS_FILE

from ..deps import EngineDep

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/experts", tags=["experts"])

_ZIP_MAGIC = b"PK\x03\x04"
"""The first bytes of a zip archive, which is what ``torch.save`` writes."""


@router.get("", response_model=ExpertList)
def list_experts(engine: EngineDep) -> ExpertList:
    library = engine.library
    return ExpertList(experts=[Expert(**info.to_json()) for info in library.list()], revision=library.revision)


@router.get("/{name}", response_model=Expert)
def get_expert(name: str, engine: EngineDep) -> Expert:
    return Expert(**engine.library.get(name).to_json())


_UPLOAD_FIELDS = {"name", "adapter_config", "adapter_model", "mttl_checkpoint", "task", "description", "replace"}


@router.post("", response_model=Expert, status_code=201)
async def upload_expert(
    request: Request,
    engine: EngineDep,
    name: Annotated[str | None, Form(description="expert name: 1-64 ASCII letters, digits, '_' or '-', starting with a letter or digit")] = None,
    adapter_config: Annotated[UploadFile | None, File(description="the PEFT adapter_config.json")] = None,
    adapter_model: Annotated[
        UploadFile | None, File(description="the PEFT weights: adapter_model.safetensors, or adapter_model.bin (read as tensors only)")
    ] = None,
    mttl_checkpoint: Annotated[
        UploadFile | None, File(description="an MTTL expert checkpoint, converted to a PEFT adapter; instead of adapter_config and adapter_model")
    ] = None,
    task: Annotated[str | None, Form(description="the task the expert was trained for")] = None,
    description: Annotated[str | None, Form()] = None,
    replace: Annotated[bool, Form(description="swap an existing expert of that name for this one instead of returning 409")] = False,
) -> Expert:
    """Validate an uploaded LoRA adapter, compute its Arrow prototypes and store it.

    Send either ``adapter_config`` and ``adapter_model`` (a PEFT adapter) or ``mttl_checkpoint``.
    """
    if request.headers.get("content-type", "").startswith("application/json"):
        return await run_in_threadpool(_import_from_hub, engine, await _json_body(request))
    unknown = sorted(set((await request.form()).keys()) - _UPLOAD_FIELDS)
    if unknown:
        raise InvalidExpertError(
            str(name), [f"unknown form fields {', '.join(map(repr, unknown))}; expected {', '.join(sorted(_UPLOAD_FIELDS))}"]
        )
    return await run_in_threadpool(
        _store_upload, engine, name or "", adapter_config, adapter_model, mttl_checkpoint, task, description, replace
    )


class HubImport(BaseModel):
    """``POST /experts`` with JSON: import one PEFT adapter from a Hub repo."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["hub"]
    repo_id: str = Field(min_length=1, max_length=200)
    name: str
    subfolder: str | None = None
    revision: str | None = Field(None, description="a branch (followed by every sync), tag or commit sha (pinned); default main")
    replace: bool = False


async def _json_body(request: Request) -> HubImport:
    try:
        return HubImport.model_validate_json(await request.body())
    except ValidationError as error:
        raise RequestValidationError(error.errors(include_url=False)) from None


def _import_from_hub(engine, body: HubImport) -> Expert:
    from quiver.library.hub import import_from_hub

    info = import_from_hub(
        engine.library, body.name, body.repo_id, subfolder=body.subfolder, revision=body.revision, replace=body.replace,
        api=engine.hub.api if engine.hub is not None else None,
    )
    return _published(engine, info, replace=body.replace)


def _published(engine, info, *, replace: bool) -> Expert:
    """Push a stored expert to the library's Hub repo, if there is one, and return its metadata."""
    expert = Expert(**info.to_json())
    if engine.hub is not None:
        expert.hub = engine.hub.record("put", info.name, replace=replace)
    return expert


def _store_upload(
    engine,
    name: str,
    adapter_config: UploadFile | None,
    adapter_model: UploadFile | None,
    mttl_checkpoint: UploadFile | None,
    task: str | None,
    description: str | None,
    replace: bool,
) -> Expert:
    library = engine.library
    peft_parts = [part for part in (adapter_config, adapter_model) if part is not None]
    if mttl_checkpoint is not None and peft_parts:
        raise InvalidExpertError(name, ["send either mttl_checkpoint or adapter_config and adapter_model, not both"])
    with tempfile.TemporaryDirectory(prefix="quiver-upload-") as folder:
        folder = Path(folder)
        if mttl_checkpoint is not None:
            _save_upload(mttl_checkpoint, folder / "checkpoint.pt")
            info = library.import_mttl(name, folder / "checkpoint.pt", task=task, description=description, replace=replace)
            return _published(engine, info, replace=replace)
        else:
            missing = [field for field, part in (("adapter_config", adapter_config), ("adapter_model", adapter_model)) if part is None]
            if missing:
                raise InvalidExpertError(
                    name, [f"the upload has no {' or '.join(missing)} file; send the adapter's adapter_config.json and its weights, or an MTTL checkpoint"]
                )
            _save_upload(adapter_config, folder / CONFIG_FILE)
            weights = _save_upload(adapter_model, folder / WEIGHTS_FILE)
            with open(weights, "rb") as stream:
                pickled = stream.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC
            if pickled:
                weights.rename(folder / PICKLE_WEIGHTS_FILE)  # torch.save output, read with the restricted unpickler
            info = library.add(name, folder, task=task, description=description, replace=replace)
    return _published(engine, info, replace=replace)


@router.get(
    "/{name}/adapter",
    response_class=FileResponse,
    responses={200: {"content": {"application/zip": {}}, "description": "a zip of the PEFT adapter folder"}},
)
def export_expert(name: str, engine: EngineDep) -> FileResponse:
    """Return expert ``name`` as a zip of a PEFT adapter folder: adapter_config.json, adapter_model.safetensors, README.md."""
    work = Path(tempfile.mkdtemp(prefix="quiver-export-"))
    try:
        engine.library.export(name, work / name)
        archive = work / f"{name}.zip"
        with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zipped:
            for path in sorted((work / name).iterdir()):
                zipped.write(path, arcname=path.name)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return FileResponse(
        archive,
        media_type="application/zip",
        filename=f"{name}.zip",
        background=BackgroundTask(shutil.rmtree, work, ignore_errors=True),
    )


@router.delete("/{name}", status_code=204)
def delete_expert(name: str, engine: EngineDep) -> Response:
    engine.library.remove(name)
    if engine.hub is not None:
        engine.hub.record("delete", name)
    return Response(status_code=204)


def _save_upload(upload: UploadFile, target: Path) -> Path:
    """Copy an uploaded part to ``target``; the request body limit was enforced while it arrived."""
    with open(target, "wb") as stream:
        shutil.copyfileobj(upload.file, stream)
    return target
