"""Server settings, read from ``QUIVER_*`` environment variables and overridable by CLI flags."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path


def _default_cache_dir() -> Path:
    return Path("~/.cache/quiver").expanduser()


@dataclass(frozen=True)
class Settings:
    """Everything the server needs to start. Each field has an environment variable ``QUIVER_<FIELD>``."""

    cache_dir: Path = _default_cache_dir()
    """Cache folder for the converted embedded model and the demo experts."""
    library_dir: Path | None = None
    """The expert library folder; defaults to ``<cache_dir>/library``."""
    base_model: str | None = None
    """A transformers causal LM id or local path; None serves the embedded SmolLM2-135M-Instruct."""
    device: str = "auto"
    """'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'."""
    dtype: str = "auto"
    """'auto' (bfloat16 on CUDA, float32 on the CPU), 'float32', 'bfloat16' or 'float16'."""
    # The default routing scored best in bench/evaluate_routing.py (docs/evaluation.md): one
    # expert per request, chosen by a vote of all modules over the centred, normalised prompt scores.
    routing_method: str = "sequence"
    """The routing method of requests that name none (see ``quiver.library.routing.ROUTING_METHODS``)."""
    routing_pooling: str = "vote"
    """The pooling of the sequence and hybrid methods for requests that set none: 'module' or 'vote'."""
    routing_top_k: int = 1
    """The number of experts mixed per token and module for requests that set none."""
    routing_temperature: float = 1.0
    """The routing temperature for requests that set none."""
    max_new_tokens: int = 512
    """The largest ``max_new_tokens`` a request may ask for."""
    max_input_tokens: int = 4096
    """The maximum prompt length accepted, in tokens."""
    max_batch_size: int = 16
    """The maximum number of requests generated together in one batch; more wait in the queue."""
    max_queue: int = 64
    """The maximum number of requests waiting for a place in the batch; beyond it requests get 503 with Retry-After."""
    max_batch_prefill_tokens: int = 4096
    """The maximum number of prompt tokens (padded) run together in one prefill pass; a longer prompt still runs alone."""
    request_timeout: float = 300.0
    """Seconds a request may take from arrival to its last token, waiting included; beyond it the request fails."""
    max_upload_mb: int = 512
    """The largest request body accepted, in MiB: an upload's weights, config and form fields together."""
    host: str = "127.0.0.1"
    port: int = 8000
    hub_repo: str | None = None
    """A Hugging Face Hub model repo id (``namespace/name``) that the library is kept in sync with;
    None keeps the library local. The token comes from ``HF_TOKEN``."""
    hub_revision: str = "main"
    """The branch of ``hub_repo`` to pull from and push to."""
    sync_interval: float = 60.0
    """Seconds between polls of ``hub_repo`` for changes; 0 turns polling off (webhooks still work)."""
    api_token: str | None = None
    """The bearer token that write routes (uploads, deletes, syncs) require; None leaves them open."""
    api_token_reads: bool = False
    """Whether every route except ``/health`` requires ``api_token`` too, generation and metrics included."""
    webhook_secret: str | None = None
    """The secret that ``POST /hub/webhook`` expects in ``X-Webhook-Secret``; None turns the webhook off."""

    @property
    def resolved_library_dir(self) -> Path:
        return Path(self.library_dir).expanduser() if self.library_dir else Path(self.cache_dir).expanduser() / "library"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> Settings:
        """Build settings from ``environ`` (default ``os.environ``), then apply non-None ``overrides``.

        Raises:
            ValueError: a variable contains a value of the wrong type, named in the message.
        """
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for field in fields(cls):
            variable = f"QUIVER_{field.name.upper()}"
            raw = environ.get(variable)
            if raw is None or raw == "":
                continue
            values[field.name] = _parse(variable, raw, field.default)
        settings = replace(cls(**values), **{key: value for key, value in overrides.items() if value is not None})
        settings.check()
        return settings

    def check(self) -> None:
        """Raise for limits that cannot work, naming the variable.

        Raises:
            ValueError: a limit is zero or negative.
        """
        for name in ("max_new_tokens", "max_input_tokens", "max_batch_size", "max_batch_prefill_tokens", "max_upload_mb"):
            if getattr(self, name) < 1:
                raise ValueError(f"QUIVER_{name.upper()}={getattr(self, name)} is invalid: expected at least 1")
        if self.max_queue < 0:
            raise ValueError(f"QUIVER_MAX_QUEUE={self.max_queue} is invalid: expected 0 or more")
        if self.api_token_reads and not self.api_token:
            raise ValueError("QUIVER_API_TOKEN_READS=1 needs QUIVER_API_TOKEN: set the token that reads should require")
        if self.api_token is not None and len(self.api_token) < 16:
            raise ValueError(f"QUIVER_API_TOKEN is {len(self.api_token)} characters long; use at least 16 random characters")
        if not self.request_timeout > 0:
            raise ValueError(f"QUIVER_REQUEST_TIMEOUT={self.request_timeout} is invalid: expected a positive number of seconds")


def _parse(variable: str, raw: str, default: object) -> object:
    if isinstance(default, bool):
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{variable}={raw!r} is invalid: expected 1 or 0 (true or false)")
    if isinstance(default, float):
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{variable}={raw!r} is invalid: expected a number") from None
    if isinstance(default, int):
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{variable}={raw!r} is invalid: expected an integer") from None
    if isinstance(default, Path) or variable in ("QUIVER_LIBRARY_DIR",):
        return Path(raw).expanduser()
    return raw
