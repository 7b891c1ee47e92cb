"""The gateway's wire format: OpenAI's chat request (as far as the gateway reads it), alignloop's feedback, preference,
facts and admin bodies, and OpenAI's error shape. Fields follow the order of OpenAI's API reference.

The chat request keeps unknown fields (`extra="allow"`): everything vLLM accepts is passed through unchanged. The
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
    n: int | None = Field(default=None, ge=1)
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    user: str | None = Field(default=None, max_length=256)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n is not None and n != 1:
            raise ValueError("n must be 1: each answer is recorded and rated on its own; send separate requests")
        return n


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


class RollbackRequest(_Body):
    reason: str = Field(default="", max_length=500)


class CanaryRequest(_Body):
    version: VersionNumber | None
    fraction: float = Field(ge=0.0, le=1.0)
