"""The long-context KV runtime: tiered block cache, the three sliding-window strategies, prefix reuse across
requests and restarts, bit-identical restore, metrics and memory accounting. See docs/kv-runtime.md.

A sequence's KV (model.SeqState) has two parts (DESIGN.md section 3):

- compressed entries (per CSA/HCA layer, plus the CSA indexer's keys): append-only, so block b of
  `cfg.kv_block_tokens` source tokens is the fixed row range b*epb .. (b+1)*epb - 1 of every layer's entries
  (epb = block / rate). Blocks are always stored, keyed by the chained hash of the token blocks up to and
  including b (kvstore.chain_hashes) in a namespace that names the model's weights (`model_identity`);
- a fixed-size part: the last W raw sliding-window entries of every layer, the compressors' partial windows and
  the CSA overlap halves. At a block boundary the partial windows are empty, so the fixed part is the windows
  plus the overlaps. The deployment's `Strategy` says how much of it is stored:

    full         a fixed-state record at every block boundary: a hit restores exactly where the cache ends;
    periodic:P   a record every P tokens: a hit restores the latest record at or before the cached length;
    none         no records: a hit loads the compressed entries up to block boundary B and recomputes the
                 tokens from B - W*L (rounded down to a block) to B with the loaded entries served to attention,
                 which rebuilds every layer's window exactly (layer l's window depends on tokens at most
                 (l+1)*W back) without re-appending compressed entries.

  The planner also uses the `none` recompute for `periodic` whenever it is cheaper than going back to the last
  record (W*L < distance to it), and both fall back to a miss when nothing is usable.

Tiers: decoded blocks live in byte-budgeted LRU memory tiers (a device tier when the model runs on an
accelerator, then host memory) in front of the durable `DiskKVStore`, which is written through by its
background writer (puts only enqueue: nothing touches the disk on the decode path). A lookup walks the tiers in
order and promotes what it finds. Any store or validation error turns into a recompute: no request fails.

Bit-identical restore needs a deterministic engine (torch backend, deterministic=True): batch-invariant ops
and prefill chunks cut at absolute multiples of the block (`chunk_spans`). Continuing from a hit then gives the
same logits bit for bit as the uninterrupted run, for every strategy, hits mid-block included.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .config import ModelConfig
from .kvstore import DiskKVStore, chain_hashes
from .model import Compressor, PoolState, SeqState, param_count

log = logging.getLogger("flashport.kv")

KV_FORMAT = 1  # layout of block / fixed-state records (names, shapes, meta); part of the namespace


class KVRestoreError(RuntimeError):
    """A cached block or record is missing or does not match the model: the request recomputes instead."""


# ---------------------------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Strategy:
    kind: str        # "full" | "periodic" | "none"
    period: int = 0  # tokens between fixed-state records (0: none stored)

    @classmethod
    def parse(cls, spec: str, block: int) -> "Strategy":
        s = str(spec).strip().lower()
        if s == "full":
            return cls("full", block)
        if s == "none":
            return cls("none", 0)
        if s.startswith("periodic:"):
            try:
                p = int(s.split(":", 1)[1])
            except ValueError:
                p = -1
            if p <= 0 or p % block:
                raise ValueError(f"KV strategy {spec!r}: the period must be a positive multiple of the KV block "
                                 f"({block} tokens for this model)")
            return cls("periodic", p)
        raise ValueError(f"unknown KV strategy {spec!r}: use full, periodic:P (P a multiple of {block}) or none")

    def checkpoint_at(self, n_tokens: int) -> bool:
        return self.period > 0 and n_tokens > 0 and n_tokens % self.period == 0

    def __str__(self) -> str:
        return f"periodic:{self.period}" if self.kind == "periodic" else self.kind


# ---------------------------------------------------------------------------------------------------------------
# Memory accounting
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class KVLayout:
    """Bytes of one sequence's KV for a config (dtype_bytes per stored value)."""

    compressed_per_token: float  # CSA + HCA entries and CSA indexer keys, per source token
    swa_per_token: int           # one raw sliding-window entry per layer (what storing every SWA entry writes)
    fixed_per_seq: int           # windows + largest compressor partial windows + CSA overlaps
    record_bytes: int            # one fixed-state record at a block boundary (windows + overlaps)
    block_bytes: int             # one block of compressed entries
    entries_per_token: float     # compressed attention entries (without indexer keys) per token

    def kv_bytes(self, n_tokens: int, sequences: int = 1) -> int:
        return int(sequences * (self.compressed_per_token * n_tokens + self.fixed_per_seq))


def kv_layout(cfg: ModelConfig, dtype_bytes: int = 4) -> KVLayout:
    W, Dh, Di, B = cfg.sliding_window, cfg.head_dim, cfg.index_head_dim, cfg.kv_block_tokens
    comp = entries = 0.0
    fixed = record = 0
    for i in range(cfg.num_hidden_layers):
        fixed += W * Dh
        record += W * Dh
        kind = cfg.layer_kind(i)
        if kind == "csa":
            m = cfg.csa_rate
            entries += 1 / m
            comp += (Dh + Di) / m
            overlap = 2 * m * (Dh + Di)  # kv + gate halves, attention and indexer compressors
            fixed += 2 * (m - 1) * 2 * (Dh + Di) + overlap
            record += overlap
        elif kind == "hca":
            m = cfg.hca_rate
            entries += 1 / m
            comp += Dh / m
            fixed += 2 * (m - 1) * Dh
    return KVLayout(comp * dtype_bytes, cfg.num_hidden_layers * Dh * dtype_bytes, fixed * dtype_bytes,
                    record * dtype_bytes, int(comp * B * dtype_bytes), entries)


def release_entry_bytes(cfg: ModelConfig, dim: int | None = None) -> int:
    """Bytes of one KV entry in the release's numerics: FP8 for the non-RoPE dims, BF16 for the RoPE dims, plus
    8 bytes of scales (584 B for V4-Flash's 512-dim entries, DESIGN.md section 3)."""
    dim = dim or cfg.head_dim
    return (dim - cfg.qk_rope_head_dim) + 2 * cfg.qk_rope_head_dim + 8


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (bytes), else free pages; 0 when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def check_fits(cfg: ModelConfig, n_tokens: int, sequences: int = 1, available: int | None = None) -> None:
    """Raise MemoryError up front when the KV of `sequences` contexts of n_tokens cannot fit in host memory."""
    need = kv_layout(cfg).kv_bytes(n_tokens, sequences)
    avail = available_memory() if available is None else available
    if avail and need > avail:
        raise MemoryError(f"a context of {n_tokens} tokens x {sequences} sequence(s) needs {_gb(need)} of KV "
                          f"(fp32), only {_gb(avail)} of memory is available")


def _gb(n: float) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):  # binary units, as plan prints
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def kv_cli(preset_or_path: str = "v4-flash", context: int = 1048576, sequences: int = 1,
           memory_gb: float | None = None) -> str:
    """KV memory accounting: bytes per token and whether CONTEXT tokens x SEQUENCES fit.

    preset_or_path: a preset name, a checkpoint directory, or "all" (every preset side by side).
    memory_gb: the memory to plan for (default: this machine's available memory).
    """
    names = sorted(_presets()) if preset_or_path == "all" else [preset_or_path]
    avail = int(memory_gb * (1 << 30)) if memory_gb else available_memory()
    rows = [f"KV accounting: context {context} tokens x {sequences} sequence(s); memory {_gb(avail)}",
            f"{'model':<14} {'layers':>6} {'block':>5} {'comp B/tok':>10} {'release B/tok':>13} {'SWA B/tok':>9} "
            f"{'fixed/seq':>10} {'KV total':>10} {'weights':>10} {'fits':>5}"]
    for name in names:
        cfg = ModelConfig.from_file(name) if Path(name).exists() else ModelConfig.preset(name)
        lay = kv_layout(cfg)
        rel = lay.entries_per_token * release_entry_bytes(cfg) + (
            sum(cfg.layer_kind(i) == "csa" for i in range(cfg.num_hidden_layers)) / cfg.csa_rate
            * (cfg.index_head_dim + 4))  # indexer keys, FP8 + a scale (an estimate: the report gives no figure)
        total = lay.kv_bytes(context, sequences)
        weights = param_count(cfg)["total"] * 4
        fits = "yes" if total + weights <= avail else "NO"
        rows.append(f"{cfg.name:<14} {cfg.num_hidden_layers:>6} {cfg.kv_block_tokens:>5} "
                    f"{lay.compressed_per_token:>10.0f} {rel:>13.0f} {lay.swa_per_token:>9} "
                    f"{_gb(lay.fixed_per_seq):>10} {_gb(total):>10} {_gb(weights):>10} {fits:>5}")
    rows.append("comp B/tok: flashport's fp32 compressed entries + indexer keys per token; release B/tok: the same "
                "in the release's FP8+BF16 numerics (~584 B per 512-dim entry); SWA B/tok: one raw window entry "
                "per layer; KV total = comp x context + fixed, per sequence; weights at fp32.")
    return "\n".join(rows)


def _presets() -> list[str]:
    from .config import PRESETS

    return list(PRESETS)


# ---------------------------------------------------------------------------------------------------------------
# Memory tiers
# ---------------------------------------------------------------------------------------------------------------
def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class MemoryTier:
    """An LRU of decoded records under a byte budget: host memory, or device memory for a device tier."""

    def __init__(self, name: str, capacity_bytes: int, device: str = "cpu"):
        self.name, self.capacity, self.device = name, int(capacity_bytes), torch.device(device)
        self._items: OrderedDict[bytes, tuple[dict, dict, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.used = self.hits = self.misses = self.evictions = 0

    def __contains__(self, key: bytes) -> bool:
        with self._lock:
            return key in self._items

    def get(self, key: bytes) -> tuple[dict, dict] | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0], item[1]

    def put(self, key: bytes, tensors: dict, meta: dict) -> None:
        size = _nbytes(tensors)
        if size > self.capacity:
            return
        if self.device.type != "cpu":
            tensors = {k: v.to(self.device, non_blocking=True) for k, v in tensors.items()}
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return
            while self.used + size > self.capacity and self._items:
                _, (_, _, s) = self._items.popitem(last=False)
                self.used -= s
                self.evictions += 1
            self._items[key] = (tensors, meta, size)
            self.used += size

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.used = 0

    def stats(self) -> dict:
        with self._lock:
            return dict(name=self.name, device=str(self.device), capacity_bytes=self.capacity, used_bytes=self.used,
                        entries=len(self._items), hits=self.hits, misses=self.misses, evictions=self.evictions)


# ---------------------------------------------------------------------------------------------------------------
# Sequences, plans, per-request stats
# ---------------------------------------------------------------------------------------------------------------
class SeqTracker:
    """A sequence's token ids and the chain hashes of its complete blocks, extended as tokens are fed."""

    def __init__(self, namespace: str, block: int, ids=()):
        self.namespace, self.block = namespace, block
        self.tokens: list[int] = []
        self.hashes: list[bytes] = []
        self.stored_blocks = 0  # blocks known to be in the cache (put or loaded)
        self.extend(ids)

    def extend(self, ids) -> None:
        self.tokens.extend(int(i) for i in ids)
        done, full = len(self.hashes) * self.block, len(self.tokens) // self.block * self.block
        if full > done:
            self.hashes += chain_hashes(self.tokens[done:full], self.block, self.namespace,
                                        prev=self.hashes[-1] if self.hashes else None)


@dataclass
class RestorePlan:
    path: str          # "miss", "checkpoint" (a fixed-state record) or "window" (recompute the windows)
    hit_blocks: int    # longest prefix of cached compressed blocks
    load_blocks: int   # compressed blocks to load
    start: int         # first token the model runs
    hit_tokens: int    # hit_blocks * block

    @staticmethod
    def miss() -> "RestorePlan":
        return RestorePlan("miss", 0, 0, 0, 0)


@dataclass
class PrefillStats:
    """What one prefill took from the cache. loaded: tokens whose KV came from a tier; recomputed: tokens inside
    the cached prefix run again (window rebuild, or the stretch after the last fixed-state record); new: tokens
    after the cached prefix."""

    prompt_tokens: int
    path: str = "miss"
    hit_tokens: int = 0
    loaded_tokens: int = 0
    recomputed_tokens: int = 0
    new_tokens: int = 0
    bytes_read: int = 0
    read_from: str = ""           # tiers that served the hit, e.g. "disk" or "host+disk"
    restore_seconds: float = 0.0  # lookups and loads
    seconds: float = 0.0          # the whole prefill (time to the first token's logits)
    error: str = ""

    @property
    def computed_tokens(self) -> int:
        return self.recomputed_tokens + self.new_tokens

    def as_dict(self) -> dict:
        return {**asdict(self), "computed_tokens": self.computed_tokens}


# ---------------------------------------------------------------------------------------------------------------
# The manager
# ---------------------------------------------------------------------------------------------------------------
def model_identity(model, extra: str = "") -> str:
    """A namespace naming the model: config + every weight's bytes (a different checkpoint never shares KV)."""
    h = hashlib.blake2b(digest_size=12)
    h.update(json.dumps(model.cfg.to_dict(), sort_keys=True, default=str).encode())
    tensors = dict(model.state_dict())
    for name, mod in model.named_modules():
        packed = getattr(mod, "packed", None)
        if packed is not None and packed.fmt != "fp32":  # bundles: the packed weights are the weights
            tensors.update({f"{name}.packed.{k}": v for k, v in packed.tensors.items()})
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return f"{model.cfg.name}-{h.hexdigest()}-kv{KV_FORMAT}{'-' + extra if extra else ''}"


_METRICS = ("requests", "hits", "prompt_tokens", "hit_tokens", "loaded_tokens", "recomputed_tokens", "new_tokens",
            "blocks_written", "records_written", "bytes_written_blocks", "bytes_written_records", "puts_dropped",
            "bytes_read_memory", "bytes_read_disk", "restore_errors", "hit_seconds", "hit_prompt_tokens",
            "miss_seconds", "miss_prompt_tokens")


class KVManager:
    """Prefix cache of one model: plans restores, loads and stores blocks and fixed-state records, keeps metrics.

    root=None keeps the cache in memory only (no disk tier). The manager is shared by every sequence of an
    engine; it is thread-safe (tiers and store lock internally, metrics under a lock).
    """

    def __init__(self, cfg: ModelConfig, root: str | Path | None, namespace: str, strategy: str = "periodic:4096",
                 disk_capacity: int = 20 << 30, memory_capacity: int = 256 << 20, device: str = "cpu",
                 device_capacity: int = 0, fsync: bool = True):
        self.cfg, self.block, self.namespace = cfg, cfg.kv_block_tokens, namespace
        self.strategy = Strategy.parse(strategy, self.block)
        self.layout = kv_layout(cfg)
        self.tiers = [MemoryTier("host", memory_capacity)]
        if torch.device(device).type != "cpu" and device_capacity:
            self.tiers.insert(0, MemoryTier("device", device_capacity, device))
        self.store = None
        if root is not None:
            # the queue holds references to block tensors: bound it to ~256 MB of blocks
            qsize = max(64, min(4096, (256 << 20) // max(1, self.layout.block_bytes)))
            self.store = DiskKVStore(root, disk_capacity, namespace, queue_size=qsize, fsync=fsync)
        self._m = dict.fromkeys(_METRICS, 0)
        self._lock = threading.Lock()
        self._logged: set[str] = set()
        self._shapes = self._block_shapes()

    # -- keys, shapes ----------------------------------------------------------------------------------------
    @staticmethod
    def record_key(block_hash: bytes) -> bytes:
        """Key of the fixed-state record at the end of the block named by block_hash."""
        return b"F" + block_hash

    def _rates(self):
        for i in range(self.cfg.num_hidden_layers):
            kind = self.cfg.layer_kind(i)
            if kind != "swa":
                yield i, kind, self.cfg.csa_rate if kind == "csa" else self.cfg.hca_rate

    def _block_shapes(self) -> dict[str, tuple[int, int]]:
        cfg, out = self.cfg, {}
        for i, kind, m in self._rates():
            out[f"{i}.comp"] = (self.block // m, cfg.head_dim)
            if kind == "csa":
                out[f"{i}.index"] = (self.block // m, cfg.index_head_dim)
        return out

    def tracker(self, ids=()) -> SeqTracker:
        return SeqTracker(self.namespace, self.block, ids)

    # -- tiered get / put ------------------------------------------------------------------------------------
    def _has(self, key: bytes) -> bool:
        try:
            return any(key in t for t in self.tiers) or (self.store is not None and self.store.contains(key))
        except Exception as e:  # noqa: BLE001 - a broken tier is a miss
            self._error("contains", e)
            return False

    def _get(self, key: bytes) -> tuple[dict, dict, str] | None:
        for i, tier in enumerate(self.tiers):
            got = tier.get(key)
            if got is not None:
                for upper in self.tiers[:i]:
                    upper.put(key, *got)
                self._add("bytes_read_memory", _nbytes(got[0]))
                return got[0], got[1], tier.name
        if self.store is None:
            return None
        try:
            got = self.store.get(key)
        except Exception as e:  # noqa: BLE001
            self._error("get", e)
            return None
        if got is None:
            return None
        self._add("bytes_read_disk", _nbytes(got[0]))
        for tier in self.tiers:
            tier.put(key, *got)
        return got[0], got[1], "disk"

    def _put(self, key: bytes, tensors: dict, meta: dict, kind: str) -> None:
        meta = {"v": KV_FORMAT, "kind": kind, "strategy": str(self.strategy), **meta}
        for tier in self.tiers:
            tier.put(key, tensors, meta)
        ok = True
        if self.store is not None:
            try:
                ok = self.store.put(key, tensors, meta)
            except Exception as e:  # noqa: BLE001
                self._error("put", e)
                ok = False
        with self._lock:
            if kind == "block":
                self._m["blocks_written"] += 1
                self._m["bytes_written_blocks"] += _nbytes(tensors)
            else:
                self._m["records_written"] += 1
                self._m["bytes_written_records"] += _nbytes(tensors)
            self._m["puts_dropped"] += not ok

    def _add(self, name: str, n: int) -> None:
        with self._lock:
            self._m[name] += n

    def _error(self, where: str, e: Exception) -> None:
        self._add("restore_errors", 1)
        lvl = logging.WARNING if where not in self._logged else logging.DEBUG
        self._logged.add(where)
        log.log(lvl, "kv: %s failed (%s: %s); recomputing instead", where, type(e).__name__, e)

    # -- planning and restoring ------------------------------------------------------------------------------
    def plan(self, tracker: SeqTracker, n_tokens: int) -> RestorePlan:
        """The cheapest usable restore for a prompt of n_tokens (no I/O: index lookups only). At least one token
        is always left to run, for the last position's logits."""
        B = self.block
        usable = min((n_tokens - 1) // B, len(tracker.hashes))
        h = 0
        while h < usable and self._has(tracker.hashes[h]):
            h += 1
        if h == 0:
            return RestorePlan.miss()
        best = RestorePlan.miss()
        if self.strategy.period:  # the latest record at or before the hit
            for c in range(h, 0, -1):
                if (c * B) % self.strategy.period == 0 and self._has(self.record_key(tracker.hashes[c - 1])):
                    best = RestorePlan("checkpoint", h, c, c * B, h * B)
                    break
        window = self.cfg.sliding_window * self.cfg.num_hidden_layers
        start = max(0, h * B - window) // B * B
        if start > best.start:  # rebuilding the windows runs fewer tokens than going back to the record
            best = RestorePlan("window", h, h, start, h * B)
        if best.path == "miss":
            best.hit_blocks, best.hit_tokens = h, h * B
        return best

    def restore(self, tracker: SeqTracker, plan: RestorePlan) -> tuple[SeqState, int, str]:
        """Build the state the plan starts from -> (state at plan.start, bytes read, tiers read). For a
        "window" plan the state holds every loaded entry and empty windows (see `serve_loaded_entries`)."""
        cfg, n_read, sources = self.cfg, 0, set()
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in self._shapes}
        # one file per block: read them concurrently so the disk sees several requests in flight (file reads
        # and CRC32C release the GIL); the tiers and the store are thread-safe
        with ThreadPoolExecutor(max_workers=max(1, min(8, plan.load_blocks))) as pool:
            fetched = list(pool.map(lambda b: self._get(tracker.hashes[b]), range(plan.load_blocks)))
        for b, got in enumerate(fetched):
            if got is None:
                raise KVRestoreError(f"block {b} is no longer cached")
            tensors, meta, src = got
            if meta.get("v") != KV_FORMAT or meta.get("kind") != "block" or meta.get("block") != b or \
                    {k: tuple(v.shape) for k, v in tensors.items()} != self._shapes or \
                    any(v.dtype != torch.float32 for v in tensors.values()):
                raise KVRestoreError(f"block {b} does not match this model's layout")
            for k, v in tensors.items():
                parts[k].append(v.cpu())
            n_read += _nbytes(tensors)
            sources.add(src)
        state = SeqState.empty(cfg)
        state.n_tokens = plan.start
        for i, kind, _ in self._rates():
            ls = state.layers[i]
            ls.comp.entries = torch.cat(parts[f"{i}.comp"])
            if kind == "csa":
                ls.index.entries = torch.cat(parts[f"{i}.index"])
        if plan.path == "checkpoint":
            got = self._get(self.record_key(tracker.hashes[plan.load_blocks - 1]))
            if got is None:
                raise KVRestoreError(f"fixed-state record at token {plan.start} is no longer cached")
            tensors, meta, src = got
            self._apply_record(state, tensors, meta)
            n_read += _nbytes(tensors)
            sources.add(src)
        return state, n_read, "+".join(sorted(sources))

    def _apply_record(self, state: SeqState, rec: dict, meta: dict) -> None:
        cfg, t = self.cfg, state.n_tokens
        if meta.get("v") != KV_FORMAT or meta.get("kind") != "record" or meta.get("tokens") != t:
            raise KVRestoreError("fixed-state record does not match")
        expect = {f"{i}.window": (min(t, cfg.sliding_window), cfg.head_dim) for i in range(cfg.num_hidden_layers)}
        for i, kind, m in self._rates():
            if kind == "csa" and t >= m:
                for part, dim in (("comp", cfg.head_dim), ("index", cfg.index_head_dim)):
                    expect[f"{i}.{part}.overlap_kv"] = expect[f"{i}.{part}.overlap_gate"] = (m, dim)
        if {k: tuple(v.shape) for k, v in rec.items()} != expect:
            raise KVRestoreError("fixed-state record does not match this model's layout")
        for i, ls in enumerate(state.layers):
            ls.window = rec[f"{i}.window"].cpu()
            for part in ("comp", "index"):
                ps = getattr(ls, part)
                if ps is not None and f"{i}.{part}.overlap_kv" in rec:
                    ps.overlap_kv, ps.overlap_gate = rec[f"{i}.{part}.overlap_kv"].cpu(), \
                        rec[f"{i}.{part}.overlap_gate"].cpu()

    # -- storing ---------------------------------------------------------------------------------------------
    def observe(self, tracker: SeqTracker, state: SeqState) -> None:
        """Call after every forward step of a sequence whose state is exact: puts the blocks it completed and, at a
        record boundary of the strategy, its fixed-state record. Only enqueues (the disk writer does the I/O)."""
        B, n = self.block, state.n_tokens
        nb = min(n // B, len(tracker.hashes))
        for b in range(tracker.stored_blocks, nb):
            key = tracker.hashes[b]
            if not self._has(key):
                rows = {}
                for i, kind, m in self._rates():
                    lo, hi = b * B // m, (b + 1) * B // m
                    ls = state.layers[i]
                    rows[f"{i}.comp"] = ls.comp.entries[lo:hi].clone()  # a copy: don't pin the growing tensor
                    if kind == "csa":
                        rows[f"{i}.index"] = ls.index.entries[lo:hi].clone()
                self._put(key, rows, {"block": b, "tokens": (b + 1) * B}, "block")
        tracker.stored_blocks = max(tracker.stored_blocks, nb)
        if n % B == 0 and nb == n // B and self.strategy.checkpoint_at(n):
            key = self.record_key(tracker.hashes[nb - 1])
            if not self._has(key):
                self._put(key, self._record(state), {"tokens": n}, "record")

    @staticmethod
    def _record(state: SeqState) -> dict[str, torch.Tensor]:
        rec = {}
        for i, ls in enumerate(state.layers):
            rec[f"{i}.window"] = ls.window.clone()
            for part in ("comp", "index"):
                ps = getattr(ls, part)
                if ps is None:
                    continue
                assert ps.kv.shape[0] == 0, "records are taken at block boundaries only"
                if ps.overlap_kv is not None:
                    rec[f"{i}.{part}.overlap_kv"], rec[f"{i}.{part}.overlap_gate"] = ps.overlap_kv, ps.overlap_gate
        return rec

    # -- metrics ---------------------------------------------------------------------------------------------
    def record_request(self, st: PrefillStats) -> None:
        with self._lock:
            m = self._m
            m["requests"] += 1
            m["prompt_tokens"] += st.prompt_tokens
            m["hit_tokens"] += st.hit_tokens
            m["loaded_tokens"] += st.loaded_tokens
            m["recomputed_tokens"] += st.recomputed_tokens
            m["new_tokens"] += st.new_tokens
            if st.loaded_tokens:
                m["hits"] += 1
                m["hit_seconds"] += st.seconds
                m["hit_prompt_tokens"] += st.prompt_tokens
            else:
                m["miss_seconds"] += st.seconds
                m["miss_prompt_tokens"] += st.prompt_tokens
        log.info("kv[%s]: %d prompt tokens, %s: loaded %d (%s, %s), recomputed %d, new %d, %.3f s%s", self.strategy,
                 st.prompt_tokens, st.path, st.loaded_tokens, st.read_from or "-", _gb(st.bytes_read),
                 st.recomputed_tokens, st.new_tokens, st.seconds, f" ({st.error})" if st.error else "")

    def stats(self) -> dict:
        """Hit rate, bytes written and read, tokens loaded / recomputed, TTFT of hits against recompute."""
        with self._lock:
            m = dict(self._m)
        per_tok = m["miss_seconds"] / m["miss_prompt_tokens"] if m["miss_prompt_tokens"] else None
        est = per_tok * m["hit_prompt_tokens"] if per_tok is not None else None
        return {
            "strategy": str(self.strategy), "namespace": self.namespace,
            "requests": m["requests"], "hits": m["hits"],
            "hit_rate": m["hits"] / m["requests"] if m["requests"] else 0.0,
            "tokens": {k: m[f"{k}_tokens"] for k in ("prompt", "hit", "loaded", "recomputed", "new")},
            "bytes_written": {"blocks": m["bytes_written_blocks"], "records": m["bytes_written_records"]},
            "bytes_read": {"memory": m["bytes_read_memory"], "disk": m["bytes_read_disk"]},
            "blocks_written": m["blocks_written"], "records_written": m["records_written"],
            "puts_dropped": m["puts_dropped"], "restore_errors": m["restore_errors"],
            "ttft": {"hit_avg_s": m["hit_seconds"] / m["hits"] if m["hits"] else None,
                     "miss_avg_s": m["miss_seconds"] / (m["requests"] - m["hits"]) if m["requests"] > m["hits"]
                     else None,
                     "recompute_s_per_token": per_tok,
                     # what the hits would have cost recomputed (at the misses' rate) over what they cost
                     "hit_speedup": est / m["hit_seconds"] if est and m["hit_seconds"] else None},
            "tiers": [t.stats() for t in self.tiers],
            "disk": self.store.stats() if self.store is not None else None,
        }

    # -- lifecycle -------------------------------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        return self.store.flush(timeout) if self.store is not None else True

    def drop_memory(self) -> None:
        """Empty the memory tiers (the next hit is served from disk)."""
        for t in self.tiers:
            t.clear()

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


# ---------------------------------------------------------------------------------------------------------------
# Prefill through the cache
# ---------------------------------------------------------------------------------------------------------------
def chunk_spans(start: int, end: int, chunk: int, block: int, deterministic: bool = False,
                period: int = 0) -> list[tuple[int, int]]:
    """Prefill chunks [a, b) covering [start, end), cut at absolute positions: multiples of `chunk` (of `block` in
    deterministic mode, so a position always meets the same chunk shape, whatever the restore point) and of
    `period` (where the strategy takes a fixed-state record)."""
    step = block if deterministic else max(1, chunk)
    cuts = {end, *range((start // step + 1) * step, end, step)}
    if period:
        cuts.update(range((start // period + 1) * period, end, period))
    spans, a = [], start
    for c in sorted(cuts):
        spans.append((a, c))
        a = c
    return spans


def _frozen_forward(comp: Compressor, x, ps: PoolState, inv_freq):
    """A compressor step that serves the entries already in `ps` (loaded from the cache) and does not append the
    windows this chunk completes; it still advances the partial-window buffers and the CSA overlap, which must
    be exact once the recompute reaches the block boundary."""
    scratch = PoolState(ps.kv, ps.gate, ps.entries[:0], ps.overlap_kv, ps.overlap_gate)
    type(comp).forward(comp, x, scratch, inv_freq)  # its new entries are discarded
    ps.kv, ps.gate, ps.overlap_kv, ps.overlap_gate = scratch.kv, scratch.gate, scratch.overlap_kv, scratch.overlap_gate
    return ps.entries


@contextmanager
def serve_loaded_entries(model):
    """While active, every compressor of `model` (attention and indexer) serves its loaded entries (the `none`
    strategy's window rebuild). The model's causal masks hide the entries beyond each query's position."""
    comps = [m for m in model.modules() if isinstance(m, Compressor)]
    for c in comps:
        c.forward = functools.partial(_frozen_forward, c)  # an instance attribute shadows Compressor.forward
    try:
        yield
    finally:
        for c in comps:
            c.__dict__.pop("forward", None)


@torch.no_grad()
def prefill_cached(model, kv: KVManager | None, ids: list[int], chunk: int = 1024, deterministic: bool = False,
                   progress: bool | None = None) -> tuple[SeqState, torch.Tensor, PrefillStats, SeqTracker | None]:
    """Prefill `ids` from the longest cached prefix: restore it, run the rest, store the new blocks.

    Returns (state, logits of the last position [V], stats, tracker for continuing the sequence). Any cache
    error falls back to a full recompute.
    """
    t0 = time.perf_counter()
    n, cfg = len(ids), model.cfg
    stats = PrefillStats(n)
    tracker = kv.tracker(ids) if kv is not None else None
    plan, state = RestorePlan.miss(), None
    if kv is not None:
        try:
            plan = kv.plan(tracker, n)
            if plan.path != "miss":
                state, stats.bytes_read, stats.read_from = kv.restore(tracker, plan)
        except Exception as e:  # noqa: BLE001 - the cache may fail; the request must not
            kv._error("restore", e)
            stats.error = f"{type(e).__name__}: {e}"
            plan, state = RestorePlan.miss(), None
    if state is None:
        state = SeqState.empty(cfg)
    stats.restore_seconds = time.perf_counter() - t0
    stats.path, stats.hit_tokens = plan.path, plan.hit_tokens
    stats.loaded_tokens = plan.hit_tokens if plan.path == "window" else plan.start
    stats.recomputed_tokens = plan.hit_tokens - plan.start if plan.path != "miss" else 0
    stats.new_tokens = n - (plan.hit_tokens if plan.path != "miss" else 0)
    if plan.path == "miss":
        stats.recomputed_tokens, stats.new_tokens = 0, n

    show = progress if progress is not None else n - plan.start > 4 * max(chunk, cfg.kv_block_tokens)
    bar = tqdm(total=n - plan.start, desc="prefill", unit="tok", disable=not show)
    period = kv.strategy.period if kv is not None else 0
    logits = None

    def run(a: int, b: int, store: bool):
        nonlocal logits
        for lo, hi in chunk_spans(a, b, chunk, cfg.kv_block_tokens, deterministic, period if store else 0):
            logits = model.forward_batch([torch.tensor(ids[lo:hi])], [state], all_logits=False)[0][0]
            if store and kv is not None:
                kv.observe(tracker, state)
            bar.update(hi - lo)

    if plan.path == "window":  # rebuild the windows over [start, hit) with the loaded entries, then continue
        with serve_loaded_entries(model):
            run(plan.start, plan.hit_tokens, store=False)
    if tracker is not None:
        tracker.stored_blocks = plan.load_blocks
    if plan.path == "window":
        kv.observe(tracker, state)  # exact again: a record here if the strategy takes one
    run(state.n_tokens, n, store=True)
    bar.close()
    stats.seconds = time.perf_counter() - t0
    if kv is not None:
        kv.record_request(stats)
    return state, logits, stats, tracker


# ---------------------------------------------------------------------------------------------------------------
# Demo
# ---------------------------------------------------------------------------------------------------------------
def demo_prefix_hit(engine, kv_dir: str | Path | None = None, strategy: str = "periodic:4096",
                    doc_blocks: int = 24) -> str:
    """Two requests that share a long document prefix; the second one's prefix is served from the disk tier
    (the memory tier is emptied in between). Returns printable lines with the tokens loaded and recomputed."""
    import tempfile

    from .options import KVOptions

    if engine.kv is None:
        engine.enable_kv(KVOptions(kv_dir or tempfile.mkdtemp(prefix="flashport-kv-demo-"), strategy))
    kv = engine.kv
    text = ("The disk tier keeps compressed attention entries in blocks, keyed by a chained hash of the tokens. "
            "A request that shares a prefix with an earlier one reads those blocks instead of recomputing them. ")
    doc = engine.encode(text * 64)[: doc_blocks * engine.cfg.kv_block_tokens]
    lines = [f"KV cache: {kv.strategy} in {kv.store.root if kv.store else 'memory'}; "
             f"shared document of {len(doc)} tokens"]
    for i, question in enumerate(["\nQuestion: what is a block?", "\nQuestion: what does a hit skip?"]):
        ids = doc + engine.encode(question, add_bos=False)
        if i:
            kv.flush()
            kv.drop_memory()  # serve the second request from disk, as after a restart
        out = engine.generate(ids, max_new_tokens=8)
        s = out.timings["kv"]
        lines.append(f"request {i + 1}: {s['prompt_tokens']} prompt tokens, {s['path']}: loaded {s['loaded_tokens']} "
                     f"({_gb(s['bytes_read'])} from {s['read_from'] or '-'}), recomputed {s['recomputed_tokens']}, "
                     f"new {s['new_tokens']}; prefill {s['seconds'] * 1e3:.0f} ms")
    st = kv.stats()
    if st["ttft"]["hit_speedup"]:
        lines.append(f"time to first token on the hit: {st['ttft']['hit_speedup']:.1f}x faster than recomputing")
    return "\n".join(lines)
