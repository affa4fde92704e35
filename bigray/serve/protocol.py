"""Request/response schemas: the OpenAI completions and chat completions shapes, classification, errors, and what crosses
the handle between the ingress and the GPT deployment (GenerationParams in; Admitted, then Deltas out).

A request body is validated and converted once, at the ingress, into typed objects that travel as
they are; nothing is rebuilt from dicts on the other side.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass
from typing import Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from bigray.artifacts.chat import MAX_MESSAGES, ChatRole
from bigray.serve.settings import AppArgs

SEED_LIMIT = 2**63
"""Seeds are 0 <= seed < 2**63 (torch.Generator's range); a prompt list's seeds wrap around it."""

MAX_STOP_CHARS = 64


class SamplingRequest(BaseModel):
    """The fields every generation route shares (OpenAI's), with their checks.

    Every value is checked here, before any work: numbers are finite and in range, strings are
    valid UTF-8, stop strings are few and short. Limits that depend on the server (prompt count and
    length, max_tokens) are checked when the request turns itself into jobs (:meth:`jobs`).
    """

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=SEED_LIMIT)
    stream: bool = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop takes up to 4 non-empty strings of at most {MAX_STOP_CHARS} characters")
        _utf8("stop", stops)
        return v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def jobs(self, limits: AppArgs) -> list[GenerationParams]:
        """The generation jobs of this request, or a ServeError naming the server limit it passes."""
        raise NotImplementedError

    def job(
        self, prompt: str, max_tokens: int, seed: int | None, messages: tuple[tuple[str, str], ...] | None = None
    ) -> GenerationParams:
        return GenerationParams(
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=self.stops(),
            seed=seed,
            messages=messages,
        )


class CompletionRequest(SamplingRequest):
    """POST /v1/completions (the subset of OpenAI's fields that applies to a base model)."""

    prompt: str | list[str]
    max_tokens: int = Field(default=16, ge=1)

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: str | list[str]) -> str | list[str]:
        prompts = [v] if isinstance(v, str) else v
        if not prompts or any(not p.strip() for p in prompts):
            raise ValueError("prompt must be a non-empty string or a non-empty list of non-empty strings")
        _utf8("prompt", prompts)
        return v

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def jobs(self, limits: AppArgs) -> list[GenerationParams]:
        """One job per prompt (each prompt's seed offset by its index, so a list is reproducible),
        within the server's limits (prompt characters before tokenizing: the token cap comes after)."""
        prompts = self.prompts()
        if len(prompts) > limits.max_prompts:
            raise ServeError(
                400, f"prompt is a list of {len(prompts)}; this server takes at most {limits.max_prompts} per request"
            )
        if max(map(len, prompts)) > limits.max_prompt_chars:
            raise ServeError(
                400,
                f"a prompt has {max(map(len, prompts))} characters; this server accepts at most {limits.max_prompt_chars}",
            )
        _check_max_tokens(self.max_tokens, limits)
        return [
            self.job(p, self.max_tokens, None if self.seed is None else (self.seed + i) % SEED_LIMIT)
            for i, p in enumerate(prompts)
        ]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: ChatRole
    content: str
    """Text, or OpenAI's list of content parts of which only ``{"type": "text", "text": ...}`` is taken."""

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, v: object) -> object:
        if isinstance(v, list):
            if not all(
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                for part in v
            ):
                raise ValueError('content parts must all be {"type": "text", "text": ...}: this model reads text only')
            return "".join(part["text"] for part in v)
        return v


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions: OpenAI's chat shape, rendered with the model's chat template; one
    choice per request (``n`` 1); ``max_completion_tokens`` is the newer name of ``max_tokens``."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1, le=1)

    @field_validator("messages")
    @classmethod
    def _text(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        _utf8("messages", [m.content for m in v])
        return v

    def jobs(self, limits: AppArgs) -> list[GenerationParams]:
        """The one job of a chat, for max_completion_tokens, else max_tokens, else 16 (as for
        completions), within the server's limits."""
        characters = sum(len(m.content) for m in self.messages)
        if characters > limits.max_prompt_chars:
            raise ServeError(
                400, f"the messages have {characters} characters; this server accepts at most {limits.max_prompt_chars}"
            )
        max_tokens = self.max_completion_tokens or self.max_tokens or 16
        _check_max_tokens(max_tokens, limits)
        return [self.job("", max_tokens, self.seed, messages=tuple((m.role, m.content) for m in self.messages))]


def _check_max_tokens(max_tokens: int, limits: AppArgs) -> None:
    if max_tokens > limits.max_tokens_limit:
        raise ServeError(400, f"max_tokens is {max_tokens}; this server allows at most {limits.max_tokens_limit}")


def _utf8(field: str, texts: list[str]) -> None:
    """JSON may carry lone surrogates (``"\\ud800"``), which no tokenizer can encode."""
    for t in texts:
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{field} is not valid Unicode text (it holds a lone surrogate)") from None


@dataclass(frozen=True)
class GenerationParams:
    """One prompt's generation job, as sent from the ingress to the GPT deployment."""

    prompt: str
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    messages: tuple[tuple[str, str], ...] | None = None
    """A chat job's (role, content) turns: the GPT deployment renders them with the model's chat
    template into the prompt (``prompt`` is then empty)."""


@dataclass(frozen=True)
class Admitted:
    """The GPT deployment's first answer to a job: the prompt fits (and how many tokens it has)."""

    prompt_tokens: int


@dataclass
class Delta:
    """What one decode step produced for one prompt; ``error``: this prompt's generation failed
    (only its own request fails: the rest of its batch goes on)."""

    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class ChatReply(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatReply
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex[:24]}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str = "bigray"
    task: Literal["text-completion", "image-classification"]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ClassLabel(BaseModel):
    label: str
    index: int
    score: float


class ClassificationResponse(BaseModel):
    model: str
    predictions: list[ClassLabel]


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: int | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ServeError(Exception):
    """An error a client caused or may retry: becomes an OpenAI-style JSON error with this status.

    Raised in the ingress; a model deployment returns it as a value instead (an exception crossing
    a handle arrives as a RayTaskError, not as itself).
    """

    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", retry_after_s: float | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.retry_after_s = status, message, type_, retry_after_s

    def detail(self) -> ErrorDetail:
        return ErrorDetail(message=self.message, type=self.type, code=self.status)

    @classmethod
    def from_detail(cls, detail: ErrorDetail) -> ServeError:
        return cls(detail.code or 500, detail.message, detail.type)


@contextlib.contextmanager
def refused_when_full(model: str) -> Iterator[None]:
    """A model deployment's full queue (its max_queued_requests), which Serve raises as its own
    BackPressureError with a plain-text body, as an OpenAI-style 429 with Retry-After."""
    from ray.serve.exceptions import BackPressureError

    try:
        yield
    except BackPressureError as e:
        retry = e.retry_after_s or 1.0
        message = f"{model} is at capacity ({e.message.rstrip('.')}); retry after {retry:g} s"
        raise ServeError(e.status_code, message, "rate_limit_error", retry_after_s=retry) from None


def raise_if_error(result: object) -> object:
    """A model deployment returns client errors as values: raise them where they become HTTP."""
    if isinstance(result, ErrorDetail):
        raise ServeError.from_detail(result)
    return result


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ChatCompletionChunk(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
