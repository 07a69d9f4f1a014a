"""Request and response bodies of `kad serve`, and its OpenAI-style errors.

Bad input gets ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status. Integer and
boolean fields are strict (``true`` is not 1, ``"2"`` is not 2), numbers must be finite, and text
must be valid Unicode (JSON may carry unpaired surrogates such as ``"\\ud800"``). Fields that
common OpenAI clients send are accepted when they ask for nothing this server lacks (an empty
``tools`` list, ``response_format`` text, ...) and refused with a message naming them otherwise;
`FIELD_NOTES` says what each refusal means.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import (
    AfterValidator,
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictInt,
    StrictStr,
    create_model,
    field_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from kad.errors import ContextLengthError, KadError, PromptError
from kad.rules import (
    COLUMNS,
    RULE_NAMES,
    RULE_PARAMS,
    RULES,
    Param,
    Rule,
    make_rule,
    rule_key,
    rule_params,
)

SEED_MAX = 2**63 - 1

# What a refused value of each field means, for the 400's message (the field's own check is
# its type below: e.g. `tools` must be an empty list).
FIELD_NOTES = {
    "echo": "echo is not supported by this server (leave it out)",
    "logprobs": "logprobs are not supported by this server (leave them out)",
    "top_logprobs": "top_logprobs are not supported by this server (leave it out or 0)",
    "best_of": "best_of is not supported by this server (leave it out or 1)",
    "suffix": "suffix is not supported by this server (leave it out)",
    "presence_penalty": "presence_penalty is not supported by this server (leave it out or 0)",
    "frequency_penalty": "frequency_penalty is not supported by this server (leave it out or 0)",
    "response_format": 'only response_format {"type": "text"} is supported by this server '
    "(json_object and json_schema are not)",
    "tools": "tools (function calling) are not supported by this server (send none or [])",
    "tool_choice": 'tool_choice may only be "none" or "auto" here: this server has no tools',
    "logit_bias": "logit_bias is not supported by this server (leave it out or {})",
}


def _valid_unicode(value: Any) -> Any:
    """``value`` if every string in it (a text, a list, a message part...) encodes to UTF-8:
    JSON's "\\ud800" escapes decode to unpaired surrogates, which no tokenizer (and no UTF-8
    response) can take. Runs before type validation: what is not text is left to that."""
    bad = _surrogate(value)
    if bad is not None:
        where, index, char = bad
        raise ValueError(
            f"{where}the text holds an unpaired UTF-16 surrogate (U+{ord(char):04X} at index "
            f"{index}), which is not valid Unicode"
        )
    return value


def _surrogate(value: Any, where: str = "") -> tuple[str, int, str] | None:
    """(where, index, character) of the first unpaired surrogate in ``value``, or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            return where, error.start, value[error.start]
        return None
    items = value.values() if isinstance(value, dict) else value
    if isinstance(value, (list, dict)):
        for i, item in enumerate(items):
            found = _surrogate(item, where or f"item {i}: ")
            if found is not None:
                return found
    return None


def ascii_safe(text: str) -> str:
    """``text`` with unpaired surrogates written as ``\\udXXX`` (so that it encodes to UTF-8)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


ValidUnicode = BeforeValidator(_valid_unicode)
StopText = Annotated[str, Field(min_length=1)]
Number = Annotated[float, Strict(), AllowInfNan(False)]  # an int or a finite float, not a bool
# Pydantic's names of union members in an error's location ("list[str]", "function-after[...]")
_UNION_TAG = re.compile(r"^(str|int|float|bool|none|constrained-\w+|[a-z-]+\[.*\])$")


# --- errors ----------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered with OpenAI's body ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = {
            "message": ascii_safe(message),
            "type": error_type,
            "param": None if param is None else ascii_safe(param),
            "code": code,
        }

    def body(self) -> dict[str, Any]:
        return {"error": self.detail}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def kad_error(error: KadError, param: str) -> APIError:
    """A library error about the request as a 400 (``param`` named for prompt errors)."""
    code = "context_length_exceeded" if isinstance(error, ContextLengthError) else None
    return APIError(
        400, str(error), param=param if isinstance(error, PromptError) else None, code=code
    )


def validation_error(error: RequestValidationError) -> APIError:
    """FastAPI's validation errors as one 400: the first problem's field is the param."""
    problems = error.errors()
    first = problems[0] if problems else {}
    if first.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('msg')}", code="invalid_json")
    param = _field(first) or None
    return APIError(
        400, "; ".join(_problem(e) for e in problems), param=param, code="invalid_value"
    )


def _field(problem: dict[str, Any]) -> str:
    """The problem's field, e.g. "messages.0.content" (without the union members' names)."""
    loc = problem.get("loc", ())
    return ".".join(str(p) for p in loc if p != "body" and not _UNION_TAG.match(str(p)))


def _problem(problem: dict[str, Any]) -> str:
    name = _field(problem) or "body"
    if problem.get("type") == "extra_forbidden":
        return f"unknown field {name!r}"
    top = next((str(p) for p in problem.get("loc", ()) if p != "body"), "")
    if top in FIELD_NOTES:
        return FIELD_NOTES[top]
    return f"{name}: {problem.get('msg')}"


# --- request bodies --------------------------------------------------------------------------


def rule_names() -> tuple[str, ...]:
    """The names a request's ``kad.rule`` may take: the registry's slugs and their underscore
    spellings ("implicit-reward", "implicit_reward")."""
    aliases = [slug.replace("-", "_") for slug in RULES if "-" in slug]
    return (*RULES, *aliases)


def _registry_check(owners: list[Param]) -> Callable[[Any], Any]:
    """A field validator that accepts what one of ``owners`` (the rules' Params of one name)
    accepts, and else fails with the registry's message (the library's and the CLI's)."""

    def check(value: Any) -> Any:
        error: KadError | None = None
        for p in owners:
            try:
                return p.check(value)
            except KadError as failed:
                error = error or failed
        raise PydanticCustomError("kad_parameter", "{message}", {"message": str(error)})

    return check


def _param_field(owners: list[tuple[str, Param]]) -> tuple[Any, Any]:
    """The request field of one rule parameter: its JSON type, documented range or choices, and
    the registry's own check (so that a bad value gets the registry's message)."""
    first = owners[0][1]
    kind: Any = {bool: StrictBool, str: StrictStr}.get(first.kind, Number)
    extra: dict[str, Any] = {"enum": list(first.choices)} if first.choices else {}
    if first.low is not None:
        extra["minimum"] = first.low
    if first.high is not None:
        extra["maximum"] = first.high
    rules = ", ".join(slug for slug, _ in owners)
    description = f"{rules}: {first.help}"
    checked = Annotated[kind, AfterValidator(_registry_check([p for _, p in owners]))]
    return checked | None, Field(None, description=description, json_schema_extra=extra or None)


def kad_options_model() -> type[BaseModel]:
    """The ``kad`` object of a request, built from the rule registry: ``rule`` (a slug or its
    underscore spelling), one field per rule parameter (``lam``, ``budget``, ``delta``,
    ``fractional``...), and ``speculative``."""
    owners: dict[str, list[tuple[str, Param]]] = {}
    for slug, spec in RULES.items():
        for p in spec.params:
            owners.setdefault(p.name, []).append((slug, p))
    fields: dict[str, Any] = {
        "rule": (
            Literal[rule_names()] | None,  # type: ignore[valid-type]
            Field(None, description="deferral rule or baseline"),
        )
    }
    fields |= {name: _param_field(found) for name, found in owners.items()}
    fields["speculative"] = (
        Annotated[StrictInt, Field(ge=0, le=16)] | Literal["auto"] | None,
        Field(None, description="draft length γ of speculative decoding; 0 turns it off; 'auto'"),
    )
    return create_model(
        "KadOptions",
        __config__=ConfigDict(extra="forbid"),
        __doc__="Per-request KAD parameters; fields left out keep the server's defaults.",
        **fields,
    )


KadOptions = kad_options_model()
_BUILT_FOR = (RULE_NAMES, COLUMNS)


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class ResponseFormat(BaseModel):
    type: Literal["text"]


class SamplingRequest(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, ValidUnicode]
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number = Field(1.0, ge=0, le=2)
    top_p: Number = Field(1.0, gt=0, le=1)
    top_k: StrictInt = Field(0, ge=-1, description="vLLM's extension; 0 or -1: off")
    n: StrictInt = Field(1, ge=1)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: Annotated[
        StopText | Annotated[list[StopText], Field(max_length=4)] | None, ValidUnicode
    ] = None
    seed: StrictInt | None = Field(None, ge=0, le=SEED_MAX)
    user: str | None = Field(None, description="ignored")
    presence_penalty: Number | None = Field(None, ge=0, le=0, description="only 0 is supported")
    frequency_penalty: Number | None = Field(None, ge=0, le=0, description="only 0 is supported")
    logit_bias: Annotated[dict[str, Any], Field(max_length=0)] | None = Field(
        None, description="only {} is supported"
    )
    kad: KadOptions | None = None  # type: ignore[valid-type]

    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk (``stream_options.include_usage``)."""
        return self.stream_options is not None and self.stream_options.include_usage

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(SamplingRequest):
    prompt: Annotated[str | Annotated[list[str], Field(min_length=1)], ValidUnicode] = Field(
        ..., description="a prompt or a list of prompts"
    )
    max_tokens: StrictInt | None = Field(16, ge=1)
    echo: Literal[False] = False
    logprobs: None = Field(None, description="not supported")
    best_of: Literal[1] | None = None
    suffix: None = Field(None, description="not supported")

    def texts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str | list[TextPart], ValidUnicode]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def to_message(self) -> dict[str, str]:
        """The aligner's message form; 'developer' is OpenAI's newer name for 'system'."""
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.text()}


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: Literal[False] | None = Field(None, description="not supported")
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=0)] | None = None
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Any], Field(max_length=0)] | None = None
    tool_choice: Literal["none", "auto"] | None = None
    parallel_tool_calls: StrictBool | None = Field(None, description="ignored")
    metadata: dict[str, str] | None = Field(None, description="ignored")
    store: StrictBool | None = Field(None, description="ignored: nothing is stored")
    service_tier: str | None = Field(None, description="ignored")

    @field_validator("messages")
    @classmethod
    def _some_text(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not any(m.text().strip() for m in messages):
            raise ValueError("the messages hold no text: give at least one non-empty content")
        return messages


def sync_with_registry() -> None:
    """Rebuild `KadOptions` and the request bodies if rules were registered since they were
    built (`create_app` calls it), so that a new rule and its parameters are served at once."""
    global KadOptions, _BUILT_FOR
    import kad.rules as rules

    now = (rules.RULE_NAMES, rules.COLUMNS)
    if now == _BUILT_FOR:
        return
    KadOptions = kad_options_model()
    for model in (SamplingRequest, CompletionRequest, ChatCompletionRequest):
        field = FieldInfo.from_annotated_attribute(KadOptions | None, None)
        model.__pydantic_fields__["kad"] = field
        model.model_rebuild(force=True)
    _BUILT_FOR = now


# --- responses -------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str
    logprobs: None = None
    kad: dict[str, Any]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None
    kad: dict[str, Any]


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    kad: dict[str, Any]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    kad: dict[str, Any]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kad"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "invalid request"},
    404: {"model": ErrorBody, "description": "unknown model"},
    413: {"model": ErrorBody, "description": "body over --max-body-bytes"},
}
SSE_RESPONSE: dict[str, Any] = {
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
    "description": "JSON body, or server-sent events when stream is true",
}


# --- the request's rule ----------------------------------------------------------------------


def resolve_rule(default: Rule, options: KadOptions | None) -> Rule:
    """The request's rule: the server's default with the request's parameters on top.

    A parameter that the chosen rule does not take is an error rather than silently ignored.
    For the nll loss ``mu`` is the threshold λ = e^-μ (give lam or mu, not both).
    """
    given = (
        {} if options is None else options.model_dump(exclude_none=True, exclude={"speculative"})
    )
    name = rule_key(given.pop("rule", default.name))
    unknown = [k for k in given if k not in RULE_PARAMS.get(name, ())]
    if unknown:
        takes = ", ".join(RULE_PARAMS.get(name, ())) or "no parameters"
        raise APIError(
            400, f"rule {name!r} does not take {', '.join(unknown)} (it takes {takes})", param="kad"
        )
    if not given and name == rule_key(default.name):
        return default
    params: dict[str, Any] = {}
    if name == rule_key(default.name):  # keep the server's settings that the request leaves
        params = rule_params(default)
        if {"lam", "mu", "loss"} & given.keys():  # a threshold belongs to its loss: drop both
            params.pop("lam", None)
            params.pop("mu", None)
    params.update(given)
    try:
        return make_rule(name, **params)
    except KadError as error:
        raise APIError(400, str(error), param="kad") from None
