"""`kad serve`: an OpenAI-compatible HTTP endpoint for a KAD-aligned pair.

Endpoints: ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``,
``POST /v1/completions`` and ``POST /v1/chat/completions`` (streaming as server-sent events
ending with ``data: [DONE]``, or not). Per-request KAD parameters travel in the extra body field
``"kad": {"rule", "lam", "budget", "beta", "loss", "mu", "speculative"}``; every response carries
``usage`` and a ``kad`` object with the decoding statistics (deferral rate, mean α, acceptance).

Requests in flight are decoded together by `kad.scheduler.Scheduler`. Bad input gets an
OpenAI-style error body ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from kad.errors import ContextLengthError, KadError, PromptError
from kad.outputs import jsonable
from kad.rules import LOSSES, RULE_NAMES, RULE_PARAMS, Rule, make_rule, rule_key, rule_params
from kad.serve.worker import DecodeParams, Job, JobDone, JobFailed, RowDelta
from kad.serve.worker import Worker as Scheduler
from kad.speculative import parse_speculative

RuleName = Literal[
    "dual", "primal", "nudging", "implicit-reward", "implicit_reward", "base", "proxy"
]
UNSUPPORTED = ("echo", "logprobs", "best_of", "suffix", "presence_penalty", "frequency_penalty")
SEED_MAX = 2**63 - 1
StopText = Annotated[str, Field(min_length=1)]
POLL_S = 0.5  # how often a waiting request checks whether its client is still there


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
        self.detail = {"message": message, "type": error_type, "param": param, "code": code}

    def body(self) -> dict[str, Any]:
        return {"error": self.detail}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _kad_error(error: KadError, param: str) -> APIError:
    code = "context_length_exceeded" if isinstance(error, ContextLengthError) else None
    return APIError(
        400, str(error), param=param if isinstance(error, PromptError) else None, code=code
    )


def _validation_error(error: RequestValidationError) -> APIError:
    problems = error.errors()
    first = problems[0] if problems else {}
    if first.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('msg')}", code="invalid_json")
    param = _field(first) or None
    return APIError(
        400, "; ".join(_problem(e) for e in problems), param=param, code="invalid_value"
    )


def _field(problem: dict[str, Any]) -> str:
    return ".".join(str(p) for p in problem.get("loc", ()) if p != "body")


def _problem(problem: dict[str, Any]) -> str:
    name = _field(problem) or "body"
    if problem.get("type") == "extra_forbidden":
        return f"unknown field {name!r}"
    if name in UNSUPPORTED:
        return f"{name} is not supported by this server (leave it out)"
    return f"{name}: {problem.get('msg')}"


# --- request bodies --------------------------------------------------------------------------


class KadOptions(BaseModel):
    """Per-request KAD parameters; fields left out keep the server's defaults."""

    model_config = ConfigDict(extra="forbid")

    rule: RuleName | None = Field(None, description="deferral rule or baseline")
    lam: float | None = Field(None, ge=0, description="dual / nudging threshold λ")
    budget: float | None = Field(None, ge=0, le=1, description="primal budget b")
    beta: float | None = Field(None, ge=-100, le=100, description="implicit-reward β")
    loss: Literal["nll", "squared", "margin", "zero_one"] | None = None
    mu: float | None = Field(None, ge=0, description="dual threshold μ for losses other than nll")
    speculative: Annotated[int, Field(ge=0, le=16)] | Literal["auto"] | None = Field(
        None, description="draft length γ of speculative decoding; 0 turns it off; 'auto'"
    )


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopText | Annotated[list[StopText], Field(max_length=4)] | None = None
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    user: str | None = None
    presence_penalty: float | None = Field(None, ge=0, le=0, description="only 0 is supported")
    frequency_penalty: float | None = Field(None, ge=0, le=0, description="only 0 is supported")
    kad: KadOptions | None = None

    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk (``stream_options.include_usage``)."""
        return self.stream_options is not None and self.stream_options.include_usage

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(SamplingRequest):
    prompt: str | Annotated[list[str], Field(min_length=1)] = Field(
        ..., description="a prompt or a list of prompts"
    )
    max_tokens: int | None = Field(16, ge=1)
    echo: Literal[False] = False
    logprobs: None = Field(None, description="not supported")
    best_of: Literal[1] | None = None
    suffix: None = Field(None, description="not supported")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def to_message(self) -> dict[str, str]:
        """The aligner's message form; 'developer' is OpenAI's newer name for 'system'."""
        text = (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        )
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": text}


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: Literal[False] | None = Field(None, description="not supported")


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
}
SSE_RESPONSE: dict[str, Any] = {
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
    "description": "JSON body, or server-sent events when stream is true",
}


# --- rules and statistics --------------------------------------------------------------------


def resolve_rule(default: Rule, options: KadOptions | None) -> Rule:
    """The request's rule: the server's default with the request's parameters on top.

    A parameter that the chosen rule does not take is an error rather than silently ignored.
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


def choice_stats(generation: Any) -> dict[str, Any]:
    """One choice's `kad.GenerationStats`, without the fields that do not apply (None)."""
    return {k: jsonable(v) for k, v in generation.stats.to_dict().items() if v is not None}


def summary_stats(rule: Rule, speculative: Any, generations: list[Any]) -> dict[str, Any]:
    """The response's `kad` object: the rule and its parameters, and token-weighted means of the
    per-choice statistics."""
    params = {
        k: getattr(rule, k) for k in RULE_PARAMS.get(rule_key(rule.name), ()) if hasattr(rule, k)
    }
    summary: dict[str, Any] = {"rule": rule.name, **{k: jsonable(v) for k, v in params.items()}}
    summary["speculative"] = speculative
    stats = [g.stats for g in generations]
    for key in ("deferral_rate", "mean_alpha", "mean_tv", "acceptance", "tokens_per_base_forward"):
        pairs = [(getattr(s, key), s.tokens) for s in stats if getattr(s, key) is not None]
        pairs = [(v, w) for v, w in pairs if math.isfinite(v)]
        weight = sum(w for _, w in pairs)
        summary[key] = sum(v * w for v, w in pairs) / weight if weight else None
    return summary


def _usage(done: JobDone) -> Usage:
    """Tokens read and written; a prompt counts once per choice, as the proxy renders it."""
    prompt = sum(done.prompt_tokens)
    completion = sum(len(g.token_ids) for g in done.generations)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


# --- the app ---------------------------------------------------------------------------------


def create_app(
    aligner: Any,
    *,
    rule: Rule | None = None,
    speculative: int | str | None = None,
    model_id: str = "kad",
    max_batch: int = 16,
    default_max_tokens: int = 256,
) -> FastAPI:
    """An OpenAI-compatible app serving `aligner`.

    rule: the default rule (kad.Dual() if None); speculative: the default draft length (None or
    0: off; "auto"); model_id: the name clients put in "model"; max_batch: most rows decoded at
    once (also the most a request may ask for: prompts × n); default_max_tokens: for chat
    requests without max_tokens (completions default to 16, as OpenAI's).
    """
    from kad.rules import Dual

    default_rule = Dual() if rule is None else rule
    scheduler = Scheduler(aligner, max_rows=max_batch)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(
        title="kad",
        summary="OpenAI-compatible endpoint for KAD-aligned generation",
        version="1",
        lifespan=lifespan,
    )
    app.state.scheduler = scheduler

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return _validation_error(error).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return APIError(error.status_code, str(error.detail)).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, error: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {error!r}", error_type="server_error").response()

    def check_model(name: str) -> None:
        if name != model_id:
            raise APIError(
                404,
                f"the model {name!r} does not exist: this server serves {model_id!r}",
                param="model",
                code="model_not_found",
            )

    def decode_params(body: SamplingRequest, max_tokens: int) -> DecodeParams:
        chosen = resolve_rule(default_rule, body.kad)
        spec = (
            speculative
            if body.kad is None or body.kad.speculative is None
            else body.kad.speculative
        )
        spec = None if spec == 0 else spec
        return DecodeParams(
            rule=chosen,
            max_new_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=body.stops(),
            speculative=spec,
        )

    def summary(job: Job, generations: list[Any]) -> dict[str, Any]:
        return summary_stats(job.params.rule, job.params.speculative, generations)

    def submit(rows: list[Any], params: DecodeParams, seed: int | None) -> Job:
        try:
            return scheduler.submit(rows, params, seed)
        except KadError as error:
            raise APIError(400, f"n too large: {error}", param="n") from None

    async def next_event(job: Job, request: Request) -> RowDelta | JobDone | JobFailed:
        """The job's next event, checking every POLL_S that the client is still there (before a
        response starts; once a stream runs, Starlette cancels it on disconnect)."""
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), timeout=POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    scheduler.cancel(job)
                    raise APIError(499, "the client closed the request") from None

    async def run_job(job: Job, request: Request, param: str) -> JobDone:
        """Wait for a whole job (non-streaming): its results, or an APIError."""
        try:
            while True:
                event = await next_event(job, request)
                if isinstance(event, JobDone):
                    return event
                if isinstance(event, JobFailed):
                    raise _job_error(event.error, param)
        except asyncio.CancelledError:  # the server is shutting down
            scheduler.cancel(job)
            raise

    async def first_event(job: Job, request: Request, param: str) -> RowDelta | JobDone:
        """Wait for the job's first event before answering a stream, so that a failure at start
        (e.g. a prompt over the context) is still a 4xx JSON error rather than a broken stream."""
        try:
            event = await next_event(job, request)
        except asyncio.CancelledError:
            scheduler.cancel(job)
            raise
        if isinstance(event, JobFailed):
            raise _job_error(event.error, param)
        return event

    def stream(
        job: Job,
        first: RowDelta | JobDone,
        chunk: Callable[[int, str, str | None, dict[str, Any] | None], dict[str, Any]],
        header: Callable[[], dict[str, Any]],
        include_usage: bool,
        param: str,
    ) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            event: RowDelta | JobDone | JobFailed = first
            try:
                while True:
                    if isinstance(event, RowDelta):
                        if event.text:
                            yield _sse(chunk(event.row, event.text, None, None))
                    elif isinstance(event, JobDone):
                        for row, gen in enumerate(event.generations):
                            yield _sse(chunk(row, "", gen.finish_reason, choice_stats(gen)))
                        if include_usage:
                            yield _sse(
                                {
                                    **header(),
                                    "choices": [],
                                    "usage": _usage(event).model_dump(),
                                    "kad": summary(job, event.generations),
                                }
                            )
                        break
                    else:
                        yield _sse(_job_error(event.error, param).body())
                        break
                    event = await job.events.get()
                yield _sse("[DONE]")
            finally:
                if not isinstance(event, (JobDone, JobFailed)):
                    scheduler.cancel(job)  # the client went away mid-stream: free its rows

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness, and the scheduler's load: rows decoding and requests waiting."""
        return {"status": "ok", "model": model_id, **scheduler.load()}

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_id, created=created)])

    @app.get("/v1/models/{model}", response_model=ModelCard, responses=ERROR_RESPONSES)
    async def get_model(model: str) -> ModelCard:
        check_model(model)
        return ModelCard(id=model_id, created=created)

    @app.post(
        "/v1/completions",
        response_model=Completion,
        responses={**ERROR_RESPONSES, 200: SSE_RESPONSE},
    )
    async def completions(body: CompletionRequest, request: Request) -> Any:
        """Text completion of one prompt or a list of prompts; choice i·n + j is prompt i's j-th."""
        check_model(body.model)
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        params = decode_params(body, body.max_tokens or 16)
        rows = [text for text in texts for _ in range(body.n)]
        job = submit(rows, params, body.seed)
        ident, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def header() -> dict[str, Any]:
            return {"id": ident, "object": "text_completion", "created": now, "model": model_id}

        if body.stream:

            def chunk(row: int, text: str, finish: str | None, kad: dict | None) -> dict[str, Any]:
                choice = {"index": row, "text": text, "logprobs": None, "finish_reason": finish}
                if kad is not None:
                    choice["kad"] = kad
                return {**header(), "choices": [choice]}

            first = await first_event(job, request, "prompt")
            return stream(job, first, chunk, header, body.include_usage(), "prompt")
        done = await run_job(job, request, "prompt")
        gens = done.generations
        choices = [
            CompletionChoice(
                index=i, text=g.text, finish_reason=g.finish_reason, kad=choice_stats(g)
            )
            for i, g in enumerate(gens)
        ]
        return Completion(**header(), choices=choices, usage=_usage(done), kad=summary(job, gens))

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        responses={**ERROR_RESPONSES, 200: SSE_RESPONSE},
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        """Chat: the proxy reads the messages through its chat template, the base as a plain
        transcript."""
        check_model(body.model)
        messages = [m.to_message() for m in body.messages]
        max_tokens = body.max_completion_tokens or body.max_tokens or default_max_tokens
        params = decode_params(body, max_tokens)
        job = submit([messages] * body.n, params, body.seed)
        ident, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def header() -> dict[str, Any]:
            return {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": now,
                "model": model_id,
            }

        if body.stream:
            started: set[int] = set()

            def chunk(row: int, text: str, finish: str | None, kad: dict | None) -> dict[str, Any]:
                delta: dict[str, Any] = {} if finish else {"content": text}
                if row not in started:
                    started.add(row)
                    delta = {"role": "assistant", **delta}
                choice = {"index": row, "delta": delta, "logprobs": None, "finish_reason": finish}
                if kad is not None:
                    choice["kad"] = kad
                return {**header(), "choices": [choice]}

            first = await first_event(job, request, "messages")
            return stream(job, first, chunk, header, body.include_usage(), "messages")
        done = await run_job(job, request, "messages")
        gens = done.generations
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=g.text),
                finish_reason=g.finish_reason,
                kad=choice_stats(g),
            )
            for i, g in enumerate(gens)
        ]
        return ChatCompletion(
            id=ident,
            created=now,
            model=model_id,
            choices=choices,
            usage=_usage(done),
            kad=summary(job, gens),
        )

    return app


def _job_error(error: BaseException, param: str) -> APIError:
    if isinstance(error, KadError):
        return _kad_error(error, param)
    return APIError(500, f"internal error: {error!r}", error_type="server_error")


# --- the command -----------------------------------------------------------------------------


def load_aligner(
    base: str | None,
    proxy: str | None,
    proxy_base: str | None = None,
    *,
    dtype: str | None = None,
    device: str | None = None,
    fast: bool | None = None,
) -> Any:
    """The pair to serve: the models given, or the built-in pair (with its proxy base, and the
    base reading questions as web text) when neither --base nor --proxy is."""
    from kad.aligner import Aligner

    if (base is None) != (proxy is None):
        raise KadError("give both --base and --proxy, or neither (to serve the built-in pair)")
    if base is not None:
        return Aligner.from_pretrained(
            base, proxy, proxy_base, dtype=dtype, device=device, fast=fast
        )
    from kad.world import builtin_aligner

    return builtin_aligner(proxy_base=proxy_base or True, dtype=dtype, device=device, fast=fast)


def set_cpu_threads(aligner: Any, threads: int | None = None) -> None:
    """Torch's CPU threads: ``threads``, or all cores but one when the base runs on the CPU.

    Torch's OpenMP threads spin while they wait; on every core they starve the event loop
    thread that serves HTTP (on 2 cores with 64 clients, 2 threads served 5-20x fewer
    requests/s than 1; scripts/load_test.py --threads measures it)."""
    import os

    import torch

    if threads is None:
        if aligner.members["base"].model.device.type != "cpu":
            return
        threads = max(1, (os.cpu_count() or 1) - 1)
    torch.set_num_threads(threads)


def serve_command(
    base: Annotated[
        str | None,
        typer.Option(help="base model: local dir, .gguf file or Hub id (default: built-in pair)"),
    ] = None,
    proxy: Annotated[
        str | None, typer.Option(help="aligned proxy model (default: built-in pair)")
    ] = None,
    proxy_base: Annotated[
        str | None, typer.Option(help="the proxy's unaligned base (for the implicit-reward rule)")
    ] = None,
    rule: Annotated[str, typer.Option(help=f"default rule: {', '.join(RULE_NAMES)}")] = "dual",
    lam: Annotated[float | None, typer.Option(help="λ of the dual / nudging rule")] = None,
    budget: Annotated[float | None, typer.Option(help="b of the primal rule")] = None,
    beta: Annotated[float | None, typer.Option(help="β of the implicit-reward rule")] = None,
    mu: Annotated[float | None, typer.Option(help="μ of the dual rule with a non-nll loss")] = None,
    loss: Annotated[
        str, typer.Option(help=f"loss of the dual/primal rules: {', '.join(LOSSES)}")
    ] = "nll",
    speculative: Annotated[
        str | None, typer.Option(help="speculative decoding with the proxy as drafter: N or 'auto'")
    ] = None,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    max_batch: Annotated[int, typer.Option(help="most sequences decoded together")] = 16,
    model_name: Annotated[str, typer.Option(help="the model id clients send")] = "kad",
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16")] = None,
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, cuda:1, ... (default: auto)")
    ] = None,
    fast: Annotated[
        bool | None,
        typer.Option(
            "--fast/--no-fast", help="static KV caches and CUDA graphs (default: on a GPU)"
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(help="torch CPU threads (default on CPU: all cores but one, for HTTP)"),
    ] = None,
) -> None:
    """Serve a KAD-aligned pair behind an OpenAI-compatible API (completions and chat)."""
    import uvicorn

    if (base is None) != (proxy is None):
        raise KadError("give both --base and --proxy, or neither (to serve the built-in pair)")
    chosen = make_rule(rule, lam=lam, budget=budget, beta=beta, loss=loss, mu=mu)
    gamma = parse_speculative(speculative)  # None, γ >= 1 or "auto"
    if max_batch < 1:
        raise KadError(f"--max-batch must be >= 1, got {max_batch}")
    if threads is not None and threads < 1:
        raise KadError(f"--threads must be >= 1, got {threads}")
    if chosen.needs_proxy_base and proxy_base is None and base is not None:
        raise KadError(f"the {chosen.name} rule needs the proxy's unaligned base: add --proxy-base")
    aligner = load_aligner(base, proxy, proxy_base, dtype=dtype, device=device, fast=fast)
    set_cpu_threads(aligner, threads)
    app = create_app(
        aligner, rule=chosen, speculative=gamma, model_id=model_name, max_batch=max_batch
    )
    pair = "the built-in pair" if base is None else f"{Path(proxy).name} steering {Path(base).name}"
    typer.echo(f"serving {model_name!r} ({pair}) at http://{host}:{port}/v1")
    uvicorn.run(app, host=host, port=port, log_level="info")
