"""HTTP request and response models (pydantic only lives at this boundary)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class DocumentIn(BaseModel):
    """One context document: `{"id"?, "title"?, "text"}`."""

    model_config = ConfigDict(extra="ignore")

    id: str | int | None = None
    title: str | None = None
    text: str


def plain_documents(items: list[DocumentIn | str]) -> list[dict[str, Any] | str]:
    """Documents as `ragzip.contract.to_documents` takes them (strings stay strings), for every route."""
    return [d if isinstance(d, str) else d.model_dump(exclude_none=True) for d in items]


class RagzipOptions(BaseModel):
    """Per-request compression settings (top-level `ragzip` object; OpenAI clients send it via `extra_body`)."""

    model_config = ConfigDict(extra="forbid")

    method: str | None = Field(default=None, max_length=200, description="Compressor or '+'-joined pipeline")
    rate: float | None = Field(default=None, gt=0, le=1, description="Fraction of tokens to keep")
    target_tokens: int | None = Field(default=None, gt=0, le=10_000_000, description="Hard cap on context tokens")
    threshold: float | None = Field(default=None, allow_inf_nan=False, description="Score threshold")
    coverage: float | None = Field(default=None, gt=0, le=1, description=(
        "auto budget: the calibrated expected share of the needed evidence to keep (default when no budget: 0.95)"))
    options: dict[str, Any] | None = Field(default=None, description="Compressor options (if the server allows)")
    retrieve: bool | None = Field(default=None, description="Use the proxy index when no documents are given")
    top_k: int | None = Field(default=None, gt=0, le=100)
    on_overload: Literal["queue", "uncompressed", "reject"] | None = Field(default=None, description=(
        "When the compressor is overloaded: wait (queue), forward uncompressed, or 429 (default: the key's, "
        "then the server's setting)"))

    @model_validator(mode="after")
    def _one_budget(self) -> RagzipOptions:
        if sum(x is not None for x in (self.rate, self.target_tokens, self.threshold, self.coverage)) > 1:
            raise ValueError("give at most one of rate, target_tokens, threshold and coverage")
        return self


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(BaseModel):
    """OpenAI chat completion request plus two extensions: `documents` and `ragzip`. Other OpenAI fields pass
    through to an upstream unchanged."""

    model_config = ConfigDict(extra="allow")

    model: str | None = Field(default=None, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool | None = False
    max_tokens: int | None = Field(default=None, ge=0)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    stream_options: dict[str, Any] | None = None
    documents: list[DocumentIn | str] | None = Field(
        default=None, description="Context documents (ragzip extension): strings or {id?, title?, text} objects")
    ragzip: RagzipOptions | None = Field(default=None, description="Compression settings (ragzip extension)")


class CompressRequest(BaseModel):
    """One CLI-contract record: `{"id"?, "question"?, "contexts": [...]}`, plus an optional `ragzip` object.
    Other keys are kept and returned."""

    model_config = ConfigDict(extra="allow")

    id: str | int | None = None
    question: str | None = None
    contexts: list[DocumentIn | str]
    ragzip: RagzipOptions | None = None


class CompressedContext(BaseModel):
    id: str
    title: str
    text: str
    spans: list[list[int]]
    scores: list[float] = Field(default_factory=list, description="Score of each kept unit (may be empty)")
    members: list[str] | None = None
    tokens_before: int | None = Field(default=None, description="Tokens of the input(s) this context replaces")
    tokens_after: int | None = None


class CompressedOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    method: str
    contexts: list[CompressedContext]
    text: str
    tokens_before: int
    tokens_after: int
    rate: float | None = Field(description="tokens_after / tokens_before; null when the input had no tokens")
    seconds: float
    stages: list[dict[str, Any]]


class CompressResponse(BaseModel):
    """The input record with `compressed` added (header x-ragzip-result-source: compressor, cache or none)."""

    model_config = ConfigDict(extra="allow")

    compressed: CompressedOut


class AddDocumentsRequest(BaseModel):
    documents: list[DocumentIn | str] = Field(min_length=1)


class AddDocumentsResponse(BaseModel):
    added_documents: int
    added_chunks: int
    total_chunks: int
    ids: list[str] = Field(description="The added documents' ids (given or assigned), for GET /v1/documents/{id}")


class IndexedChunk(BaseModel):
    id: str
    text: str
    start: int = Field(description="Offset of the chunk in the document's text")
    end: int


class IndexedDocument(BaseModel):
    id: str
    title: str
    chunks: list[IndexedChunk]


class ListedDocument(BaseModel):
    id: str
    title: str
    chunks: int


class DocumentList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ListedDocument]
    total: int = Field(description="Documents in the index (all pages)")


class ClearedIndex(BaseModel):
    deleted_documents: int
    deleted_chunks: int


class KVInfo(BaseModel):
    """What the KV-reuse backend did for one answer (chunk caches from the store)."""

    hits: int
    misses: int
    reused_tokens: int
    recomputed_tokens: int
    load_s: float
    recomputed_chunks: int | None = None
    decisions: list[str] | None = None


class RagzipInfo(BaseModel):
    """The `ragzip` object of a chat completion response."""

    method: str
    tokens_before: int
    tokens_after: int
    rate: float | None = Field(description="tokens_after / tokens_before; null when the input had no tokens")
    seconds: float
    source: Literal["documents", "messages", "index", "none"]
    num_documents: int
    fallback: str | None = None
    fallback_reason: Literal["error", "overload", "timeout"] | None = Field(
        default=None, description="Why the context went uncompressed: the compressor failed, was overloaded "
        "(on_overload uncompressed) or passed compress_timeout_ms")
    result_source: Literal["compressor", "cache", "none"] = Field(
        default="compressor", description="cache: a remembered result for the same documents, question, method, "
                                          "budget and weights; none: nothing was compressed")
    already_compressed: bool = Field(default=False, description="The context came in a block a ragzip server in "
                                     "front had compressed; this server passed it on as it is")
    kv: KVInfo | None = None


class ChatChoiceMessage(BaseModel):
    role: str
    content: str | None


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    finish_reason: str | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletionResponse(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    ragzip: RagzipInfo


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"]
    backend: str
    model: str
    index_chunks: int
    in_flight: int
    queued: int = Field(description="Requests waiting for a slot")
    max_concurrency: int


class Readiness(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, str] = Field(description="Each dependency: 'ok' or why it is not")
