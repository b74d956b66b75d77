"""The OpenAI wire format: the request schema, strict JSON parsing, errors in OpenAI's body, and
server-sent events (the `stream: true` responses).

Reference: the OpenAI API reference for /v1/chat/completions and /v1/completions (the legacy one:
`echo` + `logprobs` let lm-evaluation-harness score log-likelihoods). Departures: `logprobs` /
`top_logprobs` go up to 20 (as vLLM) instead of 5; vLLM's extra sampling fields `top_k` (-1 or 0 = off),
`min_p` and `repetition_penalty` are honoured, as is `ignore_eos` (vLLM's extension, sent with the
openai client's `extra_body`), which generates through stop tokens, for fixed-length benchmarks and tests.
`logit_bias` and `response_format` (text | json_object | json_schema, by constrained decoding:
qwen2.grammar) are OpenAI's. The accepted fields are exactly the ones declared below: any other field,
at any depth, is a 400 naming it (a field silently ignored would make a client believe it took effect).

Every bad request becomes an `APIError`, which the app turns into a 4xx with
`{"error": {"message", "type", "param", "code"}}`: never FastAPI's 422 shape, never a 500.

A stream is `data: <json>\n\n` events ended by `data: [DONE]\n\n`, as OpenAI sends them (the `openai`
client reads exactly this).
"""

from __future__ import annotations

import json
import math
import uuid
from typing import Any, Literal

from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from qwen2.extras import MissingExtra
from qwen2.sampling import LOGIT_BIAS_MAX, SamplingParams


class APIError(Exception):
    """An error for the client: HTTP status + OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- strict JSON --------------------------------------------------------------------------------
def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def _finite_float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"the number {text[:40]} is out of range (numbers must be finite)")
    return x


def _check_strings(obj: Any, path: str = "") -> None:
    """Refuse lone surrogates (JSON allows "\\ud800"; UTF-8 cannot carry it), anywhere in the body."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(
                400,
                f"{path or 'body'}: string contains a lone surrogate (invalid Unicode)",
                param=path or None,
                code="invalid_unicode",
            ) from None
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_strings(k, path)
            _check_strings(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _check_strings(v, f"{path}.{i}")


def parse_json(raw: bytes) -> dict:
    """Body bytes -> a JSON object, refusing what Python's json would let through (NaN, Infinity, 1e999,
    lone surrogates) and what would crash it (deep nesting, huge integers)."""
    try:
        text = raw.decode("utf-8")
        obj = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except UnicodeDecodeError:
        raise APIError(400, "the request body is not valid UTF-8", code="invalid_json") from None
    except (ValueError, RecursionError) as e:
        raise APIError(
            400, f"the request body is not valid JSON: {str(e)[:200]}", code="invalid_json"
        ) from None
    if not isinstance(obj, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    _check_strings(obj)
    return obj


# ---- request models -------------------------------------------------------------------------------
LOGIT_BIAS_MAX_ENTRIES = 300  # OpenAI's limit


class _Strict(BaseModel):
    # strict: no "1" -> 1 or true -> 1 coercion (an int is still a valid float); forbid: a field we do
    # not declare is refused (validate() names it), never ignored.
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False


class FunctionDef(_Strict):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None  # OpenAI's; the schema is shown to the model, calls are not constrained


class JsonSchemaFormat(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")  # `schema` would shadow BaseModel.schema
    strict: bool | None = None  # the output follows the schema either way


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class ToolCallFunction(_Strict):
    name: str
    arguments: str


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None  # an earlier reply's, sent back with the history; not part of the prompt

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class _Common(_Strict):
    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = None  # OpenAI's end-user id (for the caller's own logs): no effect on the output
    ignore_eos: bool = False  # vLLM's extension: do not stop at <|endoftext|> / <|im_end|>
    # vLLM's extra sampling fields (qwen2.sampling implements them, in transformers' order).
    top_k: int = Field(0, ge=-1)  # -1 (vLLM) or 0: off
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    # OpenAI's: {"token id": bias in [-100, 100]}, at most 300 entries; +-100 forces / bans a token.
    logit_bias: dict[str, float] | None = Field(None, max_length=LOGIT_BIAS_MAX_ENTRIES)
    response_format: ResponseFormat | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (bias or {}).items():
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"keys must be token ids as decimal strings, got {key[:20]!r}")
            if not -LOGIT_BIAS_MAX <= value <= LOGIT_BIAS_MAX:
                raise ValueError(f"the bias of token {key} must be in [-100, 100], got {value}")
        return bias

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop: give at most 4 non-empty strings", param="stop", code="invalid_value")
        return stops

    def grammar(self, compiler):
        """The compiled response_format (qwen2.grammar.Grammar), or None for text; 400 naming the field for
        a schema that does not compile, or when the `structured` extra is not installed. compiler: a
        qwen2.grammar.GrammarCompiler for the served tokenizer (None: structured output is off)."""
        rf = self.response_format
        if rf is None or rf.type == "text":
            return None
        if rf.type == "json_schema" and rf.json_schema is None:
            raise APIError(
                400,
                "response_format.json_schema: type json_schema needs {'name': ..., 'schema': {...}}",
                param="response_format.json_schema",
                code="invalid_value",
            )
        if compiler is None:
            raise APIError(
                400,
                "response_format: structured output is off on this server",
                param="response_format",
                code="unsupported",
            )
        spec = {"type": rf.type}
        if rf.json_schema is not None:
            spec["json_schema"] = {"name": rf.json_schema.name, "schema": rf.json_schema.schema_ or {}}
        try:
            return compiler.compile(spec)
        except MissingExtra as e:
            raise APIError(400, str(e), param="response_format", code="unsupported") from None
        except ValueError as e:
            field = str(e).split(":", 1)[0] if str(e).startswith("response_format") else "response_format"
            raise APIError(400, str(e), param=field, code="invalid_value") from None

    def sampling_params(
        self, *, max_new_tokens: int, index: int, stop_token_ids, vocab_size: int, grammar=None
    ) -> SamplingParams:
        """This request's SamplingParams for choice `index` (OpenAI's seed is per request: choice i samples
        with seed + i). vocab_size: token ids a logit_bias may name (400 naming the id beyond it)."""
        bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        bad = next((t for t in bias if t >= vocab_size), None)
        if bad is not None:
            raise APIError(
                400,
                f"logit_bias: token id {bad} is outside the vocabulary [0, {vocab_size})",
                param="logit_bias",
                code="invalid_value",
            )
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            max_new_tokens=max_new_tokens,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=None if self.seed is None else self.seed + index,
            stop_token_ids=[] if self.ignore_eos else sorted(stop_token_ids),
            logit_bias=bias,
            grammar=grammar,
        )


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=1)


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "function-after", "literal"}


def _param(loc: tuple) -> str | None:
    """pydantic's error location -> OpenAI's `param` (messages.0.content), dropping union-member tags."""
    parts = []
    for p in loc:
        if isinstance(p, str) and ("[" in p or p.split("-")[0] in _TYPE_TAGS or p.startswith("function-")):
            continue
        parts.append(str(p))
    return ".".join(parts) or None


def validate(model: type[BaseModel], body: dict) -> Any:
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        errors = e.errors()
        # An undeclared field first: a typo'd or unsupported name explains the rest.
        err = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
        param = _param(err["loc"])
        if err["type"] == "extra_forbidden":
            raise APIError(
                400,
                f"{param}: this server does not support the field {err['loc'][-1]!r}; remove it",
                param=param,
                code="unsupported_parameter",
            ) from None
        msg = err["msg"].removeprefix("Value error, ")
        raise APIError(400, f"{param or 'body'}: {msg}", param=param, code=err["type"]) from None
    return req


# ---- server-sent events -------------------------------------------------------------------------
DONE = "data: [DONE]\n\n"


def sse(obj: dict) -> str:
    """One event; ensure_ascii=False keeps the text as the model wrote it (UTF-8 on the wire)."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def streaming(events) -> StreamingResponse:
    """An async iterator of `sse(...)` strings as a text/event-stream response (no proxy caching)."""
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def new_id(prefix: str) -> str:
    """An OpenAI-style id: chatcmpl-..., cmpl-..., call-..."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"
