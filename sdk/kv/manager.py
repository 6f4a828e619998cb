"""The KV manager: tiers, keys, restore plans, storing blocks and fixed-state records, metrics.

A sequence's KV (model.SeqState) has two parts (DESIGN.md section 3):

- compressed entries (per CSA/HCA layer, plus the CSA indexer's keys): append-only, so block b of
  `cfg.kv_block_tokens` source tokens is the fixed row range b*epb .. (b+1)*epb - 1 of every layer's entries
  (epb = block / rate). Blocks are always stored, packed in the KV's numerics (flashport.quant.kv_numerics),
  keyed by the chained hash of the token blocks up to and including b (store.chain_hashes) in a namespace that
  names the model's weights (`model_identity`), the record format and the numerics;
- a fixed-size part: the last W raw sliding-window entries of every layer, the compressors' partial windows and
  the CSA overlap halves, stored as float32 fixed-state records as the `Strategy` says (flashport.kv.strategies).

Tiers: decoded blocks live in byte-budgeted LRU memory tiers (a device tier when the model runs on an
accelerator, then host memory) in front of the durable `DiskKVStore`, which is written through by its
background writer (puts only enqueue into a bounded queue that drops, counted, when full: nothing touches the
disk on the decode path). A lookup walks the tiers in order and promotes what it finds. Any store or validation
error turns into a recompute: no request fails; an entry that does not match the model is evicted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
from array import array
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy
import torch

from ..config import ModelConfig
from ..model import SeqState, official_index_default
from ..quant.kv_numerics import check_kv_dtype, pack_kv, unpack_kv
from .layout import format_bytes, kv_layout
from .store import DiskKVStore, FormatError, ReadBatch, chain_hashes
from .strategies import Strategy
from .tiers import MemoryTier, nbytes

log = logging.getLogger("flashport.kv")

KV_FORMAT = 3  # layout of block / fixed-state records (names, shapes, packing, meta); part of the namespace
RUN_BYTES = 4 << 20  # a prefill puts its blocks in runs of about this many bytes (one disk extent each)


class KVRestoreError(RuntimeError):
    """A cached block or record is missing or does not match the model: the request recomputes instead."""


class SeqTracker:
    """A sequence's chain hashes of its complete blocks, extended as tokens are fed. Only the tokens of the
    incomplete last block are kept (a block's hash names its whole prefix): O(blocks), not O(tokens), of memory."""

    def __init__(self, namespace: str, block: int, ids=()):
        self.namespace, self.block = namespace, block
        self.n_tokens = 0
        self.hashes: list[bytes] = []
        self.stored_blocks = 0  # blocks known to be in the cache (put or loaded)
        self._tail = array("q")  # tokens after the last complete block (int64: hashed without a conversion)
        self.extend(ids)

    def extend(self, ids) -> None:
        tail = self._tail
        tail.extend(ids if isinstance(ids, (list, tuple, array)) else map(int, ids))
        self.n_tokens = len(self.hashes) * self.block + len(tail)
        full = len(tail) // self.block * self.block
        if full:
            self.hashes += chain_hashes(tail[:full], self.block, self.namespace,
                                        prev=self.hashes[-1] if self.hashes else None)
            del tail[:full]


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
                 device_capacity: int = 0, fsync: bool = True, dtype: str = "fp32",
                 official_index: bool | None = None):
        """namespace: names the model (`model_identity`); the manager appends the KV numerics `dtype` ("release":
        FP8 e4m3 + BF16 RoPE dims, "bf16", "fp32"; flashport.quant.kv_numerics), so caches of different numerics
        never mix. Sequences it stores must be made with `new_state()` (their entries rounded to `dtype`).
        official_index: the indexer in the release's numerics (the engine's `index_numerics`; None: the
        environment's, `model.official_index_default`); part of the namespace too.
        Raises KVStoreBusy when another process holds `root`."""
        self.cfg, self.block = cfg, cfg.kv_block_tokens
        self.dtype = check_kv_dtype(dtype)
        # the indexer's keys in the release's numerics (model.Indexer)
        self.official_index = official_index_default() if official_index is None else bool(official_index)
        self.namespace = f"{namespace}{'-fp4index' if self.official_index else ''}-{dtype}"
        self.strategy = Strategy.parse(strategy, self.block)
        self.layout = kv_layout(cfg, dtype)
        self.tiers = [MemoryTier("host", memory_capacity)]
        if torch.device(device).type != "cpu" and device_capacity:
            self.tiers.insert(0, MemoryTier("device", device_capacity, device))
        self.store = None
        if root is not None:
            # the queue holds references to block tensors: bound it to ~256 MB of blocks
            qsize = max(64, min(4096, (256 << 20) // max(1, self.layout.block_bytes)))
            self.store = DiskKVStore(root, disk_capacity, self.namespace, queue_size=qsize, fsync=fsync)
        self._m = dict.fromkeys(_METRICS, 0)
        self._lock = threading.Lock()
        self._logged: set[str] = set()
        self._shapes = self._block_shapes()
        self._parts: dict[str, list[str]] = {}  # "3.comp" -> its packed parts' names ["3.comp.q", ...]
        for name in self._shapes:
            self._parts.setdefault(name.rpartition(".")[0], []).append(name)
        self._packed_block_bytes = sum(math.prod(s) * d.itemsize for s, d in self._shapes.values())
        self.run_blocks = max(1, RUN_BYTES // max(1, self.layout.block_bytes))  # blocks per deferred run

    def new_state(self) -> SeqState:
        """An empty sequence whose compressed entries are kept in this cache's numerics."""
        return SeqState.empty(self.cfg, self.dtype, self.official_index)

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

    def _block_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Packed part name -> (shape, dtype) of one block: `{layer}.comp.{part}` and `{layer}.index.{part}`."""
        cfg, r, out = self.cfg, self.cfg.qk_rope_head_dim, {}
        for i, kind, m in self._rates():
            dims = {"comp": cfg.head_dim, **({"index": cfg.index_head_dim} if kind == "csa" else {})}
            for name, dim in dims.items():
                for part, t in pack_kv(torch.zeros(self.block // m, dim), self.dtype, r).items():
                    out[f"{i}.{name}.{part}"] = (tuple(t.shape), t.dtype)
        return out

    def tracker(self, ids=()) -> SeqTracker:
        return SeqTracker(self.namespace, self.block, ids)

    # -- tiered get / put ------------------------------------------------------------------------------------
    def _has(self, key: bytes) -> bool:
        try:
            return any(key in t for t in self.tiers) or (self.store is not None and self.store.contains(key))
        except Exception as e:  # noqa: BLE001 - a broken tier is a miss
            self.report_error("contains", e)
            return False

    def _cached_prefix(self, keys: list[bytes]) -> int:
        """How many of keys, from the first, are cached in some tier (one store lookup for all of them)."""
        flags = self._cached_flags(keys)
        return flags.index(False) if False in flags else len(flags)

    def _get(self, key: bytes) -> tuple[dict, dict, str] | None:
        got = self._get_memory(key)
        if got is not None:
            return got
        if self.store is None:
            return None
        try:
            got = self.store.get(key)
        except Exception as e:  # noqa: BLE001
            self.report_error("get", e)
            return None
        if got is None:
            return None
        self._add("bytes_read_disk", nbytes(got[0]))
        for tier in self.tiers:
            tier.put(key, *got)
        return got[0], got[1], "disk"

    def _discard(self, key: bytes) -> None:
        """Evict an entry that does not match the model from every tier (it would fail on every request)."""
        for tier in self.tiers:
            tier.discard(key)
        if self.store is not None:
            try:
                self.store.discard(key)
            except Exception as e:  # noqa: BLE001
                self.report_error("discard", e)

    def _put(self, key: bytes, tensors: dict, meta: dict, kind: str) -> None:
        meta = {"v": KV_FORMAT, "kind": kind, "strategy": str(self.strategy), "dtype": self.dtype, **meta}
        for tier in self.tiers:
            tier.put(key, tensors, meta)
        ok = True
        if self.store is not None:
            try:
                ok = self.store.put(key, tensors, meta)
            except Exception as e:  # noqa: BLE001
                self.report_error("put", e)
                ok = False
        with self._lock:
            if kind == "block":
                self._m["blocks_written"] += 1
                self._m["bytes_written_blocks"] += nbytes(tensors)
            else:
                self._m["records_written"] += 1
                self._m["bytes_written_records"] += nbytes(tensors)
            self._m["puts_dropped"] += not ok

    def _add(self, name: str, n: int) -> None:
        with self._lock:
            self._m[name] += n

    def report_error(self, where: str, e: Exception) -> None:
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
        h = self._cached_prefix(tracker.hashes[:usable])
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
        "window" plan the state holds every loaded entry and empty windows (prefill_cached replays the windows).
        A block or record that does not match this model's layout is evicted, then KVRestoreError is raised."""
        entries, n_read, sources = self._load_blocks(tracker, plan.load_blocks)
        state = self.new_state()
        state.n_tokens = plan.start
        for (i, which), t in entries.items():
            getattr(state.layers[i], which).entries = t
        if plan.path == "checkpoint":
            key = self.record_key(tracker.hashes[plan.load_blocks - 1])
            got = self._get(key)
            if got is None:
                raise KVRestoreError(f"fixed-state record at token {plan.start} is no longer cached")
            tensors, meta, src = got
            try:
                self._apply_record(state, tensors, meta)
            except KVRestoreError:
                self._discard(key)
                raise
            n_read += nbytes(tensors)
            sources.add(src)
        return state, n_read, "+".join(sorted(sources))

    def _pools(self):
        """(layer, "comp" | "index", rate, entry dim) of every compressor whose entries are stored in blocks."""
        for i, kind, m in self._rates():
            yield i, "comp", m, self.cfg.head_dim
            if kind == "csa":
                yield i, "index", m, self.cfg.index_head_dim

    def _load_blocks(self, tracker: SeqTracker, n: int) -> tuple[dict[tuple[int, str], torch.Tensor], int, set[str]]:
        """The entries of blocks 0..n-1 per compressor ((layer, "comp" | "index") -> float32 [n * B / m, dim]), the
        packed bytes read and the tiers that served them. Each compressor's entries are allocated once at their
        restored length (numpy's allocator: large ones get huge pages, a fraction of the page faults) and unpacked
        into in place: blocks in a memory tier one by one; the rest, read from disk in one
        `DiskKVStore.read_batch` (a few large sequential reads of multi-block extents), with one `unpack_kv` per
        compressor and run of blocks in one extent, straight from the read buffer (`ReadBatch.rows`: no copy of
        the packed bytes, no tensor per block). Disk blocks are not promoted into the memory tiers: the restored
        state holds them. A block that is gone raises KVRestoreError; one that does not match this model's layout
        is evicted, then KVRestoreError is raised."""
        if n == 0:
            return {}, 0, set()
        B, r, keys = self.block, self.cfg.qk_rope_head_dim, tracker.hashes[:n]
        pools = list(self._pools())
        out = {(i, w): torch.from_numpy(numpy.empty((n * B // m, dim), numpy.float32)) for i, w, m, dim in pools}
        n_read, sources, on_disk = 0, set(), list(range(n))

        def unpack(b: int, count: int, get) -> None:  # blocks b .. b + count - 1, `get(part name)` their parts
            for i, w, m, _ in pools:
                epb = B // m
                name = f"{i}.{w}"
                parts = {p.rpartition(".")[2]: get(p) for p in self._parts[name]}
                unpack_kv(parts, self.dtype, r, out=out[(i, w)][b * epb:(b + count) * epb])

        if any(len(t) for t in self.tiers):  # a restarted process has empty memory tiers: no lookup per block
            on_disk = []
            for b, key in enumerate(keys):
                got = self._get_memory(key)
                if got is None:
                    on_disk.append(b)
                    continue
                if not self._block_ok(got[1], {k: (tuple(v.shape), v.dtype) for k, v in got[0].items()}):
                    self._discard(key)
                    raise KVRestoreError(f"block {b} does not match this model's layout (evicted)")
                unpack(b, 1, lambda p: got[0][p].cpu())
                n_read += nbytes(got[0])
                sources.add(got[2])
        if on_disk:
            blocks = numpy.asarray(on_disk)
            lock, disk_bytes = threading.Lock(), [0]

            def consume(batch: ReadBatch, idx: numpy.ndarray) -> None:  # on the store's reading threads
                for a, e, x, _ in batch.spans(idx):
                    self._check_extent(batch, int(idx[a]), keys, on_disk)
                    # cut where the blocks themselves are not consecutive (memory-tier blocks in between)
                    pos = idx[a:e]
                    cuts = (numpy.flatnonzero(numpy.diff(blocks[pos]) != 1) + 1).tolist()
                    for lo, hi in zip([0, *cuts], [*cuts, e - a]):
                        j = int(pos[lo])
                        try:
                            unpack(int(blocks[j]), hi - lo, lambda p: batch.rows(j, hi - lo, p))
                        except (FormatError, ValueError):  # layouts were checked per extent: a writer bug
                            self._discard(keys[on_disk[j]])
                            raise KVRestoreError(f"block {on_disk[j]} does not match this model's layout "
                                                 "(evicted)") from None
                        with lock:
                            disk_bytes[0] += (hi - lo) * self._packed_block_bytes

            batch = None
            if self.store is not None:
                try:  # the store unpacks each piece as soon as it is read and checked: reads and unpacking overlap
                    batch = self.store.read_batch([keys[b] for b in on_disk], consume)
                except KVRestoreError:
                    raise
                except Exception as e:  # noqa: BLE001 - a broken tier is a miss
                    self.report_error("get", e)
            if batch is None or not batch.found.all():
                gone = on_disk[0] if batch is None else on_disk[int(numpy.flatnonzero(~batch.found)[0])]
                raise KVRestoreError(f"block {gone} is no longer cached")
            n_read += disk_bytes[0]
            self._add("bytes_read_disk", disk_bytes[0])
            sources.add("disk")
        return out, n_read, sources

    def _check_extent(self, batch: ReadBatch, j: int, keys: list, on_disk: list[int]) -> None:
        """Check the extent of batch entry j once (not block by block): its entry layout must be this model's
        block layout and its meta the bytes this manager writes for blocks (else it is decoded and checked,
        `_block_ok`). One that does not match: its blocks are evicted, then KVRestoreError is raised."""
        x = batch.extent(j)
        if x in batch.checked:
            return
        try:
            ok = {k: (v[1], v[0]) for k, v in batch.entry_layout(j).items()} == self._shapes and \
                (batch.meta_bytes(j) == self._block_meta_bytes() or self._block_ok(batch.meta(j), None))
        except FormatError:
            ok = False
        if not ok:
            for jj in numpy.flatnonzero(batch.ext == x).tolist():
                self._discard(keys[on_disk[jj]])
            raise KVRestoreError(f"block {on_disk[j]} does not match this model's layout (evicted)")
        batch.checked.add(x)

    def _block_meta(self) -> dict:
        """The meta of every block record (one per extent: a run of blocks shares it)."""
        return {"v": KV_FORMAT, "kind": "block", "dtype": self.dtype}

    def _block_meta_bytes(self) -> bytes:
        return json.dumps(self._block_meta(), separators=(",", ":")).encode()

    def _block_ok(self, meta: dict, shapes: dict | None) -> bool:
        """Whether a block's meta (and, unless None, its part shapes and dtypes) are this model's. A block's place
        in its sequence is its key (a chain hash names the whole prefix), so the meta does not repeat it."""
        return meta.get("v") == KV_FORMAT and meta.get("kind") == "block" and meta.get("dtype") == self.dtype and \
            (shapes is None or shapes == self._shapes)

    def _get_memory(self, key: bytes) -> tuple[dict, dict, str] | None:
        """A memory tier's copy of key (promoted into the tiers above it) -> (tensors, meta, tier name)."""
        for i, tier in enumerate(self.tiers):
            got = tier.get(key)
            if got is not None:
                for upper in self.tiers[:i]:
                    upper.put(key, *got)
                self._add("bytes_read_memory", nbytes(got[0]))
                return got[0], got[1], tier.name
        return None

    def _apply_record(self, state: SeqState, rec: dict, meta: dict) -> None:
        cfg, t = self.cfg, state.n_tokens
        if meta.get("v") != KV_FORMAT or meta.get("kind") != "record" or meta.get("tokens") != t or \
                meta.get("dtype") != self.dtype:
            raise KVRestoreError("fixed-state record does not match")
        expect = {f"{i}.window": (min(t, cfg.sliding_window), cfg.head_dim) for i in range(cfg.num_hidden_layers)}
        for i, kind, m in self._rates():
            if kind == "csa" and t >= m:
                for part, dim in (("comp", cfg.head_dim), ("index", cfg.index_head_dim)):
                    expect[f"{i}.{part}.overlap_kv"] = expect[f"{i}.{part}.overlap_gate"] = (m, dim)
        if {k: tuple(v.shape) for k, v in rec.items()} != expect or \
                any(v.dtype != torch.float32 for v in rec.values()):
            raise KVRestoreError("fixed-state record does not match this model's layout")
        for i, ls in enumerate(state.layers):
            ls.window = rec[f"{i}.window"].cpu()
            for part in ("comp", "index"):
                ps = getattr(ls, part)
                if ps is not None and f"{i}.{part}.overlap_kv" in rec:
                    ps.overlap_kv, ps.overlap_gate = rec[f"{i}.{part}.overlap_kv"].cpu(), \
                        rec[f"{i}.{part}.overlap_gate"].cpu()

    # -- storing ---------------------------------------------------------------------------------------------
    def observe(self, tracker: SeqTracker, state: SeqState, defer: bool = False) -> None:
        """Call after every forward step of a sequence whose state is exact: puts the blocks it completed and, at a
        record boundary of the strategy, its fixed-state record. Only enqueues (the disk writer does the I/O).

        The blocks go in one run (`DiskKVStore.put_run`: one extent on disk, read back with one read). defer=True
        (a prefill in progress) holds them until about RUN_BYTES of them are complete, so that a prompt lies on
        disk as a few large extents; the caller then ends with a call without defer, which puts the rest."""
        B, n = self.block, state.n_tokens
        if not self._numerics_match(state):
            return
        nb = min(n // B, len(tracker.hashes))
        first = tracker.stored_blocks
        if nb > first and (not defer or nb - first >= self.run_blocks):
            self._put_blocks(tracker, state, first, nb)
            tracker.stored_blocks = nb
        if n % B == 0 and nb == n // B and self.strategy.checkpoint_at(n):
            key = self.record_key(tracker.hashes[nb - 1])
            if not self._has(key):
                self._put(key, self._record(state), {"tokens": n}, "record")

    def _put_blocks(self, tracker: SeqTracker, state: SeqState, first: int, end: int) -> None:
        """Put blocks first..end-1 of `state` not cached yet, one run per stretch of them, each part packed once
        per run (not per block)."""
        B, r, keys = self.block, self.cfg.qk_rope_head_dim, tracker.hashes
        have = self._cached_flags(keys[first:end])
        b = first
        while b < end:
            if have[b - first]:
                b += 1
                continue
            e = b
            while e < end and not have[e - first]:
                e += 1
            rows = {}
            for i, kind, m in self._rates():
                ls = state.layers[i]
                for name in ("comp", "index") if kind == "csa" else ("comp",):
                    # the entries were rounded to self.dtype as they were made, so unpacking gives back exactly
                    # these values; fp32 is packed as a view of the growing tensor: copied, not pinned
                    packed = pack_kv(getattr(ls, name).entries[b * B // m:e * B // m], self.dtype, r)
                    rows.update({f"{i}.{name}.{part}": v.clone() if self.dtype == "fp32" else v
                                 for part, v in packed.items()})
            self._put_run(keys[b:e], rows, keys[b - 1] if b else None)
            b = e

    def _cached_flags(self, keys: list[bytes]) -> list[bool]:
        """Per key: cached in some tier (one store lookup for all of them)."""
        on_disk = [False] * len(keys)
        if self.store is not None:
            try:
                on_disk = self.store.contains_many(keys)
            except Exception as e:  # noqa: BLE001 - a broken tier is a miss
                self.report_error("contains", e)
        return [d or any(k in t for t in self.tiers) for k, d in zip(keys, on_disk)]

    def _put_run(self, keys: list[bytes], tensors: dict, follows: bytes | None) -> None:
        """Put a run of blocks: each block into the memory tiers (its own copy, so that a tier's budget counts what
        it holds), the run as one entry of the disk store's queue."""
        n, meta = len(keys), self._block_meta()
        for tier in self.tiers:
            for j, key in enumerate(keys):
                tier.put(key, {k: v[j * (v.shape[0] // n):(j + 1) * (v.shape[0] // n)].clone()
                               for k, v in tensors.items()}, meta)
        ok = True
        if self.store is not None:
            try:
                ok = self.store.put_run(keys, tensors, meta, follows=follows)
            except Exception as e:  # noqa: BLE001
                self.report_error("put", e)
                ok = False
        with self._lock:
            self._m["blocks_written"] += n
            self._m["bytes_written_blocks"] += nbytes(tensors)
            self._m["puts_dropped"] += not ok

    def _numerics_match(self, state: SeqState) -> bool:
        """Only a sequence made in this cache's numerics may be stored: its bytes must be the bytes it used."""
        ps = next((ls.comp for ls in state.layers if ls.comp is not None), None)
        idx = next((ls.index for ls in state.layers if ls.index is not None), None)
        if (ps is None or ps.numerics == self.dtype) and (idx is None or idx.official == self.official_index):
            return True
        if "numerics" not in self._logged:
            self._logged.add("numerics")
            log.warning("kv: a sequence in %s numerics is not stored in a %s cache (make it with kv.new_state())",
                        ps.numerics, self.dtype)
        return False

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
                 st.prompt_tokens, st.path, st.loaded_tokens, st.read_from or "-", format_bytes(st.bytes_read),
                 st.recomputed_tokens, st.new_tokens, st.seconds, f" ({st.error})" if st.error else "")

    def stats(self) -> dict:
        """Hit rate, bytes written and read, tokens loaded / recomputed, TTFT of hits against recompute."""
        with self._lock:
            m = dict(self._m)
        per_tok = m["miss_seconds"] / m["miss_prompt_tokens"] if m["miss_prompt_tokens"] else None
        est = per_tok * m["hit_prompt_tokens"] if per_tok is not None else None
        return {
            "strategy": str(self.strategy), "namespace": self.namespace, "dtype": self.dtype,
            "bytes_per_token": self.layout.compressed_per_token,
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

