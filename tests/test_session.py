"""Sessions reuse the KV, Quick Instruction, the continuous-batching scheduler and its reply splitter (flash-tiny)."""

import pytest
import torch

from flashport.chat import encode_chat, render_tool_calls
from flashport.engine import Engine
from flashport.scheduler import QueueFull, ReplyStream, Scheduler, Sequence
from flashport.scheduler import Snapshot, snapshot
from flashport.session import KVTrace, PrefixPool, Session, align_to_cache, turn_boundaries
from flashport.tokenizer import ASSISTANT, END_THINK, TASK_TOKENS

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def engine(tiny_release):
    return Engine.load(tiny_release)


def scripted(engine, text_segments):
    """Token ids for a scripted model reply: text pieces tokenized, Control pieces by id."""
    tok, out = engine.tokenizer, []
    for s in text_segments:
        out += [tok.token_id(s.token)] if hasattr(s, "token") else tok.encode(s)
    return out


# ---- snapshots ---------------------------------------------------------------------------------------------------
def test_snapshot_stays_valid_while_the_state_moves_on(engine):
    ids = list(range(20, 60))
    state = engine.new_state()
    engine.prefill(ids[:30], state)
    snap = snapshot(state)
    engine.prefill(ids[30:], state)  # the live state advances past the snapshot
    assert snap.n_tokens == 30 and state.n_tokens == 40
    fresh = engine.new_state()
    engine.prefill(ids[:30], fresh)
    for k, v in fresh.tensors().items():  # nothing in the snapshot was modified in place
        assert torch.equal(snap.tensors()[k], v), k
    a = engine.prefill([7, 8, 9], snapshot(snap))
    b = engine.prefill([7, 8, 9], fresh)
    assert torch.equal(a, b)  # continuing from a snapshot is bit-exact


def test_trace_restores_the_longest_valid_prefix(engine):
    tr = KVTrace()
    st = engine.new_state()
    logits = engine.prefill([5, 6, 7, 8], st)
    tr.update([5, 6, 7, 8, 9], {4: _snap(st, logits)})
    assert tr.restore([5, 6, 7, 8, 10])[0] == 4
    assert tr.restore([5, 6, 7, 1])[0] == 0  # diverges before the only snapshot
    tr.update([5, 6, 1, 2], {})  # a diverging run drops the stale snapshot
    assert tr.snaps == {} and tr.ids == [5, 6, 1, 2]


def _snap(state, logits):

    return Snapshot(snapshot(state), logits)


def test_turn_boundaries_around_each_assistant_opener(engine):
    tok = engine.tokenizer
    ids = encode_chat(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                            {"role": "user", "content": "c"}], mode="thinking")
    a = [i for i, t in enumerate(ids) if t == tok.token_id(ASSISTANT)]
    assert turn_boundaries(ids, tok) == [a[0], a[0] + 1, a[0] + 2, a[1], a[1] + 1, a[1] + 2]


def test_align_to_cache_reuses_own_tokens_for_the_same_text(engine):
    tok = engine.tokenizer
    text = "the answer is forty two"
    own = [tok.encode(ch)[0] for ch in text]  # one token per character: what a model may emit
    eos, user = tok.eos_id, tok.token_id("user")
    cached = [0, 2, 50, 3, 6] + own + [eos]
    new = [0, 2, 50, 3, 6] + tok.encode(text) + [eos, user] + tok.encode("next")
    assert own != tok.encode(text)
    out = align_to_cache(cached, new, tok)
    assert out[:len(cached)] == cached and tok.decode(out) == tok.decode(new)
    # a control id in the cached run (or a different text) is never spliced in
    bad = [0, 2, 50, 3, 6] + own[:3] + [user] + own[3:] + [eos]
    assert align_to_cache(bad, new, tok) == new
    assert align_to_cache(cached[:-2] + [tok.encode("x")[0], eos], new, tok) == new


# ---- sessions ----------------------------------------------------------------------------------------------------
def test_tool_conversation_prefills_only_what_is_new(engine):
    """Interleaved thinking: every turn reuses the whole previous sequence, reasoning included."""
    tok = engine.tokenizer
    s = Session(engine, mode="thinking", tools=TOOLS)
    call = [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]
    s.scheduler.script_next(scripted(engine, ["I should look it up.", _c(END_THINK), *render_tool_calls(call)]))
    r1 = s.send("Weather in Paris?", max_new_tokens=200)
    assert r1.reasoning_content == "I should look it up." and r1.finish_reason == "tool_calls"
    assert r1.tool_calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert s.turns[0].reused_tokens == 0
    for turn in range(1, 3):
        before = list(s.trace.ids)
        s.tool_result(s.messages[-1]["tool_calls"][0]["id"] if "tool_calls" in s.messages[-1] else "c1", "sunny")
        r = s.generate(max_new_tokens=6)
        st = s.turns[-1]
        assert st.reused_tokens == len(before), turn  # the whole previous sequence, its reasoning included
        assert st.prefilled_tokens == st.prompt_tokens - st.reused_tokens
        assert st.prefilled_tokens < 40
    assert len(r.token_ids) == 6  # (a restored path's exactness: test_snapshot_stays_valid_while_the_state_moves_on)


def _c(token):
    from flashport.chat import Control

    return Control(token)


def test_plain_thinking_chat_reuses_up_to_the_dropped_reasoning(engine):
    tok = engine.tokenizer
    s = Session(engine, mode="thinking")
    s.scheduler.script_next(scripted(engine, ["let me think", _c(END_THINK), "Hello!"]))
    r1 = s.send("Hi", max_new_tokens=30)
    assert (r1.reasoning_content, r1.content) == ("let me think", "Hello!")
    s.send("And then?", max_new_tokens=3)
    ids = s.prompt_ids(s.messages[:-1])
    first_assistant = ids.index(tok.token_id(ASSISTANT))
    assert ids[first_assistant + 1] == tok.token_id(END_THINK)  # the re-rendered opener: reasoning dropped
    assert s.turns[1].reused_tokens == first_assistant + 1  # up to where the reasoning started


def test_quick_instruction_prefills_only_the_task_token(engine):
    tok = engine.tokenizer
    s = Session(engine, mode="chat")
    s.send("Plan a trip to Lisbon in May, with museums and food.", max_new_tokens=8)
    messages, trace_ids = [dict(m) for m in s.messages], list(s.trace.ids)
    q = s.quick("title", max_new_tokens=6)
    assert q.stats.prefilled_tokens == 1 and q.stats.kind == "title"
    assert s.messages == messages and s.trace.ids == trace_ids  # the session is as it was
    # same answer as the same task run as a separate request (full prefill)
    ids = encode_chat(tok, s.quick_messages("title"), mode="chat")
    assert ids[-1] == tok.token_id(TASK_TOKENS["title"]) and q.stats.prompt_tokens == len(ids)
    alone = engine.generate(ids, max_new_tokens=6)
    assert q.token_ids == alone.token_ids[:len(q.token_ids)]
    a = s.quick("action", max_new_tokens=2)  # "action" opens the assistant turn: opener + task token
    assert a.stats.prefilled_tokens == 1  # <｜Assistant｜></think> come from the snapshot after the opener
    with pytest.raises(ValueError, match="unknown Quick Instruction task"):
        s.quick("summary")


def test_quick_on_a_pending_user_turn_then_generate_reuses_its_prefill(engine):
    s = Session(engine, mode="chat")
    s.add({"role": "user", "content": "Find flights to Oslo"})
    q = s.quick("query", max_new_tokens=3)
    assert q.stats.reused_tokens == 0
    s.generate(max_new_tokens=2)
    assert s.turns[-1].prefilled_tokens == 2  # only <｜Assistant｜></think>: the user turn came from quick()


# ---- reply splitting -----------------------------------------------------------------------------------------------
def test_reply_stream_splits_reasoning_content_and_tool_calls(engine):
    tok = engine.tokenizer
    call = [{"type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]
    ids = scripted(engine, ["why", _c(END_THINK), "Sure.", *render_tool_calls(call)])
    rs = ReplyStream(tok, thinking=True)
    pieces = [p for t in ids for p in rs.push(t)] + rs.finish()
    assert "".join(t for k, t in pieces if k == "content") == "Sure." == rs.content
    assert rs.reasoning == "why" and rs.tool_calls == call and rs.errors == []
    plain = ReplyStream(tok, tool_calls=False)  # without tools the markup is content
    for t in ids[ids.index(tok.token_id(END_THINK)) + 1:]:
        plain.push(t)
    plain.finish()
    assert "<｜DSML｜tool_calls>" in plain.content and plain.tool_calls == []


def test_reply_stream_stop_strings_are_held_back_and_cut(engine):
    tok = engine.tokenizer
    rs = ReplyStream(tok, stop=("END",))
    released = []
    for ch in "abc EN":
        released += rs.push(tok.encode(ch)[0])
    assert "".join(t for _, t in released) == "abc " and not rs.stopped  # "EN" may become the stop string
    rs.push(tok.encode("D")[0])
    assert rs.stopped and rs.content == "abc "


# ---- the scheduler ---------------------------------------------------------------------------------------------------
def test_batched_sequences_match_running_alone(engine):
    tok = engine.tokenizer
    prompts = [[0] + tok.encode(p) for p in ("one two three", "a much longer prompt with more tokens in it", "x")]
    alone = [engine.generate(p, max_new_tokens=5).token_ids for p in prompts]
    sched = Scheduler(engine, step_tokens=8)  # small chunks: prefill interleaves with the others' decode
    seqs = [sched.submit(Sequence(p, max_tokens=5)) for p in prompts]
    while not all(s.done.is_set() for s in seqs):
        sched.step()
    assert [s.output for s in seqs] == alone
    assert sched.batch_rows > sched.steps  # the steps really were batched


def test_scheduler_queue_bound_cancel_and_zero_tokens(engine):
    sched = Scheduler(engine, max_queue=2)
    a, b = sched.submit(Sequence([0, 40, 41], max_tokens=50)), sched.submit(Sequence([0, 42], max_tokens=0))
    with pytest.raises(QueueFull):
        sched.submit(Sequence([0, 43]))
    sched.step()
    a.cancel()
    sched.step()
    assert a.finish_reason == "cancelled" and len(a.output) == 1 and sched.active == []
    assert b.finish_reason == "length" and b.output == []


def test_scheduler_thread_serves_sessions_concurrently(engine):
    import threading

    sched = Scheduler(engine).start()
    try:
        sessions = [Session(engine, scheduler=sched) for _ in range(4)]
        threads = [threading.Thread(target=s.send, args=(f"hello {i}",), kwargs={"max_new_tokens": 4})
                   for i, s in enumerate(sessions)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert all(len(s.turns) == 1 and s.turns[0].generated_tokens == 4 for s in sessions)
    finally:
        sched.stop()
    assert sched._thread is None


def test_prefix_pool_reuses_across_requests(engine):
    tok = engine.tokenizer
    pool = PrefixPool(tok, capacity=2)
    msgs = [{"role": "user", "content": "hello there"}]
    ids = encode_chat(tok, msgs)
    seq = Scheduler(engine).run(Sequence(ids, max_tokens=4, snap_at=turn_boundaries(ids, tok), tokenizer=tok))
    pool.store(seq.prompt + seq.output[:-1], seq.snapshots)
    nxt = encode_chat(tok, msgs + [{"role": "assistant", "content": seq.text.content},
                                   {"role": "user", "content": "more"}])
    run_ids, reused, snap = pool.lookup(nxt)
    assert reused == len(ids) + len(seq.output) - 1 and snap.state.n_tokens == reused
    assert tok.decode(run_ids) == tok.decode(nxt)
    for i in range(3):  # capacity bounds the pool
        pool.store([0, 100 + i], {2: snap})
    assert len(pool) == 2


def test_terminal_chat_shows_thinking_apart_and_runs_commands(engine):
    import io

    from flashport.chat_cli import run_chat

    s = Session(engine, mode="thinking")
    s.scheduler.script_next(scripted(engine, ["hmm", _c(END_THINK), "Hi there"]))
    lines = iter(["hello", "/stats", "/mode chat", "/mode bogus", "/title", "/clear", "/quit"])
    out = io.StringIO()
    run_chat(s, {"max_new_tokens": 20}, read=lambda prompt: next(lines), out=out)
    text = out.getvalue()
    assert "thinking: hmm\nHi there" in text and "0 tokens reused" in text
    assert "1 turn: prompt" in text and "(mode: chat)" in text and "modes: chat" in text and "title: " in text
    assert "(conversation cleared)" in text and s.messages == [] and s.mode == "chat"
