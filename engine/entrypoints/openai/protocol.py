"""The bodies of OpenAI's completions and chat completions API, as pydantic models: what a
client sends (OpenAI's fields plus lmarith's extensions `formula`, `top_k`, `min_p`,
`ignore_eos`, `stop_token_ids`) and what the server answers (responses, stream chunks, usage,
the model list, errors). Fields OpenAI has but lmarith cannot honour are accepted at their
neutral value and refused otherwise, so a client never silently gets something it did not ask
for; unknown fields are ignored, as OpenAI-compatible servers do."""
from __future__ import annotations

import time
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_MAX_TOKENS = 16     # OpenAI's default for completions; used for chat too (see README)


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """The fields both endpoints share: sampling, stopping, streaming, the formula."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """`"n": null`, `"stream": null`... (some clients send every field) mean the default."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    model: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: int = 1
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    presence_penalty: Optional[float] = None       # accepted when 0 (not implemented)
    frequency_penalty: Optional[float] = None      # accepted when 0 (not implemented)
    logit_bias: Optional[dict[str, float]] = None  # accepted when empty (not implemented)
    # lmarith's extensions (the openai client's extra_body)
    formula: Optional[str] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    ignore_eos: bool = False
    stop_token_ids: Optional[list[int]] = None

    def unsupported(self) -> Optional[str]:
        """The first field set to something lmarith cannot do, or None."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                return name
        return "logit_bias" if self.logit_bias else None


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str]]
    logprobs: Optional[int] = None
    echo: bool = False                # accepted when false
    suffix: Optional[str] = None      # accepted when empty
    best_of: Optional[int] = None     # accepted when None or n

    def unsupported(self) -> Optional[str]:
        if self.echo:
            return "echo"
        if self.suffix:
            return "suffix"
        if self.best_of not in (None, self.n):
            return "best_of"
        return super().unsupported()


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    def as_dict(self) -> dict[str, str]:
        """The engine's conversation entry: developer counts as system, text parts joined."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    max_completion_tokens: Optional[int] = None   # OpenAI's newer name for max_tokens


class Usage(BaseModel):
    """prompt_tokens sums the context tokens of every term of the formula (a 3-term formula
    reads its prompt three times), counted once per prompt even when n > 1."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: Optional[list[dict[str, float]]] = None
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None


class CompletionResponse(BaseModel):
    id: str
    object: str = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: Optional[list[ChatTokenLogprob]] = None
    refusal: Optional[list[ChatTokenLogprob]] = None


class AssistantMessage(BaseModel):
    role: str = "assistant"
    content: Optional[str] = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Optional[Usage] = None


class Delta(BaseModel):
    role: Optional[str] = None
    content: Optional[str] = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: str = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


class CompletionChunk(BaseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "lmarith"
    formula: str                      # lmarith: the preset's formula, as parse_formula reads it


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[Any] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
