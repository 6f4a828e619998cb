"""The OpenAI-compatible server on loopback, driven by the official `openai` client and raw HTTP (flash-tiny)."""

import json
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from flashport.chat import Control, render_tool_calls
from flashport.engine import Engine
from flashport.server import BackgroundServer, create_app
from flashport.tokenizer import END_THINK

MODEL = "tiny"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


class LiveServer(BackgroundServer):
    def __init__(self, app):
        super().__init__(app)
        self.srv = app.state.server

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120, **kw)


@pytest.fixture(scope="module")
def engine(tiny_release):
    return Engine.load(tiny_release)


@pytest.fixture(scope="module")
def live(engine):
    srv = LiveServer(create_app(engine, model_name=MODEL, max_body=64 << 10, max_context=2048, max_queue=64))
    yield srv
    srv.stop()


def script(live, segments):
    """Test hook: the next request's 'model' emits exactly these segments (text and Control tokens)."""
    tok, ids = live.srv.tok, []
    for s in segments:
        ids += [tok.token_id(s.token)] if isinstance(s, Control) else tok.encode(s)
    live.srv.scheduler.script_next(ids)


def metric(live, name: str) -> float:
    text = httpx.get(live.url + "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"flashport_{name}"))


# ---- the openai client -----------------------------------------------------------------------------------------------
def test_models_health_and_completion(live):
    c = live.client()
    assert [m.id for m in c.models.list().data] == [MODEL]
    assert httpx.get(live.url + "/health").json()["status"] == "ok"
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=5,
                                  temperature=0)
    assert r.object == "chat.completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5 and r.usage.prompt_tokens == 5
    # greedy is deterministic, and the streamed text is the same text
    chunks = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}],
                                            max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 5
    # the second identical request reused the first one's KV
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 5
    cmp = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4, temperature=0.8, seed=3)
    again = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4, temperature=0.8, seed=3)
    assert cmp.choices[0].text == again.choices[0].text and cmp.usage.completion_tokens == 4


def test_reasoning_stop_and_streaming_reasoning(live):
    c = live.client()
    script(live, ["weighing options", Control(END_THINK), "Go left. END here"])
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Left or right?"}],
                                  max_tokens=40, reasoning_effort="high", stop=["END"])
    msg = r.choices[0].message
    assert (msg.reasoning_content, msg.content, r.choices[0].finish_reason) == ("weighing options", "Go left. ",
                                                                               "stop")
    script(live, ["weighing options", Control(END_THINK), "Go left."])
    chunks = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Left or right?"}],
                                            max_tokens=40, stream=True, extra_body={"thinking": True}))
    deltas = [ch.choices[0].delta for ch in chunks]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "weighing options"
    assert "".join(d.content or "" for d in deltas) == "Go left."


def test_tool_call_round_trip(live):
    c = live.client()
    call = [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    script(live, ["Let me check.", *render_tool_calls(call)])
    r = c.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=100)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check."
    tc = choice.message.tool_calls[0]
    assert tc.function.name == "get_weather" and json.loads(tc.function.arguments) == {"city": "Paris"}
    # the tool result goes back; the server reuses the KV of the whole previous sequence
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": tc.id, "content": "sunny, 21 C"}]
    script(live, ["It is sunny."])
    r2 = c.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=20)
    assert r2.choices[0].message.content == "It is sunny." and r2.choices[0].finish_reason == "stop"
    first = r.usage.prompt_tokens + r.usage.completion_tokens - 1  # everything the first request ran
    assert r2.usage.prompt_tokens_details.cached_tokens == first
    # streamed tool calls come as one delta with index and id
    script(live, [*render_tool_calls(call)])
    chunks = list(c.chat.completions.create(model=MODEL, messages=messages[:1], tools=TOOLS, max_tokens=100,
                                            stream=True))
    calls = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert [(t.index, t.function.name) for t in calls] == [(0, "get_weather")]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


# ---- errors -------------------------------------------------------------------------------------------------------------
def test_openai_errors(live):
    c = live.client()
    ok = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.chat.completions.create(model="gpt-4o", messages=ok)
    with pytest.raises(openai.BadRequestError, match="context limit"):
        c.chat.completions.create(model=MODEL, messages=ok, max_tokens=5000)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.chat.completions.create(model=MODEL, messages=ok, temperature=7)
    live.srv.api_key = "sesame"
    try:
        with pytest.raises(openai.AuthenticationError):
            c.chat.completions.create(model=MODEL, messages=ok, max_tokens=1)
        good = live.client().with_options(api_key="sesame")
        assert good.chat.completions.create(model=MODEL, messages=ok, max_tokens=1).choices
    finally:
        live.srv.api_key = None
    sched, bound = live.srv.scheduler, live.srv.scheduler.max_queue
    sched.max_queue = 0
    try:
        with pytest.raises(openai.RateLimitError):
            c.chat.completions.create(model=MODEL, messages=ok, max_tokens=1)
    finally:
        sched.max_queue = bound


BAD_REQUESTS = [
    (b"{not json", 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_json"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, "invalid_utf8"),
    (json.dumps({"model": "tiny", "messages": "hi"}).encode(), 400, None),
    (json.dumps({"model": "tiny", "messages": []}).encode(), 400, None),
    (json.dumps({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400, None),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": 5}]}).encode(), 400, None),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": "9"}).encode(), 400,
     None),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}).encode(), 400,
     None),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_p": 0}).encode(), 400, None),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 2}).encode(), 400, None),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5}).encode(), 400,
     None),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [{"x": 1}]}).encode(), 400,
     None),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                 "tool_choice": {"type": "function", "function": {"name": "nope"}}}).encode(), 400, None),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400, None),
    (json.dumps({"model": 7, "messages": [{"role": "user", "content": "x"}]}).encode(), 400, None),
    (json.dumps({"model": "other", "messages": [{"role": "user", "content": "x"}]}).encode(), 404, "model_not_found"),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "\ud800"}]}).encode(), 400, None),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "' + b"x" * (70 << 10) + b'"}]}', 413,
     "request_too_large"),
]


def test_bad_input_flood_then_still_correct(live):
    """Hundreds of malformed requests: each gets an OpenAI-shaped 4xx, and the server still answers correctly."""
    url = live.url + "/v1/chat/completions"
    with httpx.Client(timeout=60) as http:
        before = http.post(url, json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 3, "temperature": 0}).json()
        for n in range(15):
            for body, status, code in BAD_REQUESTS:
                r = http.post(url, content=body, headers={"content-type": "application/json"})
                assert r.status_code == status, (body[:80], r.text)
                err = r.json()["error"]
                assert err["message"] and err["type"]
                if code:
                    assert err["code"] == code
        assert http.post(live.url + "/v1/completions", json={"model": MODEL, "prompt": [99999]}).status_code == 400
        assert http.get(live.url + "/v1/nothing").status_code == 404
        after = http.post(url, json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                     "max_tokens": 3, "temperature": 0}).json()
    assert after["choices"][0]["message"] == before["choices"][0]["message"]
    assert metric(live, 'requests_total{code="400",path="/v1/chat/completions"}') >= 15 * 17


def test_client_disconnect_cancels_generation(live):
    cancelled = metric(live, "cancelled_total")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "tell me everything"}], "max_tokens": 1000,
            "stream": True}
    with httpx.Client(timeout=60) as http, http.stream("POST", live.url + "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and "content" in line:
                break  # got a token: hang up
    deadline = time.monotonic() + 30
    while metric(live, "cancelled_total") == cancelled:
        assert time.monotonic() < deadline, "the generation was not cancelled"
        time.sleep(0.05)
    assert not live.srv.scheduler.active or all(s.finish_reason is None for s in live.srv.scheduler.active)


def test_load_32_concurrent_clients(live):
    """>= 32 concurrent clients, zero errors; prints p50/p99 latency and tokens/s."""
    n_clients, max_tokens = 32, 4
    c = live.client()
    rows_before, steps_before = live.srv.scheduler.batch_rows, live.srv.scheduler.steps

    def one(i):
        t0 = time.perf_counter()
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"client {i} says hi"}],
                                      max_tokens=max_tokens, temperature=0.7, seed=i)
        return time.perf_counter() - t0, r.usage.completion_tokens

    t0 = time.perf_counter()
    with ThreadPoolExecutor(n_clients) as pool:
        results = list(pool.map(one, range(n_clients)))
    wall = time.perf_counter() - t0
    lat = sorted(t for t, _ in results)
    tokens = sum(n for _, n in results)
    assert tokens == n_clients * max_tokens
    mean_batch = (live.srv.scheduler.batch_rows - rows_before) / (live.srv.scheduler.steps - steps_before)
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
    print(f"\nload: {n_clients} clients x {max_tokens} tokens: p50 {statistics.median(lat):.2f} s, p99 {p99:.2f} s, "
          f"{tokens / wall:.1f} tok/s, mean batch {mean_batch:.1f}")
    assert mean_batch > 2  # decode steps really were shared


def test_graceful_shutdown_finishes_requests_and_closes_engine(engine):
    closed = []
    engine.close = lambda: closed.append(True)  # the KV writer's flush hook
    try:
        live = LiveServer(create_app(engine, model_name=MODEL))
        out = {}

        def request():
            out["r"] = live.client().chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "bye"}], max_tokens=30, temperature=0)

        th = threading.Thread(target=request)
        th.start()
        deadline = time.monotonic() + 30
        while not live.srv.scheduler.active and time.monotonic() < deadline:  # in flight
            time.sleep(0.01)
        live.stop()
        th.join(timeout=60)
    finally:
        del engine.close
    assert out["r"].usage.completion_tokens == 30  # the running request was drained, not cut
    assert closed == [True] and live.srv.scheduler._thread is None


# ---- issue 12: the API as OpenAI clients expect it -------------------------------------------------------------------
def test_models_retrieve_optional_model_and_404_type(live):
    c = live.client()
    m = c.models.retrieve(MODEL)
    assert (m.id, m.object, m.owned_by) == (MODEL, "model", "flashport")
    with pytest.raises(openai.NotFoundError) as e:
        c.models.retrieve("gpt-4o")
    assert e.value.body["type"] == "invalid_request_error" and e.value.body["code"] == "model_not_found"
    r = httpx.get(live.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    # `model` may be left out: the served model answers
    r = httpx.post(live.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                            "max_tokens": 2}, timeout=60)
    assert r.status_code == 200 and r.json()["model"] == MODEL
    r = httpx.post(live.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_response_format_and_legacy_functions_are_refused_not_ignored(live):
    c = live.client()
    ok = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError, match="response_format"):
        c.chat.completions.create(model=MODEL, messages=ok, response_format={"type": "json_object"})
    with pytest.raises(openai.BadRequestError, match="tools"):
        c.chat.completions.create(model=MODEL, messages=ok, functions=[{"name": "f", "parameters": {}}])
    r = c.chat.completions.create(model=MODEL, messages=ok, max_tokens=1, response_format={"type": "text"})
    assert r.usage.completion_tokens == 1


def test_default_max_tokens_is_capped_to_the_context_left(engine):
    """--max-context 300, a prompt of ~290 tokens and no max_tokens: served with the 10 tokens left (llama-server
    and vLLM behaviour), not refused because the default 256 does not fit."""
    live = LiveServer(create_app(engine, model_name=MODEL, max_context=300, default_max_tokens=256))
    try:
        c = live.client()
        content = "one two three " * 95
        r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], temperature=0)
        assert 280 <= r.usage.prompt_tokens < 300
        assert r.usage.prompt_tokens + r.usage.completion_tokens <= 300
        if r.choices[0].finish_reason == "length":
            assert r.usage.completion_tokens == 300 - r.usage.prompt_tokens
        with pytest.raises(openai.BadRequestError, match="context limit"):  # an explicit max_tokens is not capped
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=20)
        with pytest.raises(openai.BadRequestError, match="context limit"):  # nothing left at all
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "one two three " * 110}])
    finally:
        live.stop()


def test_metrics_histograms(live):
    c = live.client()
    c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "metrics"}], max_tokens=4)
    text = httpx.get(live.url + "/metrics").text
    for name in ("time_to_first_token_seconds", "request_latency_seconds", "generation_tokens_per_second"):
        assert f"# TYPE flashport_{name} histogram" in text
        assert metric(live, f"{name}_count") >= 1 and f'flashport_{name}_bucket{{le="+Inf"}}' in text
    assert metric(live, "engine_up") == 1 and metric(live, "generation_tokens_total") >= 4


# ---- issue 17: Quick Instruction over the OpenAI API ----------------------------------------------------------------
def conversation(live, turns=2):
    """A multi-turn conversation of several hundred tokens through the official client (greedy)."""
    c = live.client()
    notes = " ".join(f"Note {i}: the rollout step {i} touches service {i % 7}." for i in range(30))
    messages = [{"role": "system", "content": "You are a release assistant."},
                {"role": "user", "content": f"Here are my notes:\n{notes}\nSummarise them."}]
    for turn in range(turns):
        r = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
        messages.append({"role": "assistant", "content": r.choices[0].message.content})
        if turn < turns - 1:
            messages.append({"role": "user", "content": f"And what is the riskiest step, question {turn}?"})
    return messages[:-1], r  # up to the last user turn, and its reply


@pytest.mark.parametrize("task", ["title", "action"])
def test_quick_instruction_reuses_the_conversation_kv(live, engine, task):
    from flashport.chat import encode_chat
    from flashport.tokenizer import TASK_TOKENS

    c = live.client()
    live.srv.pool.traces.clear()
    messages, last = conversation(live)
    assert last.usage.prompt_tokens > 300
    asked = [*messages[:-1], {**messages[-1], "task": task}]  # an extra field on the last user message
    pool_before = [(list(tr.ids), sorted(tr.snaps)) for tr in live.srv.pool.traces.values()]
    r = c.chat.completions.create(model=MODEL, messages=asked, max_tokens=8, temperature=0)
    u = r.usage
    ids = encode_chat(engine.tokenizer, asked)
    assert ids[-1] == engine.tokenizer.token_id(TASK_TOKENS[task]) and u.prompt_tokens == len(ids)
    assert u.prompt_tokens_details.cached_tokens == u.prompt_tokens - 1  # only the task token is prefilled
    # the same tokens as the same prompt run cold
    cold = engine.generate(ids, max_new_tokens=8)
    assert r.usage.completion_tokens == len(cold.token_ids)
    assert r.choices[0].message.content == engine.tokenizer.decode(
        [t for t in cold.token_ids if t != engine.tokenizer.eos_id])
    # through extra_body, streamed: the same text
    chunks = list(c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "ignored"}],
                                            max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"messages": asked}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == r.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == u.prompt_tokens - 1
    # the conversation's cached state is intact (the task is a side branch, not stored) and its next turn reuses it
    assert [(list(tr.ids), sorted(tr.snaps)) for tr in live.srv.pool.traces.values()] == pool_before
    nxt = [*messages, {"role": "assistant", "content": last.choices[0].message.content},
           {"role": "user", "content": "Thanks."}]
    r2 = c.chat.completions.create(model=MODEL, messages=nxt, max_tokens=2, temperature=0)
    assert r2.usage.prompt_tokens_details.cached_tokens >= last.usage.prompt_tokens


def test_quick_instruction_refusals(live):
    c = live.client()
    with pytest.raises(openai.BadRequestError, match="'summary'") as e:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x", "task": "summary"}])
    assert e.value.body["param"] == "messages.0.task"
    with pytest.raises(openai.BadRequestError, match="messages.0.task") as e:
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x", "task": "title"},
                                                         {"role": "assistant", "content": "y"},
                                                         {"role": "user", "content": "z"}])
    with pytest.raises(openai.BadRequestError, match="messages.1.task"):
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"},
                                                         {"role": "assistant", "content": "y", "task": "title"}])
