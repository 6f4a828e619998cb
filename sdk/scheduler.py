"""Continuous batching: one engine thread advances every running sequence with one `Transformer.forward_batch`.

    sched = Scheduler(engine, max_queue=64, max_batch=32).start()    # a background engine thread
    seq = sched.submit(Sequence(prompt_ids, max_tokens=32, temperature=0.7, seed=1, tokenizer=engine.tokenizer))
    seq.done.wait(); seq.output, seq.finish_reason, seq.text.content
    sched.stop(drain=True)

Each step takes the decode token of every sequence that is generating and a prefill chunk of every sequence that
is still reading its prompt (chunked prefill), up to `step_tokens` tokens, and runs them in one forward pass:
projections and the MoE on all rows together, attention per sequence (model.py). A sequence joins at the next
step after it is submitted and leaves as soon as it finishes or is cancelled; the others never wait for it.

Exactness: a sequence's logits in a batched step agree with running it alone within float tolerance (the batched
matmuls may sum in another order); greedy output is the same unless two logits tie within that tolerance.
A sequence that runs alone (batch of one) is bit-exact with `Engine.generate`.

Prefix reuse plugs in at one place, `Scheduler._initial_state`: a sequence either brings a snapshot (`start`, from
a Session or the server's prefix pool) or, when the engine has a KV cache attached (`engine.kv`, flashport.kv),
its prompt comes from `engine.prefill_cached(ids) -> (state, last_logits, stats)`.

Fault containment: an exception while admitting, prefilling, sampling or retiring one sequence fails that sequence
alone (`finish_reason` "error", `error` set); a failed batched forward pass fails the sequences of that step. The
engine thread survives both. If it ever dies anyway (a BaseException, a bug outside the per-sequence guards), every
waiting and running sequence is failed, `Scheduler.failure` says why, and `submit` refuses new work
(`EngineDead`), so no request waits forever for a thread that is gone.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

import torch

from .chat import parse_assistant, split_releasable
from .engine import sample
from .model import LayerState, SeqState
from .tokenizer import END_THINK, THINK, StreamDecoder

log = logging.getLogger("flashport.scheduler")
TOOL_CALLS_OPEN = "<｜DSML｜tool_calls>"


def snapshot(state: SeqState) -> SeqState:
    """A copy of `state` that shares its tensors: valid because the model replaces state tensors, never edits them."""
    return SeqState(state.n_tokens, [LayerState(st.window, copy.copy(st.comp), copy.copy(st.index))
                                     for st in state.layers])


@dataclass
class Snapshot:
    """A sequence's state after ids[:pos], with the next-token logits (so a full hit needs no forward pass)."""

    state: SeqState  # covers ids[:pos]
    logits: torch.Tensor  # [V] next-token logits after ids[:pos]


class QueueFull(RuntimeError):
    """The scheduler's waiting queue is at its bound (the server answers 429)."""


class SchedulerClosed(RuntimeError):
    """The scheduler is shutting down and takes no new sequences."""


class EngineDead(SchedulerClosed):
    """The engine thread has died (`Scheduler.failure` says why): no sequence can run any more."""


class NonFiniteLogits(ArithmeticError):
    """The model produced NaN or +inf logits for a sequence (a backend fault): nothing can be sampled from them."""


def check_logits(logits: torch.Tensor) -> None:
    """Raise NonFiniteLogits unless `logits` [V] can be sampled from: no NaN, no +inf, not all -inf (-inf alone is
    a masked token). Softmax and argmax give garbage ids silently on such rows; multinomial raises a vague error."""
    if bool(torch.isnan(logits).any()) or bool(torch.isposinf(logits).any()) or bool(torch.isneginf(logits).all()):
        n_nan, n_inf = int(torch.isnan(logits).sum()), int(torch.isinf(logits).sum())
        raise NonFiniteLogits(f"the model produced non-finite logits ({n_nan} NaN, {n_inf} inf of {logits.numel()})")


class ReplyStream:
    """Splits generated ids into reasoning, content and tool-call text as they arrive.

    Reasoning is everything before the `</think>` id (thinking mode only). Content is released as soon as it can no
    longer turn into a stop string or the tool-call opener `<｜DSML｜tool_calls>`: the longest tail that is a prefix
    of one of them is held back. Stop strings end the content (they are not included) and apply to content only.
    From the opener on, the text is tool-call markup, parsed at the end by flashport.chat.parse_assistant.
    """

    def __init__(self, tokenizer, thinking: bool = False, stop: tuple[str, ...] = (), tool_calls: bool = True):
        self.dec = StreamDecoder(tokenizer)  # control ids decode to their spelling: DSML markup needs them
        self.think_id, self.end_think_id = tokenizer.token_id(THINK), tokenizer.token_id(END_THINK)
        self.phase = "reasoning" if thinking else "content"
        self.thinking = thinking
        self.reasoning = self.content = self.tools = self._pending = self._rpending = ""
        self.stop = tuple(s for s in stop if s)
        self.opener = TOOL_CALLS_OPEN if tool_calls else None  # without tools, DSML markup is plain content
        self.stopped = False  # a stop string was found: the sequence should end

    def push(self, tok: int) -> list[tuple[str, str]]:
        """Feed one generated id; returns the (kind, text) pieces released, kind "reasoning" or "content"."""
        if self.phase == "reasoning":
            if tok == self.think_id and not self.reasoning:  # the prompt already opened the thinking
                return []
            if tok == self.end_think_id:
                self.phase = "content"
                return self._reason(self.dec.finish(), final=True)
            return self._reason(self.dec.push(tok))
        piece = self.dec.push(tok)
        if self.phase == "tools":
            self.tools += piece
            return []
        return self._release(piece)

    def finish(self) -> list[tuple[str, str]]:
        tail = self.dec.finish()
        if self.phase == "reasoning":
            return self._reason(tail, final=True)
        if self.phase == "tools":
            self.tools += tail
            return []
        return self._release(tail, final=True)

    def _reason(self, piece: str, final: bool = False) -> list[tuple[str, str]]:
        text, self._rpending = split_releasable(self._rpending + piece, final, (), self.opener is not None)
        return self._add("reasoning", text)

    def _add(self, kind: str, text: str) -> list[tuple[str, str]]:
        if not text:
            return []
        setattr(self, kind, getattr(self, kind) + text)
        return [(kind, text)]

    def _release(self, piece: str, final: bool = False) -> list[tuple[str, str]]:
        text, self._pending = self._pending + piece, ""
        if self.stopped:
            return []
        cut = min((i for s in self.stop if (i := text.find(s)) >= 0), default=-1)
        opener = text.find(self.opener) if self.opener else -1
        if cut >= 0 and (opener < 0 or cut < opener):
            self.stopped = True
            return self._add("content", split_releasable(text[:cut], True, (), self.opener is not None)[0])
        if opener >= 0:
            self.phase, self.tools = "tools", text[opener:]
            return self._add("content", text[:opener].removesuffix("\n\n"))
        text, self._pending = split_releasable(text, final, self.stop, self.opener is not None)
        return self._add("content", text)

    def result(self) -> tuple[list[dict], list[str]]:
        """(tool calls, errors) of the whole reply."""
        errors = ["reasoning not closed by </think>"] if self.phase == "reasoning" and self.thinking else []
        if not self.tools:
            return [], errors
        parsed = parse_assistant(self.tools, thinking=False)
        return parsed["tool_calls"], errors + parsed["errors"]

    @property
    def tool_calls(self) -> list[dict]:
        return self.result()[0]

    @property
    def errors(self) -> list[str]:
        return self.result()[1]


class Sequence:
    """One generation request: its prompt, sampling parameters, state and output. Fields are written by the engine
    thread; read them after `done` is set, or from the `on_token` / `on_text` callbacks (engine thread)."""

    def __init__(self, prompt: list[int], max_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop: tuple[str, ...] = (), stop_ids=(), snap_at=(),
                 start: Snapshot | None = None, thinking: bool = False, tokenizer=None, on_text=None,
                 on_token=None, use_prefix_cache: bool = True, tool_calls: bool = True):
        if not prompt:
            raise ValueError("empty prompt")
        self.prompt, self.max_tokens = list(prompt), max_tokens
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.stop_ids = set(stop_ids)
        self.start, self.use_prefix_cache = start, use_prefix_cache
        self.reused = start.state.n_tokens if start else 0
        self.snap_at = sorted({p for p in snap_at if self.reused < p <= len(self.prompt)})
        self.snapshots: dict[int, Snapshot] = {}
        self.text = ReplyStream(tokenizer, thinking, tuple(stop), tool_calls) if tokenizer is not None else None
        self.on_text, self.on_token = on_text, on_token  # on_text(kind, text); on_token(seq, id or None at end)
        self.state = None
        self.logits: torch.Tensor | None = None  # [V] next-token logits once the prompt is in
        self.gen: torch.Generator | None = None
        self.output: list[int] = []
        self.script: list[int] | None = None  # test hook: emit these ids instead of sampling
        self.finish_reason: str | None = None  # "stop", "length", "cancelled", "error"
        self.error: BaseException | None = None
        self.cancelled = False
        self.done = threading.Event()
        self.t_submit = self.t_first = self.t_done = 0.0

    def cancel(self):
        """Ask the engine thread to drop this sequence at its next step (safe from any thread)."""
        self.cancelled = True

    @property
    def prefilled(self) -> int:
        """Prompt tokens this sequence ran through the model itself."""
        return len(self.prompt) - self.reused


class Scheduler:
    def __init__(self, engine, max_queue: int = 64, max_batch: int = 32, step_tokens: int | None = None):
        self.engine, self.model = engine, engine.model
        self.max_queue, self.max_batch = max_queue, max_batch
        self.step_tokens = step_tokens or engine.prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.active: list[Sequence] = []
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._scripts: deque[list[int]] = deque()
        self.failure: str | None = None  # why the engine thread died (None while it is alive or never started)
        self.steps = 0
        self.batch_rows = 0  # sum of sequences over steps: batch_rows / steps = mean batch

    # -- submitting --------------------------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> Sequence:
        with self._cv:
            if self.failure is not None:
                raise EngineDead(f"the engine has stopped: {self.failure}")
            if self._closing:
                raise SchedulerClosed("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (max_queue={self.max_queue})")
            seq.t_submit = time.perf_counter()
            self.waiting.append(seq)
            self._cv.notify()
        return seq

    def run(self, seq: Sequence) -> Sequence:
        """Submit and wait until done: on the engine thread if it runs, else by stepping here."""
        self.submit(seq)
        if self._thread is not None:
            seq.done.wait()
        else:
            while not seq.done.is_set():
                self.step()
        return seq

    def script_next(self, token_ids: list[int]):
        """Test hook: the next admitted sequence emits these ids (then EOS ends it) instead of sampling."""
        self._scripts.append(list(token_ids))

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def alive(self) -> bool:
        """False once the engine thread has died (see `failure`); True before it starts and while it runs."""
        return self.failure is None

    # -- the engine thread -------------------------------------------------------------------------------------
    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self._loop, name="flashport-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, drain: bool = True, timeout: float = 30.0):
        """Stop taking sequences; with drain, let the running and waiting ones finish (up to timeout), then cancel
        whatever is left and end the thread."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        deadline = time.monotonic() + timeout
        # a dead engine thread drains nothing: waiting for it would only delay the shutdown by `timeout`
        while drain and (self.active or self.waiting) and time.monotonic() < deadline and self.alive:
            time.sleep(0.01)
        for seq in list(self.waiting) + list(self.active):
            seq.cancel()
        with self._cv:
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _loop(self):
        try:
            while True:
                with self._cv:
                    while not (self.waiting or self.active or self._closing):
                        self._cv.wait()
                    if self._closing and not (self.waiting or self.active):
                        return
                try:
                    self.step()
                except Exception as e:  # a bug outside the per-sequence guards: fail this step's sequences only
                    log.exception("engine step failed")
                    for seq in [s for s in self.active if s.finish_reason is None]:
                        self._fail(seq, e)
                    with self._cv:
                        self.active = [s for s in self.active if s.finish_reason is None]
        except BaseException as e:  # the thread is dying: nobody may wait for it
            self.failure = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            log.critical("the engine thread died (%s); failing every request", self.failure)
            with self._cv:
                orphans, self.waiting, self.active = list(self.waiting) + list(self.active), deque(), []
            for seq in orphans:
                if not seq.done.is_set():
                    self._fail(seq, EngineDead(f"the engine has stopped: {self.failure}"))
            raise

    @torch.no_grad()
    def step(self):
        """Admit waiting sequences, run one forward pass over all running ones, sample, retire finished ones."""
        with self._cv:
            while self.waiting and len(self.active) < self.max_batch:
                self.active.append(self.waiting.popleft())
                self._admit(self.active[-1])
        for seq in [s for s in self.active if s.cancelled and s.finish_reason is None]:
            self._finish(seq, "cancelled")
        running = [s for s in self.active if s.finish_reason is None]
        if running:
            chunks = self._chunks(running)
            try:
                logits = self.model.forward_batch([torch.tensor(c) for c in chunks],
                                                  [s.state for s in running], all_logits=False)
            except Exception as e:  # one bad step must not take the server down: fail its sequences
                log.exception("forward pass failed")
                for seq in running:
                    self._fail(seq, e)
            else:
                self.steps, self.batch_rows = self.steps + 1, self.batch_rows + len(running)
                for seq, chunk, lg in zip(running, chunks, logits):
                    try:
                        self._advance(seq, len(chunk), lg[0])
                    except Exception as e:  # sampling, a snapshot, a callback: this sequence fails alone
                        self._fail(seq, e)
        with self._cv:
            self.active = [s for s in self.active if s.finish_reason is None]

    def _admit(self, seq: Sequence):
        if self._scripts:
            seq.script = self._scripts.popleft()
        try:
            # manual_seed raises on seeds outside [-2**63, 2**64 - 1]: the server validates, other callers may not
            seq.gen = torch.Generator().manual_seed(seq.seed) if seq.seed is not None else None
            self._initial_state(seq)
            if seq.logits is not None:  # the whole prompt came from a cache
                self._sample(seq)
        except Exception as e:
            self._fail(seq, e)

    def _initial_state(self, seq: Sequence):
        """Where a sequence's KV comes from: its snapshot, the engine's prefix cache, or nothing (prefill all)."""
        if seq.start is not None:
            seq.state = seq.start.state
            if seq.reused == len(seq.prompt):
                seq.logits = seq.start.logits
            return
        if getattr(self.engine, "kv", None) is not None and seq.use_prefix_cache:
            # the engine's disk/host prefix cache: the prompt is restored + prefilled here, outside the batch
            seq.state, seq.logits, stats = self.engine.prefill_cached(seq.prompt)
            seq.reused = int(getattr(stats, "loaded_tokens", 0))
            seq.snap_at = []
            return
        seq.state = self.engine.new_state()

    def _chunks(self, running: list[Sequence]) -> list[list[int]]:
        """The decode token of each generating sequence, then prefill chunks in the budget that is left."""
        budget = max(self.step_tokens - sum(1 for s in running if s.logits is not None), 1)
        prefilling = sum(1 for s in running if s.logits is None)
        share = max(budget // max(prefilling, 1), 1)
        chunks = []
        for seq in running:
            if seq.logits is not None:
                chunks.append([seq.output[-1]])
                continue
            fed = seq.state.n_tokens
            end = min(len(seq.prompt), fed + share, *(p for p in seq.snap_at if p > fed))
            chunks.append(seq.prompt[fed:end])
        return chunks

    def _advance(self, seq: Sequence, n_fed: int, logits: torch.Tensor):
        if seq.logits is None:  # prefilling
            pos = seq.state.n_tokens
            if pos in seq.snap_at:
                seq.snapshots[pos] = Snapshot(snapshot(seq.state), logits)
            if pos < len(seq.prompt):
                return
        seq.logits = logits
        self._sample(seq)

    def _sample(self, seq: Sequence):
        if seq.cancelled:
            return self._finish(seq, "cancelled")
        if seq.max_tokens <= 0:
            return self._finish(seq, "length")
        if seq.script is not None:
            tok = seq.script.pop(0) if seq.script else self.engine.cfg.eos_token_id
        else:
            check_logits(seq.logits)
            tok = sample(seq.logits, seq.temperature, seq.top_p, seq.gen)
        seq.output.append(tok)
        if len(seq.output) == 1:
            seq.t_first = time.perf_counter()
        if tok == self.engine.cfg.eos_token_id or tok in seq.stop_ids:
            return self._finish(seq, "stop")
        if seq.text is not None:
            self._emit(seq, seq.text.push(tok))
        if seq.on_token:
            seq.on_token(seq, tok)
        if seq.text is not None and seq.text.stopped:
            return self._finish(seq, "stop")
        if len(seq.output) >= seq.max_tokens:
            return self._finish(seq, "length")

    def _emit(self, seq: Sequence, pieces):
        if seq.on_text:
            for kind, text in pieces:
                seq.on_text(kind, text)

    def _fail(self, seq: Sequence, error: BaseException):
        """End `seq` with finish_reason "error" (its request answers with `error`); the others run on."""
        if seq.done.is_set():
            return
        if not isinstance(error, (EngineDead, NonFiniteLogits)):
            log.error("sequence failed: %s: %s", type(error).__name__, error, exc_info=error)
        seq.error = error
        self._finish(seq, "error")

    def _finish(self, seq: Sequence, reason: str):
        """Retire `seq`. Never raises: whatever fails here fails the sequence, and its waiter always wakes."""
        seq.finish_reason = reason
        try:
            if seq.text is not None and reason != "error":
                self._emit(seq, seq.text.finish())
            if seq.logits is not None and seq.state is not None and reason in ("stop", "length"):
                # the state covers prompt + output[:-1]: the end of the sequence is one more reusable snapshot
                end = seq.state.n_tokens
                seq.snapshots[end] = Snapshot(snapshot(seq.state), seq.logits)
        except Exception as e:
            log.exception("retiring a sequence failed")
            seq.error, seq.finish_reason = e, "error"
        seq.t_done = time.perf_counter()
        seq.state = None  # the KV lives on only in snapshots
        seq.done.set()
        if seq.on_token:
            try:
                seq.on_token(seq, None)
            except Exception:
                log.exception("on_token callback failed")


__all__ = ["Scheduler", "Sequence", "ReplyStream", "QueueFull", "SchedulerClosed", "EngineDead", "NonFiniteLogits",
           "check_logits"]
