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
    merge_strategy: Literal["linear"] | None = Field(
        "linear", description="'linear' (or null): the output is the weighted sum of the experts' outputs; no other strategy is offered"
    )
    density: float = Field(1.0, ge=0, le=1, description="accepted for LoRAX clients; a linear merge keeps every weight, so it has no effect")
    majority_sign_method: Literal["total", "frequency"] | None = Field(
        None, description="accepted for LoRAX clients; only TIES-style merges use it, so it has no effect on a linear merge"
    )

    @model_validator(mode="before")
    @classmethod
    def _known_strategy(cls, data: object) -> object:
        if isinstance(data, dict):
            strategy = data.get("merge_strategy")
            if strategy not in (None, "linear"):
                raise ValueError(f"merge_strategy {strategy!r} is not supported; use 'linear' (a weighted sum of the experts' outputs)")
        return data

    @model_validator(mode="after")
    def _same_length(self) -> MergedAdapters:
        if self.weights is not None and len(self.weights) != len(self.ids):
            raise ValueError(f"weights has {len(self.weights)} entries for {len(self.ids)} ids; give one weight per id")
        if len(set(self.ids)) != len(self.ids):
            raise ValueError(f"ids names an expert twice: {self.ids}")
        return self


MAX_STOP_SEQUENCES = 8
"""The maximum number of stop sequences in one request."""


class GenerateParameters(_Strict):
    """Generation settings in the TGI / LoRAX format, plus Quiver's ``routing``.

    Fields that TGI and LoRAX clients send with defaults (``best_of``, ``watermark``, ``grammar``
    and the like) are accepted at those defaults and rejected with a clear message otherwise.
    """

    max_new_tokens: int | None = Field(20, ge=1, description="maximum number of tokens to generate; null for 20")
    do_sample: bool = Field(False, description="sample instead of greedy decoding; temperature, top_k, top_p or typical_p also turn sampling on")
    temperature: float | None = Field(None, ge=1e-2, description="divides the logits before sampling; at least 0.01")
    top_k: int | None = Field(None, gt=0, description="sample only from the k most likely tokens")
    top_p: float | None = Field(None, gt=0, le=1, description="sample only from the smallest set of tokens whose probability reaches top_p")
    typical_p: float | None = Field(None, gt=0, le=1, description="typical decoding mass")
    repetition_penalty: float | None = Field(None, gt=0, description="divides the logits of tokens already present (CTRL's penalty); 1 is none")
    frequency_penalty: float | None = Field(
        None, ge=-2, le=2, description="subtracts this times each token's count in the generated text from its logit; 0 is none"
    )
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="random seed for sampling; the same seed gives the same output")
    stop: list[str] = Field(
        default_factory=list, max_length=MAX_STOP_SEQUENCES, description="stop when the generated text contains one of these strings (kept in the text)"
    )
    ignore_eos_token: bool = Field(False, description="keep generating after the end-of-sequence token")
    truncate: int | None = Field(None, ge=1, description="keep only the last this many prompt tokens")
    return_full_text: bool | None = Field(False, description="prepend the prompt to generated_text")
    details: bool = Field(False, description="return every generated token with its id, text and log-probability in details.tokens")
    decoder_input_details: bool = Field(False, description="with details, also return the prompt's tokens and their log-probabilities in details.prefill")
    routing: RoutingParameters = Field(default_factory=RoutingParameters)
    adapter_id: str | None = Field(None, description="serve this one expert alone, without routing (multi-LoRA serving)")
    adapter_source: Literal["local", "hub"] | None = Field(
        None, description="LoRAX's adapter source; adapter_id always names an expert of this server's library"
    )
    api_token: str | None = Field(None, description="accepted for LoRAX clients and ignored: experts are served from the library")
    merged_adapters: MergedAdapters | None = Field(None, description="serve a fixed weighted mix of experts, without routing")
    # Accepted at their defaults so that TGI and LoRAX clients can send them.
    best_of: int | None = Field(None, description="only 1 (or null) is supported")
    watermark: bool = Field(False, description="only false is supported")
    grammar: dict | None = Field(None, description="guided generation is not supported; must be null")
    response_format: dict | None = Field(None, description="guided generation is not supported; must be null")
    top_n_tokens: int | None = Field(None, description="alternative tokens are not returned; must be null or 0")
    return_k_alternatives: int | None = Field(None, description="alternative tokens are not returned; must be null or 0")

    @model_validator(mode="after")
    def _one_mode(self) -> GenerateParameters:
        if self.adapter_id is not None and self.merged_adapters is not None:
            raise ValueError("set adapter_id or merged_adapters, not both")
        unsupported = {
            "best_of": self.best_of not in (None, 1),
            "watermark": self.watermark,
            "grammar": self.grammar is not None,
            "response_format": self.response_format is not None,
            "top_n_tokens": bool(self.top_n_tokens),
            "return_k_alternatives": bool(self.return_k_alternatives),
        }
        named = [name for name, present in unsupported.items() if present]
        if named:
            raise ValueError(f"{', '.join(named)} is not supported by this server; leave it unset")
        if any(not text for text in self.stop):
            raise ValueError("stop contains an empty string; every stop sequence needs at least one character")
        return self

    @property
    def sampling(self) -> bool:
        """Whether tokens are sampled: asked for, or implied by a sampling setting, as TGI does."""
        warpers = (self.temperature not in (None, 1.0)) or bool(self.top_k) or (self.top_p not in (None, 1.0)) or (self.typical_p not in (None, 1.0))
        return self.do_sample or warpers


class GenerateRequest(_Strict):
    inputs: str = Field(..., min_length=1, description="the prompt, as plain text")
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)
    stream: bool = Field(False, description="on POST /, stream the response as server-sent events like /generate_stream")


class Token(BaseModel):
    id: int
    text: str
    logprob: float | None = Field(None, description="natural log-probability of the token under the distribution it was chosen from")
    special: bool = False


class GenerateDetails(BaseModel):
    finish_reason: str = Field(
        ..., description="'length' when max_new_tokens was reached, 'eos_token' when the model stopped, 'stop_sequence' at a stop sequence"
    )
    generated_tokens: int
    prompt_tokens: int = 0
    seed: int | None = Field(None, description="the seed used when sampling")
    prefill: list[Token] = Field(default_factory=list, description="the prompt's tokens, when decoder_input_details was set")
    tokens: list[Token] = Field(default_factory=list, description="the generated tokens, when details was set")
    routing: dict[str, float] = Field(
        default_factory=dict,
        description="each expert's mean routing weight over the positions that produced the generated tokens, across all routed modules",
    )


class GenerateResponse(BaseModel):
    generated_text: str
    details: GenerateDetails


class StreamDetails(BaseModel):
    finish_reason: str
    generated_tokens: int
    prompt_tokens: int
    input_length: int = Field(..., description="the same as prompt_tokens, under TGI's name")
    seed: int | None = None
    routing: dict[str, float] = Field(default_factory=dict)


class StreamResponse(BaseModel):
    """One server-sent event of ``/generate_stream``: a token, and on the last one the whole text and details."""

    index: int
    token: Token
    generated_text: str | None = None
    details: StreamDetails | None = None


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
    error: str | None = Field(None, description="the same text as detail, under the name TGI and LoRAX clients read")
    error_type: str | None = Field(None, description="TGI's error category: validation, overloaded, not_found, generation, ...")
