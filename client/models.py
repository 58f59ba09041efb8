"""JSON wire models shared by the Quiver server and client.

The server imports these models for its request and response bodies, so both sides always
agree on the wire format. This module needs only pydantic.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    """Request bodies reject unknown fields, so a misspelt parameter is an error, not ignored."""

    model_config = ConfigDict(extra="forbid")


class RoutingParameters(_Strict):
    """Routing settings of one request."""

    method: Literal["arrow", "centered", "normalized", "sequence", "hybrid"] | None = Field(
        None,
        description="scoring method: 'arrow' |v·x| per token; 'centered' |v·(x−μ)|; 'normalized' the centred "
        "score over ‖x−μ‖; 'sequence' one mix per request from the prompt; 'hybrid' per-token plus sequence; "
        "null for the server's default",
    )
    pooling: Literal["module", "vote"] | None = Field(
        None, description="sequence and hybrid methods: one mix per module, or one vote across all modules; null for the server's default"
    )
    sequence_weight: float = Field(0.5, ge=0, le=1, description="hybrid method: weight of the sequence-level logits")
    top_k: int | None = Field(
        None, ge=1, description="number of experts mixed per token and module, clamped to the experts in scope; null for the server's default"
    )
    temperature: float | None = Field(
        None, ge=1e-4, description="divides the routing logits before the softmax, at least 1e-4; null for the server's default"
    )
    experts: list[str] | None = Field(None, description="experts in scope; null for all, an empty list for the base model alone")


class MergedAdapters(_Strict):
    """A fixed weighted mix of named experts instead of routing (LoRAX's ``merged_adapters``)."""

    ids: list[str] = Field(..., min_length=1, description="the experts to mix")
    weights: list[float] | None = Field(None, description="one weight per expert; null for equal weights summing to 1")
    merge_strategy: Literal["linear"] = Field("linear", description="'linear': the output is the weighted sum of the experts' outputs")

    @model_validator(mode="after")
    def _same_length(self) -> MergedAdapters:
        if self.weights is not None and len(self.weights) != len(self.ids):
            raise ValueError(f"weights has {len(self.weights)} entries for {len(self.ids)} ids; give one weight per id")
        if len(set(self.ids)) != len(self.ids):
            raise ValueError(f"ids names an expert twice: {self.ids}")
        return self


class GenerateParameters(_Strict):
    max_new_tokens: int = Field(20, ge=1, description="maximum number of tokens to generate")
    temperature: float | None = Field(None, ge=1e-2, description="sampling temperature, at least 0.01; only used with do_sample")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling mass; only used with do_sample")
    do_sample: bool = Field(False, description="sample instead of greedy decoding")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="random seed for sampling; the same seed gives the same output")
    routing: RoutingParameters = Field(default_factory=RoutingParameters)
    adapter_id: str | None = Field(None, description="serve this one expert alone, without routing (multi-LoRA serving)")
    merged_adapters: MergedAdapters | None = Field(None, description="serve a fixed weighted mix of experts, without routing")

    @model_validator(mode="after")
    def _one_mode(self) -> GenerateParameters:
        if self.adapter_id is not None and self.merged_adapters is not None:
            raise ValueError("set adapter_id or merged_adapters, not both")
        return self


class GenerateRequest(_Strict):
    inputs: str = Field(..., min_length=1, description="the prompt, as plain text")
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)


class GenerateDetails(BaseModel):
    generated_tokens: int
    finish_reason: str = Field(..., description="'length' when max_new_tokens was reached, 'eos_token' when the model stopped")
    routing: dict[str, float] = Field(
        default_factory=dict,
        description="each expert's mean routing weight over the positions that produced the generated tokens, across all routed modules",
    )


class GenerateResponse(BaseModel):
    generated_text: str
    details: GenerateDetails


class Expert(BaseModel):
    """An expert's metadata, as stored in its ``expert.json``."""

    model_config = ConfigDict(extra="allow")

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
    source_revision: str | None = Field(None, description="the commit of source_repo being served")
    source_subfolder: str | None = None
    source_ref: str | None = Field(None, description="the revision the import asked for; a branch is followed by each sync")
    hub: str | None = Field(None, description="after an upload to a server synced with a Hub repo: 'pushed', or 'queued' for a retry")


class ExpertList(BaseModel):
    experts: list[Expert]
    revision: int = Field(..., description="library revision; it grows with every change")


class Health(BaseModel):
    status: str
    base_model: str
    device: str
    experts: int
    routing: dict[str, str | int | float] = Field(default_factory=dict, description="the default routing: method, top_k, temperature")


class ErrorBody(BaseModel):
    """The body of every error response."""

    detail: str = Field(..., description="what went wrong and what to do about it")
    code: str = Field(..., description="a stable machine-readable error code")
    request_id: str
    problems: list[str] | None = Field(None, description="for an invalid expert or request, every problem found")
