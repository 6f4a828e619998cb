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
import math
import operator
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch
from tqdm import tqdm

from .backends import Ops, create
from .bundle import is_bundle
from .config import ModelConfig
from .distributed import EPGroup, EPRunner, launch_torchrun, rank_plan
from .kv import KVManager, PrefillStats, check_fits, check_not_in_use, chunk_spans, model_identity, prefill_cached
from .loader import open_model
from .model import PREFILL_CHUNK, Linear, SeqState, Transformer, default_prefill_chunk, stored_bytes
from .offload import apply_offload, offload_keep_expert
from .options import (EngineOptions, KVOptions, OffloadOptions, OptionError, ParallelOptions, check_index_numerics,
                      index_numerics_default)
from .tokenizer import Tokenizer

log = logging.getLogger("flashport.engine")
T = TypeVar("T")


class RequestError(ValueError):
    """A request the engine refuses (empty prompt, context too long, bad sampling parameters)."""


SEED_RANGE = (-(2 ** 63), 2 ** 64 - 1)  # what torch.Generator.manual_seed accepts


def check_sampling(max_new_tokens: int, temperature: float, top_p: float, seed: int | None) -> None:
    """Refuse sampling parameters the sampler cannot honour (RequestError naming the parameter): max_new_tokens
    >= 0; temperature finite and >= 0; top_p in (0, 1]; seed None or an integer in SEED_RANGE. NaN fails every
    comparison, so each bound is written to reject it."""
    if not max_new_tokens >= 0:
        raise RequestError(f"max_new_tokens must be >= 0, not {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise RequestError(f"temperature must be finite and >= 0, not {temperature}")
    if not 0 < top_p <= 1.0:
        raise RequestError(f"top_p must be in (0, 1], not {top_p}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise RequestError(f"seed must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], not {seed!r}")


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
    """A model, its tokenizer (None: token ids only) and the generate loop. Build one with `Engine.load` /
    `flashport.load_engine`; `offload` (the expert cache) and `ep_runner` (expert parallelism) are set there."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None, path: Path | None = None,
                 prefill_chunk: int = PREFILL_CHUNK, deterministic: bool | None = None,
                 index_numerics: str | None = None):
        self.model, self.tokenizer, self.path = model.eval(), tokenizer, path
        self.cfg: ModelConfig = model.cfg
        self.prefill_chunk = prefill_chunk
        caps = getattr(model.ops, "caps", None)
        # deterministic: block-aligned prefill chunks (see flashport.kv.chunk_spans); bit-exact with the
        # backend's batch-invariant ops (torch backend, deterministic=True)
        self.deterministic = bool(caps and caps.deterministic) if deterministic is None else deterministic
        # the lightning indexer's numerics for every new sequence (options.check_index_numerics)
        self.index_numerics = check_index_numerics(index_numerics) or index_numerics_default()
        self.kv: KVManager | None = None
        self.offload = None    # flashport.offload.ExpertCache when experts are offloaded
        self.ep_runner = None  # flashport.distributed.EPRunner under expert parallelism

    @classmethod
    def load(cls, path: str | Path, *, backend: str = "auto", backend_options: dict | None = None,
             device: str | None = None, deterministic: bool = False, kv: KVOptions | str | Path | None = None,
             offload: OffloadOptions | None = None, parallel: ParallelOptions | None = None,
             public_key: str | Path | None = None, prefill_chunk: int | None = None, verify: bool | None = None,
             progress: bool = False, index_numerics: str | None = None) -> "Engine":
        """The documented SDK call: the same as `flashport.load_engine` (see there)."""
        return load_engine(path, backend=backend, backend_options=backend_options, device=device,
                           deterministic=deterministic, kv=kv, offload=offload, parallel=parallel,
                           public_key=public_key, prefill_chunk=prefill_chunk, verify=verify, progress=progress,
                           index_numerics=index_numerics)

    def enable_kv(self, kv: KVOptions | str | Path | None = None) -> KVManager:
        """Attach a prefix cache (KVOptions, or a directory for the defaults; None or a KVOptions without a dir:
        memory tier only). Its namespace names these weights and the numeric mode, so a cache is never shared
        with another model or with non-deterministic results."""
        kv = kv if isinstance(kv, KVOptions) else KVOptions(kv)
        if self.kv is not None:
            self.kv.close()
            self.kv = None
        ns = model_identity(self.model, "det" if self.deterministic else "")
        self.kv = KVManager(self.cfg, kv.dir, ns, kv.strategy, kv.capacity, kv.memory, fsync=kv.fsync, dtype=kv.dtype,
                            official_index=self.index_numerics == "release")
        return self.kv

    def close(self) -> None:
        """Flush and close the KV cache (pending block writes finish first), stop the expert prefetcher and leave
        the expert-parallel group."""
        if self.kv is not None:
            self.kv.close()
            self.kv = None
        if self.offload is not None:
            self.offload.close()
        if self.ep_runner is not None:
            self.ep_runner.shutdown()
            self.ep_runner.ep.close()
            self.ep_runner = None

    # -- low level -------------------------------------------------------------------------------------------
    def new_state(self) -> SeqState:
        """An empty sequence, its indexer in `index_numerics`; with a KV cache its compressed entries are kept in
        the cache's numerics (KVOptions.dtype), so what the cache stores is exactly what the model used."""
        if self.kv is not None:
            return self.kv.new_state()
        return SeqState.empty(self.cfg, official_index=self.index_numerics == "release")

    def _check_ids(self, ids: list[int], state: SeqState | None = None):
        if not ids:
            raise RequestError("empty prompt")
        for i in ids:  # ints, numpy ints and integer 0-d tensors; a float would reach the embedding as an index
            try:
                operator.index(i)
            except TypeError:
                raise RequestError(f"token ids must be integers, got {i!r}") from None
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

    def require_tokenizer(self) -> Tokenizer:
        """The tokenizer, or a RequestError saying that this model takes token ids only."""
        if self.tokenizer is None:
            raise RequestError(f"{self.path}: the model has no tokenizer.json, so it takes token ids, not text "
                               "(put the model's tokenizer.json beside its weights)")
        return self.tokenizer

    def encode(self, prompt: str | list[int], add_bos: bool = True) -> list[int]:
        """Token ids of a text prompt (BOS first), or the ids as given."""
        if isinstance(prompt, str):
            tok = self.require_tokenizer()
            return ([tok.bos_id] if add_bos else []) + tok.encode(prompt)
        return list(prompt)

    def decode(self, ids: list[int]) -> str:
        """Text of generated ids ("" without a tokenizer: the ids are the result)."""
        return self.tokenizer.decode(ids, skip_special=True) if self.tokenizer is not None else ""

    # -- generation ------------------------------------------------------------------------------------------
    def generate(self, prompt: str | list[int], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, stream: bool = False,
                 stop_ids: set[int] | None = None) -> Generation | Iterator[str]:
        """Generate from a text prompt (BOS is prepended) or a list of token ids.

        Returns a `Generation` (token ids, text, timings), or with stream=True an iterator of text pieces.
        Raises RequestError, before any work, for parameters outside `check_sampling`'s ranges, ids that are not
        integers in [0, vocab), an empty or too long prompt, and text without a tokenizer.
        """
        check_sampling(max_new_tokens, temperature, top_p, seed)
        ids = self.encode(prompt)
        self._check_ids(ids + [0] * max_new_tokens)
        steps = self._steps(ids, max_new_tokens, temperature, top_p, seed, stop_ids)
        if stream:
            self.require_tokenizer()
            return self._stream_text(steps)
        out = list(steps)
        timings = out.pop() if out and isinstance(out[-1], dict) else {}
        return Generation(out, self.decode(out), len(ids),
                          timings.get("prefill_seconds", 0.0), timings.get("decode_seconds", 0.0),
                          timings.get("finish_reason", "length"), timings)

    def _steps(self, ids, max_new_tokens, temperature, top_p, seed, stop_ids):
        """Yields each new token id, then one dict of timings."""
        with torch.no_grad():
            yield from self._steps_no_grad(ids, max_new_tokens, temperature, top_p, seed, stop_ids)

    def _steps_no_grad(self, ids, max_new_tokens, temperature, top_p, seed, stop_ids):
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        stop = {self.cfg.eos_token_id} | set(stop_ids or ())
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


# ---------------------------------------------------------------------------------------------------------------
# The factory: every entrance (Engine.load, the CLI, the server, each expert-parallel rank, the ONNX exporter and
# the benchmarks) builds its engine here, so every option composes the same way everywhere.
# ---------------------------------------------------------------------------------------------------------------
def load_engine(path: str | Path, *, backend: str = "auto", backend_options: dict | None = None,
                device: str | None = None, deterministic: bool = False, kv: KVOptions | str | Path | None = None,
                offload: OffloadOptions | None = None, parallel: ParallelOptions | None = None,
                public_key: str | Path | None = None, prefill_chunk: int | None = None, verify: bool | None = None,
                progress: bool = False, index_numerics: str | None = None) -> Engine:
    """Open a bundle, a release checkpoint or transformers' save_pretrained output and build an Engine.

    path: the model directory (its format is detected from the files: flashport.loader).
    backend: "auto", "torch", "triton", "onnxruntime" or a plugin's name; backend_options: keyword options of the
      backend (onnxruntime: ep=EXECUTION_PROVIDER, plugin_ep_library=PATH, threads=N...); device: the backend's
      device ("cpu", "cuda:0", ...). Ops a per-op backend lacks fall back per op to the torch reference.
    deterministic: bit-identical results across restores and batch compositions (torch backend only).
    kv: the prefix cache (KVOptions, or a directory for the default options); None: no cache.
    offload: expert offload (OffloadOptions); parallel: expert parallelism (ParallelOptions, ep > 1 under
      torchrun: this process loads only its rank's experts; rank 0 drives, the others call
      `engine.ep_runner.follow()`).
    public_key: a signer's public key file (default $FLASHPORT_PUBLIC_KEY): the bundle must carry a valid
      signature by it (docs/export.md, trust model). verify: check every file's sha256 (default FLASHPORT_VERIFY).
    prefill_chunk: tokens per prefill step; None: 1024, or less where one chunk's activations would be a large
      share of the weights' memory (`model.default_prefill_chunk`).
    index_numerics: the lightning indexer's numerics, "fp32" (transformers' indexer) or "release" (the release
      code's Hadamard-rotated FP4 queries and keys, scored exactly in integers: what makes a 1M-token prefill
      affordable; docs/kv-runtime.md); None: $FLASHPORT_INDEX_NUMERICS, else fp32. Per-op backends only.
    Combinations that cannot work are refused before anything is loaded (`check_combination`). Raises
    OptionError, BackendError, CheckpointError / BundleError (files), OffloadError, EPError.
    """
    path = Path(path)
    if isinstance(kv, (str, Path)):
        kv = KVOptions(kv)
    if index_numerics is None:
        index_numerics = index_numerics_default()  # a bad environment value is refused before any work
    opts = EngineOptions(backend, dict(backend_options or {}), device, bool(deterministic), kv, offload, parallel,
                         public_key, index_numerics)
    be = preflight(path, opts)
    whole_step = runs_whole_steps(be)
    ep = holders = keep = partition = None
    if parallel is not None and parallel.ep > 1:
        ep = EPGroup(parallel.pg_backend, parallel.timeout)
        if ep.world != parallel.ep:
            raise OptionError(f"ep {parallel.ep} but torchrun started {ep.world} ranks")
        keep, holders, partition = rank_plan(path, ep)
    elif offload is not None:
        keep = offload_keep_expert(is_bundle(path))
    # a whole-step backend exports the model into its own graph formats: it gets fp32 weights from checkpoints
    loaded = open_model(path, keep_expert=keep, prefer_partition=partition, verify=verify, progress=progress,
                        public_key=public_key, keep_packed=not whole_step)
    model = loaded.model
    model.set_ops(Ops(be))
    cache = apply_offload(model, path, loaded.manifest, offload) if offload is not None else None
    runner = EPRunner(model, ep, holders) if ep is not None else None
    if whole_step:
        model = be.bind_model(model, path)
    else:
        upload_weights(model, progress)
    if prefill_chunk is None:
        prefill_chunk = default_prefill_chunk(model.cfg, stored_bytes(model))
    engine = Engine(model, loaded.tokenizer, path, prefill_chunk=prefill_chunk, deterministic=deterministic or None,
                    index_numerics=index_numerics)
    engine.offload, engine.ep_runner = cache, runner
    if kv is not None and (ep is None or ep.rank == 0):  # followers never prefill: only the driver caches
        engine.enable_kv(kv)
    return engine


def run_command(path: str | Path, opts: EngineOptions, fn: Callable[[Engine], T], command: list[str],
                secrets: dict[str, str] | None = None) -> T | None:
    """What `flashport generate|chat|serve` do with their engine flags: build the engine (`load_engine`) and
    `drive` fn with it. With expert parallelism outside torchrun, everything checkable is checked here first
    (`preflight`: option pairs, path, backend), then `opts.parallel.ep` ranks are started running
    `flashport COMMAND` under torchrun (a rank's failure exits with its status: SystemExit). secrets (e.g.
    FLASHPORT_API_KEY) reach the ranks through the environment, never their command line."""
    if opts.parallel is not None and opts.parallel.ep > 1 and "WORLD_SIZE" not in os.environ:
        preflight(path, opts, launching=True)
        rc = launch_torchrun(opts.parallel.ep, "flashport.cli", command, secrets)
        if rc:
            raise SystemExit(rc)
        return None
    return drive(load_engine(path, **opts.kwargs()), fn)


def upload_weights(model: Transformer, progress: bool = False) -> None:
    """Put every resident weight into the backend's layout now (Ops.handle), so that loading is not paid inside
    the first request's prefill. Placeholders (experts held by other ranks or offloaded) are skipped: the cache
    uploads those it materialises."""
    ops = model.ops
    lins = [m for m in model.modules() if isinstance(m, Linear)
            and (m.packed.tensors if m.packed is not None else m.weight.numel())]
    for lin in tqdm(lins, desc="upload", unit="weight", disable=not progress):
        ops.handle(lin)


def drive(engine: Engine, fn: Callable[[Engine], T]) -> T | None:
    """Run fn(engine) where requests are driven and close the engine after. Under expert parallelism that is
    rank 0; the other ranks serve their experts for rank 0's steps until it is done (then None is returned)."""
    runner = engine.ep_runner
    try:
        if runner is not None and runner.ep.rank != 0:
            runner.follow()
            return None
        return fn(engine)
    finally:
        engine.close()


def preflight(path: str | Path, opts: EngineOptions, launching: bool = False):
    """Everything that can be checked before a model is read: the options' combination, the path, and the backend
    (created here: its options, execution provider, device) -> the backend. Raises like `load_engine`."""
    check_combination(opts, launching=launching)
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: does not exist")
    if opts.kv is not None and opts.kv.dir is not None and "RANK" not in os.environ:  # ranks: rank 0 opens it
        check_not_in_use(opts.kv.dir)
    if opts.offload is not None and opts.offload.tier == "disk" and not is_bundle(path):
        raise OptionError(f"offload tier disk with {path}: the disk tier reads experts from a bundle's shards; "
                          "export one first (flashport export) or use the host tier")
    backend, kwargs = opts.backend, dict(opts.backend_options)
    if opts.device:
        kwargs["device"] = opts.device
    if opts.deterministic:
        backend, kwargs["deterministic"] = "torch", True
    be = create(backend, **kwargs)
    check_combination(opts, runs_whole_steps(be), launching)
    return be


def runs_whole_steps(backend) -> bool:
    """Whether a backend runs whole decoder steps (the contract's `whole_step` capability) rather than single ops."""
    return bool(backend.capabilities().whole_step)


def check_combination(opts: EngineOptions, whole_step: bool | None = None, launching: bool = False) -> None:
    """Refuse, before anything is loaded, option pairs that cannot work together: one OptionError naming both
    options and why. whole_step: whether the chosen backend runs whole decoder steps (None: not known yet);
    launching: the caller is about to start the expert-parallel ranks itself (torchrun)."""
    name = opts.backend
    if opts.deterministic and name not in ("auto", "torch"):
        raise OptionError(f"deterministic with backend {name}: deterministic mode needs the torch backend's "
                          "batch-invariant ops")
    if opts.deterministic and opts.parallel is not None and opts.parallel.ep > 1:
        raise OptionError("deterministic with ep > 1: expert parallelism sums partial expert outputs in rank order, "
                          "which the batch-invariant guarantee does not cover")
    if opts.offload is not None and opts.parallel is not None and opts.parallel.ep > 1:
        raise OptionError("max device memory (expert offload) with ep > 1: each rank already holds only its slice "
                          "of the experts; give the ranks enough memory or offload in one process")
    if whole_step:
        why = (f"backend {name} runs whole decoder steps with every expert inside its own graph")
        if opts.offload is not None:
            raise OptionError(f"max device memory (expert offload) with backend {name}: {why}, so experts cannot "
                              "be offloaded; use a per-op backend (torch, triton or a plugin)")
        if opts.parallel is not None and opts.parallel.ep > 1:
            raise OptionError(f"ep > 1 with backend {name}: {why}, so MoE layers cannot be split across ranks; "
                              "use a per-op backend (torch, triton or a plugin)")
        if opts.index_numerics == "release":
            raise OptionError(f"index numerics release with backend {name}: it runs whole decoder steps in its own "
                              "graph, whose indexer is transformers' fp32 one; use a per-op backend (torch, triton "
                              "or a plugin) or index numerics fp32")
    if opts.parallel is not None and opts.parallel.ep > 1 and "WORLD_SIZE" not in os.environ and not launching:
        raise OptionError(f"ep {opts.parallel.ep}: expert parallelism runs one process per rank under torchrun; "
                          f"use `flashport generate|serve PATH --ep {opts.parallel.ep}` (it starts torchrun) or "
                          "start this program with torchrun")
