"""Expert offload: run a model whose routed experts do not all fit on the device.

    engine = flashport.load_engine("bundle/", offload=OffloadOptions("8GiB", tier="disk"))
    engine.generate("Hello", max_new_tokens=16)
    engine.offload.stats()          # hits, misses, bytes read, evictions ...

    flashport generate BUNDLE --max-device-memory 8GiB [--offload-tier host|disk]   (CLI: see docs/scale.md)

Where every routed expert lives:
- pinned: resident for the whole run. The hottest experts by the calibration routing statistics
  (routing_stats.json of the bundle; the same hottest-first order the planner uses), up to `pin_fraction` of
  the expert budget. Without statistics nothing is pinned and the whole budget is LRU cache.
- cached: an LRU cache of the other experts in the rest of the budget, filled on demand.
- cold: everything else, in host memory (`tier="host"`) or memory-mapped from the bundle's safetensors shards
  (`tier="disk"`, read on every miss, each tensor's CRC32C checked, so a damaged shard fails loudly).

The budget: `max_device_memory` is the whole device. The non-expert weights as loaded, the KV target (context x
sequences) and one prefill chunk's workspace come off first (`device_needs`); what is left holds pinned + cached
experts. A budget that cannot hold even those and one expert is refused (OffloadError naming the numbers)
before any expert is read. Without `max_device_memory`, a bundle exported in edge mode is run as planned: experts the placement put on the primary
device are pinned, the ones on cpu/ are held in host memory, the ones on disk/ stay on disk, and the LRU cache
is the planner's double buffer (2 x top-k experts).

How it hooks in (no change to model.py or dispatch.py): each MoE's `experts` ModuleList is replaced by an
`OffloadedExperts` module, which `Ops.moe` indexes like the list (dispatch resolves expert handles lazily, only
for routed experts); an index materialises the expert from the cache. A forward hook on each router (`gate`)
queues a background load of (a) the experts this layer just routed to, so later experts load while the first
ones compute, and (b) the next MoE layer's likely experts: exactly known on hash-routed layers (`tid2eid` of the
token ids), else the next router applied to this layer's input (its top-k per token). The loader thread also
uploads (`Ops.handle`): copies overlap compute. Prefetched experts of the next layer never evict the current
layer's experts.

Exactness: a materialised expert holds the same packed bytes as the fully resident model and goes through the
same `Ops.handle` / `moe` calls, so logits and tokens are bit-identical to the resident run (tested).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from .backends.contract import QuantWeight
from .bundle import ROUTING_STATS, load_routing_stats, read_tensor, stored_nbytes
from .kv import kv_layout
from .model import Expert, Linear, Module, MoE, Transformer, workspace_bytes

log = logging.getLogger("flashport.offload")

Key = tuple[str, int]  # (MoE prefix "layers.3" / "mtp.0", expert index)
WEIGHTS = ("w1", "w2", "w3")


class OffloadError(ValueError):
    """Offload settings that cannot work (a cache smaller than one expert, a disk tier without a bundle...)."""


def moe_layers(model: Transformer) -> list[tuple[str, MoE]]:
    """(prefix, MoE) of every MoE in execution order: the main layers, then the MTP block(s)."""
    out = [(f"layers.{i}", b.ffn) for i, b in enumerate(model.layers)]
    return out + [(f"mtp.{j}", b.ffn) for j, b in enumerate(model.mtp)]


def expert_name(key: Key, w: str) -> str:
    return f"{key[0]}.ffn.experts.{key[1]}.{w}.weight"


def _qweight(lin: Linear) -> QuantWeight:
    return lin.packed if lin.packed is not None else QuantWeight("fp32", tuple(lin.weight.shape),
                                                                 {"weight": lin.weight.data})


# ---------------------------------------------------------------------------------------------------------------
# Cold tiers
# ---------------------------------------------------------------------------------------------------------------
class ExpertStore:
    """Where experts live when not resident: `host` (packed tensors in host memory) or, for bundles, read from
    the bundle's shards through safetensors' memory map (CRC32C checked on every read)."""

    def __init__(self, host: dict[Key, dict[str, QuantWeight]] | None = None, bundle: str | Path | None = None,
                 manifest: dict | None = None):
        self.host = host or {}
        self.bundle, self.manifest = (Path(bundle) if bundle else None), manifest
        self._files: dict[str, object] = {}
        self._lock = threading.Lock()
        self.bytes_read = {"host": 0, "disk": 0}

    def tier(self, key: Key) -> str:
        return "host" if key in self.host else "disk"

    def read(self, key: Key) -> dict[str, QuantWeight]:
        if key in self.host:
            ws = self.host[key]
            self.bytes_read["host"] += sum(w.nbytes for w in ws.values())
            return ws
        if self.bundle is None:
            raise OffloadError(f"expert {key} is in no tier (no host copy and no bundle to read from)")
        out = {}
        for w in WEIGHTS:
            name = expert_name(key, w)
            e = self.manifest["tensors"][name]
            rel = e["files"][0]
            with self._lock:  # safe_open handles are opened once and shared; reads are serialised per store
                if rel not in self._files:
                    self._files[rel] = safe_open(self.bundle / rel, "pt")
                packed = read_tensor(self._files[rel], self.bundle / rel, name, e)
            out[w] = QuantWeight(e["format"], tuple(e["shape"]), packed)
            self.bytes_read["disk"] += out[w].nbytes
        return out

    def nbytes(self, key: Key) -> int:
        if key in self.host:
            return sum(w.nbytes for w in self.host[key].values())
        return sum(stored_nbytes(self.manifest["tensors"][expert_name(key, w)]) for w in WEIGHTS)


# ---------------------------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class CacheStats:
    hits: int = 0            # resident when asked (pinned, cached, or a finished prefetch)
    prefetch_waits: int = 0  # a background load was in flight when asked: waited for it
    misses: int = 0          # loaded synchronously on the inference path
    prefetched: int = 0      # loads done by the background thread
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.prefetch_waits + self.misses
        return (self.hits + self.prefetch_waits) / n if n else 1.0


class ExpertCache:
    """Pinned experts + an LRU of materialised experts within `capacity` bytes (packed bytes: what the device
    copy holds in the bundle's format), loaded from `store`, with one background loader thread."""

    def __init__(self, store: ExpertStore, capacity: int, make_expert: Callable[[Key, dict], Expert],
                 prefetch: bool = True):
        self.store, self.capacity, self.make_expert = store, int(capacity), make_expert
        self.pinned: dict[Key, Expert] = {}
        self.lru: OrderedDict[Key, tuple[Expert, int]] = OrderedDict()
        self.used = 0
        self.inflight: dict[Key, Future] = {}
        self.protected: set[Key] = set()  # the current layer's experts: prefetching the next layer keeps them
        self.stats_ = CacheStats()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="flashport-prefetch") if prefetch else None

    # -- materialising ---------------------------------------------------------------------------------------
    def _load(self, key: Key, ops) -> Expert:
        ex = self.make_expert(key, self.store.read(key))
        if ops is not None:  # the upload into the backend's layout happens here, off the inference thread
            for w in WEIGHTS:
                ops.handle(getattr(ex, w))
        return ex

    def pin(self, key: Key, ops=None) -> None:
        self.pinned[key] = self._load(key, ops)

    def _insert(self, key: Key, ex: Expert) -> None:
        nb = self.store.nbytes(key)
        with self._lock:
            if key in self.lru or key in self.pinned:
                return
            self.lru[key] = (ex, nb)
            self.used += nb
            for allow_protected in (False, True):
                for k in [k for k in self.lru if k != key and (allow_protected or k not in self.protected)]:
                    if self.used <= self.capacity:
                        break
                    self.used -= self.lru.pop(k)[1]
                    self.stats_.evictions += 1

    def get(self, key: Key, ops=None) -> Expert:
        with self._lock:
            if key in self.pinned:
                self.stats_.hits += 1
                return self.pinned[key]
            if key in self.lru:
                self.lru.move_to_end(key)
                self.stats_.hits += 1
                return self.lru[key][0]
            fut = self.inflight.get(key)
            if fut is not None:
                self.stats_.prefetch_waits += 1
            else:
                self.stats_.misses += 1
        if fut is not None:
            ex = fut.result()
            with self._lock:
                if key in self.lru:
                    self.lru.move_to_end(key)
            return ex
        ex = self._load(key, ops)
        self._insert(key, ex)
        return ex

    def _background(self, key: Key, ops) -> Expert:
        try:
            ex = self._load(key, ops)
            self._insert(key, ex)
            self.stats_.prefetched += 1
            return ex
        finally:
            with self._lock:
                self.inflight.pop(key, None)

    def prefetch(self, keys: Iterable[Key], ops=None, protect: bool = False) -> None:
        """Queue background loads of `keys` (in order); protect=True marks them as the current layer's (then they
        replace the previous protected set). At most what fits beside the protected experts is queued."""
        keys = list(dict.fromkeys(keys))
        with self._lock:
            if protect:
                self.protected = set(keys)
            if self._pool is None:
                return
            room = self.capacity - sum(nb for k, (_, nb) in self.lru.items() if k in self.protected)
            for key in keys:
                if key in self.pinned or key in self.lru or key in self.inflight:
                    continue
                nb = self.store.nbytes(key)
                if not protect and nb > room:
                    break
                room -= nb
                self.inflight[key] = self._pool.submit(self._background, key, ops)

    def drain(self) -> None:
        """Wait for every queued background load (benchmarks and tests)."""
        while True:
            with self._lock:
                futs = list(self.inflight.values())
            if not futs:
                return
            for f in futs:
                f.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def stats(self) -> dict:
        s = self.stats_
        return {"hits": s.hits, "prefetch_waits": s.prefetch_waits, "misses": s.misses, "prefetched": s.prefetched,
                "evictions": s.evictions, "hit_rate": round(s.hit_rate, 4), "pinned": len(self.pinned),
                "pinned_bytes": sum(self.store.nbytes(k) for k in self.pinned), "cached": len(self.lru),
                "cached_bytes": self.used, "capacity_bytes": self.capacity,
                "bytes_read_host": self.store.bytes_read["host"], "bytes_read_disk": self.store.bytes_read["disk"]}


class OffloadedExperts(Module):
    """Stands in for a MoE's `experts` ModuleList: `experts[e]` materialises expert e through the cache."""

    def __init__(self, cache: ExpertCache, prefix: str, n: int):
        super().__init__()
        self.cache, self.prefix, self.n = cache, prefix, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, e: int) -> Expert:
        if not 0 <= e < self.n:
            raise IndexError(f"{self.prefix}: expert {e} of {self.n}")
        return self.cache.get((self.prefix, int(e)), self.ops)


class _Prefetcher:
    """Forward hook on a router: queue this layer's routed experts and the next MoE layer's likely ones."""

    def __init__(self, cache: ExpertCache, prefix: str, moe: MoE, next_: tuple[str, MoE] | None):
        self.cache, self.prefix, self.moe, self.next = cache, prefix, moe, next_

    def __call__(self, gate, args, output) -> None:
        x, token_ids = args
        _, idx = output  # [T, k]
        ops = self.moe.ops
        self.cache.prefetch([(self.prefix, e) for e in idx.unique().tolist()], ops, protect=True)
        if self.next is None:
            return
        prefix, moe = self.next
        g = moe.gate
        if g.hashed:  # hash routing: the next layer's experts are known exactly
            guess = g.tid2eid[token_ids]
        else:  # its router on this layer's input: the residual stream changes little between layers
            guess = (F.softplus(x @ g.weight.T).sqrt() + g.bias).topk(g.cfg.num_experts_per_tok, dim=-1).indices
        ids, counts = guess.flatten().unique(return_counts=True)
        order = ids[counts.argsort(descending=True, stable=True)].tolist()  # most tokens first
        self.cache.prefetch([(prefix, e) for e in order], ops)


# ---------------------------------------------------------------------------------------------------------------
# Wiring
# ---------------------------------------------------------------------------------------------------------------
def _expert_factory(cfg) -> Callable[[Key, dict], Expert]:
    def make(key: Key, ws: dict[str, QuantWeight]) -> Expert:
        with torch.device("meta"):
            ex = Expert(cfg.hidden_size, cfg.moe_intermediate_size)
        for w, qw in ws.items():
            lin = getattr(ex, w)
            if qw.fmt == "fp32":
                lin.weight, lin.packed = nn.Parameter(qw.tensors["weight"], requires_grad=False), None
            else:
                lin.weight, lin.packed = nn.Parameter(torch.empty(0), requires_grad=False), qw
            lin.handles = {}
        return ex
    return make


def hot_order(stats: dict | None, prefixes: list[str]) -> list[Key]:
    """Every (prefix, expert), hottest first by routing statistics counts share (ties: layer order, index)."""
    out = []
    for p in prefixes:
        counts = (stats or {}).get("layers", {}).get(p)
        if counts:
            total = sum(counts) or 1
            out += [(-c / total, p, e) for e, c in enumerate(counts)]
    return [(p, e) for _, p, e in sorted(out)]


def enable_offload(model: Transformer, store: ExpertStore, capacity: int, pinned: Iterable[Key] = (),
                   prefetch: bool = True) -> ExpertCache:
    """Replace every MoE's experts by cache-backed ones: `pinned` experts resident, an LRU of `capacity` bytes
    for the rest, cold copies in `store`. Call after `model.set_ops` so uploads go to the final backend."""
    layers = moe_layers(model)
    cache = ExpertCache(store, capacity, _expert_factory(model.cfg), prefetch)
    biggest = max((store.nbytes((p, 0)) for p, _ in layers), default=0)
    if capacity < biggest:
        raise OffloadError(f"expert cache of {capacity} bytes cannot hold one expert ({biggest} bytes); give more "
                           "device memory or pin fewer experts")
    for i, (prefix, moe) in enumerate(layers):
        n = len(moe.experts)
        moe.experts = OffloadedExperts(cache, prefix, n)
        moe.experts.ops = moe.ops
        if prefetch:
            nxt = layers[i + 1] if i + 1 < len(layers) and not prefix.startswith("mtp") else None
            moe.gate.register_forward_hook(_Prefetcher(cache, prefix, moe, nxt))
    for key in pinned:
        cache.pin(key, dict(layers)[key[0]].ops)
    model.offload = cache
    return cache


def _take_experts(model: Transformer) -> dict[Key, dict[str, QuantWeight]]:
    """The packed weights of every materialised routed expert (the host tier of a fully loaded model)."""
    out = {}
    for prefix, moe in moe_layers(model):
        for e, ex in enumerate(moe.experts):
            if ex.w1.packed is not None and not ex.w1.packed.tensors:
                continue  # a placeholder (not loaded)
            out[(prefix, e)] = {w: _qweight(getattr(ex, w)) for w in WEIGHTS}
    return out




# ---------------------------------------------------------------------------------------------------------------
# Applying offload to an opened model (what flashport.load_engine calls)
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class DeviceNeeds:
    """Bytes on the device besides the routed-expert cache: the non-expert weights as loaded (packed where
    packed), the KV of `context` x `sequences` tokens, one prefill chunk's workspace; and all routed experts."""

    non_expert: int
    kv: int
    workspace: int
    experts: int

    @property
    def fixed(self) -> int:
        return self.non_expert + self.kv + self.workspace


def offload_keep_expert(is_bundle: bool):
    """Which routed experts `open_model` should read for offload: none from a bundle (the expert store reads them
    from the shards after the budget check), all from a checkpoint (fp32; they become the host tier)."""
    return (lambda prefix, e: False) if is_bundle else None


def device_needs(model: Transformer, store: ExpertStore, context: int, sequences: int,
                 prefill_chunk: int = 1024) -> DeviceNeeds:
    non_expert = 0
    for name, mod in model.named_modules():
        if ".ffn.experts." in name or isinstance(mod, OffloadedExperts):
            continue
        for t in list(mod._parameters.values()) + list(mod._buffers.values()):
            if isinstance(t, torch.Tensor):
                non_expert += t.numel() * t.element_size()
        if isinstance(mod, Linear) and mod.packed is not None:
            non_expert += mod.packed.nbytes
    experts = sum(store.nbytes((p, e)) for p, moe in moe_layers(model) for e in range(len(moe.experts)))
    return DeviceNeeds(non_expert, kv_layout(model.cfg).kv_bytes(context, sequences),
                       workspace_bytes(model.cfg, prefill_chunk, context), experts)


def apply_offload(model: Transformer, path: Path, manifest: dict | None, opts) -> ExpertCache:
    """Offload the routed experts of an opened model (flashport.loader.open_model with `offload_keep_expert`)
    according to `opts` (flashport.options.OffloadOptions). Call after `model.set_ops`. The budget is checked
    before any expert is read: OffloadError names the numbers when the non-expert weights, KV and workspace do
    not leave room for one expert."""
    if opts.tier == "disk" and manifest is None:
        raise OffloadError(f"{path}: the disk tier reads experts from a bundle's shards; export one first "
                           "(flashport export) or use the host tier")
    stats = load_routing_stats(opts.stats) if opts.stats else \
        load_routing_stats(path) if (path / ROUTING_STATS).exists() else None
    layers = moe_layers(model)
    keys = [(p, e) for p, moe in layers for e in range(len(moe.experts))]
    store = ExpertStore(_take_experts(model), path if manifest is not None else None, manifest)
    needs = device_needs(model, store, opts.context, opts.sequences)
    biggest = max((store.nbytes((p, 0)) for p, _ in layers), default=0)
    host_keys: set[Key] = set()
    if opts.max_device_memory is not None:
        left = opts.max_device_memory - needs.fixed
        if left < biggest:
            raise OffloadError(
                f"max device memory {_mib(opts.max_device_memory)} does not fit: the device needs "
                f"{_mib(needs.non_expert)} of non-expert weights, {_mib(needs.kv)} of KV ({opts.context} tokens x "
                f"{opts.sequences}) and {_mib(needs.workspace)} of workspace, plus {_mib(biggest)} for one expert")
        pins, room = [], int(opts.pin_fraction * left)
        for key in hot_order(stats, [p for p, _ in layers]):
            nb = store.nbytes(key)
            if nb > room:
                break
            pins.append(key)
            room -= nb
        capacity = left - sum(store.nbytes(k) for k in pins)
    else:  # run the bundle's own edge placement: pinned = on the primary device, cache = its double buffer
        placement = (manifest or {}).get("placement") or {}
        if placement.get("mode") != "edge":
            raise OffloadError(f"{path}: give a max device memory (the model has no edge-mode placement to follow)")
        devices = placement["devices"]
        host_devs = {d["name"] for d in devices if d["kind"] == "host"}
        pins = [(p, e) for p, per in placement["placement"].items() for e, devs in enumerate(per)
                if devices[0]["name"] in devs]
        host_keys = {(p, e) for p, per in placement["placement"].items() for e, devs in enumerate(per)
                     if host_devs & set(devs)}
        capacity = 2 * model.cfg.num_experts_per_tok * biggest
    if manifest is not None:  # read the host tier from the shards now, after the budget check
        wanted = keys if opts.tier == "host" else set(pins) | host_keys
        for key in wanted:
            store.host[key] = store.read(key)
        store.bytes_read["disk"] = 0
    cache = enable_offload(model, store, capacity, pins, opts.prefetch)
    cache.needs = needs
    log.info("offload: %d experts pinned, LRU cache %.1f MiB, cold tier %s", len(pins), capacity / 2**20, opts.tier)
    return cache


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"
