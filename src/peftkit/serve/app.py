"""The HTTP API (FastAPI) in front of an `AdapterServer`.

    POST   /v1/classify               {"adapter": NAME, "texts": [...]} -> label, label id, probabilities per text
    POST   /v1/completions            OpenAI-compatible; "model" = adapter name ("__base__" = no adapter)
    POST   /v1/chat/completions       OpenAI-compatible, through the tokenizer's chat template
    GET    /v1/models                 the adapters, as OpenAI clients list models
    GET    /v1/adapters               every adapter in the directory: state (slot / memory / disk), rank, labels, times
    POST   /v1/adapters/{name}/load   read it and put it in a slot now; returns load and switch seconds
    DELETE /v1/adapters/{name}        drop it from its slot and from memory (its files stay)
    GET    /health                    liveness, queue depth, batches run
    GET    /metrics                   Prometheus text format
    GET    /                          the web page (peftkit.serve.dashboard), reading GET /v1/dashboard and /v1/routing

Naming the adapter "auto" (classify's "adapter", completions' and chat's "model") lets the server choose
it from the input (peftkit.serve.routing); the response says which it chose ("routed_to", "routing")
and so does the X-Peftkit-Adapter header.

Every error is JSON, `{"error": {"message", "type", "code", "param"}}` (OpenAI's shape): 400 for a
malformed body or a disallowed adapter name, 404 for an unknown adapter or path, 409 for an adapter
this model cannot serve, 413 for a request over a size limit, 422 for a field with a wrong value, 503
(with Retry-After) when the queue is full, 500 when a batch fails (only that batch's requests).
Streaming (`"stream": true`) answers with server-sent events, one `data: {chunk}` per piece of
text and `data: [DONE]` at the end; see peftkit.serve.inference for how streams share batches.
"""

from __future__ import annotations

import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Literal

from peftkit.extras import require

require("fastapi", "peftkit serve (the HTTP API)")
require("uvicorn", "peftkit serve (the HTTP API)")

from fastapi import APIRouter, FastAPI  # noqa: E402  (after the check above, which names the extra to install)
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from peftkit.errors import PeftkitError
from peftkit.serve import metrics as prometheus
from peftkit.serve.batching import END_OF_STREAM, BatchError, QueueFullError, Request
from peftkit.serve.cache import AdapterMismatchError, AdapterNameError, UnknownAdapterError
from peftkit.serve.dashboard import add_dashboard_routes
from peftkit.serve.routing import AUTO_ADAPTER, routed_headers
from peftkit.serve.server import AdapterServer, RequestTooLargeError, WrongEndpointError

RETRY_AFTER_S = 1

# --- request bodies -------------------------------------------------------------------------------


class ClassifyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter: str = Field(description=f"the adapter's folder name in the adapter directory; {AUTO_ADAPTER!r}: the server "
                                     "chooses one per text (peftkit.serve.routing)")
    texts: list[str] = Field(description="texts to classify with that adapter")


class _SamplingFields(BaseModel):
    # Unknown fields are ignored, as OpenAI clients send many; the ones that would change the answer
    # and are not implemented are refused by name in `_refuse_unsupported`.
    model_config = ConfigDict(extra="ignore")
    model: str = Field(description=f"adapter name; '__base__' for the base model without adapter; {AUTO_ADAPTER!r}: "
                                   "the server chooses (peftkit.serve.routing)")
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    n: int = 1
    stop: str | list[str] | None = None
    logprobs: bool | int | None = None
    echo: bool = False
    best_of: int | None = None


class CompletionBody(_SamplingFields):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


def _refuse_unsupported(body: _SamplingFields) -> None:
    problems = []
    if body.n != 1:
        problems.append(f"n={body.n} (one choice per prompt only)")
    if body.best_of not in (None, 1):
        problems.append("best_of")
    if body.stop:
        problems.append("stop sequences")
    if body.logprobs:
        problems.append("logprobs")
    if body.echo:
        problems.append("echo")
    if problems:
        raise PeftkitError(f"not supported by this server: {', '.join(problems)}; leave them out")


# --- errors ---------------------------------------------------------------------------------------


def error_response(status: int, message: str, kind: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "code": status, "param": param}}
    return JSONResponse(body, status_code=status, headers=headers)


_ERROR_STATUS = [  # most specific first
    (AdapterNameError, 400, "invalid_request_error"),
    (UnknownAdapterError, 404, "not_found_error"),
    (AdapterMismatchError, 409, "conflict_error"),
    (RequestTooLargeError, 413, "request_too_large"),
    (WrongEndpointError, 400, "invalid_request_error"),
    (PeftkitError, 422, "invalid_request_error"),
]


def _peftkit_error(request, error: PeftkitError) -> JSONResponse:
    for kind, status, name in _ERROR_STATUS:
        if isinstance(error, kind):
            return error_response(status, str(error), name)
    return error_response(422, str(error), "invalid_request_error")


def _validation_error(request, error: RequestValidationError) -> JSONResponse:
    problems = error.errors()
    malformed = [p for p in problems if p.get("type") == "json_invalid"]
    if malformed:
        context = malformed[0].get("ctx") or {}
        return error_response(400, f"the body is not valid JSON ({context.get('error', 'parse error')}); "
                                   "send a JSON object with Content-Type: application/json", "invalid_request_error")
    parts = []
    for problem in problems[:10]:
        location = ".".join(str(part) for part in problem.get("loc", ()) if part != "body") or "body"
        parts.append(f"{location}: {problem.get('msg')}")
    first = problems[0].get("loc", ()) if problems else ()
    param = ".".join(str(part) for part in first if part != "body") or None
    return error_response(422, "invalid request: " + "; ".join(parts), "invalid_request_error", param=param)


def _http_error(request, error: StarletteHTTPException) -> JSONResponse:
    message = error.detail if isinstance(error.detail, str) else json.dumps(error.detail)
    if error.status_code == 404:
        message = f"no such endpoint: {request.method} {request.url.path}; see GET /docs for the API"
    elif error.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
    return error_response(error.status_code, message, "invalid_request_error", headers=getattr(error, "headers", None))


def _queue_full(request, error: QueueFullError) -> JSONResponse:
    return error_response(503, f"the server is busy: {error}; retry after {RETRY_AFTER_S} s", "server_overloaded",
                          headers={"Retry-After": str(RETRY_AFTER_S)})


def _batch_error(request, error: BatchError) -> JSONResponse:
    return error_response(500, f"{error}; the server keeps running, retry the request", "server_error")


def _unexpected(request, error: Exception) -> JSONResponse:
    return error_response(500, f"internal error: {type(error).__name__}: {error}", "server_error")


# Which handler answers which exception (Starlette picks the most specific type that matches).
_ERROR_HANDLERS = (
    (RequestValidationError, _validation_error),
    (StarletteHTTPException, _http_error),
    (PeftkitError, _peftkit_error),
    (QueueFullError, _queue_full),
    (BatchError, _batch_error),
    (Exception, _unexpected),
)


# --- middleware -----------------------------------------------------------------------------------


class BodySizeLimit:
    """Refuses bodies over `max_bytes` with 413 before the app parses them (declared or streamed)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send, int(declared))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([], message, receive), send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send, size)
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        return await self.app(scope, _replay([body], None, receive), send)

    async def _refuse(self, scope, receive, send, size: int):
        response = error_response(413, f"the request body has {size} bytes or more; the limit is {self.max_bytes} "
                                       "(--max-body-bytes)", "request_too_large")
        await response(scope, receive, send)


def _replay(messages: list, last, receive):
    queued = list(messages) + ([last] if last is not None else [])

    async def replayed():
        return queued.pop(0) if queued else await receive()
    return replayed


class RequestMetrics:
    """Counts every response by route, method and status, and times it (to the end of the response)."""

    def __init__(self, app, metrics: prometheus.ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = {"code": 500}

        async def recording_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "other"
            self.metrics.observe_request(endpoint, scope.get("method", ""), status["code"], time.perf_counter() - started)


# --- the app --------------------------------------------------------------------------------------


def create_app(server: AdapterServer) -> FastAPI:
    """A FastAPI app serving `server`; its lifespan starts and stops the batcher."""
    metrics = prometheus.ServerMetrics()
    server.batcher.on_batch = metrics.observe_batch

    @asynccontextmanager
    async def lifespan(app):
        await server.start()
        try:
            yield
        finally:
            await server.stop()

    app = FastAPI(title="peftkit serve", description="One base model, many LoRA adapters, mixed-adapter batches.",
                  lifespan=lifespan)
    app.state.server = server
    app.state.metrics = metrics
    app.add_middleware(BodySizeLimit, max_bytes=server.settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: counts the 413s too
    for error_type, handler in _ERROR_HANDLERS:
        app.add_exception_handler(error_type, handler)
    app.include_router(_status_routes(server, metrics))
    app.include_router(_adapter_routes(server))
    app.include_router(_completion_routes(server))
    add_dashboard_routes(app, server)
    return app


def _status_routes(server: AdapterServer, metrics: prometheus.ServerMetrics) -> APIRouter:
    """GET /health and GET /metrics."""
    routes = APIRouter()

    @routes.get("/health")
    async def health():
        return {"status": "ok", "model": server.model_name, "kind": server.kind,
                "mixed_batching": server.settings.mixed_batching, "queue_depth": server.batcher.queue_depth,
                "batches": server.batcher.batches_run, "adapters_in_slots": len(server.cache.in_slots()),
                "uptime_s": round(time.time() - server.started_at, 1)}

    @routes.get("/metrics")
    async def metrics_text():
        text = metrics.render(server.batcher.queue_depth, server.settings.max_queue, server.cache.snapshot(),
                              {"model": server.model_name, "kind": server.kind,
                               "mixed_batching": str(server.settings.mixed_batching).lower()})
        return PlainTextResponse(text, media_type=prometheus.CONTENT_TYPE)

    return routes


def _adapter_routes(server: AdapterServer) -> APIRouter:
    """The adapter directory (list, load, unload; /v1/models as OpenAI clients list it) and classification."""
    routes = APIRouter()

    @routes.get("/v1/adapters")
    async def list_adapters():
        return {"adapters": server.list_adapters(), "cache": _cache_summary(server)}

    @routes.post("/v1/adapters/{name}/load")
    async def load_adapter(name: str):
        return await server.load_adapter(name)

    @routes.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str):
        return await server.unload_adapter(name)

    @routes.get("/v1/models")
    async def list_models():
        names = [entry["name"] for entry in server.list_adapters() if "error" not in entry]
        return {"object": "list", "data": [{"id": name, "object": "model", "created": int(server.started_at),
                                            "owned_by": "peftkit"} for name in names]}

    @routes.post("/v1/classify")
    async def classify(body: ClassifyBody):
        result = await server.classify(body.adapter, body.texts)
        return JSONResponse(result, headers=routed_headers(result))

    return routes


def _completion_routes(server: AdapterServer) -> APIRouter:
    """The OpenAI-compatible text generation endpoints: /v1/completions and /v1/chat/completions."""
    routes = APIRouter()

    @routes.post("/v1/completions")
    async def completions(body: CompletionBody):
        _refuse_unsupported(body)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise PeftkitError("prompt is an empty list: give a string or a list of strings")
        if len(prompts) > server.settings.max_texts:
            raise RequestTooLargeError(f"{len(prompts)} prompts in one request; the limit is {server.settings.max_texts}")
        if body.stream and len(prompts) > 1:
            raise PeftkitError("stream=true takes one prompt; send one request per prompt")
        max_tokens = body.max_tokens if body.max_tokens is not None else 16  # OpenAI's default for completions
        prompt_ids = [server.encode_prompt(prompt=prompt) for prompt in prompts]
        adapters, routing = await server.resolve_adapters(body.model, prompts, "completions")
        requests = [server.make_completion_request(adapter, ids, max_tokens, body.temperature, body.top_p, body.stream)
                    for adapter, ids in zip(adapters, prompt_ids)]
        header = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                  "model": adapters[0] if len(set(adapters)) == 1 else body.model}
        routed = {"routed_to": adapters} if routing else {}
        if body.stream:
            server.submit(requests[0])
            return _event_stream(requests[0], header, chat=False, headers=routed_headers(routed))
        done = await server.complete(requests)
        choices = [{"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None,
                    **({"adapter": adapters[i], "routing": routing[i]} if routing else {})} for i, c in enumerate(done)]
        result = {**header, "object": "text_completion", "choices": choices, "usage": _usage(done), **routed}
        return JSONResponse(result, headers=routed_headers(result))

    @routes.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody):
        _refuse_unsupported(body)
        requested = body.max_completion_tokens or body.max_tokens
        max_tokens = requested if requested is not None else server.settings.max_tokens
        prompt_ids = server.encode_prompt(messages=[m.model_dump() for m in body.messages])
        last_user = next((m.content for m in reversed(body.messages) if m.role == "user"), body.messages[-1].content)
        adapters, routing = await server.resolve_adapters(body.model, [last_user], "chat")
        request = server.make_completion_request(adapters[0], prompt_ids, max_tokens, body.temperature, body.top_p, body.stream)
        header = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": adapters[0]}
        routed = {"routed_to": adapters, "routing": routing[0]} if routing else {}
        if body.stream:
            server.submit(request)
            return _event_stream(request, header, chat=True, headers=routed_headers(routed))
        done = await server.complete([request])
        result = {**header, "object": "chat.completion",
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": done[0].text},
                               "finish_reason": done[0].finish_reason, "logprobs": None}],
                  "usage": _usage(done), **routed}
        return JSONResponse(result, headers=routed_headers(result))

    return routes


def _usage(completions) -> dict[str, int]:
    prompt = sum(c.prompt_tokens for c in completions)
    generated = sum(len(c.token_ids) for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def _cache_summary(server: AdapterServer) -> dict:
    snapshot = server.cache.snapshot()
    snapshot.pop("adapters")
    return snapshot


def _event_stream(request: Request, header: dict, chat: bool, headers: dict[str, str] | None = None) -> StreamingResponse:
    """Server-sent events for one streaming completion: a chunk per piece of text, then the finish, then [DONE]."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish_reason: str | None = None, role: bool = False) -> str:
        if chat:
            delta = ({"role": "assistant", "content": ""} if role else {} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        return f"data: {json.dumps({**header, 'object': kind, 'choices': [choice]})}\n\n"

    async def events():
        finished = False
        try:
            if chat:
                yield chunk(None, role=True)
            while True:
                event = await request.events.get()
                if event is END_OF_STREAM:
                    break
                yield chunk(event)
            try:
                completion = request.future.result()
            except Exception as error:  # noqa: BLE001 - the stream has started: report the error in it
                status = 500 if isinstance(error, BatchError) or not isinstance(error, PeftkitError) else 409
                yield f"data: {json.dumps({'error': {'message': str(error), 'type': 'server_error', 'code': status}})}\n\n"
            else:
                yield chunk(None, finish_reason=completion.finish_reason)
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:  # the client went away: stop decoding its row, or drop it from the queue
                request.cancelled.set()
                if not request.future.done():
                    request.future.cancel()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})


def run(server: AdapterServer, host: str = "127.0.0.1", port: int = 8000, access_log: bool = True) -> None:
    """Serve `server` with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(server), host=host, port=port, access_log=access_log, log_level="info")
