"""OpenAI-compatible HTTP server (FastAPI + uvicorn): `flashport serve PATH`.

    flashport serve samples/models/flash-small --port 8000 [--api-key KEY]
    curl localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "Hi"}]}'

Endpoints: POST /v1/chat/completions (SSE with "stream": true; `reasoning_content` in thinking mode, chosen by
`reasoning_effort` or the extension field `thinking`; `tools`/`tool_choice`; Quick Instruction with a `task` field
on the last user message), POST /v1/completions, GET /v1/models, GET /v1/models/{id}, GET /health, GET /metrics
(Prometheus text through prometheus_client).

All requests share one model: a single engine thread (flashport.scheduler) batches the decode steps of every
running sequence. The OpenAI API is stateless, so a `PrefixPool` of recent sequences' KV snapshots lets a request
that re-sends a conversation reuse the KV of the previous turn (reported as `usage.prompt_tokens_details.
cached_tokens` and in /metrics); an engine with a disk prefix cache (`prefill_cached`) is used on a miss.

Errors are OpenAI-shaped: {"error": {"message", "type", "param", "code"}} with 400 (bad JSON, JSON nested deeper
than `MAX_JSON_DEPTH`, bad UTF-8, wrong types or values, too many tokens), 401 (API key), 404 (unknown model or
route), 413 (body too large), 429 (queue full), 500 (one generation failed), 503 (shutting down, engine dead).

Fault containment: the request is validated (pydantic models below, strict types and ranges) before any work;
tokenization runs on a small thread pool with a time bound, never on the event loop or the engine thread; a
failure inside the engine fails that request alone (flashport.scheduler); `/health` answers 503 when the engine
thread has died; a client that disconnects cancels its generation, streamed or not.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat import MODES, encode_chat
from .engine import SEED_RANGE, Engine
from .kv import available_memory, kv_layout
from .scheduler import EngineDead, QueueFull, Scheduler, SchedulerClosed, Sequence
from .session import PrefixPool, turn_boundaries
from .tokenizer import TASK_TOKENS

log = logging.getLogger("flashport.server")

MAX_JSON_DEPTH = 64  # JSON nesting a request may use (tool parameter schemas are the deepest real ones, ~10)
BYTES_PER_TOKEN = 16  # request-body bytes allowed per context token when the body limit is derived
KV_MEMORY_FRACTION = 0.5  # of the memory available at start (weights loaded) that the KV may take by default


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


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


class _NamedFunction(_Strict):
    name: str = Field(min_length=1)


class _ToolChoice(_Strict):
    type: Literal["function"] = "function"
    function: _NamedFunction


class _ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]


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
    task: str | None = None  # Quick Instruction (release extension): on the last user message only


class _StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str | None = None  # optional: the served model
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)  # one choice per request


class ChatRequest(_Sampling):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[_Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | _ToolChoice | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "max", "xhigh"] | None = None
    thinking: bool | None = None  # extension: thinking mode on/off
    logprobs: bool | None = None
    response_format: _ResponseFormat | None = None
    functions: Any = None  # legacy function calling: refused with a pointer to `tools`
    function_call: Any = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None


# ---- limits -------------------------------------------------------------------------------------------------------
def default_max_context(cfg, sequences: int, available: int | None = None,
                        fraction: float = KV_MEMORY_FRACTION) -> int:
    """The longest prompt + completion (tokens) the server admits when `max_context` is not given.

    `fraction` of the memory available now (bytes; flashport.kv.available_memory, read after the weights are loaded)
    is shared by `sequences` KV states (the running batch plus the prefix pool's conversations), each costing the
    model's KV bytes per token in the runtime's fp32 layout (flashport.kv.kv_layout: compressed entries and indexer
    keys) plus its fixed per-sequence state. Rounded down to the KV block (`cfg.kv_block_tokens`), at least one
    block, at most `cfg.max_position_embeddings`. Unknown memory (0) gives the model's limit.
    """
    limit = cfg.max_position_embeddings
    avail = available_memory() if available is None else available
    if avail <= 0:
        return limit
    lay = kv_layout(cfg)
    per_seq = avail * fraction / max(sequences, 1) - lay.fixed_per_seq
    tokens = int(per_seq / max(lay.compressed_per_token, 1e-9))
    block = max(cfg.kv_block_tokens, 1)
    return max(block, min(limit, tokens // block * block))


def json_depth(obj) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0, [] is 1), without recursion."""
    depth, stack = 0, [(obj, 1)]
    while stack:
        value, d = stack.pop()
        if isinstance(value, dict):
            value = value.values()
        elif not isinstance(value, list):
            continue
        depth = max(depth, d)
        stack.extend((v, d + 1) for v in value if isinstance(v, (dict, list)))
    return depth


def parse_json_body(body: bytes, max_depth: int = MAX_JSON_DEPTH) -> dict:
    """A request body -> its JSON object, or ApiError 400 (not UTF-8, malformed, not an object, nested deeper than
    `max_depth`). The C parser stops at Python's recursion limit with RecursionError (caught); the depth check then
    keeps deeper-than-useful structures away from validation, repr and rendering, which recurse too."""
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not valid UTF-8 (byte {e.start})", code="invalid_utf8") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(400, f"malformed JSON in request body: {e.msg} at line {e.lineno} column {e.colno}",
                       code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, f"request body nests JSON deeper than {max_depth} levels", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    if json_depth(obj) > max_depth:
        raise ApiError(400, f"request body nests JSON deeper than {max_depth} levels", code="invalid_json")
    return obj


# ---- metrics ------------------------------------------------------------------------------------------------------
class Metrics:
    """Prometheus metrics (prometheus_client, one registry per server): request counts, token counters, latency
    histograms, and the scheduler's gauges read at scrape time."""

    COUNTERS = {
        "prompt_tokens_total": "Prompt tokens of finished requests",
        "prefill_tokens_total": "Prompt tokens run through the model (the rest came from the KV cache)",
        "generation_tokens_total": "Generated tokens",
        "kv_reused_tokens_total": "Prompt tokens whose KV was reused from a cached prefix",
        "kv_hits_total": "Requests that reused a cached prefix",
        "kv_lookups_total": "Requests that looked for a cached prefix",
        "cancelled_total": "Generations cancelled (client disconnected)",
        "failed_total": "Generations that failed inside the engine (the request got an error, the server went on)",
    }
    LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
    RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)

    def __init__(self, scheduler: Scheduler):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = reg = CollectorRegistry()
        self.requests = Counter("flashport_requests", "HTTP requests by path and status", ["path", "code"],
                                registry=reg)
        self.counters = {k: Counter(f"flashport_{k.removesuffix('_total')}", doc, registry=reg)
                         for k, doc in self.COUNTERS.items()}
        self.ttft = Histogram("flashport_time_to_first_token_seconds",
                              "Request arrival to the first generated token (validation, queue, prefill)",
                              buckets=self.LATENCY_BUCKETS, registry=reg)
        self.latency = Histogram("flashport_request_latency_seconds",
                                 "Request arrival to the end of its generation", buckets=self.LATENCY_BUCKETS,
                                 registry=reg)
        self.tokens_per_second = Histogram("flashport_generation_tokens_per_second",
                                           "Decode rate of a request after its first token",
                                           buckets=self.RATE_BUCKETS, registry=reg)
        reg.register(_SchedulerCollector(scheduler))

    def count_request(self, path: str, status: int):
        self.requests.labels(path, str(status)).inc()

    def add(self, **kv):
        for k, v in kv.items():
            self.counters[k].inc(v)

    def observe(self, seq: Sequence, t_request: float):
        """Record a finished sequence's time to first token, latency (seconds from `t_request`) and decode rate."""
        if seq.t_first:
            self.ttft.observe(max(seq.t_first - t_request, 0.0))
        self.latency.observe(max(seq.t_done - t_request, 0.0))
        if len(seq.output) > 1 and seq.t_done > seq.t_first > 0:
            self.tokens_per_second.observe((len(seq.output) - 1) / (seq.t_done - seq.t_first))

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _SchedulerCollector:
    """The scheduler's live figures, read at scrape time."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.scheduler
        yield GaugeMetricFamily("flashport_queue_depth", "Requests waiting for the engine", value=s.queue_depth)
        yield GaugeMetricFamily("flashport_running_sequences", "Sequences in the running batch", value=len(s.active))
        yield GaugeMetricFamily("flashport_engine_up", "1 while the engine thread is alive", value=int(s.alive))
        yield CounterMetricFamily("flashport_engine_steps", "Batched forward passes", value=s.steps)
        yield CounterMetricFamily("flashport_engine_batch_rows", "Sequences summed over forward passes",
                                  value=s.batch_rows)


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
    """Request handling shared by the endpoints. Limits (all configurable):

    max_context: prompt + completion tokens per request; 0 derives it from the memory available at start
      (`default_max_context` over max_batch + prefix_pool sequences), capped at the model's limit.
    max_body: request bytes; 0 derives it from the context, `BYTES_PER_TOKEN` x max_context, at least 1 MiB.
    tokenize_timeout: seconds a request's tokenization may take (on `tokenize_threads` worker threads) before 400.
    default_max_tokens: completion length when a request gives none, capped to the context left.
    Raises RequestError for an engine without a tokenizer (the API's replies are text).
    """

    def __init__(self, engine: Engine, model_name: str | None = None, api_key: str | None = None,
                 max_queue: int = 64, max_batch: int = 32, max_body: int = 0, max_context: int = 0,
                 default_max_tokens: int = 256, prefix_pool: int = 16, tokenize_timeout: float = 10.0,
                 tokenize_threads: int = 2):
        # the API takes and returns text: refuse a token-ids-only model here, not on every request
        self.engine, self.tok = engine, engine.require_tokenizer()
        self.model_name = model_name or (engine.path.name if engine.path else engine.cfg.name)
        self.api_key = api_key
        limit = engine.cfg.max_position_embeddings
        self.max_context = min(max_context or default_max_context(engine.cfg, max_batch + prefix_pool), limit)
        self.max_body = max_body or max(1 << 20, BYTES_PER_TOKEN * self.max_context)
        self.default_max_tokens = default_max_tokens
        self.tokenize_timeout = tokenize_timeout
        self._tokenizer_pool = ThreadPoolExecutor(tokenize_threads, thread_name_prefix="flashport-tokenize")
        self.scheduler = Scheduler(engine, max_queue=max_queue, max_batch=max_batch)
        self.pool = PrefixPool(self.tok, capacity=prefix_pool) if prefix_pool else None
        self.metrics = Metrics(self.scheduler)
        self.created = int(time.time())
        log.info("limits: context %d tokens, body %d bytes, queue %d, batch %d", self.max_context, self.max_body,
                 max_queue, max_batch)

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
        return parse_json_body(body)

    def validate(self, schema: type[BaseModel], obj: dict):
        try:
            req = schema.model_validate(obj)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise ApiError(400, f"{loc}: {err['msg']} (got {_short(err.get('input'))})", param=loc) from None
        if req.model is not None and req.model != self.model_name:
            raise ApiError(404, f"the model {req.model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        return req

    async def tokenize(self, fn, *args, param: str) -> list[int]:
        """Run a tokenization off the event loop and the engine thread, bounded by `tokenize_timeout` seconds."""
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(self._tokenizer_pool, fn, *args),
                                          self.tokenize_timeout)
        except asyncio.TimeoutError:
            raise ApiError(400, f"tokenizing the {param} took longer than {self.tokenize_timeout:g} s",
                           param=param, code="tokenization_timeout") from None
        except ApiError:
            raise
        except (ValueError, TypeError, KeyError) as e:
            raise ApiError(400, f"cannot render {param}: {e}", param=param) from None
        except Exception as e:  # e.g. lone UTF-16 surrogates the tokenizer cannot take
            raise ApiError(400, f"cannot tokenize {param}: {e}", param=param) from None

    async def start(self, ids: list[int], req, max_tokens: int | None, *, thinking=False, tools=False, chat=True,
                    task: str | None = None, t_request: float = 0.0) -> Sequence:
        """Check the token budget, find reusable KV and submit a sequence. max_tokens None: the default, capped to
        the context the prompt leaves (as llama-server and vLLM do). The prefix-pool lookup and the snapshot points
        are linear in the prompt, so they run on the tokenizer threads too, not on the event loop."""
        param = "messages" if chat else "prompt"
        left = self.max_context - len(ids)
        if max_tokens is None:
            max_tokens = min(self.default_max_tokens, left)
        if max_tokens < 1 or len(ids) + max_tokens > self.max_context:
            raise ApiError(400, f"this request needs {len(ids)} prompt + {max(max_tokens, 1)} completion tokens, more "
                                f"than the context limit of {self.max_context}", param=param,
                           code="context_length_exceeded")
        bad = next((i for i in ids if not 0 <= i < self.engine.cfg.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} outside the vocabulary [0, {self.engine.cfg.vocab_size})",
                           param="prompt")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4:
            raise ApiError(400, "at most 4 stop sequences", param="stop")
        if not self.scheduler.alive:
            raise ApiError(503, f"the engine has stopped: {self.scheduler.failure}", type="server_error",
                           code="engine_dead")
        def find_kv():
            run_ids, _, snap = self.pool.lookup(ids) if self.pool else (ids, 0, None)
            return run_ids, snap, turn_boundaries(run_ids, self.tok) if chat and not task else ()

        loop = asyncio.get_running_loop()
        run_ids, snap, snap_at = await loop.run_in_executor(self._tokenizer_pool, find_kv)
        seq = Sequence(run_ids, max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                       stop=tuple(stop), snap_at=snap_at, start=snap, thinking=thinking, tokenizer=self.tok,
                       tool_calls=tools)
        pipe = _Pipe(loop)
        seq.on_text, seq.on_token = pipe.on_text, self._on_token(pipe)
        seq.pipe, seq.task, seq.t_request = pipe, task, t_request or time.perf_counter()
        try:
            self.scheduler.submit(seq)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}; retry later", type="rate_limit_error",
                           code="rate_limit_exceeded") from None
        except EngineDead as e:
            raise ApiError(503, str(e), type="server_error", code="engine_dead") from None
        except SchedulerClosed as e:
            raise ApiError(503, str(e), type="server_error") from None
        return seq

    def _on_token(self, pipe: _Pipe):
        def on_token(seq: Sequence, tok):
            if tok is not None:
                return
            try:
                if seq.finish_reason in ("stop", "length"):
                    self.metrics.add(prompt_tokens_total=len(seq.prompt), prefill_tokens_total=seq.prefilled,
                                     generation_tokens_total=len(seq.output), kv_reused_tokens_total=seq.reused,
                                     kv_hits_total=int(seq.reused > 0), kv_lookups_total=1)
                    self.metrics.observe(seq, seq.t_request)
                    # a Quick Instruction is a side branch: the conversation's own trace stays as it was
                    if self.pool is not None and seq.task is None:
                        self.pool.store(seq.prompt + seq.output[:-1], seq.snapshots)
                elif seq.finish_reason == "cancelled":
                    self.metrics.add(cancelled_total=1)
                elif seq.finish_reason == "error":
                    self.metrics.add(failed_total=1)
            finally:
                pipe.on_token(seq, None)
        return on_token

    async def events(self, seq: Sequence, request):
        """(kind, text) pieces until the sequence is done. Polls for a client disconnect every 0.5 s, also while
        pieces keep arriving, and cancels the sequence when the client has gone."""
        loop = asyncio.get_running_loop()
        next_poll = loop.time() + 0.5
        try:
            while True:
                try:
                    kind, text = await asyncio.wait_for(seq.pipe.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    kind = text = None
                if kind == "done":
                    return
                if kind is not None:
                    yield kind, text
                if loop.time() >= next_poll:
                    next_poll = loop.time() + 0.5
                    if await request.is_disconnected():
                        seq.cancel()
                        return
        finally:
            if not seq.done.is_set():
                seq.cancel()  # the client disconnected (the stream was closed or the task cancelled)

    def usage(self, seq: Sequence) -> dict:
        return {"prompt_tokens": len(seq.prompt), "completion_tokens": len(seq.output),
                "total_tokens": len(seq.prompt) + len(seq.output),
                "prompt_tokens_details": {"cached_tokens": seq.reused}}

    def failure(self, seq: Sequence) -> ApiError:
        """The error a request gets when its sequence failed in the engine (500; 503 when the engine died)."""
        e = seq.error
        if isinstance(e, EngineDead):
            return ApiError(503, str(e), type="server_error", code="engine_dead")
        return ApiError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error",
                        code="generation_failed")

    def close(self):
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)


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
    max_body, max_context, default_max_tokens, prefix_pool, tokenize_timeout, tokenize_threads).
    `app.state.server` holds the Server."""
    srv = Server(engine, **options)

    @asynccontextmanager
    async def lifespan(app):
        srv.scheduler.start()
        yield
        log.info("shutting down: draining %d running and %d waiting sequences", len(srv.scheduler.active),
                 srv.scheduler.queue_depth)
        srv.scheduler.stop(drain=True)
        srv.close()
        if callable(getattr(engine, "close", None)):  # flushes the disk KV writer
            engine.close()

    app = FastAPI(title="flashport", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = srv

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e):
        return ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}").response()

    app.add_middleware(_Guard, server=srv)

    @app.get("/health")
    async def health():
        body = {"status": "ok", "model": srv.model_name, "queue_depth": srv.scheduler.queue_depth,
                "running": len(srv.scheduler.active)}
        if not srv.scheduler.alive:  # a load balancer must take this replica out
            return JSONResponse({**body, "status": "error", "reason": f"engine thread died: {srv.scheduler.failure}"},
                                status_code=503)
        ops = getattr(srv.engine.model, "ops", None)
        degraded = list(getattr(ops, "degraded", None) or [])
        if degraded:  # still serving, on the reference for these ops: correct, slower
            body.update(status="degraded", degraded_ops=degraded,
                        backend=getattr(getattr(ops, "backend", None), "name", None))
        return body

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return PlainTextResponse(srv.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict:
        return {"id": srv.model_name, "object": "model", "created": srv.created, "owned_by": "flashport"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != srv.model_name:
            raise ApiError(404, f"the model {model_id!r} does not exist; this server serves {srv.model_name!r}",
                           param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        t_request = time.perf_counter()
        req: ChatRequest = srv.validate(ChatRequest, await srv.read_json(request))
        if req.logprobs:
            raise ApiError(400, "logprobs are not supported", param="logprobs")
        if req.functions is not None or req.function_call is not None:
            raise ApiError(400, "the legacy `functions` / `function_call` fields are not supported; send the same "
                                "definitions as `tools` (and `tool_choice`)",
                           param="functions" if req.functions is not None else "function_call")
        if req.response_format is not None and req.response_format.type != "text":
            raise ApiError(400, f"response_format {req.response_format.type!r} is not supported (no constrained "
                                "decoding); only 'text'", param="response_format")
        mode = _mode(req)
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
        if isinstance(req.tool_choice, _ToolChoice):
            name = req.tool_choice.function.name
            if name not in {t["function"]["name"] for t in tools}:
                raise ApiError(400, f"tool_choice names the function {name!r}, which is not in tools",
                               param="tool_choice")
        if req.tool_choice == "none":
            tools = []
        task = _task(req.messages)
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        ids = await srv.tokenize(encode_chat, srv.tok, messages, tools or None, mode, param="messages")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        thinking = MODES[mode][0] and task is None  # a task's reply is plain text
        seq = await srv.start(ids, req, max_tokens, thinking=thinking, tools=bool(tools) and task is None, task=task,
                        t_request=t_request)
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
                    yield _sse(srv.failure(seq).body())
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
        t_request = time.perf_counter()
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
        if isinstance(prompt, str):
            ids = await srv.tokenize(engine.encode, prompt, param="prompt")
        else:
            ids = engine.encode(prompt)  # token ids: no tokenizer work
        seq = await srv.start(ids, req, req.max_tokens, chat=False, t_request=t_request)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def body(text: str, finish=None) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": srv.model_name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}

        if req.stream:
            async def stream():
                async for _, text in srv.events(seq, request):
                    yield _sse(body(text))
                if seq.finish_reason == "error":
                    yield _sse(srv.failure(seq).body())
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


def _task(messages: list[_Message]) -> str | None:
    """The Quick Instruction task of a request: allowed only on its last message, a user turn (or the tool result
    that closes one), and only a release task name; anything else is a 400 naming the message and the task."""
    task = None
    for i, m in enumerate(messages):
        if m.task is None:
            continue
        if m.task not in TASK_TOKENS:
            raise ApiError(400, f"messages.{i}.task: unknown Quick Instruction task {m.task!r}; expected one of "
                                f"{', '.join(sorted(TASK_TOKENS))}", param=f"messages.{i}.task",
                           code="unknown_task")
        if i != len(messages) - 1 or m.role not in ("user", "tool"):
            raise ApiError(400, f"messages.{i}.task: the task {m.task!r} must be on the last message, a user turn "
                                f"(this is message {i} of {len(messages)}, role {m.role!r})",
                           param=f"messages.{i}.task")
        task = m.task
    return task


class _Guard:
    """ASGI middleware: the API key on /v1/*, request counting by path and status, and an OpenAI-shaped 500 for
    any exception that escapes a handler (the server keeps serving). Pure ASGI, so streamed responses and
    `request.is_disconnected()` see the client's connection directly."""

    KNOWN = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")

    def __init__(self, app, server: Server):
        self.app, self.srv = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        known = path if path in self.KNOWN else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
        if self.srv.api_key and path.startswith("/v1/"):
            if Headers(scope=scope).get("authorization", "") != f"Bearer {self.srv.api_key}":
                self.srv.metrics.count_request(known, 401)
                return await ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                      code="invalid_api_key").response()(scope, receive, send)
        status = {}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except Exception:  # a bug: answer in the OpenAI shape when nothing was sent yet, keep serving
            log.exception("request failed: %s", path)
            if "code" not in status:
                await ApiError(500, "internal server error", type="server_error").response()(scope, receive,
                                                                                            send_status)
        self.srv.metrics.count_request(known, status.get("code", 500))


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
    generation failure raises (500, or 503 when the engine died)."""
    async for _ in srv.events(seq, request):
        pass
    if seq.finish_reason == "error":
        raise srv.failure(seq)
    if seq.finish_reason == "cancelled" or not seq.done.is_set():
        return JSONResponse(ApiError(499, "client closed the request", code="cancelled").body(), 499)
    return None


def serve_cli(path: str, opts, command: list[str], host: str = "127.0.0.1", port: int = 8000,
              api_key: str | None = None, api_key_file: str | None = None, max_queue: int = 64, max_batch: int = 32,
              max_body: int = 0, max_context: int = 0, max_tokens: int = 256, model_name: str = "",
              prefix_pool: int = 16, log_level: str = "info", shutdown_timeout: float = 30.0) -> None:
    """Serve PATH with an OpenAI-compatible API on the engine that `opts` (flashport.options.EngineOptions, from
    `flashport serve`'s engine flags) describe; `command` is what each rank runs under expert parallelism.

    api_key: required as `Authorization: Bearer KEY` on /v1/* (default: the first line of api_key_file, else
    $FLASHPORT_API_KEY, else none); it reaches expert-parallel ranks through the environment, never a command
    line. max_queue: waiting requests before 429; max_batch: sequences decoded together; max_body: request bytes
    before 413 (0: 16 per context token, at least 1 MiB); max_context: prompt + completion token limit (0: what
    half the available memory holds as KV, see default_max_context); max_tokens: default completion length
    (capped to the context a prompt leaves); model_name: the id clients send (default: the directory's name);
    prefix_pool: recent conversations kept for KV reuse across requests (0: off); shutdown_timeout: seconds to
    finish running requests on Ctrl-C. Raises OptionError for an unreadable key file.
    """
    from .engine import run_command
    from .options import OptionError

    if api_key_file:
        try:
            api_key = Path(api_key_file).read_text().splitlines()[0].strip() or None
        except (OSError, IndexError, UnicodeDecodeError) as e:
            raise OptionError(f"--api-key-file {api_key_file}: cannot read a key from it "
                              f"({e.__class__.__name__})") from None
    api_key = api_key or os.environ.get("FLASHPORT_API_KEY") or None

    def serve(engine):
        if engine.ep_runner is not None:
            print(f"flashport: expert parallelism over {engine.ep_runner.ep.world} ranks", flush=True)
        run_server(engine, host, port, api_key, log_level, shutdown_timeout, model_name=model_name or None,
                   max_queue=max_queue, max_batch=max_batch, max_body=max_body, max_context=max_context,
                   default_max_tokens=max_tokens, prefix_pool=prefix_pool)

    run_command(path, opts, serve, command, {"FLASHPORT_API_KEY": api_key} if api_key else None)


def run_server(engine: Engine, host: str, port: int, api_key: str | None, log_level: str = "info",
               shutdown_timeout: float = 30.0, **app_options) -> None:
    """Serve `engine` with uvicorn until Ctrl-C (used by `flashport serve` and by rank 0 under `--ep`)."""
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("listening on %s without an API key: anyone who can reach this port can use the model", host)
    app = create_app(engine, api_key=api_key, **app_options)
    print(f"flashport: serving {app.state.server.model_name!r} on http://{host}:{port}/v1", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout)


__all__ = ["create_app", "serve_cli", "run_server", "BackgroundServer", "Server", "ApiError", "Metrics", "ChatRequest",
           "CompletionRequest", "default_max_context", "parse_json_body", "json_depth", "MAX_JSON_DEPTH"]
