"""The engine: load a checkpoint, prefill in chunks, decode, sample. A thin loop around `model.Transformer`.

    engine = flashport.Engine.load("path/to/checkpoint")
    out = engine.generate("Once upon a time", max_new_tokens=32)
    for piece in engine.generate("Hello", max_new_tokens=32, stream=True):
        print(piece, end="")

With a KV directory (`Engine.load(path, kv_dir=..., kv_strategy="periodic:4096")`) prompts go through the prefix
cache of flashport.kv: the longest cached prefix is restored, the rest prefilled, new blocks stored in the
background (`engine.prefill_cached`, `engine.kv.stats()`). `deterministic=True` selects the torch backend's
batch-invariant ops and block-aligned prefill chunks: a restored sequence continues bit-identically.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import CheckpointReader
from .kv import KVManager, PrefillStats, check_fits, chunk_spans, model_identity, prefill_cached
from .config import ModelConfig
from .model import SeqState, Transformer
from .tokenizer import Tokenizer

log = logging.getLogger("flashport.engine")


class RequestError(ValueError):
    """A request the engine refuses (empty prompt, context too long, bad sampling parameters)."""


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    finish_reason: str  # "stop" (EOS or a stop id) or "length"
    timings: dict = field(default_factory=dict)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / max(self.prefill_seconds, 1e-9)

    @property
    def decode_tok_s(self) -> float:
        """Decode forward passes per second (the first new token comes from the prefill's logits)."""
        return self.timings.get("decode_steps", 0) / max(self.decode_seconds, 1e-9)


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    """Greedy at temperature 0, else nucleus sampling over softmax(logits / temperature)."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, path: Path | None = None,
                 prefill_chunk: int = 1024, deterministic: bool | None = None):
        self.model, self.tokenizer, self.path = model.eval(), tokenizer, path
        self.cfg: ModelConfig = model.cfg
        self.prefill_chunk = prefill_chunk
        caps = getattr(model.ops, "caps", None)
        # deterministic: block-aligned prefill chunks (see flashport.kv.chunk_spans); bit-exact with the
        # backend's batch-invariant ops (torch backend, deterministic=True)
        self.deterministic = bool(caps and caps.deterministic) if deterministic is None else deterministic
        self.kv: KVManager | None = None

    @classmethod
    def load(cls, path: str | Path, backend: str = "auto", device: str | None = None, kv_dir: str | Path | None = None,
             kv_strategy: str = "periodic:4096", kv_capacity: int = 20 << 30, kv_memory: int = 256 << 20,
             deterministic: bool = False, **kwargs) -> "Engine":
        """Open a release-format or transformers-format checkpoint directory and run it on `backend`
        ("auto", "torch", "triton", "onnxruntime" or a plugin's name); unsupported ops fall back per op.

        kv_dir: a directory for the durable prefix cache (None: no cache); kv_strategy: full | periodic:P | none
        (what is stored of the sliding windows); kv_capacity: disk bytes; kv_memory: host-memory tier bytes.
        deterministic: bit-identical results across restores and batch compositions (torch backend only).
        """
        from .backends import Ops, create

        options = {"device": device} if device else {}
        if deterministic:
            if backend not in ("auto", "torch"):
                raise ValueError(f"deterministic mode needs the torch backend, not {backend!r}")
            backend, options["deterministic"] = "torch", True
        ops = Ops(create(backend, **options))
        path = Path(path)
        if (path / "manifest.json").exists():  # a deployment bundle (flashport export)
            from .export.bundle import load_model

            model = load_model(path)
        else:
            reader = CheckpointReader(path)
            model = Transformer(reader.cfg)
            model.load_state_dict(reader.load_state_dict())
        model.set_ops(ops)
        if ops.caps.whole_step:  # a backend that runs whole decoder steps (contract 1.1: onnxruntime)
            model = ops.backend.bind_model(model, path)
        tok_file = path / "tokenizer.json"
        tokenizer = Tokenizer.from_file(tok_file) if tok_file.exists() else Tokenizer.default()
        if tokenizer.vocab_size > model.cfg.vocab_size:
            raise ValueError(f"{tok_file}: tokenizer has {tokenizer.vocab_size} ids, the model only "
                             f"{model.cfg.vocab_size}")
        engine = cls(model, tokenizer, path, **kwargs)
        if kv_dir is not None:
            engine.enable_kv(kv_dir, kv_strategy, kv_capacity, kv_memory)
        return engine

    def enable_kv(self, kv_dir: str | Path | None, strategy: str = "periodic:4096", capacity: int = 20 << 30,
                  memory: int = 256 << 20, fsync: bool = True) -> KVManager:
        """Attach a prefix cache (kv_dir None: memory tier only). Its namespace names these weights and the
        numeric mode, so a cache is never shared with another model or with non-deterministic results."""
        if self.kv is not None:
            self.kv.close()
        ns = model_identity(self.model, "det" if self.deterministic else "")
        self.kv = KVManager(self.cfg, kv_dir, ns, strategy, capacity, memory, fsync=fsync)
        return self.kv

    def close(self) -> None:
        """Flush and close the KV cache (pending block writes finish first)."""
        if self.kv is not None:
            self.kv.close()
            self.kv = None

    # -- low level -------------------------------------------------------------------------------------------
    def new_state(self) -> SeqState:
        return SeqState.empty(self.cfg)

    def _check_ids(self, ids: list[int], state: SeqState | None = None):
        if not ids:
            raise RequestError("empty prompt")
        bad = [i for i in ids if not 0 <= i < self.cfg.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} outside the vocabulary [0, {self.cfg.vocab_size})")
        total = len(ids) + (state.n_tokens if state else 0)
        if total > self.cfg.max_position_embeddings:
            raise RequestError(f"context of {total} tokens exceeds the model's limit of "
                               f"{self.cfg.max_position_embeddings} (max_position_embeddings)")

    @torch.no_grad()
    def prefill(self, ids: list[int], state: SeqState, progress: bool | None = None) -> torch.Tensor:
        """Feed ids into state in chunks; returns the logits of the last position [V]."""
        self._check_ids(ids, state)
        start = state.n_tokens
        spans = chunk_spans(start, start + len(ids), self.prefill_chunk, self.cfg.kv_block_tokens, self.deterministic)
        show = progress if progress is not None else len(ids) > 4 * self.prefill_chunk
        last = None
        for a, b in tqdm(spans, desc="prefill", unit="chunk", disable=not show):
            chunk = torch.tensor(ids[a - start:b - start])
            last = self.model.forward_batch([chunk], [state], all_logits=False)[0][0]
        return last

    def prefill_cached(self, ids: list[int], progress: bool | None = None) -> tuple[SeqState, torch.Tensor, PrefillStats]:
        """Prefill a new sequence through the KV cache: restore the longest cached prefix, prefill the rest,
        store the new blocks. -> (state, last position's logits [V], stats: tokens loaded / recomputed / new).
        Without a cache (engine.kv None) it is a plain prefill. Any cache error falls back to recompute."""
        state, logits, stats, _ = self._prefill_cached(ids, progress)
        return state, logits, stats

    def _prefill_cached(self, ids, progress=None):
        ids = list(ids)
        self._check_ids(ids)
        try:
            check_fits(self.cfg, len(ids))
        except MemoryError as e:
            raise RequestError(str(e)) from None
        return prefill_cached(self.model, self.kv, ids, self.prefill_chunk, self.deterministic, progress)

    @torch.no_grad()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """Full-sequence next-token logits [len(token_ids), vocab], float32."""
        self._check_ids(list(token_ids))
        state, out = self.new_state(), []
        for a, b in chunk_spans(0, len(token_ids), self.prefill_chunk, self.cfg.kv_block_tokens, self.deterministic):
            chunk = torch.tensor(list(token_ids[a:b]))
            out.append(self.model.forward_batch([chunk], [state])[0])
        return torch.cat(out).float()

    def quick(self, session, task: str, **kwargs):
        """Quick Instruction: append `task`'s token after a chat session's context, reuse its KV, return the
        short answer and leave the session as it was (flashport.session.Session.quick)."""
        return session.quick(task, **kwargs)

    def encode(self, prompt: str | list[int], add_bos: bool = True) -> list[int]:
        if isinstance(prompt, str):
            return ([self.tokenizer.bos_id] if add_bos else []) + self.tokenizer.encode(prompt)
        return list(prompt)

    # -- generation ------------------------------------------------------------------------------------------
    def generate(self, prompt: str | list[int], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stream: bool = False,
                 stop_ids: set[int] | None = None) -> Generation | Iterator[str]:
        """Generate from a text prompt (BOS is prepended) or a list of token ids.

        Returns a `Generation` (token ids, text, timings), or with stream=True an iterator of text pieces.
        """
        if max_new_tokens < 0 or not 0 < top_p <= 1.0 or temperature < 0:
            raise RequestError("need max_new_tokens >= 0, temperature >= 0 and 0 < top_p <= 1")
        ids = self.encode(prompt)
        self._check_ids(ids + [0] * max_new_tokens)
        steps = self._steps(ids, max_new_tokens, temperature, top_p, seed, stop_ids)
        if stream:
            return self._stream_text(steps)
        out = list(steps)
        timings = out.pop() if out and isinstance(out[-1], dict) else {}
        return Generation(out, self.tokenizer.decode(out, skip_special=True), len(ids),
                          timings.get("prefill_seconds", 0.0), timings.get("decode_seconds", 0.0),
                          timings.get("finish_reason", "length"), timings)

    def _steps(self, ids, max_new_tokens, temperature, top_p, seed, stop_ids):
        """Yields each new token id, then one dict of timings."""
        with torch.no_grad():
            yield from self._steps_no_grad(ids, max_new_tokens, temperature, top_p, seed, stop_ids)

    def _steps_no_grad(self, ids, max_new_tokens, temperature, top_p, seed, stop_ids):
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        stop = {self.tokenizer.eos_id} | set(stop_ids or ())
        t0 = time.perf_counter()
        state, logits, kv_stats, tracker = self._prefill_cached(ids)
        t1 = time.perf_counter()
        reason, n = "length", 0
        for n in range(1, max_new_tokens + 1):
            tok = sample(logits, temperature, top_p, gen)
            yield tok
            if tok in stop:
                reason = "stop"
                break
            if n < max_new_tokens:
                logits = self.model.forward_batch([torch.tensor([tok])], [state], all_logits=False)[0][0]
                if self.kv is not None:  # blocks the reply completes serve the next turn (enqueue only)
                    tracker.extend([tok])
                    self.kv.observe(tracker, state)
        t2 = time.perf_counter()
        yield {"prefill_seconds": t1 - t0, "decode_seconds": t2 - t1, "finish_reason": reason,
               "decode_steps": max(n - 1, 0), "kv": kv_stats.as_dict()}

    def _stream_text(self, steps) -> Iterator[str]:
        from .tokenizer import StreamDecoder

        dec = StreamDecoder(self.tokenizer, skip_special=True)
        for tok in steps:
            if isinstance(tok, dict):
                break
            if piece := dec.push(tok):
                yield piece
        if tail := dec.finish():
            yield tail
