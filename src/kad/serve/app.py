"""The OpenAI-compatible FastAPI app of `kad serve`.

Endpoints: ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``,
``POST /v1/completions`` and ``POST /v1/chat/completions`` (streaming as server-sent events
ending with ``data: [DONE]``, or not). Per-request KAD parameters travel in the extra body field
``"kad": {"rule", "lam", "budget", "beta", "loss", "mu", "speculative"}``; every response carries
``usage`` and a ``kad`` object with the decoding statistics (deferral rate, mean α, acceptance).

A request's path: its body is limited in bytes before it is parsed (413), its prompts in
characters before they are tokenized (400); they are tokenized once, in a thread of the pool
(neither on the event loop nor on the worker's thread), and the token ids go to the `Worker`,
which decodes all requests in flight together. A client that goes away has its job cancelled
at once, while it waits for a whole response as much as mid-stream.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kad.errors import KadError
from kad.outputs import jsonable
from kad.rules import RULE_PARAMS, Rule, rule_key
from kad.serve.schema import (
    ERROR_RESPONSES,
    SSE_RESPONSE,
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelCard,
    ModelList,
    SamplingRequest,
    Usage,
    kad_error,
    resolve_rule,
    sync_with_registry,
    validation_error,
)
from kad.serve.worker import DecodeParams, Job, JobDone, JobFailed, RowDelta, Worker

MAX_BODY_BYTES = 1 << 20
MAX_PROMPT_CHARS = 200_000

Event = RowDelta | JobDone | JobFailed


# --- statistics ------------------------------------------------------------------------------


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


def _usage(prompt_tokens: int, done: JobDone) -> Usage:
    completion = sum(len(g.token_ids) for g in done.generations)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        total_tokens=prompt_tokens + completion,
    )


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def _job_error(error: BaseException, param: str) -> APIError:
    if isinstance(error, KadError):
        return kad_error(error, param)
    return APIError(500, f"internal error: {error!r}", error_type="server_error")


# --- the connection --------------------------------------------------------------------------


class BodyLimit:
    """ASGI middleware: an HTTP body over ``max_bytes`` is answered 413 before anything parses
    it (at once when its Content-Length says so, else as soon as the bytes read pass it)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before the body ended
                first: Message = message
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                break
        replayed = False

        async def replay() -> Message:
            """The whole body as one message, then the connection's own messages."""
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return first

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        error = APIError(
            413,
            f"the request body is over {self.max_bytes} bytes, this server's limit "
            "(kad serve --max-body-bytes)",
            code="request_too_large",
        )
        await error.response()(scope, receive, send)


async def _client_gone(request: Request) -> None:
    """Return when the client disconnects (the body has been read: only that message is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@asynccontextmanager
async def _watching(request: Request) -> AsyncIterator[asyncio.Task]:
    """A task that ends when the client disconnects, for as long as the context lasts."""
    gone = asyncio.create_task(_client_gone(request))
    try:
        yield gone
    finally:
        gone.cancel()


# --- the app ---------------------------------------------------------------------------------


def create_app(
    aligner: Any,
    *,
    rule: Rule | None = None,
    speculative: int | str | None = None,
    model_id: str = "kad",
    max_rows: int = 16,
    default_max_tokens: int = 256,
    default_temperature: float = 1.0,
    default_top_p: float = 1.0,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_prompt_chars: int = MAX_PROMPT_CHARS,
) -> FastAPI:
    """An OpenAI-compatible app serving `aligner`.

    rule: the default rule (kad.Dual() if None); speculative: the default draft length (None or
    0: off; "auto"); model_id: the name clients put in "model"; max_rows: most sequences decoded
    at once (also the most a request may ask for: prompts × n); default_max_tokens: for chat
    requests without max_tokens (completions default to 16, as OpenAI's); default_temperature,
    default_top_p: for requests that set none (1 and 1, as OpenAI's); max_body_bytes: the
    largest request body (413 above); max_prompt_chars: the longest prompt, or a chat's text, in
    characters (400 above, before tokenizing).
    """
    from kad.rules import Dual

    sync_with_registry()  # the request bodies know every rule registered by now
    default_rule = Dual() if rule is None else rule
    default_speculative = None if speculative == 0 else speculative
    worker = Worker(aligner, max_rows=max_rows)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(
        title="kad",
        summary="OpenAI-compatible endpoint for KAD-aligned generation",
        version="1",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    app.state.worker = worker

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return validation_error(error).response()

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
            default_speculative
            if body.kad is None or body.kad.speculative is None
            else body.kad.speculative
        )
        return DecodeParams(
            rule=chosen,
            max_new_tokens=max_tokens,
            temperature=(
                body.temperature if "temperature" in body.model_fields_set else default_temperature
            ),
            top_p=body.top_p if "top_p" in body.model_fields_set else default_top_p,
            top_k=max(body.top_k, 0),
            stop=body.stops(),
            speculative=None if spec == 0 else spec,
        )

    async def submit(
        prompts: list[Any], chars: list[int], body: SamplingRequest, max_tokens: int, param: str
    ) -> tuple[Job, int]:
        """Check the request's size, tokenize its prompts (in the thread pool) and queue it:
        n rows per prompt. Returns the job and its prompt tokens as the proxy reads them."""
        rows = len(prompts) * body.n
        if rows > max_rows:
            raise APIError(
                400,
                f"n too large: a request may decode 1 to {max_rows} sequences (prompts × n) at "
                f"once; this one asks for {rows}",
                param="n",
            )
        longest = max(chars)
        if longest > max_prompt_chars:
            raise APIError(
                400,
                f"a prompt of {longest} characters is over this server's limit of "
                f"{max_prompt_chars} (kad serve --max-prompt-chars)",
                param=param,
                code="prompt_too_long",
            )
        params = decode_params(body, max_tokens)
        try:
            encoded = await run_in_threadpool(aligner.encode_prompts, prompts)
        except KadError as error:
            raise kad_error(error, param) from None
        prompt_ids = {
            role: [list(ids) for ids in per_prompt for _ in range(body.n)]
            for role, per_prompt in encoded.items()
        }
        try:
            job = worker.submit(
                [p for p in prompts for _ in range(body.n)], params, body.seed, prompt_ids
            )
        except KadError as error:
            raise APIError(400, str(error), param="n") from None
        return job, sum(len(ids) for ids in prompt_ids["proxy"])

    async def next_event(job: Job, gone: asyncio.Task) -> Event:
        """The job's next event; if the client leaves first, cancel the job (499)."""
        get = asyncio.ensure_future(job.events.get())
        try:
            await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
            if get.done():
                return get.result()
        finally:
            get.cancel()  # a no-op once it is done; a cancelled get leaves its item queued
        worker.cancel(job)
        raise APIError(499, "the client closed the request")

    async def until(job: Job, request: Request, param: str, whole: bool) -> RowDelta | JobDone:
        """Wait, watching the connection, for the job's first event (``whole`` False: a stream
        starts only then, so that a failure at start is still a 4xx JSON error) or for all of
        it (JobDone)."""
        try:
            async with _watching(request) as gone:
                while True:
                    event = await next_event(job, gone)
                    if isinstance(event, JobFailed):
                        raise _job_error(event.error, param)
                    if isinstance(event, JobDone) or not whole:
                        return event
        except asyncio.CancelledError:  # the server is shutting down
            worker.cancel(job)
            raise

    def summary(job: Job, generations: list[Any]) -> dict[str, Any]:
        return summary_stats(job.params.rule, job.params.speculative, generations)

    def stream(
        job: Job,
        first: RowDelta | JobDone,
        chunk: Callable[[int, str, str | None, dict[str, Any] | None], dict[str, Any]],
        header: Callable[[], dict[str, Any]],
        usage: Callable[[JobDone], Usage] | None,
        param: str,
    ) -> StreamingResponse:
        """The job's events as server-sent events; ``usage`` (if given) makes the last chunk."""

        async def events() -> AsyncIterator[str]:
            event: Event = first
            try:
                while True:
                    if isinstance(event, RowDelta):
                        if event.text:
                            yield _sse(chunk(event.row, event.text, None, None))
                    elif isinstance(event, JobDone):
                        for row, gen in enumerate(event.generations):
                            yield _sse(chunk(row, "", gen.finish_reason, choice_stats(gen)))
                        if usage is not None:
                            yield _sse(
                                {
                                    **header(),
                                    "choices": [],
                                    "usage": usage(event).model_dump(),
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
                    worker.cancel(job)  # the client went away mid-stream: free its rows

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness, and the worker's load (rows decoding, requests waiting, ...)."""
        return {"status": "ok", "model": model_id, **worker.load()}

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
        texts = body.texts()
        chars = [len(text) for text in texts]
        job, prompt_tokens = await submit(texts, chars, body, body.max_tokens or 16, "prompt")
        ident, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def header() -> dict[str, Any]:
            return {"id": ident, "object": "text_completion", "created": now, "model": model_id}

        def usage(done: JobDone) -> Usage:
            return _usage(prompt_tokens, done)

        if body.stream:

            def chunk(row: int, text: str, finish: str | None, kad: dict | None) -> dict[str, Any]:
                choice = {"index": row, "text": text, "logprobs": None, "finish_reason": finish}
                if kad is not None:
                    choice["kad"] = kad
                return {**header(), "choices": [choice]}

            first = await until(job, request, "prompt", whole=False)
            return stream(
                job, first, chunk, header, usage if body.include_usage() else None, "prompt"
            )
        done = await until(job, request, "prompt", whole=True)
        assert isinstance(done, JobDone)
        gens = done.generations
        choices = [
            CompletionChoice(
                index=i, text=g.text, finish_reason=g.finish_reason, kad=choice_stats(g)
            )
            for i, g in enumerate(gens)
        ]
        return Completion(**header(), choices=choices, usage=usage(done), kad=summary(job, gens))

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
        chars = [sum(len(m["content"]) for m in messages)]
        max_tokens = body.max_completion_tokens or body.max_tokens or default_max_tokens
        job, prompt_tokens = await submit([messages], chars, body, max_tokens, "messages")
        ident, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def header() -> dict[str, Any]:
            return {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": now,
                "model": model_id,
            }

        def usage(done: JobDone) -> Usage:
            return _usage(prompt_tokens, done)

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

            first = await until(job, request, "messages", whole=False)
            return stream(
                job, first, chunk, header, usage if body.include_usage() else None, "messages"
            )
        done = await until(job, request, "messages", whole=True)
        assert isinstance(done, JobDone)
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
            usage=usage(done),
            kad=summary(job, gens),
        )

    return app
