"""Placement planner: put every routed expert of every MoE layer on a device or tier, for a memory budget.

    flashport plan --model v4-flash --devices npu:0=64GiB,npu:1=64GiB,cpu=256GiB,disk --recipe int4-experts \
                   --context 131072 --sequences 4 [--stats routing_stats.json] [--mode ep|edge]

Inputs: the model config (a preset such as `v4-flash`, which needs no weights, a checkpoint or a bundle), the
recipe (which fixes every tensor's bytes), routing statistics (tokens per layer and expert from calibration;
uniform when absent), the devices with their budgets, and the KV target (context x concurrent sequences).

Memory per device = weights + KV + workspace:
- weights: each tensor at its recipe format's stored size (scales and padding included, `format_nbytes`); embed
  and the router matrix count at fp32 (they are loaded as fp32 parameters).
- KV (flashport.kv.kv_layout): per sequence, (a) per token, over the compressed layers,
  sum_CSA (head_dim + index_head_dim) / csa_rate + sum_HCA head_dim / hca_rate values (compressed entries plus
  the lightning indexer's keys), and (b) a fixed part: the sliding window of every layer (num_layers x window x
  head_dim) plus the compressors' not-yet-pooled tails and CSA overlaps. Values cost 4 bytes (kv_dtype fp32,
  flashport's runtime), 2 (bf16) or 584/512 (fp8: the release numerics, FP8 + BF16 RoPE dims + scales).
- workspace: the activations of one prefill chunk (streams, attention logits over window + chunk + the compressed
  entries one query sees, MoE hidden), plus in edge mode a double buffer for experts fetched from host or disk.
  An estimate for the reference runtime; backends with fused kernels need less.

Modes:
- ep (expert parallel, DeepSeek-style): every accelerator rank holds the non-expert weights (attention is data
  parallel; sequences are split across ranks) and a slice of each layer's experts. Per layer, spare expert slots
  (one per rank by default, as memory allows) hold replicas of the hottest experts (EPLB: each replica goes to the
  expert with the highest load per replica), then replicas are packed onto ranks heaviest first, each to the
  least loaded rank with a free slot that does not hold that expert yet. Imbalance = max rank load / mean rank
  load per layer (1.0 is perfect).
- edge (one device plus host memory and disk): the primary device (the first accelerator, else the CPU) holds the
  non-expert weights, the KV and the workspace; experts are pinned hottest first in its remaining memory, then
  host memory, then disk. The table reports the expected share of expert activations each tier serves and the
  bytes per token read from the slower tiers (no cache assumed).

The planner refuses (PlanError, naming the device and the numbers) when the non-expert weights, KV and workspace
do not fit on a device that needs them, or when the experts fit nowhere.
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ModelConfig
from ..kv import kv_layout
from ..model import param_shapes, workspace_bytes
from .recipes import Recipe, load_recipe, tensor_class, format_nbytes


class PlanError(ValueError):
    """The model does not fit the given devices (or the request is malformed); the message says why."""


# -------------------------------------------------------------------------------------------------------------
# Devices
# -------------------------------------------------------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(s: str) -> int:
    """'64GiB', '128GB', '1.5TiB', '1024' (bytes) -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(s))
    if not m or m.group(2).lower() not in _UNITS:
        raise PlanError(f"cannot read size {s!r}; write e.g. 64GiB, 128GB, 512MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass
class Device:
    name: str               # "npu:0", "cuda:1", "cpu", "disk"
    kind: str               # "accel", "host" or "disk"
    budget: int | None      # bytes; None: unlimited (a disk given without a size)

    @property
    def partition(self) -> str:
        """The bundle directory of this device's expert shards ("npu:0" -> "npu0")."""
        return re.sub(r"[^A-Za-z0-9_.-]", "", self.name) or "dev"


def parse_devices(spec: str | list) -> list[Device]:
    """'npu:0=64GiB,npu:1=64GiB,cpu=256GiB,disk' -> devices. Only a disk may omit its size."""
    items = spec if isinstance(spec, (list, tuple)) else [x for x in str(spec).split(",") if x.strip()]
    out: list[Device] = []
    for item in items:
        name, _, size = str(item).strip().partition("=")
        name = name.strip()
        kind = "host" if name.startswith("cpu") else "disk" if name.startswith(("disk", "ssd", "nvme")) else "accel"
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*(:\d+)?", name):
            raise PlanError(f"device {item!r}: write NAME=SIZE, e.g. npu:0=64GiB, cpu=256GiB, disk")
        if not size and kind != "disk":
            raise PlanError(f"device {name!r} needs a memory budget, e.g. {name}=64GiB")
        if any(d.name == name for d in out):
            raise PlanError(f"device {name!r} listed twice")
        out.append(Device(name, kind, parse_size(size) if size else None))
    if not out:
        raise PlanError("no devices given; e.g. --devices npu:0=64GiB,cpu=256GiB,disk")
    return out


# -------------------------------------------------------------------------------------------------------------
# What has to be placed
# -------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _shapes(cfg_json: str) -> dict[str, tuple]:
    return param_shapes(ModelConfig.from_dict(json.loads(cfg_json)))


def model_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """param_shapes(cfg), cached (building the meta model of v4-flash takes seconds)."""
    return _shapes(json.dumps(cfg.to_dict(), sort_keys=True, default=str))


@dataclass
class WeightBytes:
    non_expert: int                 # bytes at run time of everything but the routed experts
    expert: dict[str, int]          # MoE layer prefix ("layers.3", "mtp.0") -> bytes of ONE routed expert
    stored: int                     # bytes of the whole bundle on disk


def weight_bytes(cfg: ModelConfig, recipe: Recipe, names: list[str] | None = None) -> WeightBytes:
    shapes = model_shapes(cfg)
    names = list(shapes) if names is None else names
    fmts = recipe.assign(cfg, names)
    non, stored, expert = 0, 0, {}
    for n in names:
        b = format_nbytes(fmts[n], shapes[n])
        stored += b
        cls, _ = tensor_class(n, cfg)
        if cls == "experts":
            prefix, e = n.split(".ffn.experts.")[0], int(n.split(".ffn.experts.")[1].split(".")[0])
            if e == 0:
                expert[prefix] = expert.get(prefix, 0) + b
        else:
            non += math.prod(shapes[n]) * 4 if cls in ("embed", "gate") else b
    return WeightBytes(non, expert, stored)


KV_VALUE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp8": 584 / 512}


def kv_bytes(cfg: ModelConfig, kv_dtype: str = "fp32") -> tuple[float, float]:
    """(bytes per token, fixed bytes per sequence) of one sequence's KV; see the module docstring."""
    if kv_dtype not in KV_VALUE_BYTES:
        raise PlanError(f"unknown kv_dtype {kv_dtype!r}; use {', '.join(KV_VALUE_BYTES)}")
    lay = kv_layout(cfg, KV_VALUE_BYTES[kv_dtype])
    return lay.compressed_per_token, lay.fixed_per_seq


def _gib(n: float | None) -> str:
    return "unlimited" if n is None else f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


# -------------------------------------------------------------------------------------------------------------
# The plan
# -------------------------------------------------------------------------------------------------------------
@dataclass
class Usage:
    non_expert: int = 0
    experts: int = 0
    kv: int = 0
    workspace: int = 0
    n_experts: int = 0      # expert copies held (replicas included)
    load: float = 0.0       # expected share of all routed-expert activations this device serves

    @property
    def total(self) -> int:
        return self.non_expert + self.experts + self.kv + self.workspace


@dataclass
class Plan:
    mode: str
    model: str
    recipe: str
    devices: list[Device]
    usage: dict[str, Usage]
    placement: dict[str, list[list[str]]]   # MoE prefix -> per expert the devices holding a copy
    kv_per_token: float
    kv_fixed_per_seq: float
    kv_capacity_tokens: int
    context: int
    sequences: int
    kv_dtype: str
    imbalance: dict[str, float] = field(default_factory=dict)
    fetch_bytes_per_token: dict[str, float] = field(default_factory=dict)
    stats: str = "uniform"
    notes: list[str] = field(default_factory=list)

    def devices_of(self, prefix: str, expert: int) -> list[str]:
        return self.placement[prefix][expert]

    def to_dict(self) -> dict:
        return {
            "mode": self.mode, "model": self.model, "recipe": self.recipe, "stats": self.stats,
            "devices": [{"name": d.name, "kind": d.kind, "budget": d.budget, "partition": d.partition}
                        for d in self.devices],
            "usage": {k: {**vars(u), "total": u.total} for k, u in self.usage.items()},
            "placement": self.placement, "kv_per_token": self.kv_per_token, "kv_fixed_per_seq": self.kv_fixed_per_seq,
            "kv_capacity_tokens": self.kv_capacity_tokens, "context": self.context, "sequences": self.sequences,
            "kv_dtype": self.kv_dtype, "imbalance": self.imbalance, "fetch_bytes_per_token": self.fetch_bytes_per_token,
            "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        devs = [Device(x["name"], x["kind"], x["budget"]) for x in d["devices"]]
        usage = {k: Usage(**{f: v[f] for f in vars(Usage()) if f in v}) for k, v in d["usage"].items()}
        return cls(d["mode"], d["model"], d["recipe"], devs, usage, d["placement"], d["kv_per_token"],
                   d["kv_fixed_per_seq"], d["kv_capacity_tokens"], d["context"], d["sequences"], d["kv_dtype"],
                   d.get("imbalance", {}), d.get("fetch_bytes_per_token", {}), d.get("stats", "uniform"),
                   d.get("notes", []))

    def table(self) -> str:
        n_layers = len(self.placement)
        n_exp = sum(len(v) for v in self.placement.values())
        rows = [f"plan: {self.model}, recipe {self.recipe}, mode {self.mode}, {n_layers} MoE layers x "
                f"{n_exp // max(n_layers, 1)} routed experts, routing stats: {self.stats}",
                f"KV target: {self.context} tokens x {self.sequences} sequence(s), {self.kv_dtype}: "
                f"{self.kv_per_token:.0f} B/token + {_gib(self.kv_fixed_per_seq)} per sequence",
                "",
                f"{'device':<8} {'budget':>12} {'weights':>11} {'experts':>11} {'KV':>11} {'workspace':>11} "
                f"{'total':>11} {'free':>11} {'#experts':>9} {'load':>7}"]
        for d in self.devices:
            u = self.usage[d.name]
            free = "-" if d.budget is None else _gib(d.budget - u.total)
            rows.append(f"{d.name:<8} {_gib(d.budget):>12} {_gib(u.non_expert):>11} {_gib(u.experts):>11} "
                        f"{_gib(u.kv):>11} {_gib(u.workspace):>11} {_gib(u.total):>11} {free:>11} "
                        f"{u.n_experts:>9} {100 * u.load:>6.1f}%")
        rows.append("")
        if self.imbalance:
            rows.append(f"expected load imbalance (max rank / mean rank, per layer): mean {self.imbalance['mean']:.3f}, "
                        f"worst {self.imbalance['max']:.3f}; without replicas: mean "
                        f"{self.imbalance['no_replicas_mean']:.3f}, worst {self.imbalance['no_replicas_max']:.3f}")
        for dev, b in self.fetch_bytes_per_token.items():
            rows.append(f"expected expert bytes read from {dev} per token (no cache): {_gib(b)}")
        rows.append(f"KV capacity: {self.kv_capacity_tokens:,} tokens in the memory left after weights and workspace "
                    f"(target {self.context * self.sequences:,})")
        rows += [f"note: {n}" for n in self.notes]
        return "\n".join(rows)


def _loads(cfg: ModelConfig, prefixes: list[str], stats: dict | None) -> dict[str, list[float]]:
    """Per MoE layer, each expert's share of the layer's routed slots (sums to 1); uniform without stats."""
    E = cfg.n_routed_experts
    out = {}
    for p in prefixes:
        counts = (stats or {}).get("layers", {}).get(p)
        if counts is not None and len(counts) != E:
            raise PlanError(f"routing statistics for {p} have {len(counts)} experts, the model {E}")
        total = sum(counts) if counts else 0
        out[p] = [c / total for c in counts] if total else [1.0 / E] * E
    return out


def plan(cfg: ModelConfig, devices: str | list[Device], recipe: str | Recipe = "int4-experts",
         stats: dict | None = None, context: int = 65536, sequences: int = 1, mode: str = "auto",
         kv_dtype: str = "fp32", redundant: int | None = None, chunk: int = 1024,
         names: list[str] | None = None) -> Plan:
    """Place every routed expert; raises PlanError when the model cannot fit. See the module docstring."""
    devs = parse_devices(devices) if not isinstance(devices, list) else devices
    recipe = load_recipe(recipe)
    accels = [d for d in devs if d.kind == "accel"]
    if mode == "auto":
        # auto tries the modes that can fit, fastest first: ep (every expert resident on some accelerator) with two
        # or more accelerators, else edge (hot experts on the accelerator, the rest on host memory and disk)
        if len(accels) > 1:
            args = (cfg, devs, recipe, stats, context, sequences)
            try:
                return plan(*args, "ep", kv_dtype, redundant, chunk, names)
            except PlanError as e:
                if not str(e).startswith("does not fit"):
                    raise
                try:
                    p = plan(*args, "edge", kv_dtype, redundant, chunk, names)
                except PlanError as e2:
                    raise PlanError(f"{e2} (auto mode tried ep too: {str(e).removeprefix('does not fit: ')})") from None
                p.notes.insert(0, f"auto mode: ep does not fit ({str(e).removeprefix('does not fit: ')}); "
                                 "placed in edge mode instead")
                return p
        mode = "edge"
    if mode not in ("ep", "edge"):
        raise PlanError(f"unknown mode {mode!r}; use ep, edge or auto")
    if context < 1 or sequences < 1:
        raise PlanError("context and sequences must be >= 1")
    wb = weight_bytes(cfg, recipe, names)
    prefixes = list(wb.expert)
    loads = _loads(cfg, prefixes, stats)
    per_tok, fixed = kv_bytes(cfg, kv_dtype)
    ws = workspace_bytes(cfg, chunk, context)
    usage = {d.name: Usage() for d in devs}
    common = dict(model=cfg.name, recipe=recipe.name, devices=devs, usage=usage, kv_per_token=per_tok,
                  kv_fixed_per_seq=fixed, context=context, sequences=sequences, kv_dtype=kv_dtype,
                  stats="measured" if stats else "uniform")
    if mode == "ep":
        return _plan_ep(cfg, accels, wb, loads, per_tok, fixed, ws, redundant, common)
    return _plan_edge(cfg, devs, accels, wb, loads, per_tok, fixed, ws, common)


def _refuse_fixed(d: Device, u: Usage, what: str) -> None:
    if d.budget is not None and u.total > d.budget:
        raise PlanError(f"does not fit: {d.name} has {_gib(d.budget)} but needs {_gib(u.total)} before any routed "
                        f"expert ({what}: non-expert weights {_gib(u.non_expert)}, KV {_gib(u.kv)}, workspace "
                        f"{_gib(u.workspace)}); add memory, lower the recipe, or shorten the context")


def _plan_ep(cfg, ranks, wb, loads, per_tok, fixed, ws, redundant, common) -> Plan:
    if len(ranks) < 2:
        raise PlanError("ep mode needs two or more accelerators (e.g. npu:0=64GiB,npu:1=64GiB); use --mode edge")
    R, E, ctx, seqs = len(ranks), cfg.n_routed_experts, common["context"], common["sequences"]
    seqs_per_rank = -(-seqs // R)  # attention is data parallel: sequences are split across ranks
    usage = common["usage"]
    for d in ranks:
        u = usage[d.name]
        u.non_expert, u.kv, u.workspace = wb.non_expert, int(seqs_per_rank * (per_tok * ctx + fixed)), ws
        _refuse_fixed(d, u, "every rank holds them")
    base = -(-E // R)  # expert slots per rank per layer without replicas
    row = sum(wb.expert.values())  # one slot in every layer
    left = min(d.budget - usage[d.name].total for d in ranks)
    if base * row > left:
        raise PlanError(f"does not fit: each of the {R} ranks needs {_gib(base * row)} for {base} experts per layer "
                        f"but has {_gib(left)} left after non-expert weights, KV and workspace; add ranks, lower the "
                        "recipe, or use --mode edge with host memory and disk")
    spare = (left - base * row) // row if row else 0
    extra = min(spare, 1 if redundant is None else redundant)  # replica slots per rank per layer
    slots = base + extra
    placement, imb, imb0 = {}, [], []
    for p in loads:
        assign, rank_load, rank_load0 = _eplb(loads[p], R, slots)
        placement[p] = [[ranks[r].name for r in rs] for rs in assign]
        imb.append(max(rank_load) / (sum(rank_load) / R))
        imb0.append(max(rank_load0) / (sum(rank_load0) / R))
        for r in range(R):
            usage[ranks[r].name].load += rank_load[r] / len(loads)
    for p, per_expert in placement.items():
        for devs_e in per_expert:
            for name in devs_e:
                usage[name].n_experts += 1
                usage[name].experts += wb.expert[p]
    cap = sum(int(max(0, d.budget - usage[d.name].non_expert - usage[d.name].experts - ws
                      - seqs_per_rank * fixed) // per_tok) for d in ranks)
    notes = [f"{extra} replica slot(s) per rank per layer ({extra * R} replicas per layer) from the memory left"]
    others = [d.name for d in common["devices"] if d.kind != "accel"]
    if others:
        notes.append(f"ep mode places experts on accelerators only; {', '.join(others)} unused")
    return Plan(mode="ep", placement=placement, kv_capacity_tokens=cap,
                imbalance={"mean": sum(imb) / len(imb), "max": max(imb), "no_replicas_mean": sum(imb0) / len(imb0),
                           "no_replicas_max": max(imb0)}, notes=notes, **common)


def _eplb(load: list[float], R: int, slots: int) -> tuple[list[list[int]], list[float], list[float]]:
    """One layer: replicate the hottest experts into R*slots slots, pack them onto R ranks.
    -> (per expert the ranks holding it, per-rank load with replicas, per-rank load of the plain round-robin
    layout without replicas, for comparison)."""
    E = len(load)
    copies = [1] * E
    for _ in range(min(R * slots, E * R) - E):  # each spare slot to the expert with the highest load per copy
        e = max(range(E), key=lambda i: (load[i] / copies[i], -i))
        if copies[e] >= R:
            break
        copies[e] += 1
    items = sorted(((load[e] / copies[e], e) for e in range(E) for _ in range(copies[e])), key=lambda t: (-t[0], t[1]))
    rank_load, used = [0.0] * R, [0] * R
    holders: list[list[int]] = [[] for _ in range(E)]
    for w, e in items:
        free = [r for r in range(R) if used[r] < slots and r not in holders[e]] or \
               [r for r in range(R) if used[r] < slots]
        r = min(free, key=lambda r: (rank_load[r], r))
        holders[e].append(r)
        rank_load[r] += w
        used[r] += 1
    plain = [0.0] * R
    for e in range(E):
        plain[e * R // E] += load[e]  # contiguous blocks of experts per rank (the layout without EPLB)
    return holders, rank_load, plain


def _plan_edge(cfg, devs, accels, wb, loads, per_tok, fixed, ws, common) -> Plan:
    host = next((d for d in devs if d.kind == "host"), None)
    primary = accels[0] if accels else host
    if primary is None:
        raise PlanError("edge mode needs an accelerator or cpu=SIZE to run on")
    disk = next((d for d in devs if d.kind == "disk"), None)
    usage, ctx, seqs = common["usage"], common["context"], common["sequences"]
    k = cfg.num_experts_per_tok
    u = usage[primary.name]
    max_expert = max(wb.expert.values(), default=0)
    tiers = [primary] + ([host] if host is not None and host is not primary else []) + ([disk] if disk else [])
    staging = 2 * k * max_expert if len(tiers) > 1 else 0  # double buffer for experts fetched from slower tiers
    u.non_expert, u.kv, u.workspace = wb.non_expert, int(seqs * (per_tok * ctx + fixed)), ws + staging
    _refuse_fixed(primary, u, "the primary device holds them")
    order = sorted(((loads[p][e], p, e) for p in loads for e in range(len(loads[p]))), key=lambda t: (-t[0], t[1], t[2]))
    free = {d.name: (None if d.budget is None else d.budget - usage[d.name].total) for d in tiers}
    placement = {p: [[] for _ in loads[p]] for p in loads}
    fetch: dict[str, float] = {}
    n_layers = len(loads)
    for share, p, e in order:
        b = wb.expert[p]
        d = next((d for d in tiers if free[d.name] is None or free[d.name] >= b), None)
        if d is None:
            missing = sum(wb.expert[q] for s, q, x in order if not placement[q][x])
            raise PlanError(f"does not fit: routed experts need {_gib(missing)} more than {', '.join(t.name for t in tiers)}"
                            f" can hold; add host memory or a disk tier (e.g. ,disk), or lower the recipe")
        if free[d.name] is not None:
            free[d.name] -= b
        placement[p][e].append(d.name)
        du = usage[d.name]
        du.n_experts, du.experts, du.load = du.n_experts + 1, du.experts + b, du.load + share / n_layers
        if d is not primary:
            fetch[d.name] = fetch.get(d.name, 0.0) + k * share * b
    cap = int(max(0, primary.budget - u.non_expert - u.experts - u.workspace - seqs * fixed) // per_tok)
    notes = [f"primary device {primary.name}: non-expert weights, KV and workspace; experts hottest first, then "
             + ", ".join(t.name for t in tiers[1:]) if len(tiers) > 1 else f"everything on {primary.name}"]
    return Plan(mode="edge", placement=placement, kv_capacity_tokens=cap, fetch_bytes_per_token=fetch, notes=notes,
                **common)


# -------------------------------------------------------------------------------------------------------------
# CLI
# -------------------------------------------------------------------------------------------------------------
def model_config(model: str | Path) -> tuple[ModelConfig, Path | None]:
    """A preset name, a checkpoint directory or a bundle directory -> (config, directory or None)."""
    p = Path(str(model))
    if p.is_dir():
        if (p / "manifest.json").exists():
            return ModelConfig.from_dict(json.loads((p / "manifest.json").read_text())["config"]), p
        return ModelConfig.from_file(p), p
    return ModelConfig.preset(str(model)), None


def plan_cli(model: str = "v4-flash", devices: str = "npu:0=64GiB,npu:1=64GiB,cpu=256GiB,disk",
             recipe: str = "int4-experts", stats: str | None = None, context: int = 65536, sequences: int = 1,
             mode: str = "auto", kv_dtype: str = "fp32", redundant: int | None = None, chunk: int = 1024,
             json_out: str | None = None) -> str:
    """Place every routed expert of MODEL (preset, checkpoint or bundle) on DEVICES and print the table.

    devices: NAME=SIZE list (npu:0=64GiB,...,cpu=256GiB,disk); recipe: a named recipe or a JSON/TOML file;
    stats: routing_stats.json (or a bundle holding one; uniform routing when absent); context x sequences: the
    KV target; mode: ep | edge | auto (ep with two or more accelerators when it fits, else edge); kv_dtype:
    fp32 | bf16 | fp8;
    redundant: replica slots per rank per layer in ep mode (default 1, as memory allows); json_out: also write
    the plan as JSON.
    """
    from .calibrate import ROUTING_STATS, load_routing_stats

    cfg, where = model_config(model)
    if stats is None and where is not None and (where / ROUTING_STATS).exists():
        stats = str(where)
    st = load_routing_stats(stats) if stats else None
    p = plan(cfg, devices, recipe, st, context, sequences, mode, kv_dtype, redundant, chunk)
    if json_out:
        Path(json_out).write_text(json.dumps(p.to_dict(), indent=1))
    return p.table()
