"""The OpenAI wire format (and keel's /v1/classify): pydantic types that validate requests and document the API.

Requests forbid unknown fields, so a typo is a 400 naming the field rather than a silently ignored option.
Bounds that depend on the server's settings (max_tokens, n, stop, inputs per request) are checked in
``limits.py`` against ``ServeConfig``; the bounds here are the ones OpenAI documents.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Response(BaseModel):
    model_config = ConfigDict(extra="allow")


# -- errors ----------------------------------------------------------------------------------------


class ErrorBody(Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(Response):
    error: ErrorBody


# -- shared ----------------------------------------------------------------------------------------


def encodable_texts(value: str | list[str]) -> str | list[str]:
    """Refuse a lone surrogate ("\\ud800" is valid JSON but not text): the tokenizer would raise on it."""
    for i, text in enumerate([value] if isinstance(value, str) else value):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            where = "" if isinstance(value, str) else f"text {i} "
            raise ValueError(
                f"{where}has a lone surrogate (\\ud800-\\udfff without its pair) at character {e.start}; "
                "send valid Unicode text"
            ) from None
    return value


class StreamOptions(Request):
    include_usage: bool = False


class Usage(Response):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class SamplingFields(Request):
    """What completions and chat share: the sampling knobs of OpenAI's API."""

    model: str | None = Field(None, max_length=512, description="optional; the served model's id")
    max_tokens: int | None = Field(None, ge=1, description="new tokens per choice (default: serve.default_max_tokens)")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 (or anything under 1e-5) = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = Field(None, description="up to serve.max_stop strings that end a choice")
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="accepted for compatibility; only 0 is supported")
    frequency_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, description="accepted for compatibility; only 0 is supported"
    )
    user: str | None = Field(None, max_length=256)

    @field_validator("stop")
    @classmethod
    def _encodable_stop(cls, value):
        return value if value is None else encodable_texts(value)

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


# -- completions -------------------------------------------------------------------------------------


class CompletionRequest(SamplingFields):
    prompt: str | list[str] = Field(..., description="a text, or a list of texts (one choice set each)")
    echo: bool = False

    _encodable = field_validator("prompt")(encodable_texts)


class CompletionChoice(Response):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class _Generated(Response):
    """What every non-streamed generation response carries besides its choices (OpenAI's order of fields)."""

    id: str
    created: int
    model: str


class CompletionResponse(_Generated):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


# -- chat -------------------------------------------------------------------------------------------


class ChatMessage(Request):
    role: Literal["system", "user", "assistant", "developer"]
    content: str = Field(..., max_length=1_000_000)
    name: str | None = Field(None, max_length=256)

    _encodable = field_validator("content")(encodable_texts)


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")


class ChatChoiceMessage(Response):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(Response):
    index: int
    message: ChatChoiceMessage
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class ChatResponse(_Generated):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage | None = None


# -- embeddings and classification -------------------------------------------------------------------


class TextInput(Request):
    input: str | list[str] = Field(..., description="a text or a list of texts")

    _encodable = field_validator("input")(encodable_texts)


class EmbeddingRequest(TextInput):
    model: str | None = Field(None, max_length=512)
    encoding_format: Literal["float", "base64"] = Field("float", description="base64: little-endian float32 bytes")
    dimensions: int | None = Field(None, ge=1, description="accepted only when equal to the model's size")
    user: str | None = Field(None, max_length=256)


class Embedding(Response):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(Response):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ClassifyRequest(TextInput):
    model: str | None = Field(None, max_length=512)
    explain: bool = Field(
        False,
        description="also return integrated-gradients token attributions toward each "
        "predicted label (serve.max_explain_inputs texts at most)",
    )
    explain_steps: int = Field(32, ge=4, le=256, description="integrated-gradients steps (more: a smaller delta)")


class Explanation(Response):
    tokens: list[str]
    attributions: list[float] = Field(
        ...,
        description="one per token, toward the predicted label; they sum to "
        "p(label | text) - p(label | baseline) up to delta",
    )
    delta: float = Field(..., description="completeness gap of the integral approximation")
    model: str = Field(..., description="the PyTorch model the gradients come from (ONNX has none)")


class Mitigation(Response):
    applied: bool = Field(..., description="whether the audit's per-group thresholds decided this label")
    attribute: str | None = Field(None, description="the lexicon attribute the thresholds equalize (e.g. gender)")
    group: str | None = Field(None, description="the group the lexicon finds in this text")
    changed: bool | None = Field(None, description="the thresholds changed the model's own label")
    reason: str | None = Field(None, description="why the thresholds were not applied")


class Classification(Response):
    index: int
    label: str
    score: float
    scores: dict[str, float]
    explanation: Explanation | None = None
    mitigation: Mitigation | None = None


class ClassifyResponse(Response):
    id: str = Field(..., description="name it in POST /v1/feedback to correct a label")
    object: Literal["list"] = "list"
    data: list[Classification]
    model: str
    usage: Usage


# -- feedback -------------------------------------------------------------------------------------


class Preference(Request):
    chosen: int = Field(..., ge=0, description="the index of the better choice")
    rejected: int = Field(..., ge=0, description="the index of the worse choice (same prompt)")


class FeedbackRequest(Request):
    response_id: str = Field(..., min_length=1, max_length=128, description="the id of an earlier response")
    index: int = Field(0, ge=0, description="which input (classify) or choice (completions, chat)")
    label: str | None = Field(None, max_length=512, description="the correct label (classify)")
    thumbs: Literal["up", "down"] | None = None
    preference: Preference | None = Field(None, description="between two choices of one response (n >= 2)")


class FeedbackResponse(Response):
    id: str
    object: Literal["feedback"] = "feedback"
    response_id: str
    kind: Literal["label", "thumbs", "preference"]
    model_version: str = Field(..., description="the model version that served the response")


# -- models -----------------------------------------------------------------------------------------


class ModelCard(Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "keel"


class ModelList(Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
