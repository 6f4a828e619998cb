"""Fault injection against a live server on 127.0.0.1 (flash-tiny): hostile requests, failures inside the engine,
a dead engine thread, abandoned and unbounded work. Every hostile request must get an OpenAI-shaped 4xx (never a
500), one failing sequence must not touch the others, and the server must keep answering correctly afterwards."""

import json
import threading
import time

import httpx
import openai
import pytest
import torch

import flashport.scheduler as scheduler_mod
import flashport.server as server_mod
from flashport.engine import Engine
from flashport.scheduler import NonFiniteLogits, Scheduler, Sequence, check_logits
from flashport.server import BackgroundServer, create_app, default_max_context, json_depth

MODEL = "tiny"
OK = [{"role": "user", "content": "hi"}]


class LiveServer(BackgroundServer):
    def __init__(self, app):
        super().__init__(app)
        self.srv = app.state.server
        self.chat_url = self.url + "/v1/chat/completions"

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60, **kw)

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics").text
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"flashport_{name}"))


@pytest.fixture(scope="module")
def engine(tiny_release):
    return Engine.load(tiny_release)


@pytest.fixture(scope="module")
def live(engine):
    srv = LiveServer(create_app(engine, model_name=MODEL, max_context=4096))
    yield srv
    srv.stop()


def greedy(live, content="hi", n=3) -> str:
    r = httpx.post(live.chat_url, json={"model": MODEL, "messages": [{"role": "user", "content": content}],
                                        "max_tokens": n, "temperature": 0}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def inject_sampler_fault(monkeypatch):
    """The scheduler's sampler raises for sequences sampled at temperature 0.123 and works for the rest."""
    real = scheduler_mod.sample

    def faulty(logits, temperature, top_p, gen):
        if temperature == 0.123:
            raise RuntimeError("injected sampler fault")
        return real(logits, temperature, top_p, gen)

    monkeypatch.setattr(scheduler_mod, "sample", faulty)


def assert_openai_4xx(r: httpx.Response, status: int = 400):
    assert r.status_code == status, r.text[:300]
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error", err
    return err


# ---- one request stops the server (issue 16) ---------------------------------------------------------------------
@pytest.mark.parametrize("seed", [2 ** 64, -(2 ** 63) - 1, 10 ** 30])
def test_out_of_range_seed_is_400(live, seed):
    r = httpx.post(live.chat_url, json={"model": MODEL, "messages": OK, "seed": seed, "max_tokens": 1})
    assert assert_openai_4xx(r)["param"] == "seed"
    assert httpx.get(live.url + "/health").json()["status"] == "ok"


def test_extreme_valid_seeds_run(live):
    for seed in (2 ** 64 - 1, -(2 ** 63), 0):
        r = httpx.post(live.chat_url, json={"model": MODEL, "messages": OK, "seed": seed, "max_tokens": 2,
                                            "temperature": 0.9}, timeout=60)
        assert r.status_code == 200, r.text


def test_bad_seed_past_the_api_fails_its_sequence_alone(engine):
    """A seed that reaches the scheduler unvalidated (SDK callers) fails that sequence only: its batch-mate admitted
    in the same step runs on, and the engine thread stays alive."""
    alone = Scheduler(engine).run(Sequence([0, 40, 41], max_tokens=3)).output
    sched = Scheduler(engine).start()
    try:
        with sched._cv:  # both join the batch in the same step, the good one first
            good = sched.submit(Sequence([0, 40, 41], max_tokens=3))
            bad = sched.submit(Sequence([0, 40, 41], max_tokens=3, temperature=0.8, seed=2 ** 64))
        assert bad.done.wait(30) and good.done.wait(30)
        assert bad.finish_reason == "error" and "Overflow" in str(bad.error)
        assert good.finish_reason == "length" and good.output == alone
        assert sched.alive and sched._thread.is_alive()
        again = sched.submit(Sequence([0, 40, 41], max_tokens=3))
        assert again.done.wait(30) and again.output == alone
    finally:
        sched.stop()


def test_exception_in_sampling_fails_only_that_sequence(engine, monkeypatch):
    """Two sequences in one batched step, the sampler raises for one of them: the other's output is the same as
    alone (the step goes on for the rest of the batch)."""
    alone = Scheduler(engine).run(Sequence([0, 60, 61], max_tokens=4)).output
    inject_sampler_fault(monkeypatch)
    sched = Scheduler(engine)
    bad = sched.submit(Sequence([0, 70, 71], max_tokens=4, temperature=0.123))
    good = sched.submit(Sequence([0, 60, 61], max_tokens=4))
    while not (bad.done.is_set() and good.done.is_set()):
        sched.step()
    assert bad.finish_reason == "error" and "injected sampler fault" in str(bad.error)
    assert good.finish_reason == "length" and good.output == alone


def test_exception_in_sampling_fails_one_request(live, monkeypatch):
    """A sampler that raises for one request: that request gets a 500 error object, a concurrent one completes,
    and the server answers correctly afterwards."""
    before = greedy(live)
    inject_sampler_fault(monkeypatch)
    out = {}

    def other():
        out["r"] = httpx.post(live.chat_url, json={"model": MODEL, "messages": [{"role": "user", "content": "x" * 50}],
                                                   "max_tokens": 6, "temperature": 0}, timeout=60)

    th = threading.Thread(target=other)
    th.start()
    r = httpx.post(live.chat_url, json={"model": MODEL, "messages": OK, "max_tokens": 4, "temperature": 0.123},
                   timeout=60)
    th.join(60)
    assert r.status_code == 500 and "injected sampler fault" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "server_error"
    assert out["r"].status_code == 200 and out["r"].json()["usage"]["completion_tokens"] == 6
    # streamed: the error arrives as an SSE error object, then [DONE]
    with httpx.stream("POST", live.chat_url, json={"model": MODEL, "messages": OK, "max_tokens": 4,
                                                   "temperature": 0.123, "stream": True}, timeout=60) as s:
        lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
    assert "injected sampler fault" in json.loads(lines[-2][6:])["error"]["message"] and lines[-1] == "data: [DONE]"
    monkeypatch.undo()
    assert live.srv.scheduler.alive and greedy(live) == before
    assert httpx.get(live.url + "/health").json()["status"] == "ok"
    assert live.metric("failed_total") >= 2


def test_non_finite_logits_fail_that_sequence(engine):
    """A backend that returns NaN logits for one row: that sequence fails with a clear error, its batch-mate's
    output is the same as alone."""
    check_logits(torch.tensor([0.0, -float("inf"), 3.0]))  # masked tokens are fine
    for bad in ([float("nan"), 0.0], [float("inf"), 0.0], [-float("inf"), -float("inf")]):
        with pytest.raises(NonFiniteLogits):
            check_logits(torch.tensor(bad))
    alone = Scheduler(engine).run(Sequence([0, 50, 51, 52], max_tokens=4)).output
    sched = Scheduler(engine)
    real = sched.model.forward_batch

    class Poisoned:
        def forward_batch(self, chunks, states, all_logits=False):
            out = real(chunks, states, all_logits=all_logits)
            return [torch.full_like(lg, float("nan")) if int(c[0]) == 7 else lg for c, lg in zip(chunks, out)]

    sched.model = Poisoned()
    bad = sched.submit(Sequence([7, 8, 9], max_tokens=4, temperature=0.0))
    good = sched.submit(Sequence([0, 50, 51, 52], max_tokens=4))
    while not (bad.done.is_set() and good.done.is_set()):
        sched.step()
    assert bad.finish_reason == "error" and isinstance(bad.error, NonFiniteLogits) and "NaN" in str(bad.error)
    assert good.finish_reason == "length" and good.output == alone


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_dead_engine_thread_is_reported_and_shutdown_is_prompt(engine):
    """If the engine thread dies anyway, /health says so (503, status "error", the reason), requests in flight and
    new ones get a 503 at once instead of hanging, and the server stops promptly."""
    live = LiveServer(create_app(engine, model_name=MODEL))
    sched = live.srv.scheduler
    try:
        assert greedy(live)  # alive
        real_step = sched.step
        calls = []

        def dying_step():
            if calls:
                raise SystemExit("injected: the engine thread is gone")
            calls.append(1)
            return real_step()

        sched.step = dying_step
        t0 = time.monotonic()
        r = httpx.post(live.chat_url, json={"model": MODEL, "messages": OK, "max_tokens": 50}, timeout=30)
        assert r.status_code == 503 and "engine" in r.json()["error"]["message"], r.text
        assert time.monotonic() - t0 < 10
        h = httpx.get(live.url + "/health")
        assert h.status_code == 503 and h.json()["status"] == "error" and "injected" in h.json()["reason"]
        r = httpx.post(live.chat_url, json={"model": MODEL, "messages": OK, "max_tokens": 5}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        assert live.metric("engine_up") == 0
    finally:
        t0 = time.monotonic()
        live.stop()
    assert time.monotonic() - t0 < 5, "shutdown waited on a dead engine"


# ---- abandoned or unbounded work ---------------------------------------------------------------------------------
def test_non_streamed_request_is_cancelled_when_the_client_leaves(live):
    cancelled = live.metric("cancelled_total")
    # greedy: this prompt's reply runs 1,538 tokens before its end (several seconds); a sampled one could draw EOS
    # within the 1.5 s and finish before the client leaves
    body = {"model": MODEL, "messages": [{"role": "user", "content": "tell me everything"}], "max_tokens": 3000,
            "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live.chat_url, json=body, timeout=1.5)  # hangs up after 1.5 s while tokens keep coming
    deadline = time.monotonic() + 8
    while live.metric("cancelled_total") == cancelled:
        assert time.monotonic() < deadline, "the abandoned non-streamed generation is still running"
        time.sleep(0.1)
    assert not any(s.finish_reason is None and s.max_tokens == 3000 for s in live.srv.scheduler.active)


def test_tokenization_runs_off_the_event_loop_with_a_bound(live, monkeypatch):
    """A prompt whose tokenization is pathologically slow gets a 400 after tokenize_timeout; meanwhile the server
    answers /health and other requests."""
    tok = live.srv.tok

    class SlowTokenizer:
        def __getattr__(self, name):
            return getattr(tok, name)

        def encode(self, text):
            if "\u0301\u0301\u0301" in text:
                time.sleep(3)
            return tok.encode(text)

    monkeypatch.setattr(live.srv, "tok", SlowTokenizer())
    monkeypatch.setattr(live.srv, "tokenize_timeout", 1.0)
    out = {}

    def hostile():
        out["r"] = httpx.post(live.chat_url, json={"model": MODEL, "max_tokens": 1,
                                                   "messages": [{"role": "user", "content": "a" + "\u0301" * 2000}]},
                              timeout=30)

    th = threading.Thread(target=hostile)
    th.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    assert httpx.get(live.url + "/health", timeout=5).json()["status"] == "ok"
    assert time.monotonic() - t0 < 0.5, "the event loop was blocked by a tokenization"
    th.join(30)
    err = assert_openai_4xx(out["r"])
    assert err["code"] == "tokenization_timeout"
    time.sleep(2.5)  # let the worker thread finish before the tokenizer is restored


def test_default_limits_follow_memory_and_kv_bytes(engine, monkeypatch):
    from flashport.kv import kv_layout

    cfg = engine.cfg
    lay = kv_layout(cfg)
    gib = 1 << 30
    n = default_max_context(cfg, sequences=48, available=8 * gib)
    expect = int((8 * gib * 0.5 / 48 - lay.fixed_per_seq) / lay.compressed_per_token)
    assert n == min(cfg.max_position_embeddings, expect // cfg.kv_block_tokens * cfg.kv_block_tokens)
    assert default_max_context(cfg, 48, available=1 << 20) == cfg.kv_block_tokens  # at least one block
    assert default_max_context(cfg, 48, available=0) == cfg.max_position_embeddings  # unknown memory
    # the server's defaults: context from memory (max_batch + prefix_pool sequences), body from the context
    monkeypatch.setattr(server_mod, "available_memory", lambda: 2 * gib)
    srv = server_mod.Server(engine, max_batch=8, prefix_pool=8)
    assert srv.max_context == default_max_context(cfg, 16, available=2 * gib) < cfg.max_position_embeddings
    assert srv.max_body == max(1 << 20, server_mod.BYTES_PER_TOKEN * srv.max_context)
    srv.close()
    srv = server_mod.Server(engine, max_context=1000, max_body=5000)  # explicit limits win
    assert (srv.max_context, srv.max_body) == (1000, 5000)
    srv.close()


def test_prompt_over_the_context_is_refused_before_engine_work(live):
    steps = live.srv.scheduler.steps
    r = httpx.post(live.chat_url, json={"model": MODEL, "messages": [{"role": "user", "content": "word " * 5000}]})
    assert assert_openai_4xx(r)["code"] == "context_length_exceeded"
    assert live.srv.scheduler.steps == steps


# ---- 500 instead of 400 -------------------------------------------------------------------------------------------
def nested(depth: int, leaf="1", open_="[", close="]") -> str:
    return open_ * depth + leaf + close * depth


HOSTILE_BODIES = {
    "tool_choice.function as a string": {"tool_choice": {"type": "function", "function": "get_weather"}},
    "tool_choice.function as a list": {"tool_choice": {"type": "function", "function": ["get_weather"]}},
    "tool_choice.function.name as a list": {"tool_choice": {"type": "function", "function": {"name": ["a"]}}},
    "tool_choice.function.name as a dict": {"tool_choice": {"type": "function", "function": {"name": {"a": 1}}}},
    "tool_choice as a number": {"tool_choice": 3},
    "response_format json_object": {"response_format": {"type": "json_object"}},
    "response_format as a string": {"response_format": "json"},
    "legacy functions": {"functions": [{"name": "f", "parameters": {}}]},
    "legacy function_call": {"function_call": "auto"},
    "max_tokens 0": {"max_tokens": 0},
    "max_completion_tokens 0": {"max_completion_tokens": 0},
    "temperature 1e300": {"temperature": 1e300},
    "top_p > 1": {"top_p": 1.5},
    "seed a float": {"seed": 1.5},
    "stop a number": {"stop": 5},
    "messages a dict": {"messages": {"role": "user", "content": "x"}},
    "message content a dict": {"messages": [{"role": "user", "content": {"text": "x"}}]},
    "content part without type": {"messages": [{"role": "user", "content": [{"text": "x"}]}]},
    "tool_calls a string": {"messages": [{"role": "assistant", "content": "x", "tool_calls": "call"},
                                         {"role": "user", "content": "y"}]},
    "tool call arguments a list": {"messages": [
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "function",
                                                             "function": {"name": "f", "arguments": [1]}}]},
        {"role": "user", "content": "y"}]},
    "stream_options a list": {"stream": True, "stream_options": [1]},
    "task unknown": {"messages": [{"role": "user", "content": "x", "task": "summarize"}]},
    "task a number": {"messages": [{"role": "user", "content": "x", "task": 3}]},
}


@pytest.mark.parametrize("name", sorted(HOSTILE_BODIES))
def test_hostile_field_is_400(live, name):
    body = {"model": MODEL, "messages": OK, "max_tokens": 1, **HOSTILE_BODIES[name]}
    assert_openai_4xx(httpx.post(live.chat_url, json=body, timeout=30))


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_temperature_is_400(live, literal):
    raw = f'{{"model": "tiny", "messages": [{{"role": "user", "content": "x"}}], "temperature": {literal}}}'
    r = httpx.post(live.chat_url, content=raw.encode(), headers={"content-type": "application/json"})
    assert assert_openai_4xx(r)["param"] == "temperature"


@pytest.mark.parametrize("raw", [
    '{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": ' + nested(20000, "{}") + "}",
    '{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": '
    '{"name": "f", "parameters": ' + nested(20000, "1", '{"a":', "}") + "}}]}",
    nested(100000),
    '{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stop": ' + nested(100000) + "}",
    # just past the depth limit: parses fine, refused before validation
    '{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": '
    '{"name": "f", "parameters": ' + nested(70, "1", '{"a":', "}") + "}}]}",
])
def test_deeply_nested_json_is_400(live, raw):
    r = httpx.post(live.chat_url, content=raw.encode(), headers={"content-type": "application/json"}, timeout=30)
    assert assert_openai_4xx(r)["code"] == "invalid_json"


def test_json_depth():
    assert json_depth({}) == 1 and json_depth({"a": [1, {"b": []}]}) == 4 and json_depth(5) == 0
    assert json_depth(json.loads(nested(500))) == 500  # iterative: no recursion limit


HOSTILE_VALUES = [None, True, -1, 0, 2 ** 64, -(2 ** 63) - 1, 1e308, "x", "", [], {}, [[[]]], {"a": {"b": [1]}},
                  "\ud800", [None], [{"role": None}]]
FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "stream",
          "stream_options", "n", "tools", "tool_choice", "reasoning_effort", "thinking", "logprobs", "response_format",
          "functions", "task"]
MESSAGE_FIELDS = ["role", "content", "reasoning_content", "tool_calls", "tool_call_id", "name", "task"]


def test_every_field_with_every_hostile_value_is_never_5xx(live):
    """Each top-level and message field replaced by each hostile value: always an OpenAI-shaped answer, 2xx or
    4xx, never 5xx; afterwards the server still answers correctly."""
    before = greedy(live)
    statuses = {}
    with httpx.Client(timeout=60) as http:
        for where, fields in (("body", FIELDS), ("message", MESSAGE_FIELDS)):
            for field in fields:
                for value in HOSTILE_VALUES:
                    msg = {"role": "user", "content": "hi"}
                    body = {"model": MODEL, "messages": [msg], "max_tokens": 1}
                    (body if where == "body" else msg)[field] = value
                    raw = json.dumps(body, ensure_ascii=False, allow_nan=True).encode("utf-8", "surrogatepass")
                    r = http.post(live.chat_url, content=raw, headers={"content-type": "application/json"})
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    assert r.status_code < 500, (where, field, value, r.text[:200])
                    if r.status_code >= 400:
                        assert r.json()["error"]["message"]
                    elif body.get("stream") is not True:
                        assert r.json()["choices"]
        for field in ["prompt", "echo", "logprobs", "suffix", "max_tokens", "seed", "stop", "temperature", "n"]:
            for value in HOSTILE_VALUES + [[2 ** 70], [[1, 2], [3]], [-5]]:
                body = {"model": MODEL, "prompt": "hi", "max_tokens": 1, field: value}
                raw = json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")
                r = http.post(live.url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                assert r.status_code < 500, ("completions", field, value, r.text[:200])
    print("\nhostile field x value:", statuses)
    assert greedy(live) == before


SERVE_WITH_FRAGILE_ENGINE = """
import sys
from flashport.engine import Engine
from flashport.scheduler import Scheduler
from flashport.server import run_server

real_step = Scheduler.step

def step(self):  # the engine thread dies when a request asks for temperature 0.777 (fault injection)
    if any(s.temperature == 0.777 for s in list(self.waiting) + list(self.active)):
        raise SystemExit("injected engine death")
    return real_step(self)

Scheduler.step = step
run_server(Engine.load(sys.argv[1]), "127.0.0.1", int(sys.argv[2]), None, "warning", shutdown_timeout=30,
           model_name="tiny")
"""


def test_sigterm_with_a_dead_engine_exits_promptly(tiny_release, tmp_path):
    """`run_server` in its own process: the engine thread dies under a request, the client gets a 503 instead of
    hanging, /health says 503, and SIGTERM ends the process in seconds (it took 63 s)."""
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = tmp_path / "serve.py"
    script.write_text(SERVE_WITH_FRAGILE_ENGINE)
    proc = subprocess.Popen([sys.executable, str(script), str(tiny_release), str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not start"
            try:
                httpx.get(url + "/health", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        r = httpx.post(url + "/v1/chat/completions", timeout=30,
                       json={"messages": OK, "max_tokens": 500, "temperature": 0.777})
        assert r.status_code == 503 and "injected engine death" in r.json()["error"]["message"]
        assert httpx.get(url + "/health").status_code == 503
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        assert time.monotonic() - t0 < 5, "SIGTERM waited on a dead engine"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
