"""``/experts``: list, read, upload and delete experts."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Form, Response, UploadFile

from quiver.client.models import Expert, ExpertList
from quiver.library import check_expert_name
from quiver.library.adapter import CONFIG_FILE, WEIGHTS_FILE

from ..deps import EngineDep
from ..errors import UploadTooLargeError

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/experts", tags=["experts"])


@router.get("", response_model=ExpertList)
def list_experts(engine: EngineDep) -> ExpertList:
    library = engine.library
    return ExpertList(experts=[Expert(**info.to_json()) for info in library.list()], revision=library.revision)


@router.get("/{name}", response_model=Expert)
def get_expert(name: str, engine: EngineDep) -> Expert:
    return Expert(**engine.library.get(name).to_json())


@router.post("", response_model=Expert, status_code=201)
def upload_expert(
    engine: EngineDep,
    name: Annotated[str, Form(description="expert name: 1-64 letters, digits, '_' or '-'")],
    adapter_config: Annotated[UploadFile, File(description="the PEFT adapter_config.json")],
    adapter_model: Annotated[UploadFile, File(description="the PEFT adapter_model.safetensors")],
    task: Annotated[str | None, Form(description="the task the expert was trained for")] = None,
    description: Annotated[str | None, Form()] = None,
) -> Expert:
    """Validate an uploaded PEFT LoRA adapter, compute its Arrow prototypes and store it."""
    check_expert_name(name)
    limit = engine.settings.max_upload_mb * 1024 * 1024
    with tempfile.TemporaryDirectory(prefix="quiver-upload-") as folder:
        _save_upload(adapter_config, Path(folder) / CONFIG_FILE, limit)
        _save_upload(adapter_model, Path(folder) / WEIGHTS_FILE, limit)
        info = engine.library.add(name, folder, task=task, description=description)
    return Expert(**info.to_json())


@router.delete("/{name}", status_code=204)
def delete_expert(name: str, engine: EngineDep) -> Response:
    engine.library.remove(name)
    return Response(status_code=204)


def _save_upload(upload: UploadFile, target: Path, limit: int) -> None:
    with open(target, "wb") as stream:
        shutil.copyfileobj(upload.file, stream)
    size = target.stat().st_size
    if size > limit:
        raise UploadTooLargeError(
            f"{upload.filename or target.name} is {size / 2**20:.1f} MiB; the limit is {limit // 2**20} MiB (QUIVER_MAX_UPLOAD_MB)"
        )
