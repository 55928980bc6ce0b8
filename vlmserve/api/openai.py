"""The OpenAI surface as typed pydantic models (no torch): what the gateway's ``/v1/chat/completions`` and
``/v1/completions`` accept, and the chat models' ``PARAMETERS`` JSON (``GenerationParameters``), which the Triton
model re-validates with the same field rules.

Field rules live once, as annotated types (``Temperature``, ``TopP``, ``Penalty``, ...), and every model that has
the field uses them, so the gateway's 4xx and the model's INVALID_ARG say the same thing. Per-model limits
(``max_tokens`` against the model's ``max_new_tokens_limit``, ``n`` against its ``max_batch``) are checked where the
model is known: once in the gateway, by the request models' ``to_generation_parameters`` (against the model's
typed config, :class:`GenerationLimits`), and again by the model itself as the engine's own guard
(``vlmserve.model_repository.chat.parse_params``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Discriminator, Field, PrivateAttr, Tag, field_validator

__all__ = [
    "AssistantMessage", "ChatCompletionRequest", "ChatMessage", "CompletionRequest", "ContentPart",
    "DeveloperMessage", "GenerationLimits", "GenerationParameters", "RequestRejected",
    "max_tokens_for", "ImagePart", "JsonObjectFormat", "JsonSchemaFormat",
    "JsonSchemaSpec", "MAX_N", "MAX_STOP", "MAX_TOP_LOGPROBS", "MAX_COMPLETION_LOGPROBS", "ResponseFormat",
    "StreamOptions", "SystemMessage", "TextFormat", "TextPart", "UserMessage", "VideoPart", "grammar_spec",
]

MAX_STOP = 4  # OpenAI's own limit on stop sequences
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat top_logprobs
MAX_COMPLETION_LOGPROBS = 5  # the legacy completions API's limit
MAX_N = 8  # choices per request; each is a row of the batch (the model's max_batch bounds it too)

# --- field rules shared by the gateway's request models and the model's PARAMETERS ------------------------------

Temperature = Annotated[float, Field(ge=0, le=2, description="0 = greedy")]
TopP = Annotated[float, Field(gt=0, le=1)]
Penalty = Annotated[float, Field(ge=-2, le=2, description="OpenAI presence/frequency penalty, -2..2")]
RepetitionPenalty = Annotated[float, Field(gt=0, le=2, description="vLLM/transformers extension: >1 discourages "
                                                                   "tokens already in the prompt or answer")]
Seed = Annotated[int, Field(ge=-(2**63), lt=2**63)]
Choices = Annotated[int, Field(ge=1, le=MAX_N, description="choices; they share the prompt's prefill")]
TopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]
VideoFps = Annotated[float, Field(gt=0, le=30, description="vlmserve extension: frames per second sampled")]
VideoFrames = Annotated[int, Field(ge=1, description="vlmserve extension: at most this many frames per video")]
Stop = Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP)]


# --- response_format ---------------------------------------------------------------------------------------------


class TextFormat(BaseModel):
    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    """Any JSON object (OpenAI's JSON mode)."""

    type: Literal["json_object"]


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str = Field("response", max_length=64)
    description: str | None = None
    # ``schema`` shadows a BaseModel attribute, hence the alias.
    json_schema: dict[str, Any] = Field(..., alias="schema", description="a JSON Schema the answer must match")
    strict: bool | None = Field(None, description="accepted; the schema is always enforced (constrained decoding)")


class JsonSchemaFormat(BaseModel):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


def grammar_spec(response_format: TextFormat | JsonObjectFormat | JsonSchemaFormat | None) -> dict[str, Any] | None:
    """What the chat models constrain decoding to: ``{"type": "json_object"}``, ``{"type": "json_schema",
    "schema": {...}}``, or None for free text."""
    if isinstance(response_format, JsonObjectFormat):
        return {"type": "json_object"}
    if isinstance(response_format, JsonSchemaFormat):
        return {"type": "json_schema", "schema": response_format.json_schema.json_schema}
    return None


# --- messages ---------------------------------------------------------------------------------------------------


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="allow")

    url: str = Field(..., description="a data URI or an http(s) URL")
    detail: Literal["auto", "low", "high"] | None = Field(None, description="accepted; images are processed whole")


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class VideoURL(BaseModel):
    model_config = ConfigDict(extra="allow")

    url: str = Field(..., description="a data URI or an http(s) URL of an MP4/WebM video")


class VideoPart(BaseModel):
    type: Literal["video_url"]
    video_url: VideoURL


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]
# A string or a list of parts; the callable discriminator keeps errors to the form the client chose.
Content = Annotated[
    Annotated[str, Tag("string")] | Annotated[list[ContentPart], Field(min_length=1), Tag("parts")],
    Discriminator(lambda v: "string" if isinstance(v, str) else "parts" if isinstance(v, list) else None,
                  custom_error_type="invalid_content",
                  custom_error_message="content must be a string or a non-empty list of parts"),
]


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, ...: accepted and not used

    content: Content


class SystemMessage(_Message):
    role: Literal["system"]


class DeveloperMessage(_Message):
    """OpenAI's newer name for ``system``."""

    role: Literal["developer"]


class UserMessage(_Message):
    role: Literal["user"]


class AssistantMessage(_Message):
    role: Literal["assistant"]


ChatMessage = Annotated[SystemMessage | DeveloperMessage | UserMessage | AssistantMessage,
                        Field(discriminator="role")]


# --- per-model limits -------------------------------------------------------------------------------------------


class GenerationLimits(Protocol):
    """What a chat model allows, from its typed config (``vlmserve.families.contract.ChatParams`` is one)."""

    @property
    def max_new_tokens_limit(self) -> int: ...
    @property
    def max_batch(self) -> int: ...
    @property
    def max_video_frames(self) -> int: ...


class RequestRejected(ValueError):
    """A request this model cannot honour as sent (the gateway answers 400 naming ``param``)."""

    def __init__(self, message: str, param: str, code: str | None = "invalid_value") -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


def max_tokens_for(max_tokens: int | None, limits: GenerationLimits, param: str = "max_tokens") -> int | None:
    """The answer's length cap as the request sets it, checked against ``1..max_new_tokens_limit`` (the one check
    before the engine). None stays None: the model's default (``default_max_new_tokens``), which the model lowers
    to what is left of its context (vLLM's rule), so the gateway does not copy it."""
    if max_tokens is None:
        return None
    if not 1 <= max_tokens <= limits.max_new_tokens_limit:
        raise RequestRejected(f"{param} must be 1..{limits.max_new_tokens_limit} for this model, got {max_tokens}",
                              param)
    return max_tokens


def _choices(n: int | None, limits: GenerationLimits) -> int:
    if n is not None and n > limits.max_batch:
        raise RequestRejected(f"n must be 1..{limits.max_batch} for this model (each choice is a row of its batch), "
                              f"got {n}", "n")
    return n or 1


# --- requests ---------------------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class _Sampling(BaseModel):
    """Settings both OpenAI request kinds share."""

    model_config = ConfigDict(extra="allow")  # OpenAI adds fields often (user, metadata, store, ...)

    model: str | None = Field(None, description="source model id, family or Triton name; default: first chat model")
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: str | Stop | None = None
    seed: Seed | None = None
    n: Choices | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: RepetitionPenalty | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, value: str | list[str] | None) -> str | list[str] | None:
        if value == "":
            raise ValueError("stop sequences must be non-empty strings")
        return value

    def stop_list(self) -> list[str] | None:
        return [self.stop] if isinstance(self.stop, str) else self.stop

    def _common(self, limits: GenerationLimits) -> dict[str, Any]:
        """The settings both kinds send (None: the model's default)."""
        values = {"temperature": self.temperature, "top_p": self.top_p, "stop": self.stop_list(), "seed": self.seed,
                  "n": _choices(self.n, limits), "presence_penalty": self.presence_penalty,
                  "frequency_penalty": self.frequency_penalty, "repetition_penalty": self.repetition_penalty}
        return {k: v for k, v in values.items() if v is not None}


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = None
    max_completion_tokens: int | None = Field(None, description="OpenAI's newer name for max_tokens")
    logprobs: bool | None = Field(None, description="return each answer token's log probability")
    top_logprobs: TopLogprobs | None = Field(None, description="and the most likely alternatives (needs logprobs)")
    response_format: ResponseFormat | None = Field(None, description="json_object or json_schema: constrained "
                                                                     "decoding, the answer always parses")
    tools: list[Any] | None = None
    video_fps: VideoFps | None = None
    video_max_frames: VideoFrames | None = None

    def to_generation_parameters(self, limits: GenerationLimits) -> GenerationParameters:
        """What the model is asked for; :class:`RequestRejected` for what it cannot honour (rather than ignoring
        it), with the model's limits (``max_tokens``, ``n``, ``video_max_frames``) checked here once."""
        if self.tools:
            raise RequestRejected("tool calling is not supported by these models", "tools", "unsupported_parameter")
        if self.top_logprobs and not self.logprobs:
            raise RequestRejected("top_logprobs needs logprobs: true", "top_logprobs")
        if None not in (self.max_tokens, self.max_completion_tokens) and self.max_tokens != self.max_completion_tokens:
            raise RequestRejected("max_tokens and max_completion_tokens disagree; send one of them",
                                  "max_completion_tokens", None)
        wire = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        param = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        if self.video_max_frames is not None and self.video_max_frames > limits.max_video_frames:
            raise RequestRejected(f"video_max_frames must be 1..{limits.max_video_frames} for this model, "
                                  f"got {self.video_max_frames}", "video_max_frames")
        return GenerationParameters.model_validate({
            **self._common(limits), "max_tokens": max_tokens_for(wire, limits, param),
            "logprobs": bool(self.logprobs), "top_logprobs": self.top_logprobs or 0,
            "response_format": grammar_spec(self.response_format), "video_fps": self.video_fps,
            "video_max_frames": self.video_max_frames,
        })


# The gateway answers 400 for the unsupported values; the schema states the ones that work.
_PROMPT = Annotated[str, Field(json_schema_extra={"minLength": 1})]


class CompletionRequest(_Sampling):
    """``POST /v1/completions`` (legacy text completions): the prompt goes to the model as is, no chat template."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"prompt": "Once upon a time", "max_tokens": 8}]})

    prompt: _PROMPT | Annotated[list[_PROMPT], Field(min_length=1, max_length=MAX_N)] = Field(
        ..., description="a text prompt, or a list of them (token-id prompts are not supported)")
    max_tokens: int | None = Field(16, description="OpenAI's default is 16")
    logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = Field(
        None, description="return token log probabilities and this many alternatives per token")
    echo: bool | None = Field(False, description="not supported: false only", json_schema_extra={"enum": [False, None]})
    suffix: str | None = Field(None, description="not supported: empty only", json_schema_extra={"maxLength": 0})
    best_of: int | None = Field(None, description="equal to n only (no server-side reranking)")

    def to_generation_parameters(self, limits: GenerationLimits) -> GenerationParameters:
        """What the model is asked for each prompt (see :meth:`ChatCompletionRequest.to_generation_parameters`);
        ``logprobs`` N asks for the answer's log probabilities and N alternatives."""
        return GenerationParameters.model_validate({
            **self._common(limits), "max_tokens": max_tokens_for(self.max_tokens, limits),
            "logprobs": self.logprobs is not None, "top_logprobs": self.logprobs or 0,
        })


# --- the chat models' PARAMETERS ---------------------------------------------------------------------------------


class GenerationParameters(BaseModel):
    """The chat models' ``PARAMETERS`` JSON (everything optional). The gateway sends it; Triton clients may too."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int | None = Field(None, ge=1)
    temperature: Temperature = 0.0
    top_p: TopP = 1.0
    stop: str | Stop = Field(default_factory=list)
    seed: Seed | None = None
    n: Choices = 1
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: RepetitionPenalty = 1.0
    logprobs: bool = False
    top_logprobs: TopLogprobs = 0
    response_format: dict[str, Any] | None = Field(
        None, description='{"type": "json_object"} or {"type": "json_schema", "schema": {...}}')
    video_fps: VideoFps | None = None
    video_max_frames: VideoFrames | None = None
    priority: Literal["interactive", "batch"] = Field(
        "interactive", description="'batch' rows are admitted after every waiting 'interactive' row")

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str]) -> list[str]:
        if isinstance(value, str):
            if not value:
                raise ValueError("stop sequences must be non-empty strings")
            return [value]
        return value

    @field_validator("response_format")
    @classmethod
    def _grammar(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None or value.get("type") == "text":
            return None
        if value.get("type") == "json_object":
            return {"type": "json_object"}
        if value.get("type") == "json_schema" and isinstance(value.get("schema"), dict):
            return {"type": "json_schema", "schema": value["schema"]}
        raise ValueError('must be {"type": "json_object"} or {"type": "json_schema", "schema": {...}}')

    # What the engine reads: the fields above (the public contract) and these, none of them in the JSON schema.

    # Whether the client sent max_tokens: None until :meth:`resolved` fills it in (then the client's value counts).
    _max_tokens_sent: bool | None = PrivateAttr(None)

    def resolved(self, default_max_tokens: int, max_tokens_limit: int, max_choices: int) -> GenerationParameters:
        """A copy for one model: ``max_tokens`` filled with its default when the client sent none, and checked, with
        ``n``, against its limits (ValueError saying which; the only place the model checks ``max_tokens``)."""
        max_tokens = default_max_tokens if self.max_tokens is None else self.max_tokens
        if not 1 <= max_tokens <= max_tokens_limit:
            raise ValueError(f"max_tokens must be 1..{max_tokens_limit}, got {max_tokens}")
        if self.n > max_choices:
            raise ValueError(f"n must be 1..{max_choices} for this model (its max_batch), got {self.n}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        out = self.model_copy(update={"max_tokens": max_tokens})
        out._max_tokens_sent = self.max_tokens_sent
        return out

    @property
    def max_tokens_sent(self) -> bool:
        """The client chose ``max_tokens`` (not the model's default): a context too short for it is the client's
        error, where the default is lowered to fit (``vlmserve.model_repository.chat.fit_context``)."""
        return self.max_tokens is not None if self._max_tokens_sent is None else self._max_tokens_sent

    @property
    def token_limit(self) -> int:
        """``max_tokens`` as the decode engine counts it: set (by :meth:`resolved`, or by the caller)."""
        if self.max_tokens is None:
            raise ValueError("max_tokens is not set: GenerationParameters.resolved() fills in the model's default")
        return self.max_tokens

    @property
    def stop_sequences(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else self.stop

    @property
    def penalised(self) -> bool:
        """A repetition, presence or frequency penalty changes the logits."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    @property
    def plain_greedy(self) -> bool:
        """Greedy on the raw logits (no logprobs, penalty or response_format): a batch's one argmax serves it."""
        return self.temperature <= 0 and not self.logprobs and self.response_format is None and not self.penalised
