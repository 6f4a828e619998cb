"""Multi-turn chat sessions that reuse the KV cache, and Quick Instruction.

A session keeps the token ids it has already run through the model (`KVTrace.ids`) and cheap snapshots of the
sequence state at turn boundaries. Each new turn renders the whole conversation (flashport.chat), restores the
longest snapshot that is a prefix of the new prompt, and prefills only the rest.

    s = Session(engine, mode="thinking")
    reply = s.send("Hi!", max_new_tokens=64)       # reply.content, reply.reasoning_content, reply.tool_calls
    s.turns[-1]                                    # TurnStats: prompt, reused and prefilled tokens
    title = s.quick("title")                       # side task on the same KV; the session is unchanged

Why snapshots are cheap: the model never modifies a state tensor in place, it assigns new tensors (model.py), so
a copy of the SeqState/LayerState/PoolState dataclasses that shares the tensors (`snapshot`) stays valid while the
live state moves on. Snapshot points (`turn_boundaries`): just before each `<｜Assistant｜>` (where a Quick
Instruction task token attaches to the user turn), just after each assistant opener `<｜Assistant｜>` +
`<think>`/`</think>` (plain thinking chat re-renders the next prompt with earlier reasoning dropped and the opener
changed to `</think>`, so reuse stops right after `<｜Assistant｜>`), and the end of every generation.

Exactness: a restored snapshot is the same object state the model had at that position, so continuing from it is
bit-exact with continuing the original sequence when the continuation runs alone; inside a batched decode step
the projections run on several rows at once and agree within float tolerance (see scheduler.py).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass


from .chat import MODES, encode_chat
from .scheduler import Scheduler, Sequence, Snapshot, snapshot
from .tokenizer import ASSISTANT, END_THINK, TASK_TOKENS, THINK


class KVTrace:
    """The ids a sequence has run through the model plus snapshots of its state at some positions.

    Every snapshot at position p is valid for `ids[:p]`. `restore(new_ids)` finds the longest snapshot that is a
    prefix of new_ids; `update(ids, snaps)` records a new run and drops snapshots past the point where it diverged.
    """

    def __init__(self, max_snapshots: int = 64):
        self.ids: list[int] = []
        self.snaps: dict[int, Snapshot] = {}
        self.max_snapshots = max_snapshots

    def restore(self, new_ids: list[int]) -> tuple[int, Snapshot | None]:
        """(tokens reused, a snapshot to continue from or None). The snapshot's state is a fresh shallow copy."""
        from .chat import common_prefix_len

        common = common_prefix_len(self.ids, new_ids)
        best = max((p for p in self.snaps if p <= common), default=0)
        if best == 0:
            return 0, None
        snap = self.snaps[best]
        return best, Snapshot(snapshot(snap.state), snap.logits)

    def update(self, ids: list[int], snaps: dict[int, Snapshot]):
        from .chat import common_prefix_len

        common = common_prefix_len(self.ids, ids)
        if common < len(ids):  # ids extend or diverge from what we had: later snapshots are stale
            self.snaps = {p: s for p, s in self.snaps.items() if p <= common}
            self.ids = list(ids)
        self.snaps.update({p: s for p, s in snaps.items() if 0 < p <= len(ids)})
        while len(self.snaps) > self.max_snapshots:  # keep the newest (longest) ones
            del self.snaps[min(self.snaps)]

    def clear(self):
        self.ids, self.snaps = [], {}


def turn_boundaries(ids: list[int], tokenizer) -> list[int]:
    """Snapshot positions in a rendered prompt: before and after each `<｜Assistant｜>`, and after its opener."""
    assistant, openers = tokenizer.token_id(ASSISTANT), {tokenizer.token_id(THINK), tokenizer.token_id(END_THINK)}
    out = []
    for i, t in enumerate(ids):
        if t == assistant:
            out += [i, i + 1]  # the user turn ends / plain thinking chat re-renders the opener after this
            if i + 1 < len(ids) and ids[i + 1] in openers:
                out.append(i + 2)
    return sorted({p for p in out if 0 < p <= len(ids)})


def align_to_cache(cached: list[int], new: list[int], tokenizer) -> list[int]:
    """Reuse the model's own token ids where the re-rendered prompt only re-tokenized the same text.

    A reply the model generated, decoded and rendered again into the next prompt can tokenize differently (BPE
    merges text the model produced token by token). Past the common prefix, while both sequences continue with a
    run of plain-text ids that decode to the same text and end at the same control id, the cached run replaces the
    new one. Only runs without control ids are taken, and the control id that ends them must match, so no text can
    become a control token. Returns the ids to prefill (the same text as `new`).
    """
    from .chat import common_prefix_len

    control_ids = tokenizer.special_ids
    i = common_prefix_len(cached, new)
    out, p, q = list(cached[:i]), i, i

    def text(ids):
        return b"".join(tokenizer.token_bytes(t) for t in ids)

    def next_control(seq, start):
        return next((k for k in range(start, len(seq)) if seq[k] in control_ids), -1)

    while p < len(cached) and q < len(new):
        pc, qc = next_control(cached, p), next_control(new, q)
        if pc < 0 or qc < 0 or cached[pc] != new[qc] or text(cached[p:pc]) != text(new[q:qc]):
            break
        out += cached[p:pc + 1]
        p, q = pc + 1, qc + 1
        k = common_prefix_len(cached[p:], new[q:])
        out += cached[p:p + k]
        p, q = p + k, q + k
    return out + new[q:]


@dataclass
class TurnStats:
    prompt_tokens: int
    reused_tokens: int  # restored from a snapshot
    prefilled_tokens: int  # run through the model as prompt
    generated_tokens: int
    seconds: float
    kind: str = "turn"  # "turn" or a Quick Instruction task
    first_token_seconds: float = 0.0  # time to the first token: restore + prefill


@dataclass
class Reply:
    content: str
    reasoning_content: str | None
    tool_calls: list[dict]
    errors: list[str]
    finish_reason: str
    token_ids: list[int]
    stats: TurnStats

    def message(self) -> dict:
        """The OpenAI-style assistant message appended to the conversation."""
        m = {"role": "assistant", "content": self.content}
        if self.reasoning_content is not None:
            m["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            m["tool_calls"] = self.tool_calls
        return m


class Session:
    """One conversation on one engine. Not thread-safe: use one session per conversation.

    `scheduler`: a flashport.scheduler.Scheduler to share the model with other sequences (its thread batches the
    decode steps); by default a private one that runs in the caller's thread.
    """

    def __init__(self, engine, mode: str = "chat", tools: list[dict] | None = None, system: str | None = None,
                 scheduler=None, max_snapshots: int = 64):
        if mode not in MODES:
            raise ValueError(f"unknown chat mode {mode!r}; expected one of {sorted(MODES)}")
        self.engine, self.mode, self.tools = engine, mode, tools
        self.tok = engine.tokenizer
        self.scheduler = scheduler or Scheduler(engine)
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.trace = KVTrace(max_snapshots)
        self.turns: list[TurnStats] = []

    # -- conversation ------------------------------------------------------------------------------------------
    def add(self, message: dict) -> "Session":
        """Append a message (user, tool result, system...) without generating."""
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"a chat message is a dict with a 'role', got {message!r:.80}")
        self.messages.append(dict(message))
        return self

    def tool_result(self, tool_call_id: str, content: str) -> "Session":
        return self.add({"role": "tool", "tool_call_id": tool_call_id, "content": content})

    def send(self, content: str, **kwargs) -> "Reply":
        """Add a user turn and generate the assistant's reply (see `generate`)."""
        return self.add({"role": "user", "content": content}).generate(**kwargs)

    def clear(self):
        """Forget the conversation (keeps the system prompt) and the cached KV."""
        self.messages = [m for m in self.messages[:1] if m["role"] == "system"]
        self.trace.clear()

    @property
    def thinking(self) -> bool:
        return MODES[self.mode][0]

    def prompt_ids(self, messages: list[dict] | None = None) -> list[int]:
        ids = encode_chat(self.tok, self.messages if messages is None else messages, self.tools, self.mode)
        return align_to_cache(self.trace.ids, ids, self.tok)

    def generate(self, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, on_token=None) -> Reply:
        """Generate the next assistant turn, append it to the messages, and return it.

        on_token(kind, text): called as text arrives, kind "reasoning" or "content" (a terminal shows them apart).
        """
        ids = self.prompt_ids()
        seq, reused, t0 = self._run(ids, max_new_tokens, temperature, top_p, seed, on_token)
        self.trace.update(seq.prompt + seq.output[:-1], seq.snapshots)
        out = seq.text
        calls = [{"id": f"call_{uuid.uuid4().hex[:24]}", **c} for c in out.tool_calls]
        stats = TurnStats(len(ids), reused, len(ids) - reused, len(seq.output), time.perf_counter() - t0,
                          first_token_seconds=_ttft(seq, t0))
        reply = Reply(out.content, out.reasoning if self.thinking else None, calls, out.errors,
                      "tool_calls" if calls else seq.finish_reason, list(seq.output), stats)
        self.turns.append(stats)
        self.messages.append(reply.message())
        return reply

    def stream(self, **kwargs) -> Iterator[tuple[str, str]]:
        """Like `generate`, as an iterator of (kind, text) pieces; the Reply is then in `self.last_reply`."""
        import queue
        import threading

        pieces: queue.Queue = queue.Queue()
        result = {}

        def work():
            try:
                result["reply"] = self.generate(on_token=lambda k, t: pieces.put((k, t)), **kwargs)
            finally:
                pieces.put(None)

        th = threading.Thread(target=work, daemon=True)
        th.start()
        while (item := pieces.get()) is not None:
            yield item
        th.join()
        self.last_reply = result.get("reply")

    # -- Quick Instruction -------------------------------------------------------------------------------------
    def quick(self, task: str, max_new_tokens: int = 32) -> Reply:
        """Run a side task ("title", "query", "action", "authority", "domain", "read_url") on this conversation.

        The task token attaches to the last user turn (the release's rendering), so the prompt is the session's
        context up to the end of that turn plus the task token: the KV up to there comes from a snapshot and only
        the task token (for "action": `<｜Assistant｜>` + opener + `<｜action｜>`) is prefilled. Greedy. The
        conversation and its messages stay as they were; the snapshot before the task token is kept in the cache.
        """
        if task not in TASK_TOKENS:
            raise ValueError(f"unknown Quick Instruction task {task!r}; expected one of {sorted(TASK_TOKENS)}")
        messages = self.quick_messages(task)
        ids = self.prompt_ids(messages)
        task_pos = len(ids) - 1 - ids[::-1].index(self.tok.token_id(TASK_TOKENS[task]))
        start = task_pos - (2 if task == "action" else 0)  # "action" also opens the assistant turn
        seq, reused, t0 = self._run(ids, max_new_tokens, 0.0, 1.0, None, None, chat_reply=False, extra_snaps=[start])
        self.trace.update(ids[:start], {p: s for p, s in seq.snapshots.items() if p <= start})
        text = self.tok.decode([t for t in seq.output if t != self.tok.eos_id], skip_special=True).strip()
        stats = TurnStats(len(ids), reused, len(ids) - reused, len(seq.output), time.perf_counter() - t0, task,
                          _ttft(seq, t0))
        self.turns.append(stats)
        return Reply(text, None, [], [], seq.finish_reason, list(seq.output), stats)

    def quick_messages(self, task: str) -> list[dict]:
        """The conversation up to its last user turn, with `task` attached to that turn."""
        last = max((i for i, m in enumerate(self.messages) if m["role"] in ("user", "tool")), default=-1)
        if last < 0:
            raise ValueError("Quick Instruction needs a user turn in the session")
        msgs = [dict(m) for m in self.messages[:last + 1]]
        msgs[-1]["task"] = task
        return msgs

    # -- running -----------------------------------------------------------------------------------------------
    def _run(self, ids, max_new_tokens, temperature, top_p, seed, on_token, chat_reply=True, extra_snaps=()):
        t0 = time.perf_counter()
        reused, snap = self.trace.restore(ids)
        seq = Sequence(ids, max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                       snap_at=[*turn_boundaries(ids, self.tok), *extra_snaps], start=snap,
                       thinking=self.thinking if chat_reply else False, tokenizer=self.tok, on_text=on_token,
                       tool_calls=chat_reply and bool(self.tools))
        self.scheduler.run(seq)
        if seq.error:
            raise seq.error
        return seq, reused, t0


def _ttft(seq, t0: float) -> float:
    return seq.t_first - t0 if seq.t_first else 0.0


class PrefixPool:
    """Recent sequences' traces, for KV reuse across the requests of a stateless API (the OpenAI client re-sends
    the whole conversation every turn). At most `capacity` traces, least recently used evicted. Thread-safe."""

    def __init__(self, tokenizer, capacity: int = 16, max_snapshots: int = 16):
        import threading
        from collections import OrderedDict

        self.tok, self.capacity, self.max_snapshots = tokenizer, capacity, max_snapshots
        self.traces: OrderedDict[int, KVTrace] = OrderedDict()
        self._lock, self._next = threading.Lock(), 0

    def lookup(self, ids: list[int]) -> tuple[list[int], int, Snapshot | None]:
        """(ids to run, tokens reused, snapshot): the longest reusable prefix over all traces (ids re-aligned to
        that trace's own token ids where the text is the same, see `align_to_cache`)."""
        best: tuple[list[int], int, Snapshot | None] = (ids, 0, None)
        with self._lock:
            hit = None
            for key, tr in self.traces.items():
                aligned = align_to_cache(tr.ids, ids, self.tok)
                n, snap = tr.restore(aligned)
                if n > best[1]:
                    best, hit = (aligned, n, snap), key
            if hit is not None:
                self.traces.move_to_end(hit)
        return best

    def store(self, ids: list[int], snaps: dict[int, Snapshot]):
        """Record a finished sequence: it extends the trace it continued, or starts a new one."""
        from .chat import common_prefix_len

        if not snaps:
            return
        with self._lock:
            key = next((k for k, tr in self.traces.items() if tr.ids
                        and common_prefix_len(tr.ids, ids) == len(tr.ids)), None)
            if key is None:
                key, self._next = self._next, self._next + 1
                self.traces[key] = KVTrace(self.max_snapshots)
            self.traces[key].update(ids, snaps)
            self.traces.move_to_end(key)
            while len(self.traces) > self.capacity:
                self.traces.popitem(last=False)

    def __len__(self) -> int:
        return len(self.traces)


__all__ = ["Session", "PrefixPool", "Reply", "TurnStats", "KVTrace", "Snapshot", "snapshot", "turn_boundaries",
           "align_to_cache"]
