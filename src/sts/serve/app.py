"""The OpenAI-compatible HTTP routes over one :class:`~sts.api.LLM` whose scheduler runs in its own thread.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream``: server-sent
events in OpenAI's chunk format, ended by ``data: [DONE]``), ``GET /v1/models`` (and ``/v1/models/{id}``), ``GET /health``
and ``GET /metrics`` (Prometheus). With an API key every route but ``/health`` needs
``Authorization: Bearer KEY``. Every error is answered with OpenAI's body
(``{"error": {"message", "type", "param", "code"}}``): 400 for a request that cannot be
served as asked, 401 without the key, 404 for an unknown model or route, 413 for a body past the
server's limit (refused unread: by its Content-Length, else once that many bytes have come), 415 for a
body sent as anything but JSON (see :func:`require_json`), 429 when the queue is full, 500 when decoding
fails inside (that request only: the server goes on).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
from collections.abc import Sequence
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sts.api import LLM
from sts.errors import STSError
from sts.serve.metrics import CONTENT_TYPE, Metrics
from sts.serve.options import default_max_request_bytes
from sts.serve.protocol import (APIError, ChatRequest, CompletionRequest, Reply, _Body, check_body, error_body,
                                policy_settings, usage)
from sts.serve.scheduler import Delta, Request as Job, RequestError

log = logging.getLogger(__name__)

#: Seconds between checks that the client of a request without ``stream`` is still connected.
DISCONNECT_POLL_S = 0.5


#: How pydantic names the kinds of value a field of several types takes, in an error's location (``prompt.str``).
_KIND = re.compile(r"(str|int|float|bool|dict|list|none)(\[.*\])?|[A-Z]\w*")


def _field_path(loc: Sequence[Any]) -> tuple[str | None, str | None]:
    """Return a validation error's field as a request names it (``messages.0.content``; None: the body) and, for a field
    taking several kinds of value, the kind whose check failed (``str``, ``list[int]``; else None)."""
    parts: list[str] = []
    for item in loc:
        if item == "body" and not parts:
            continue
        if isinstance(item, str) and _KIND.fullmatch(item):
            return ".".join(parts) or None, item
        parts.append(str(item))
    return ".".join(parts) or None, None


def api_error(exc: BaseException) -> APIError:
    """Return the HTTP error for an exception: user errors 4xx, anything else 500."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestError):
        return APIError(exc.status, str(exc), exc.param, exc.code)
    if isinstance(exc, STSError):
        return APIError(400, str(exc))
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="internal_error")


class _CountResponses:
    """ASGI middleware that counts responses by route and status (pure ASGI: streams and disconnects pass untouched)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.http_response(scope["path"], message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


class _LimitBody:
    """ASGI middleware that answers ``refusal`` (a 413) to a request body past ``limit`` bytes without reading on: at
    once when its Content-Length says so, else (chunked) as soon as more has come; a body within it goes on whole.
    The refusal says ``Connection: close`` and the server then closes the connection: the rest of the body is
    never read, so the connection cannot carry another request (and an endless body stops there).

    (Starlette's own limit, ``FastAPI(max_body_size=...)``, answers a Content-Length past it in plain text, whatever
    the exception handlers say.)
    """

    def __init__(self, app: ASGIApp, limit: int, refusal: APIError) -> None:
        self.app, self.limit, self.refusal = app, limit, refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.limit:
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its body ended: nobody to answer
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            more = message.get("more_body", False)
        whole: Message | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> Message:
            nonlocal whole
            if whole is None:
                return await receive()  # after the body: the disconnect
            message, whole = whole, None
            return message

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = _error_response(self.refusal)
        response.headers["connection"] = "close"
        await response(scope, receive, send)


class _Flight:
    """One submitted request as the event loop sees it: its deltas arrive from the scheduler's thread."""

    def __init__(self, llm: LLM, ids: list[int], body: _Body, max_tokens: int | None, http: Request) -> None:
        self.llm, self.http = llm, http
        params = llm.params(len(ids), max_tokens, body.temperature, body.top_p, body.top_k, body.stop, body.seed,
                            body.ignore_eos, body.budget)
        loop = asyncio.get_running_loop()
        self.deltas: asyncio.Queue[Delta] = asyncio.Queue()
        self.job: Job = llm.submit(ids, params, lambda d: loop.call_soon_threadsafe(self.deltas.put_nowait, d))
        self.next_check = loop.time() + DISCONNECT_POLL_S

    async def next(self, poll: bool) -> Delta | None:
        """Return the next delta; with ``poll``, None once the client has gone (the request is then cancelled).

        The client is checked every :data:`DISCONNECT_POLL_S` seconds, whether or not deltas keep coming.
        """
        if not poll:
            return await self.deltas.get()
        loop = asyncio.get_running_loop()
        while True:
            if loop.time() >= self.next_check:
                self.next_check = loop.time() + DISCONNECT_POLL_S
                if await self.http.is_disconnected():
                    self.cancel()
                    return None
            try:
                return await asyncio.wait_for(self.deltas.get(), max(0.0, self.next_check - loop.time()))
            except asyncio.TimeoutError:
                continue

    def cancel(self) -> None:
        """Free the request's slot if it still decodes."""
        if self.job.finish_reason is None:
            self.llm.scheduler.cancel(self.job)

    def usage(self) -> dict[str, int]:
        return usage(len(self.job.prompt_ids), len(self.job.token_ids))


def require_json(http: Request) -> None:
    """Refuse (415) a POST whose Content-Type is not JSON (``application/json`` or ``application/*+json``, parameters
    such as a charset aside; none is not JSON either): FastAPI's rule, under which the routes would otherwise get the
    raw bytes and answer a 400 that does not say why.

    Such bodies are not read as JSON on purpose: a web page may make a browser POST a body as text, a form or untyped
    to any address without asking the server first (CORS), and a server that read those as JSON would let any page its
    user opens run requests on a server on their machine (FastAPI's CVE-2021-32677, and its strict content type).
    """
    given = http.headers.get("content-type", "")
    kind, _, subtype = given.partition(";")[0].strip().lower().partition("/")
    if kind != "application" or not (subtype == "json" or subtype.endswith("+json")):
        sent = f"got {given!r}" if given else "none was sent"
        raise APIError(415, f"Content-Type must be application/json, {sent}", code="unsupported_media_type")


def _error_response(exc: BaseException) -> JSONResponse:
    """Return the JSON error response for an exception (the scheduler has logged internal ones)."""
    err = api_error(exc)
    return JSONResponse(err.body(), status_code=err.status)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"  # ASCII: no client can split a line inside it


def create_app(llm: LLM, model_name: str, api_key: str | None = None, max_request_bytes: int | None = None) -> FastAPI:
    """Return the server's ASGI app over ``llm`` (its scheduler runs in its own thread while the app runs).

    ``api_key``: the Bearer token every route but /health requires (None: none; empty: STSError, since a bare
    "Bearer" header would match it). ``max_request_bytes``: the largest request body taken (default:
    :func:`~sts.serve.options.default_max_request_bytes` of ``llm``'s context); a larger one is a 413.
    """
    if api_key is not None and not api_key.strip():
        raise STSError("the API key is empty: give a key, or None to serve without one")
    metrics = Metrics(max(llm.gamma, 1))
    llm.scheduler.observer = metrics
    settings = llm.settings | policy_settings(llm.method, llm.options)  # as /v1/models reports them
    limit = max_request_bytes if max_request_bytes is not None else default_max_request_bytes(llm.max_model_len)
    too_large = APIError(413, f"the request body is larger than this server's limit of {limit} bytes",
                         code="request_too_large")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        llm.start()
        try:
            yield
        finally:
            llm.stop()

    app = FastAPI(title="sts", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_LimitBody, limit=limit, refusal=too_large)
    app.add_middleware(_CountResponses, metrics=metrics)  # the outer: it counts the 413s too

    def authorize(http: Request) -> None:
        if api_key is None:
            return
        header = http.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "a valid API key is needed: Authorization: Bearer KEY", code="invalid_api_key")

    guarded = [Depends(authorize)]
    posted = [*guarded, Depends(require_json)]  # after the key: a client without it learns nothing more

    @app.exception_handler(APIError)
    async def on_api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(STSError)
    async def on_user_error(_: Request, exc: STSError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        param, kind = _field_path(first.get("loc", ()))
        if first.get("type") == "json_invalid":
            message, param = "the body is not valid JSON", None
        elif kind is not None:  # a field taking several kinds of value: one error per kind, one message for all
            paths = [_field_path(error.get("loc", ())) for error in errors]
            kinds = dict.fromkeys(k for field, k in paths if field == param and k)
            message = f"{param}: must be one of {', '.join(kinds)}"
        else:
            message = f"{param or 'body'}: {first.get('msg', 'invalid request')}"
        return JSONResponse(error_body(message, "invalid_request_error", param, first.get("type")), status_code=400)

    @app.exception_handler(HTTPException)
    async def on_http(_: Request, exc: HTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, UnicodeDecodeError):  # FastAPI's "error parsing the body" for a body not UTF-8
            return JSONResponse(error_body(f"the body is not valid JSON: {exc.__cause__}", "invalid_request_error",
                                           code="json_invalid"), status_code=400)
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def on_internal(_: Request, exc: Exception) -> JSONResponse:
        log.error("internal error", exc_info=exc)
        return _error_response(exc)

    def served(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}", "model",
                           "model_not_found")

    def check(body: _Body) -> None:
        served(body.model)
        check_body(body, settings)

    async def answer(reply: Reply, body: _Body, ids: list[int], max_tokens: int | None, http: Request) -> Response:
        flight = _Flight(llm, ids, body, max_tokens, http)
        try:
            first = await flight.next(poll=True)
        except BaseException:
            flight.cancel()
            raise
        if first is None:
            return Response(status_code=499)  # the client has gone: nobody reads this
        if first.error is not None:
            return _error_response(first.error)
        if body.stream:
            # The background task also runs when the client leaves before the stream has started.
            return StreamingResponse(_stream(reply, body, flight, first), media_type="text/event-stream",
                                     background=BackgroundTask(flight.cancel))
        try:
            text, last = [first.text], first
            while last.finish_reason is None:
                delta = await flight.next(poll=True)
                if delta is None:
                    return Response(status_code=499)
                if delta.error is not None:
                    return _error_response(delta.error)
                text.append(delta.text)
                last = delta
        finally:
            flight.cancel()
        job = flight.job
        ids = (job.token_ids, job.prompt_ids) if body.return_token_ids else (None, None)
        return JSONResponse(reply.full("".join(text), last.finish_reason, flight.usage(), job.stats.summary(), *ids))

    async def _stream(reply: Reply, body: _Body, flight: _Flight, first: Delta) -> AsyncIterator[str]:
        try:
            if reply.kind == "chat":
                yield _sse(reply.chunk(None, role=True))
            delta: Delta | None = first
            while delta is not None:
                if delta.error is not None:
                    yield _sse(api_error(delta.error).body())
                    break
                ids = delta.token_ids if body.return_token_ids else None
                if delta.text or ids:
                    yield _sse(reply.chunk(delta.text, token_ids=ids))
                if delta.finish_reason is not None:
                    yield _sse(reply.chunk(None if reply.kind == "chat" else "", delta.finish_reason))
                    if body.include_usage:
                        yield _sse(reply.usage_chunk(flight.usage()))
                    break
                delta = await flight.next(poll=False)
            yield "data: [DONE]\n\n"
        finally:
            flight.cancel()  # a client that disconnects mid-stream cancels this generator: free the slot

    @app.post("/v1/completions", dependencies=posted)
    async def completions(body: CompletionRequest, http: Request) -> Response:
        check(body)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError(400, f"give one prompt per request, got {len(prompt)}", "prompt")
            prompt = prompt[0]
        ids = await run_in_threadpool(llm.prompt_ids, prompt)  # type: ignore[arg-type]
        return await answer(Reply("completion", model_name), body, ids, body.max_tokens, http)

    @app.post("/v1/chat/completions", dependencies=posted)
    async def chat_completions(body: ChatRequest, http: Request) -> Response:
        check(body)
        messages = [m.template_input(i) for i, m in enumerate(body.messages)]
        ids = await run_in_threadpool(llm.chat_ids, messages)
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await answer(Reply("chat", model_name), body, ids, limit, http)

    card = {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "sts",
            "max_model_len": llm.max_model_len, "sts": settings}  # created: when the server started

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{name:path}", dependencies=guarded)
    async def model(name: str) -> dict[str, Any]:
        served(name)
        return card

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = llm.scheduler.started
        return JSONResponse({"status": "ok" if ok else "scheduler stopped"}, status_code=200 if ok else 503)

    @app.get("/metrics", dependencies=guarded)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app
