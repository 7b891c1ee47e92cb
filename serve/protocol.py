"""The gateway's wire format: OpenAI's chat, completions and responses requests (as far as the gateway reads them),
alignloop's feedback, preference, facts and admin bodies, and OpenAI's error shape. Fields follow the order of
OpenAI's API reference.

The OpenAI requests keep unknown fields (`extra="allow"`): everything vLLM accepts is passed through unchanged. The
feedback bodies refuse unknown fields, so a typo is an error instead of silently lost data.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from online_rl.schema import LIMITS

# ---- errors ----------------------------------------------------------------------------------------------------
ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "service_unavailable",
    504: "server_error",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class APIError(Exception):
    """An error the API answers in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, headers=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        detail = ErrorDetail(
            message=self.message, type=ERROR_TYPES.get(self.status, "server_error"), param=self.param, code=self.code
        )
        return {"error": detail.model_dump()}


# ---- chat completions ------------------------------------------------------------------------------------------
MAX_CHOICES = 8  # `n`: every choice costs a full generation and a record


class ImageURL(BaseModel):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool | None = None


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions. Fields the gateway reads are typed; all others go to vLLM as they came."""

    model_config = ConfigDict(extra="allow")

    messages: list[ChatMessage] = Field(min_length=1)
    model: str = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    n: int | None = Field(
        default=None,
        ge=1,
        le=MAX_CHOICES,
        description="choices to generate; each is recorded: choice 0 under the response id, choice i as <id>-<i>",
    )
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    user: str | None = Field(default=None, max_length=256)


# ---- completions (legacy, plain text) --------------------------------------------------------------------------
class CompletionRequest(BaseModel):
    """POST /v1/completions: one text prompt, continued as plain text (no chat template). Fields the gateway reads
    are typed; all others go to vLLM as they came."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    prompt: str = Field(description="one prompt, as text (lists of prompts and token ids are not accepted)")
    max_tokens: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    user: str | None = Field(default=None, max_length=256)

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_text_prompt(cls, value: Any) -> Any:
        if not isinstance(value, str):
            raise ValueError("prompt must be one string: this server takes one text prompt per request")
        return value


# ---- responses -------------------------------------------------------------------------------------------------
class InputText(BaseModel):
    type: Literal["input_text"]
    text: str


class InputImage(BaseModel):
    type: Literal["input_image"]
    image_url: str | None = Field(default=None, min_length=1, description="a data: URL, or an allow-listed http(s) URL")
    file_id: str | None = None
    detail: Literal["low", "high", "auto", "original"] | None = None

    @model_validator(mode="after")
    def _by_url(self) -> InputImage:
        if self.image_url is None:
            raise ValueError("send the image as image_url (a data: URL); file ids are not supported here")
        return self


class OutputText(BaseModel):
    """Text of an earlier assistant answer, as a client replays it in `input`."""

    model_config = ConfigDict(extra="allow")

    type: Literal["output_text"]
    text: str


InputContent = Annotated[InputText | InputImage | OutputText, Field(discriminator="type")]


class InputMessage(BaseModel):
    """One message of `input` (an easy input message, or an earlier output message replayed)."""

    model_config = ConfigDict(extra="allow")

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputContent]

    @model_validator(mode="after")
    def _parts_fit_the_role(self) -> InputMessage:
        if isinstance(self.content, str):
            return self
        for part in self.content:
            if self.role == "assistant" and part.type == "input_image":
                raise ValueError("an assistant message cannot carry an image")
            if self.role != "assistant" and part.type == "output_text":
                raise ValueError(f"a {self.role} message takes input_text and input_image parts, not output_text")
        return self


class ResponseTextFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text"] = Field(description="plain text only: structured output formats are not supported")


class ResponseTextConfig(BaseModel):
    model_config = ConfigDict(extra="allow")

    format: ResponseTextFormat | None = None


class ResponsesRequest(BaseModel):
    """POST /v1/responses, served by translating it into a chat completion. Fields the gateway reads are typed;
    other fields that vLLM's chat endpoint reads (top_k, seed, ...) go to vLLM as they came."""

    model_config = ConfigDict(extra="allow")

    background: bool | None = Field(default=None, description="must be false: answers are not run in the background")
    conversation: Any = Field(default=None, description="not supported: use previous_response_id")
    include: list[str] | None = None
    input: str | list[InputMessage]
    instructions: str | None = Field(
        default=None, description="a system message first; not carried over by previous_response_id"
    )
    max_output_tokens: int | None = Field(default=None, ge=1)
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(default=None, max_length=16)
    model: str = Field(min_length=1)
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = Field(
        default=None, min_length=1, max_length=200, description="an earlier answer of this key, by the id it got"
    )
    prompt: Any = Field(default=None, description="not supported: prompt templates are not stored here")
    reasoning: Any = None
    safety_identifier: str | None = Field(default=None, max_length=64)
    store: bool | None = Field(default=None, description="accepted; every answer is recorded for feedback anyway")
    stream: bool | None = False
    temperature: float | None = Field(default=None, ge=0, le=2)
    text: ResponseTextConfig | None = None
    tool_choice: Any = None
    tools: list[Any] | None = Field(default=None, description="must be empty: the model calls no tools")
    top_p: float | None = Field(default=None, gt=0, le=1)
    truncation: Literal["auto", "disabled"] | None = None
    user: str | None = Field(default=None, max_length=256)

    @field_validator("input")
    @classmethod
    def _some_input(cls, value: str | list[InputMessage]) -> str | list[InputMessage]:
        if isinstance(value, list) and not value:
            raise ValueError("input needs at least one message")
        return value

    @model_validator(mode="after")
    def _supported(self) -> ResponsesRequest:
        if self.background:
            raise ValueError("background responses are not supported: send background=false")
        if self.conversation is not None:
            raise ValueError("conversations are not supported: chain answers with previous_response_id")
        if self.prompt is not None:
            raise ValueError("prompt templates are not supported: send the input itself")
        if self.tools:
            raise ValueError("tools are not supported: the model answers in text only")
        if self.tool_choice not in (None, "none", "auto"):
            raise ValueError("tool_choice must be 'none' or 'auto': the model calls no tools")
        return self


# ---- feedback --------------------------------------------------------------------------------------------------
class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


FactText = Annotated[str, Field(min_length=1, max_length=LIMITS.max_fact_chars)]
IdempotencyKey = Annotated[str, Field(min_length=1, max_length=LIMITS.max_idempotency_key_chars)]


class FeedbackRequest(_Body):
    """POST /v1/feedback: a judgement of one answer, by the response id the client received."""

    response_id: str = Field(min_length=1, max_length=200)
    rating: Literal[-1, 1] | None = Field(default=None, description="1 thumbs up, -1 thumbs down")
    correction: str | None = Field(default=None, min_length=1, max_length=LIMITS.max_correction_chars)
    comment: str | None = Field(default=None, max_length=LIMITS.max_comment_chars)
    facts: list[FactText] | None = Field(default=None, max_length=LIMITS.max_facts)
    idempotency_key: IdempotencyKey | None = None
    user: str | None = Field(default=None, max_length=256, description="end-user id, as in the chat request")

    @field_validator("rating", mode="before")
    @classmethod
    def _strict_rating(cls, value: Any) -> Any:
        if value is not None and (isinstance(value, bool) or value not in (-1, 1)):
            raise ValueError("rating must be 1 (thumbs up), -1 (thumbs down) or null")
        return value

    @model_validator(mode="after")
    def _says_something(self) -> FeedbackRequest:
        if self.rating is None and not self.correction and not self.comment and not self.facts:
            raise ValueError("feedback needs a rating, a correction, a comment or facts")
        return self


class FeedbackObject(BaseModel):
    id: str
    object: Literal["feedback"] = "feedback"
    created: int
    response_id: str
    rating: int | None
    correction: str | None
    comment: str | None
    facts: list[str] | None
    adapter_version: str = Field(description="the version that wrote the rated answer: policy-vN or base")


class PreferenceRequest(_Body):
    """POST /v1/preferences: two answers to the same prompt, and the better one."""

    response_ids: tuple[str, str]
    preferred_id: str
    idempotency_key: IdempotencyKey | None = None
    user: str | None = Field(default=None, max_length=256)

    @model_validator(mode="after")
    def _consistent(self) -> PreferenceRequest:
        if self.response_ids[0] == self.response_ids[1]:
            raise ValueError("response_ids must name two different responses")
        if self.preferred_id not in self.response_ids:
            raise ValueError("preferred_id must be one of response_ids")
        return self


class PreferenceObject(BaseModel):
    id: str
    object: Literal["preference"] = "preference"
    created: int
    response_ids: tuple[str, str]
    preferred_id: str
    adapter_versions: tuple[str, str]


class FactsRequest(_Body):
    """POST /v1/images/{sha256}/facts: a caption and/or short facts about an image the caller has sent."""

    caption: str | None = Field(default=None, max_length=LIMITS.max_fact_chars)
    facts: list[FactText] = Field(default_factory=list, max_length=LIMITS.max_facts)

    @model_validator(mode="after")
    def _not_empty(self) -> FactsRequest:
        if not self.caption and not self.facts:
            raise ValueError("send a caption or at least one fact")
        return self


class FactsObject(BaseModel):
    id: str
    object: Literal["image.facts"] = "image.facts"
    image_sha256: str
    caption: str | None
    facts: list[str]
    source: str
    created: int


# ---- admin -----------------------------------------------------------------------------------------------------
# Adapter versions count up from 1; the bound keeps any JSON integer inside what both stores can hold.
VersionNumber = Annotated[int, Field(ge=1, le=2**31 - 1)]


class PromoteRequest(_Body):
    version: VersionNumber | None = Field(description="the adapter version to serve; null for the base model")
    expected_version: VersionNumber | None = Field(
        default=None, description="compare-and-set: only if the alias still serves this version"
    )
    check_expected: bool = Field(default=False, description="set true to use expected_version (null is meaningful)")
    reason: str = Field(default="", max_length=500)
    require_effect: bool = Field(
        default=True,
        description="staging: refuse a version whose answer and token log-probabilities on the probe equal the base "
        "model's (false promotes such an adapter on purpose)",
    )
    actor: str | None = Field(
        default=None,
        max_length=40,
        pattern=r"^[a-z][a-z0-9_-]*$",
        description="with the service key: the part of alignloop that promotes (trainer, canary), for the alias "
        "history; the admin key is always `admin`",
    )


class RollbackRequest(_Body):
    reason: str = Field(default="", max_length=500)


class CanaryRequest(_Body):
    version: VersionNumber | None
    fraction: float = Field(ge=0.0, le=1.0)
    reason: str = Field(default="", max_length=500)
