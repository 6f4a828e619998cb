"""Expert offload: run a model whose routed experts do not all fit on the device.

    engine = flashport.offload.load_engine("bundle/", max_device_memory="8GiB", tier="disk")
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

The budget: `max_device_memory` is the whole device. The planner (flashport.export.planner, edge mode) takes off
the non-expert weights, the KV target (context x sequences) and the workspace including its double buffer for
fetched experts; what is left holds pinned + cached experts. A budget that cannot hold even the non-expert
weights is refused by the planner (PlanError naming the numbers) before anything is loaded. Without
`max_device_memory`, a bundle exported in edge mode is run as planned: experts the placement put on the primary
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
from .model import Expert, Linear, Module, MoE, Transformer

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
# Partial bundle loading (shared with flashport.distributed: a rank maps only its partition)
# ---------------------------------------------------------------------------------------------------------------
def load_bundle_partial(path: str | Path, keep_expert: Callable[[str, int], bool] | None = None,
                        prefer_partition: str | None = None, verify: bool | None = None) -> tuple[Transformer, dict]:
    """Like flashport.export.bundle.load_model, but reads only the routed experts `keep_expert(prefix, e)` accepts
    (all when None), each from the shard of `prefer_partition` when it holds a copy. The other experts get
    placeholder Linears (no data, the right format name) that must never run. Only the files read are checked.
    -> (model, manifest)."""
    from .config import ModelConfig
    from .export import bundle as B

    path = Path(path)
    m = B.read_manifest(path)
    entries = m["tensors"]
    cfg = ModelConfig.from_dict(m["config"])
    shapes = B.model_shapes(cfg)
    has_mtp = any(n.startswith("mtp.") for n in entries)
    want = {n for n in shapes if has_mtp or not n.startswith("mtp.")}
    if set(entries) != want:
        raise B.BundleError(f"{path}: manifest tensors do not match the {cfg.name} config")

    def wanted(name: str) -> bool:
        prefix = B._moe_prefix(name)
        return prefix is None or keep_expert is None or keep_expert(prefix, B._expert_index(name))

    def file_of(name: str) -> str:
        files = entries[name]["files"]
        own = [f for f in files if prefer_partition and f.split("/")[0] == prefer_partition]
        return (own or files)[0]

    read = {n: file_of(n) for n in entries if wanted(n)}
    needed = {f: m["files"][f] for f in set(read.values())}
    B.check_files(path, {**m, "files": needed}, B._verify_default(verify))
    with torch.device("meta"):
        model = Transformer(cfg)
    if not has_mtp:
        model.mtp = nn.ModuleList()
    handles: dict[str, object] = {}
    try:
        for name in sorted(entries):
            e = entries[name]
            if name not in read:  # an expert held elsewhere: a placeholder with its format, no bytes
                lin = model.get_submodule(name.rpartition(".")[0])
                lin.weight = nn.Parameter(torch.empty(0), requires_grad=False)
                lin.packed, lin.handles = QuantWeight(e["format"], tuple(e["shape"]), {}), {}
                continue
            rel = read[name]
            if rel not in handles:
                handles[rel] = safe_open(path / rel, "pt")
            B._install(model, name, e, B._read_tensor(handles[rel], path / rel, name, e))
    finally:
        handles.clear()
    B._rebuild_buffers(model)
    return model.eval(), m


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
        from .export import bundle as B

        out = {}
        for w in WEIGHTS:
            name = expert_name(key, w)
            e = self.manifest["tensors"][name]
            rel = e["files"][0]
            with self._lock:  # safe_open handles are opened once and shared; reads are serialised per store
                if rel not in self._files:
                    self._files[rel] = safe_open(self.bundle / rel, "pt")
                packed = B._read_tensor(self._files[rel], self.bundle / rel, name, e)
            out[w] = QuantWeight(e["format"], tuple(e["shape"]), packed)
            self.bytes_read["disk"] += out[w].nbytes
        return out

    def nbytes(self, key: Key) -> int:
        if key in self.host:
            return sum(w.nbytes for w in self.host[key].values())
        from .export.bundle import _expected_specs

        total = 0
        for w in WEIGHTS:
            e = self.manifest["tensors"][expert_name(key, w)]
            total += sum(torch.Size(s).numel() * d.itemsize for s, d in _expected_specs(e["format"], e["shape"]).values())
        return total


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


def expert_budget(cfg, max_device_memory: int | str, recipe, stats: dict | None = None, context: int = 4096,
                  sequences: int = 1, kv_dtype: str = "fp32"):
    """-> (plan, bytes left for routed experts) on one device of `max_device_memory`; the planner raises
    PlanError when even the non-expert weights, KV and workspace do not fit."""
    from .export.planner import Device, parse_size, plan

    budget = parse_size(max_device_memory) if isinstance(max_device_memory, str) else int(max_device_memory)
    p = plan(cfg, [Device("device", "accel", budget), Device("host", "host", None)], recipe, stats, context,
             sequences, "edge", kv_dtype)
    u = p.usage["device"]
    return p, budget - u.non_expert - u.kv - u.workspace


FP32_RECIPE = {"name": "fp32", "formats": {c: "fp32" for c in ("experts", "shared_experts", "attention", "compressor",
                                                               "indexer", "gate", "mtp_proj", "embed", "head")}}


def load_engine(path: str | Path, max_device_memory: int | str | None = None, tier: str = "host",
                backend: str = "auto", pin_fraction: float = 0.5, prefetch: bool = True, context: int = 4096,
                sequences: int = 1, stats: str | dict | None = None, verify: bool | None = None, **engine_kwargs):
    """An Engine whose routed experts are offloaded (see the module docstring).

    path: a bundle (tier host or disk) or a checkpoint directory (tier host only: it is loaded as fp32).
    max_device_memory: bytes or a size such as "8GiB" for the whole device; None: the bundle's own edge
    placement. tier: where the experts that are not pinned live: host memory or the bundle's files on disk.
    pin_fraction: share of the expert budget pinned hottest first (the rest is the LRU cache).
    context x sequences: the KV the budget reserves. stats: routing statistics (file, dir or dict; default:
    the bundle's routing_stats.json). The engine gets `engine.offload` (the ExpertCache).
    """
    from .backends import Ops, create
    from .checkpoint import CheckpointReader
    from .engine import Engine
    from .export.calibrate import ROUTING_STATS, load_routing_stats
    from .tokenizer import Tokenizer

    path = Path(path)
    if tier not in ("host", "disk"):
        raise OffloadError(f"tier must be host or disk, not {tier!r}")
    if not 0.0 <= pin_fraction <= 1.0:
        raise OffloadError(f"pin_fraction must be in [0, 1], not {pin_fraction}")
    is_bundle = (path / "manifest.json").exists()
    if tier == "disk" and not is_bundle:
        raise OffloadError(f"{path}: the disk tier reads experts from a bundle's shards; export one first "
                           "(flashport export) or use tier='host'")
    if isinstance(stats, (str, Path)):
        stats = load_routing_stats(stats)
    elif stats is None and (path / ROUTING_STATS).exists():
        stats = load_routing_stats(path)

    if is_bundle:
        from .export.bundle import read_manifest
        from .export.planner import Plan

        manifest = read_manifest(path)
        from .config import ModelConfig

        cfg, recipe = ModelConfig.from_dict(manifest["config"]), manifest["recipe"]
    else:
        reader = CheckpointReader(path)
        cfg, recipe, manifest = reader.cfg, FP32_RECIPE, None

    if max_device_memory is not None:  # budget first: a plan that cannot work fails before any load
        _, expert_bytes = expert_budget(cfg, max_device_memory, recipe, stats, context, sequences)
        order, capacity_total, host_keys = hot_order(stats, _prefixes(cfg)), expert_bytes, None
    else:
        if not is_bundle or manifest["placement"]["mode"] != "edge":
            raise OffloadError(f"{path}: give max_device_memory (no edge-mode placement to follow)")
        plan_ = Plan.from_dict(manifest["placement"])
        primary = plan_.devices[0].name
        order = [(p, e) for p, per in plan_.placement.items() for e, devs in enumerate(per) if primary in devs]
        host_keys = {(p, e) for p, per in plan_.placement.items() for e, devs in enumerate(per)
                     if any(d.kind == "host" for d in plan_.devices if d.name in devs)}
        capacity_total = None

    if is_bundle:  # read now: the host tier (all experts, or those the plan puts in host memory or on the device)
        planned = None if host_keys is None else host_keys | set(order)
        model, manifest = load_bundle_partial(
            path, lambda p, e: tier == "host" if planned is None else (p, e) in planned, verify=verify)
    else:
        model = Transformer(cfg)
        model.load_state_dict(reader.load_state_dict())
    ops = Ops(create(backend))
    model.set_ops(ops)
    host = _take_experts(model)
    store = ExpertStore(host, path if is_bundle else None, manifest)
    biggest = max(store.nbytes((p, 0)) for p, _ in moe_layers(model))
    if capacity_total is None:  # the bundle's plan: pinned = on the primary device, cache = its double buffer
        pins, capacity = order, 2 * cfg.num_experts_per_tok * biggest
    else:
        pins, left = [], int(pin_fraction * capacity_total)
        for key in order:
            nb = store.nbytes(key)
            if nb > left:
                break
            pins.append(key)
            left -= nb
        capacity = capacity_total - sum(store.nbytes(k) for k in pins)
    if tier == "disk":  # experts neither pinned nor planned for host memory are dropped from it: read from disk
        keep_host = set(pins) | (host_keys or set())
        store.host = {k: v for k, v in store.host.items() if k in keep_host}
    cache = enable_offload(model, store, capacity, pins, prefetch)
    tok_file = path / "tokenizer.json"
    tokenizer = Tokenizer.from_file(tok_file) if tok_file.exists() else Tokenizer.default()
    engine = Engine(model, tokenizer, path, **engine_kwargs)
    engine.offload = cache
    log.info("offload: %d experts pinned, LRU cache %.1f MiB, cold tier %s", len(pins), capacity / 2**20, tier)
    return engine


def _prefixes(cfg) -> list[str]:
    return [f"layers.{i}" for i in range(cfg.num_hidden_layers)] + \
        [f"mtp.{j}" for j in range(cfg.num_nextn_predict_layers)]
