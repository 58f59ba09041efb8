"""A library of LoRA experts kept in one folder, in the layout PEFT and the Hub can read::

    <library>/
      quiver.json                          manifest: format version, base model, revision, created
      README.md                            model card generated from the experts' metadata
      <expert>/adapter_config.json         the PEFT LoRA config, byte for byte as uploaded
      <expert>/adapter_model.safetensors   the PEFT LoRA weights, byte for byte as uploaded
                                           (pickled adapter_model.bin weights are stored as safetensors)
      <expert>/expert.json                 metadata (see ExpertInfo)
      <expert>/arrow.safetensors           Arrow prototypes (see quiver.library.arrow)
      .staging/                            work area for atomic writes; never read as experts
      .lock                                file lock held by every write

Writes build the new expert in ``.staging`` and rename it into place under the lock, so a crash
leaves either the old state or the new one. Replacing an expert moves the old folder to
``.staging/<tmp>/replaced/<name>`` first; if the process dies before the new folder takes its
place, the next open moves the old one back. Every change bumps the manifest's ``revision``
before touching expert folders, so a reader that sees a revision never misses the change it
announces; readers load under the same lock (:meth:`ExpertLibrary.load_all`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from filelock import FileLock
from safetensors.torch import save_file
from torch import nn

from .adapter import CONFIG_FILE, WEIGHTS_FILE, BaseModules, LoraModule, read_adapter, sha256_file
from .arrow import ARROW_CONFIG, ARROW_FILE, compute_prototypes, load_prototypes, save_prototypes
from .errors import (
    ExpertExistsError,
    ExpertNotFoundError,
    InvalidExpertError,
    InvalidExpertNameError,
    LibraryFormatError,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_FILE = "quiver.json"
EXPERT_FILE = "expert.json"
CARD_FILE = "README.md"

EXPERT_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
"""Expert names: 1–64 characters of letters, digits, '_' and '-', starting with a letter or digit."""

RESERVED_NAMES = frozenset(
    {"base", "default", "all", "none", "null", "adapter", "experts", "library", "quiver"}
    | {"con", "prn", "aux", "nul"}
    | {f"{device}{number}" for device in ("com", "lpt") for number in range(10)}
)
"""Names refused in any letter case: words that mean something else in a request ("base" for the
base model, "default" for PEFT's adapter name, "all"/"none" for a routing scope) and device names
that Windows cannot use as folder names."""

_STAGING = ".staging"
_REPLACED = "replaced"


@dataclass(frozen=True)
class ExpertInfo:
    """Metadata of one stored expert, as written to ``expert.json``."""

    name: str
    base_model: str
    rank: int
    alpha: float
    target_modules: list[str]
    module_count: int
    weights_sha256: str
    created: str
    task: str | None = None
    description: str | None = None
    adapter_base_model: str | None = None
    source_repo: str | None = None
    source_revision: str | None = None
    """The commit of ``source_repo`` being served."""
    source_subfolder: str | None = None
    source_ref: str | None = None
    """The revision the import asked for: a branch is followed by each sync, a commit sha is pinned."""
    arrow_config: dict = field(default_factory=lambda: dict(ARROW_CONFIG))
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ExpertInfo:
        known = {name for name in cls.__dataclass_fields__}
        return cls(**{key: value for key, value in data.items() if key in known})


@dataclass(frozen=True)
class LoadedExpert:
    """An expert's factors and prototypes, ready to be placed in a routed model."""

    info: ExpertInfo
    modules: dict[str, LoraModule]
    prototypes: dict[str, torch.Tensor]  # module name -> (D_in,) float32


def check_expert_name(name: object) -> str:
    """Return ``name`` if it is a valid expert name, else raise :class:`InvalidExpertNameError`.

    The error names what is wrong with the name: its length, the characters that are not
    allowed, its first character, or that it is reserved.
    """
    rule = "use 1-64 ASCII letters, digits, '_' or '-', starting with a letter or digit"
    if not isinstance(name, str):
        raise InvalidExpertNameError(str(name), [f"name {name!r} is not a string; {rule}"])
    reasons = []
    if not name:
        reasons.append("it is empty")
    elif len(name) > 64:
        reasons.append(f"it has {len(name)} characters, more than 64")
    bad = sorted({char for char in name if not (char.isascii() and (char.isalnum() or char in "_-"))})
    if bad:
        reasons.append("it contains " + ", ".join(_describe_char(char) for char in bad))
    if name and not bad and not name[0].isalnum():
        reasons.append(f"it starts with {name[0]!r}")
    if name.lower() in RESERVED_NAMES:
        reasons.append("it is reserved (" + ", ".join(sorted(name for name in RESERVED_NAMES if not name[-1].isdigit())) + ", and Windows device names)")
    if reasons:
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise InvalidExpertNameError(shown, [f"name {shown!r} is invalid: {'; '.join(reasons)}; {rule}"])
    return name


def _describe_char(char: str) -> str:
    names = {" ": "a space", "/": "'/'", "\\": "a backslash", ".": "'.'"}
    if char in names:
        return names[char]
    if not char.isprintable():
        return f"the control character U+{ord(char):04X}"
    if not char.isascii():
        return f"the non-ASCII character {char!r} (U+{ord(char):04X})"
    return repr(char)


class ExpertLibrary:
    """A folder of LoRA experts for one base model.

    Args:
        root: the library folder; created with an empty manifest when it does not exist.
        model: the base model the experts adapt. Adding an expert checks it against this model's
            modules; without a model the library can list, read and remove experts but not add.
        base_model_id: the id recorded in the manifest and in each expert; defaults to the
            model's ``config.name_or_path``.
    """

    def __init__(self, root: str | os.PathLike[str], model: nn.Module | None = None, *, base_model_id: str | None = None) -> None:
        self.root = Path(root).expanduser()
        self._base = BaseModules.of(model) if model is not None else None
        if base_model_id is None and model is not None:
            base_model_id = getattr(getattr(model, "config", None), "name_or_path", None)
        self.base_model_id = base_model_id or "unknown"

        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.root / ".lock"))
        with self._lock:
            self._open_manifest()
            self._recover()

    # Reading

    @property
    def revision(self) -> int:
        """A counter bumped by every add and remove; it only grows."""
        return int(self._read_manifest()["revision"])

    def names(self) -> list[str]:
        return sorted(
            entry.name
            for entry in self.root.iterdir()
            if entry.is_dir() and EXPERT_NAME_PATTERN.match(entry.name) and (entry / EXPERT_FILE).is_file()
        )

    def list(self) -> list[ExpertInfo]:
        """Return the metadata of every expert, skipping one removed between the folder scan and its read."""
        infos = []
        for name in self.names():
            try:
                infos.append(self.get(name))
            except ExpertNotFoundError:  # deleted meanwhile, by a request or a Hub pull
                continue
        return infos

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and EXPERT_NAME_PATTERN.match(name) is not None and (self.root / name / EXPERT_FILE).is_file()

    def __len__(self) -> int:
        return len(self.names())

    def __iter__(self) -> Iterator[ExpertInfo]:
        return iter(self.list())

    def get(self, name: str) -> ExpertInfo:
        """Return the metadata of expert ``name``; raise :class:`ExpertNotFoundError` if absent."""
        path = self._expert_path(name) / EXPERT_FILE
        try:
            return ExpertInfo.from_json(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:  # removed after the existence check
            raise ExpertNotFoundError(name, self.names()) from None
        except (json.JSONDecodeError, TypeError) as error:
            raise LibraryFormatError(f"cannot read {path}: {error}") from error

    def path(self, name: str) -> Path:
        """Return the folder of expert ``name``, a PEFT adapter folder."""
        return self._expert_path(name)

    def load(self, name: str) -> LoadedExpert:
        """Read expert ``name``'s factors and prototypes, recomputing prototypes stored with another config.

        Modules whose update is zero have no prototype and are left out: they add nothing.
        """
        with self._lock:
            folder = self._expert_path(name)
            info = self.get(name)
            try:
                adapter = read_adapter(name, folder, self._base or _shapes_from_weights(folder))
            except InvalidExpertError as error:
                raise LibraryFormatError(f"stored expert {name!r} no longer loads: {error}") from error

            try:
                prototypes = load_prototypes(folder / ARROW_FILE)
            except LibraryFormatError as error:
                logger.warning("recomputing Arrow prototypes of expert %s: %s", name, error)
                prototypes = _nonzero(compute_prototypes(adapter.modules))
                _atomic_save(folder / ARROW_FILE, lambda path: save_prototypes(path, prototypes))
        modules = {module: adapter.modules[module] for module in prototypes if module in adapter.modules}
        return LoadedExpert(info, modules, {module: vector for module, (vector, _) in prototypes.items() if module in modules})

    def load_all(self) -> tuple[int, list[LoadedExpert], dict[str, str]]:
        """Load every expert under the lock, so the result matches one revision.

        Returns:
            The revision, the loaded experts, and the error of each expert that cannot be loaded.
        """
        experts, failures = [], {}
        with self._lock:
            revision = self.revision
            for name in self.names():
                try:
                    experts.append(self.load(name))
                except LibraryFormatError as error:
                    failures[name] = str(error)
        return revision, experts, failures

    def export(self, name: str, target: str | os.PathLike[str]) -> Path:
        """Write expert ``name`` as a PEFT adapter folder (config, weights, model card) into ``target``.

        The folder loads with ``PeftModel.from_pretrained``; ``target`` is created if needed.
        """
        target = Path(target)
        target.mkdir(parents=True, exist_ok=True)
        with self._lock:
            folder = self._expert_path(name)
            info = self.get(name)
            for file in (CONFIG_FILE, WEIGHTS_FILE):
                shutil.copyfile(folder / file, target / file)
        (target / CARD_FILE).write_text(render_expert_card(info), encoding="utf-8")
        return target

    # Writing

    def add(
        self,
        name: str,
        adapter_dir: str | os.PathLike[str],
        *,
        task: str | None = None,
        description: str | None = None,
        source_repo: str | None = None,
        source_revision: str | None = None,
        source_subfolder: str | None = None,
        source_ref: str | None = None,
        replace: bool = False,
        created: str | None = None,
        reuse_prototypes: bool = False,
    ) -> ExpertInfo:
        """Validate the PEFT LoRA adapter in ``adapter_dir``, compute its prototypes and store it.

        With ``replace``, an existing expert of that name is swapped for the new one in one step:
        readers see the old expert or the new one, never a mix, and the old task and description
        are kept unless new ones are given (a free name is simply added). With ``reuse_prototypes``, an
        ``arrow.safetensors`` in ``adapter_dir`` computed with the current Arrow config for these
        modules is kept instead of recomputed (used when syncing an expert from a Hub replica).

        Raises:
            InvalidExpertError: the adapter cannot adapt the base model (every problem listed).
            ExpertExistsError: an expert called ``name`` (in any letter case) exists and
                ``replace`` is false.
        """
        if self._base is None:
            raise InvalidExpertError(name, ["this library was opened without a base model, so experts cannot be checked; open it with the model"])
        adapter_dir = Path(adapter_dir)
        try:
            check_expert_name(name)
        except InvalidExpertNameError as bad_name:
            # Report the adapter's own problems too, so one error lists everything to fix.
            try:
                read_adapter(name, adapter_dir, self._base)
            except InvalidExpertError as error:
                raise InvalidExpertError(bad_name.expert, bad_name.problems + error.problems) from None
            raise
        self._check_free(name, replace)
        if replace and name in self and task is None and description is None:
            previous = self.get(name)
            task, description = previous.task, previous.description

        adapter = read_adapter(name, adapter_dir, self._base)
        prototypes = _reusable_prototypes(adapter_dir / ARROW_FILE, adapter.modules) if reuse_prototypes else None
        all_prototypes = prototypes or compute_prototypes(adapter.modules)
        prototypes = _nonzero(all_prototypes)
        if not prototypes:
            raise InvalidExpertError(
                name, ["the update B·A is zero in every module, so the expert has no direction to route on (an untrained adapter?)"]
            )
        skipped = sorted(set(all_prototypes) - set(prototypes))
        if skipped:
            logger.warning("expert %s: %d modules have a zero update and are not routed: %s", name, len(skipped), ", ".join(skipped))

        adapter_base = adapter.config.get("base_model_name_or_path")
        staging = self._new_staging_dir()
        try:
            shutil.copyfile(adapter_dir / CONFIG_FILE, staging / CONFIG_FILE)
            if adapter.weights_file.name == WEIGHTS_FILE:
                shutil.copyfile(adapter.weights_file, staging / WEIGHTS_FILE)
            else:  # pickled weights are stored as safetensors, the format the library reads back
                save_file({key: tensor.contiguous().clone() for key, tensor in adapter.tensors.items()}, str(staging / WEIGHTS_FILE))
            info = ExpertInfo(
                name=name,
                base_model=self.base_model_id,
                rank=adapter.rank,
                alpha=adapter.alpha,
                target_modules=sorted({module.rsplit(".", 1)[-1] for module in adapter.modules}),
                module_count=len(prototypes),
                weights_sha256=sha256_file(staging / WEIGHTS_FILE),
                created=created or datetime.now(timezone.utc).isoformat(timespec="seconds"),
                task=task,
                description=description,
                adapter_base_model=None if self._same_base(adapter_base) else adapter_base,
                source_repo=source_repo,
                source_revision=source_revision,
                source_subfolder=source_subfolder,
                source_ref=source_ref,
            )
            (staging / EXPERT_FILE).write_text(json.dumps(info.to_json(), indent=2) + "\n", encoding="utf-8")
            save_prototypes(staging / ARROW_FILE, prototypes)
            _make_readable(staging)

            with self._lock:
                self._check_free(name, replace)
                target = self.root / name
                self._bump_revision()
                if target.exists():
                    parked = self._new_staging_dir() / _REPLACED
                    parked.mkdir()
                    os.replace(target, parked / name)
                    os.replace(staging, target)
                    shutil.rmtree(parked.parent, ignore_errors=True)
                else:
                    os.replace(staging, target)
                self._write_card()
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        logger.info("%s expert %s (%d modules, rank %d)", "replaced" if replace else "added", name, info.module_count, info.rank)
        return info

    def import_mttl(
        self,
        name: str,
        checkpoint: str | os.PathLike[str],
        *,
        task: str | None = None,
        description: str | None = None,
        replace: bool = False,
    ) -> ExpertInfo:
        """Convert an MTTL expert checkpoint to a PEFT LoRA adapter and add it as ``name``.

        ``task`` defaults to the checkpoint's ``expert_task_name``. See :mod:`quiver.library.mttl`.
        """
        from .mttl import convert_mttl_checkpoint

        check_expert_name(name)
        with tempfile.TemporaryDirectory(prefix="quiver-mttl-") as folder:
            try:
                expert = convert_mttl_checkpoint(checkpoint, folder, base_model=self.base_model_id)
            except InvalidExpertError as error:
                raise InvalidExpertError(name, error.problems) from None
            return self.add(name, folder, task=task or expert.task, description=description, replace=replace)

    def _check_free(self, name: str, replace: bool) -> None:
        """Raise :class:`ExpertExistsError` if ``name`` is taken, in any letter case, unless replacing that exact name."""
        for existing in self.names():
            if existing == name and not replace:
                raise ExpertExistsError(name)
            if existing != name and existing.lower() == name.lower():
                raise ExpertExistsError(
                    name,
                    f"expert {existing!r} already exists and names are compared without letter case; "
                    f"choose another name, or replace it under its stored name {existing!r}",
                )

    def _same_base(self, adapter_base: object) -> bool:
        """Return whether an adapter's ``base_model_name_or_path`` names the served model (an id, or a folder of that name)."""
        if not isinstance(adapter_base, str) or not adapter_base:
            return True
        return adapter_base == self.base_model_id or Path(adapter_base).name == Path(self.base_model_id).name

    def remove(self, name: str) -> None:
        """Delete expert ``name``; raise :class:`ExpertNotFoundError` if absent."""
        with self._lock:
            folder = self._expert_path(name)
            self._bump_revision()
            # Renaming first makes the removal atomic for readers: the expert vanishes in one step.
            trash = self._new_staging_dir()
            os.replace(folder, trash / name)
            shutil.rmtree(trash, ignore_errors=True)
            self._write_card()
        logger.info("removed expert %s", name)

    # Internals

    def _expert_path(self, name: str) -> Path:
        if name not in self:
            raise ExpertNotFoundError(name, self.names())
        return self.root / name

    def _recover(self) -> None:
        """Finish or undo writes that a killed process left behind, then empty the staging area.

        An expert parked by an unfinished replace goes back in place when the new one never
        arrived (parking happens under the lock, so any parked expert seen here was left by a
        dead process). Staging folders of processes that are no longer running are half-written
        copies and are deleted; those of live processes may be in use and stay.
        """
        staging = self.root / _STAGING
        for parked in staging.glob(f"*/{_REPLACED}/*"):
            if not (self.root / parked.name).exists() and (parked / EXPERT_FILE).is_file():
                logger.warning("restoring expert %s, whose replacement was interrupted", parked.name)
                self._bump_revision()
                os.replace(parked, self.root / parked.name)
        for temporary in [*self.root.glob(".*.tmp"), *self.root.glob("*/.*.tmp")]:
            temporary.unlink(missing_ok=True)  # written under the lock, so left by a dead process
        if staging.is_dir():
            for entry in staging.iterdir():
                if not _process_alive(entry.name.partition("-")[0]):
                    shutil.rmtree(entry, ignore_errors=True)
        # A write killed after its rename but before the card was rewritten leaves an outdated card.
        self._write_card(only_if_stale=True)

    def _new_staging_dir(self) -> Path:
        base = self.root / _STAGING
        base.mkdir(exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=base))

    def _read_manifest(self) -> dict:
        path = self.root / MANIFEST_FILE
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise LibraryFormatError(f"cannot read the library manifest {path}: {error}") from error
        if not isinstance(manifest, dict) or not isinstance(manifest.get("revision"), int):
            raise LibraryFormatError(f"{path} is not a Quiver manifest: expected a JSON object with an integer 'revision'")
        return manifest

    def _open_manifest(self) -> None:
        path = self.root / MANIFEST_FILE
        if not path.exists():
            manifest = {
                "format_version": FORMAT_VERSION,
                "base_model": self.base_model_id,
                "revision": 0,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            self._write_manifest(manifest)
            self._write_card()
            return
        manifest = self._read_manifest()
        if manifest.get("format_version") != FORMAT_VERSION:
            raise LibraryFormatError(f"{path} has format version {manifest.get('format_version')!r}; this Quiver reads version {FORMAT_VERSION}")
        if self._base is not None and manifest.get("base_model") != self.base_model_id:
            # Experts are checked by module shapes when loaded, so a renamed copy of the same model still works.
            logger.warning("library %s was created for base model %s, now opened with %s", self.root, manifest.get("base_model"), self.base_model_id)

    def _write_manifest(self, manifest: dict) -> None:
        text = json.dumps(manifest, indent=2) + "\n"
        _atomic_save(self.root / MANIFEST_FILE, lambda path: path.write_text(text, encoding="utf-8"))

    def _bump_revision(self) -> None:
        manifest = self._read_manifest()
        manifest["revision"] += 1
        self._write_manifest(manifest)

    def _write_card(self, *, only_if_stale: bool = False) -> None:
        base_model = self._read_manifest().get("base_model") or self.base_model_id
        text = render_model_card(base_model, self.list())
        path = self.root / CARD_FILE
        if only_if_stale and path.is_file() and path.read_text(encoding="utf-8") == text:
            return
        _atomic_save(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def render_model_card(base_model: str, experts: list[ExpertInfo]) -> str:
    """Return the library's README.md: YAML front matter for the Hub, then a table of experts."""
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {json.dumps(base_model)}",
        "tags:",
        "  - lora",
        "  - arrow-routing",
        "  - quiver",
        "---",
        "",
        "# Quiver expert library",
        "",
        f"LoRA experts for `{base_model}`, one PEFT adapter per folder, routed per token with Arrow.",
        "",
        "| expert | task | rank | modules |",
        "| --- | --- | --- | --- |",
    ]
    for info in experts:
        lines.append(f"| {info.name} | {_card_cell(info.task)} | {info.rank} | {', '.join(info.target_modules)} |")
    return "\n".join(lines) + "\n"


def render_expert_card(info: ExpertInfo) -> str:
    """Return the README.md of one exported expert: Hub front matter, then the expert's metadata."""
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {json.dumps(info.adapter_base_model or info.base_model)}",
        "tags:",
        "  - lora",
        "  - quiver",
        "---",
        "",
        f"# {info.name}",
        "",
        f"A LoRA adapter exported from a Quiver library for `{info.base_model}`.",
        "",
        f"- task: {_card_cell(info.task) or 'not recorded'}",
        f"- rank: {info.rank}, alpha: {info.alpha:g}, modules: {', '.join(info.target_modules)}",
        f"- weights sha256: `{info.weights_sha256}`",
    ]
    if info.description:
        lines += ["", _card_cell(info.description)]
    lines += ["", "Load it with `PeftModel.from_pretrained(base_model, path)`."]
    return "\n".join(lines) + "\n"


def _process_alive(pid: str) -> bool:
    """Return whether the process that named a staging folder ``<pid>-...`` is still running on this machine."""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists but belongs to another user
    return int(pid) != 0


def _reusable_prototypes(path: Path, modules: dict[str, LoraModule]) -> dict[str, tuple[torch.Tensor, float]] | None:
    """Return the prototypes stored at ``path`` if they fit ``modules`` and the current Arrow config, else None."""
    if not path.is_file():
        return None
    try:
        stored = load_prototypes(path)
    except LibraryFormatError as error:
        logger.info("recomputing prototypes: %s", error)
        return None
    nonzero = {name for name, module in modules.items() if module.lora_a.any() and module.lora_b.any()}
    if not stored or set(stored) != nonzero:
        return None
    for name, (vector, _) in stored.items():
        if vector.shape != (modules[name].lora_a.shape[1],):
            return None
    return stored


def _nonzero(prototypes: dict[str, tuple[torch.Tensor, float]]) -> dict[str, tuple[torch.Tensor, float]]:
    """Keep the modules whose update is not zero: a zero update has no direction to route on."""
    return {module: value for module, value in prototypes.items() if value[1] > 0.0}


def _make_readable(folder: Path) -> None:
    """Give a staged expert the usual permissions: mkdtemp and safetensors create it owner-only."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def _card_cell(text: str | None) -> str:
    """Return ``text`` as one markdown table cell: no line breaks or pipes, at most 200 characters."""
    cell = " ".join((text or "").split()).replace("|", "\\|")
    return cell if len(cell) <= 200 else cell[:199] + "…"


def _atomic_save(path: Path, write) -> None:
    """Call ``write(temporary_path)`` and rename the result over ``path``."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _shapes_from_weights(folder: Path) -> dict[str, tuple[int, int]]:
    """Derive module shapes from a stored adapter's own tensors, for libraries opened without a model."""
    from safetensors.torch import load_file

    shapes: dict[str, tuple[int, int]] = {}
    factors = load_file(folder / WEIGHTS_FILE)
    for key, tensor in factors.items():
        module = key.removeprefix("base_model.model.").split(".lora_")[0]
        d_in, d_out = shapes.get(module, (0, 0))
        if ".lora_A" in key:
            d_in = tensor.shape[1]
        else:
            d_out = tensor.shape[0]
        shapes[module] = (d_in, d_out)
    return shapes
