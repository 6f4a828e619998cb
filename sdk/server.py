"""OpenAI-compatible HTTP server (FastAPI + uvicorn): `flashport serve PATH`.

    flashport serve samples/models/flash-small --port 8000 [--api-key KEY]
    curl localhost:8000/v1/chat/completions -d '{"model": "flash-small", "messages": [{"role": "user", "content": "Hi"}]}'

Endpoints: POST /v1/chat/completions (SSE with "stream": true; `reasoning_content` in thinking mode, chosen by
`reasoning_effort` or the extension field `thinking`; `tools`/`tool_choice`), POST /v1/completions, GET /v1/models,
GET /health, GET /metrics (Prometheus text).

All requests share one model: a single engine thread (flashport.scheduler) batches the decode steps of every
running sequence. The OpenAI API is stateless, so a `PrefixPool` of recent sequences' KV snapshots lets a request
that re-sends a conversation reuse the KV of the previous turn (reported as `usage.prompt_tokens_details.
cached_tokens` and in /metrics); an engine with a disk prefix cache (`prefill_cached`) is used on a miss.

Errors are OpenAI-shaped: {"error": {"message", "type", "param", "code"}} with 400 (bad JSON, bad UTF-8, wrong
types, too many tokens), 401 (API key), 404 (unknown model or route), 413 (body too large), 429 (queue full).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat import MODES, encode_chat
from .engine import Engine
from .scheduler import QueueFull, Scheduler, SchedulerClosed, Sequence
from .session import PrefixPool, turn_boundaries

log = logging.getLogger("flashport.server")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- request schemas (strict: "1" is not a number, 1 is not a string) ------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class _Function(_Strict):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict | None = None


class _Tool(_Strict):
    type: Literal["function"] = "function"
    function: _Function


class _CallFunction(_Strict):
    name: str
    arguments: str | dict = "{}"


class _ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: _CallFunction


class _Part(_Strict):
    model_config = ConfigDict(strict=True, extra="allow")
    type: str
    text: str | None = None


class _Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_Part] | None = None
    reasoning_content: str | None = None
    tool_calls: list[_ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class _StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)  # one choice per request


class ChatRequest(_Sampling):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    tools: list[_Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "max", "xhigh"] | None = None
    thinking: bool | None = None  # extension: thinking mode on/off
    logprobs: bool | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None


# ---- metrics ----------------------------------------------------------------------------------------------------
class Metrics:
    """Counters and gauges in Prometheus text format (no client library: a handful of lines)."""

    COUNTERS = {
        "prompt_tokens_total": "Prompt tokens of finished requests",
        "prefill_tokens_total": "Prompt tokens run through the model (the rest came from the KV cache)",
        "generation_tokens_total": "Generated tokens",
        "kv_reused_tokens_total": "Prompt tokens whose KV was reused from a cached prefix",
        "kv_hits_total": "Requests that reused a cached prefix",
        "kv_lookups_total": "Requests that looked for a cached prefix",
        "cancelled_total": "Generations cancelled (client disconnected)",
    }

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.counters = dict.fromkeys(self.COUNTERS, 0)

    def count_request(self, path: str, status: int):
        with self._lock:
            self.requests[(path, status)] = self.requests.get((path, status), 0) + 1

    def add(self, **kv):
        with self._lock:
            for k, v in kv.items():
                self.counters[k] += v

    def render(self, scheduler: Scheduler) -> str:
        lines = ["# HELP flashport_requests_total HTTP requests by path and status",
                 "# TYPE flashport_requests_total counter"]
        with self._lock:
            lines += [f'flashport_requests_total{{path="{p}",code="{c}"}} {n}'
                      for (p, c), n in sorted(self.requests.items())]
            for k, v in self.counters.items():
                lines += [f"# HELP flashport_{k} {self.COUNTERS[k]}", f"# TYPE flashport_{k} counter",
                          f"flashport_{k} {v}"]
        gauges = {"queue_depth": ("Requests waiting for the engine", scheduler.queue_depth),
                  "running_sequences": ("Sequences in the running batch", len(scheduler.active)),
                  "engine_steps_total": ("Batched forward passes", scheduler.steps),
                  "engine_batch_rows_total": ("Sequences summed over forward passes", scheduler.batch_rows)}
        for k, (doc, v) in gauges.items():
            kind = "counter" if k.endswith("_total") else "gauge"
            lines += [f"# HELP flashport_{k} {doc}", f"# TYPE flashport_{k} {kind}", f"flashport_{k} {v}"]
        return "\n".join(lines) + "\n"


# ---- the app ------------------------------------------------------------------------------------------------------
class _Pipe:
    """Engine-thread callbacks -> an asyncio queue on the server's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def put(self, item):
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed (shutdown): nobody is listening any more
            pass

    def on_text(self, kind: str, text: str):
        self.put((kind, text))

    def on_token(self, seq: Sequence, tok: int | None):
        if tok is None:
            self.put(("done", None))


class Server:
    def __init__(self, engine: Engine, model_name: str | None = None, api_key: str | None = None,
                 max_queue: int = 64, max_batch: int = 32, max_body: int = 1 << 20, max_context: int = 0,
                 default_max_tokens: int = 256, prefix_pool: int = 16):
        self.engine, self.tok = engine, engine.tokenizer
        self.model_name = model_name or (engine.path.name if engine.path else engine.cfg.name)
        self.api_key, self.max_body = api_key, max_body
        self.max_context = min(max_context or engine.cfg.max_position_embeddings, engine.cfg.max_position_embeddings)
        self.default_max_tokens = default_max_tokens
        self.scheduler = Scheduler(engine, max_queue=max_queue, max_batch=max_batch)
        self.pool = PrefixPool(self.tok, capacity=prefix_pool) if prefix_pool else None
        self.metrics = Metrics()
        self.created = int(time.time())

    # -- request handling ------------------------------------------------------------------------------------------
    async def read_json(self, request) -> dict:
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            raise ApiError(413, f"request body of {length} bytes exceeds the limit of {self.max_body}",
                           code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body:
                raise ApiError(413, f"request body exceeds the limit of {self.max_body} bytes",
                               code="request_too_large")
        try:
            text = bytes(body).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ApiError(400, f"request body is not valid UTF-8 (byte {e.start})", code="invalid_utf8") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ApiError(400, f"malformed JSON in request body: {e.msg} at line {e.lineno} column {e.colno}",
                           code="invalid_json") from None
        if not isinstance(obj, dict):
            raise ApiError(400, "request body must be a JSON object", code="invalid_json")
        return obj

    def validate(self, schema: type[BaseModel], obj: dict):
        try:
            req = schema.model_validate(obj)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise ApiError(400, f"{loc}: {err['msg']} (got {_short(err.get('input'))})", param=loc) from None
        if req.model != self.model_name:
            raise ApiError(404, f"the model {req.model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        return req

    def start(self, ids: list[int], req, max_tokens: int, *, thinking=False, tools=False, chat=True) -> Sequence:
        """Check the token budget, find reusable KV and submit a sequence."""
        if len(ids) + max_tokens > self.max_context:
            raise ApiError(400, f"this request needs {len(ids)} prompt + {max_tokens} completion tokens, more than "
                                f"the context limit of {self.max_context}", param="messages" if chat else "prompt",
                           code="context_length_exceeded")
        bad = next((i for i in ids if not 0 <= i < self.engine.cfg.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} outside the vocabulary [0, {self.engine.cfg.vocab_size})",
                           param="prompt")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4:
            raise ApiError(400, "at most 4 stop sequences", param="stop")
        run_ids, reused, snap = self.pool.lookup(ids) if self.pool else (ids, 0, None)
        seq = Sequence(run_ids, max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                       stop=tuple(stop), snap_at=turn_boundaries(run_ids, self.tok) if chat else (), start=snap,
                       thinking=thinking, tokenizer=self.tok, tool_calls=tools)
        pipe = _Pipe(asyncio.get_running_loop())
        seq.on_text, seq.on_token = pipe.on_text, self._on_token(pipe)
        seq.pipe = pipe
        try:
            self.scheduler.submit(seq)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}; retry later", type="rate_limit_error",
                           code="rate_limit_exceeded") from None
        except SchedulerClosed as e:
            raise ApiError(503, str(e), type="server_error") from None
        return seq

    def _on_token(self, pipe: _Pipe):
        def on_token(seq: Sequence, tok):
            if tok is not None:
                return
            if seq.finish_reason in ("stop", "length"):
                self.metrics.add(prompt_tokens_total=len(seq.prompt), prefill_tokens_total=seq.prefilled,
                                 generation_tokens_total=len(seq.output), kv_reused_tokens_total=seq.reused,
                                 kv_hits_total=int(seq.reused > 0), kv_lookups_total=1)
                if self.pool is not None:
                    self.pool.store(seq.prompt + seq.output[:-1], seq.snapshots)
            elif seq.finish_reason == "cancelled":
                self.metrics.add(cancelled_total=1)
            pipe.on_token(seq, None)
        return on_token

    async def events(self, seq: Sequence, request):
        """(kind, text) pieces until the sequence is done; cancels it if the client goes away."""
        try:
            while True:
                try:
                    kind, text = await asyncio.wait_for(seq.pipe.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        seq.cancel()
                        return
                    continue
                if kind == "done":
                    return
                yield kind, text
        finally:
            if not seq.done.is_set():
                seq.cancel()  # the client disconnected (the stream was closed or the task cancelled)

    def usage(self, seq: Sequence) -> dict:
        return {"prompt_tokens": len(seq.prompt), "completion_tokens": len(seq.output),
                "total_tokens": len(seq.prompt) + len(seq.output),
                "prompt_tokens_details": {"cached_tokens": seq.reused}}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _mode(req: ChatRequest) -> str:
    effort = req.reasoning_effort
    if req.thinking is False or effort in ("none", "minimal"):
        return "chat"
    if effort in ("max", "xhigh"):
        return "thinking-max"
    return "thinking" if (req.thinking or effort) else "chat"


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(engine: Engine, **options):
    """The FastAPI app serving `engine`; options as for `Server` (model_name, api_key, max_queue, max_batch,
    max_body, max_context, default_max_tokens, prefix_pool). `app.state.server` holds the Server."""
    srv = Server(engine, **options)

    @asynccontextmanager
    async def lifespan(app):
        srv.scheduler.start()
        yield
        log.info("shutting down: draining %d running and %d waiting sequences", len(srv.scheduler.active),
                 srv.scheduler.queue_depth)
        srv.scheduler.stop(drain=True)
        if callable(getattr(engine, "close", None)):  # flushes the disk KV writer
            engine.close()

    app = FastAPI(title="flashport", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = srv

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e):
        kind = "not_found" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                     type=kind).body(), status_code=e.status_code)

    @app.middleware("http")
    async def auth_and_count(request: Request, call_next):
        path = request.url.path
        if srv.api_key and path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {srv.api_key}":
                srv.metrics.count_request(path, 401)
                return JSONResponse(ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                             code="invalid_api_key").body(), status_code=401)
        try:
            response = await call_next(request)
        except Exception:  # a bug: answer in the OpenAI shape, keep serving
            log.exception("request failed: %s", path)
            response = JSONResponse(ApiError(500, "internal server error", type="server_error").body(),
                                    status_code=500)
        known = path if path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health",
                                 "/metrics") else "other"
        srv.metrics.count_request(known, response.status_code)
        return response

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": srv.model_name, "queue_depth": srv.scheduler.queue_depth,
                "running": len(srv.scheduler.active)}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(srv.metrics.render(srv.scheduler), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": srv.model_name, "object": "model", "created": srv.created,
                                            "owned_by": "flashport"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatRequest = srv.validate(ChatRequest, await srv.read_json(request))
        if req.logprobs:
            raise ApiError(400, "logprobs are not supported", param="logprobs")
        mode = _mode(req)
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
        if isinstance(req.tool_choice, dict):
            name = (req.tool_choice.get("function") or {}).get("name")
            if name not in {t["function"]["name"] for t in tools}:
                raise ApiError(400, f"tool_choice names the function {name!r}, which is not in tools",
                               param="tool_choice")
        if req.tool_choice == "none":
            tools = []
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        try:
            ids = encode_chat(srv.tok, messages, tools or None, mode)
        except (ValueError, TypeError, KeyError) as e:
            raise ApiError(400, f"cannot render messages: {e}", param="messages") from None
        except Exception as e:  # e.g. lone UTF-16 surrogates the tokenizer cannot take
            raise ApiError(400, f"cannot tokenize messages: {e}", param="messages") from None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = srv.default_max_tokens if max_tokens is None else max_tokens
        thinking = MODES[mode][0]
        seq = srv.start(ids, req, max_tokens, thinking=thinking, tools=bool(tools))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(delta: dict, finish=None, **extra) -> dict:
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": srv.model_name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}

        def tool_calls() -> list[dict]:
            return [{"id": f"call_{uuid.uuid4().hex[:24]}", **c} for c in seq.text.tool_calls]

        def finish_reason(calls) -> str:
            return "tool_calls" if calls else seq.finish_reason

        if req.stream:
            async def stream():
                yield _sse(chunk({"role": "assistant", "content": ""}))
                async for kind, text in srv.events(seq, request):
                    yield _sse(chunk({"reasoning_content" if kind == "reasoning" else "content": text}))
                if seq.finish_reason == "error":
                    yield _sse(ApiError(500, f"generation failed: {seq.error}", type="server_error").body())
                elif seq.done.is_set() and seq.finish_reason != "cancelled":
                    calls = tool_calls()
                    if calls:
                        yield _sse(chunk({"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}))
                    yield _sse(chunk({}, finish_reason(calls)))
                    if req.stream_options and req.stream_options.include_usage:
                        yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                                    "model": srv.model_name, "choices": [], "usage": srv.usage(seq)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        if (unfinished := await _wait_unstreamed(srv, seq, request)) is not None:
            return unfinished
        calls = tool_calls()
        message = {"role": "assistant", "content": seq.text.content if (seq.text.content or not calls) else None}
        if thinking:
            message["reasoning_content"] = seq.text.reasoning
        if calls:
            message["tool_calls"] = calls
        return {"id": rid, "object": "chat.completion", "created": created, "model": srv.model_name,
                "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(calls),
                             "logprobs": None}],
                "usage": srv.usage(seq), "system_fingerprint": f"flashport-{engine.cfg.name}"}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = srv.validate(CompletionRequest, await srv.read_json(request))
        if req.echo or req.logprobs is not None or req.suffix is not None:
            raise ApiError(400, "echo, logprobs and suffix are not supported", param="echo")
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ApiError(400, "one prompt per request", param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise ApiError(400, "empty prompt", param="prompt")
        try:
            ids = engine.encode(prompt)
        except Exception as e:
            raise ApiError(400, f"cannot tokenize prompt: {e}", param="prompt") from None
        max_tokens = srv.default_max_tokens if req.max_tokens is None else req.max_tokens
        seq = srv.start(ids, req, max_tokens, chat=False)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def body(text: str, finish=None) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": srv.model_name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        if req.stream:
            async def stream():
                async for _, text in srv.events(seq, request):
                    yield _sse(body(text))
                if seq.finish_reason == "error":
                    yield _sse(ApiError(500, f"generation failed: {seq.error}", type="server_error").body())
                elif seq.done.is_set() and seq.finish_reason != "cancelled":
                    yield _sse(body("", seq.finish_reason))
                    if req.stream_options and req.stream_options.include_usage:
                        yield _sse({**body(""), "choices": [], "usage": srv.usage(seq)})
                yield "data: [DONE]\n\n"

            return StreamingResponse(stream(), media_type="text/event-stream")
        if (unfinished := await _wait_unstreamed(srv, seq, request)) is not None:
            return unfinished
        return {**body(seq.text.content, seq.finish_reason), "usage": srv.usage(seq)}

    return app


class BackgroundServer:
    """uvicorn serving `app` from a thread on a free loopback port (tests, benchmarks, embedding in an app).

        with BackgroundServer(create_app(engine)) as bg:
            openai.OpenAI(base_url=bg.url + "/v1", api_key="-")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0):
        import socket

        import uvicorn

        if not port:
            with socket.socket() as sock:
                sock.bind((host, 0))
                port = sock.getsockname()[1]
        self.app, self.host, self.port, self.url = app, host, port, f"http://{host}:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    timeout_graceful_shutdown=10))
        self.thread = threading.Thread(target=self.server.run, name="flashport-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)

    def stop(self):
        """Graceful: running requests finish, then the scheduler drains and the engine is closed."""
        self.server.should_exit = True
        self.thread.join(timeout=60)

    def __enter__(self) -> "BackgroundServer":
        return self

    def __exit__(self, *exc):
        self.stop()


async def _wait_unstreamed(srv, seq, request):
    """Wait for a non-streamed sequence to finish. None when it did; the 499 response when the client left; a
    generation failure raises (500)."""
    async for _ in srv.events(seq, request):
        pass
    if seq.finish_reason == "error":
        raise ApiError(500, f"generation failed: {seq.error}", type="server_error")
    if seq.finish_reason == "cancelled" or not seq.done.is_set():
        return JSONResponse(ApiError(499, "client closed the request", code="cancelled").body(), 499)
    return None


def serve_cli(path: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, api_key_file: str = "",
              max_queue: int = 64, max_batch: int = 32, max_body: int = 1 << 20, max_context: int = 0,
              max_tokens: int = 256, backend: str = "auto", execution_provider: str = "", plugin_ep_library: str = "",
              backend_option: str | tuple = "", device: str = "", deterministic: bool = False,
              model_name: str = "", kv_dir: str = "", kv_strategy: str = "periodic:4096", prefix_pool: int = 16,
              log_level: str = "info", shutdown_timeout: float = 30.0, ep: int = 0, pg_backend: str = "gloo",
              timeout: float = 30.0, max_device_memory: str = "", offload_tier: str = "host", kv_dtype: str = "fp32"):
    """Serve PATH (a checkpoint or bundle directory) with an OpenAI-compatible API.

    host: 127.0.0.1 by default (this machine only); api_key: required as `Authorization: Bearer KEY` on /v1/*
    (default: the first line of api_key_file, else $FLASHPORT_API_KEY, else none; prefer the file or the
    variable: a command line is visible to every user of the machine); max_queue: waiting requests before 429; max_batch: sequences decoded
    together; max_body: request bytes before 413; max_context: prompt + completion token limit (0: the model's);
    max_tokens: default completion length; model_name: the id clients send (default: the directory's name);
    kv_dir: disk KV cache directory; prefix_pool: recent conversations kept for KV reuse across requests (0: off);
    shutdown_timeout: seconds to finish running requests on Ctrl-C. The engine flags (backend, execution
    provider, KV, ep, offload) are those of `flashport generate`; with ep > 1 rank 0 serves and the other ranks
    serve their experts.
    """
    from .engine import run_command
    from .options import OptionError, engine_options, flags_of

    opts = engine_options(backend, execution_provider, plugin_ep_library, backend_option, device, deterministic,
                          kv_dir, kv_strategy, kv_dtype, max_device_memory, offload_tier, ep, pg_backend, timeout)
    if api_key_file:
        try:
            api_key = Path(api_key_file).read_text().splitlines()[0].strip() or None
        except (OSError, IndexError, UnicodeDecodeError) as e:
            raise OptionError(f"--api-key-file {api_key_file}: cannot read a key from it ({e.__class__.__name__})") from None
    api_key = api_key or os.environ.get("FLASHPORT_API_KEY") or None
    command = ["serve", path, *flags_of(serve_cli, locals(), skip=("api_key", "api_key_file"))]

    def serve(engine):
        if engine.ep_runner is not None:
            print(f"flashport: expert parallelism over {engine.ep_runner.ep.world} ranks", flush=True)
        run_server(engine, host, port, api_key, log_level, shutdown_timeout, model_name=model_name or None,
                   max_queue=max_queue, max_batch=max_batch, max_body=max_body, max_context=max_context,
                   default_max_tokens=max_tokens, prefix_pool=prefix_pool)

    return run_command(path, opts, serve, command, {"FLASHPORT_API_KEY": api_key} if api_key else None)


def run_server(engine: Engine, host: str, port: int, api_key: str | None, log_level: str = "info",
               shutdown_timeout: float = 30.0, **app_options) -> None:
    """Serve `engine` with uvicorn until Ctrl-C (used by `flashport serve` and by rank 0 under `--ep`)."""
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("listening on %s without an API key: anyone who can reach this port can use the model", host)
    app = create_app(engine, api_key=api_key, **app_options)
    print(f"flashport: serving {app.state.server.model_name!r} on http://{host}:{port}/v1", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout)


__all__ = ["create_app", "serve_cli", "BackgroundServer", "Server", "ApiError", "Metrics", "ChatRequest", "CompletionRequest"]
