"""What an engine is built with: plain, validated option records for `flashport.load_engine` / `Engine.load`.

    engine = flashport.load_engine("bundle/", backend="onnxruntime",
                                   backend_options={"execution_provider": "CPUExecutionProvider"},
                                   kv=KVOptions("kv/"), offload=OffloadOptions("8GiB", tier="disk"))

This module imports nothing of flashport, so the CLI and the server can build and check options (one clear
`OptionError` naming the field) before anything heavy is imported or loaded. Which combinations of options are
refused, and why, is decided in one place: `flashport.engine.check_combination`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path

SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
              "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class OptionError(ValueError):
    """An option value that cannot work (wrong type, out of range, two options that conflict)."""


def parse_size(value: int | float | str, what: str = "size") -> int:
    """Bytes from 123, "512MiB", "8GiB", "1.5GB" (SI and binary units, case-insensitive). Raises OptionError."""
    if isinstance(value, bool):
        raise OptionError(f"{what}: expected a size such as 8GiB, got {value!r}")
    if isinstance(value, (int, float)):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in SIZE_UNITS:
            raise OptionError(f"{what}: expected a size such as 8GiB or 512MB, got {value!r}")
        n = float(m.group(1)) * SIZE_UNITS[unit]
    if n <= 0:
        raise OptionError(f"{what}: must be positive, got {value!r}")
    return int(n)


KV_STRATEGY = re.compile(r"full|none|periodic:[1-9][0-9]*")


@dataclass(frozen=True)
class KVOptions:
    """The durable prefix cache (flashport.kv). dir: where blocks live (None: host-memory tier only);
    strategy: what is stored of the sliding windows, `full`, `periodic:P` (every P tokens) or `none`
    (DeepSeek-V4 report 3.5); capacity: disk bytes; memory: host-memory tier bytes; dtype: the numerics of the
    compressed entries and indexer keys, as the model makes them and as they are stored (`release`: FP8 e4m3 in
    blocks of 64 with a UE8M0 scale + BF16 RoPE dims, as the release keeps them; `bf16`; `fp32`; see
    flashport.quant.kv_numerics and docs/kv-runtime.md for its accuracy); it is part of the cache namespace."""

    dir: str | Path | None = None
    strategy: str = "periodic:4096"
    capacity: int | str = 20 << 30
    memory: int | str = 256 << 20
    dtype: str = "release"
    fsync: bool = True

    def __post_init__(self):
        if not isinstance(self.strategy, str) or not KV_STRATEGY.fullmatch(self.strategy):
            raise OptionError(f"kv strategy must be full, none or periodic:P (P > 0 tokens), not {self.strategy!r}")
        object.__setattr__(self, "capacity", parse_size(self.capacity, "kv capacity"))
        object.__setattr__(self, "memory", parse_size(self.memory, "kv memory"))
        if self.dtype not in ("release", "bf16", "fp32"):
            raise OptionError(f"kv dtype must be release, bf16 or fp32, not {self.dtype!r}")


OFFLOAD_TIERS = ("host", "disk")


@dataclass(frozen=True)
class OffloadOptions:
    """Expert offload (flashport.offload). max_device_memory: bytes or "8GiB" for the whole device (None: the
    bundle's own edge-mode placement); tier: where the experts that are not resident live (host memory or the
    bundle's shards on disk); pin_fraction: share of the expert budget pinned hottest first, the rest an LRU
    cache; context x sequences: the KV the budget reserves; stats: routing statistics file (default: the
    bundle's routing_stats.json)."""

    max_device_memory: int | str | None = None
    tier: str = "host"
    pin_fraction: float = 0.5
    prefetch: bool = True
    context: int = 4096
    sequences: int = 1
    stats: str | Path | None = None

    def __post_init__(self):
        if self.max_device_memory is not None:
            object.__setattr__(self, "max_device_memory", parse_size(self.max_device_memory, "max device memory"))
        if self.tier not in OFFLOAD_TIERS:
            raise OptionError(f"offload tier must be host or disk, not {self.tier!r}")
        if not 0.0 <= float(self.pin_fraction) <= 1.0:
            raise OptionError(f"pin fraction must be in [0, 1], not {self.pin_fraction}")
        for name in ("context", "sequences"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise OptionError(f"offload {name} must be a whole number >= 1, not {v!r}")


@dataclass(frozen=True)
class ParallelOptions:
    """Expert parallelism over torch.distributed (flashport.distributed). ep: ranks (1: one process);
    pg_backend: the process group backend (gloo, nccl, hccl...); timeout: seconds a collective waits for a peer
    before the request fails."""

    ep: int = 1
    pg_backend: str = "gloo"
    timeout: float = 30.0

    def __post_init__(self):
        if isinstance(self.ep, bool) or not isinstance(self.ep, int) or self.ep < 1:
            raise OptionError(f"ep must be a whole number of ranks >= 1, not {self.ep!r}")
        if not isinstance(self.pg_backend, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", self.pg_backend):
            raise OptionError(f"pg backend must be a process-group backend name such as gloo or nccl, "
                              f"not {self.pg_backend!r}")
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float)) or not self.timeout > 0:
            raise OptionError(f"timeout must be > 0 seconds, not {self.timeout!r}")


INDEX_NUMERICS = ("fp32", "release")
INDEX_NUMERICS_ENV = "FLASHPORT_INDEX_NUMERICS"


def check_index_numerics(value: str | None) -> str | None:
    """The lightning indexer's numerics: "fp32" (transformers' indexer), "release" (the release code's Hadamard
    rotation and FP4 queries and keys, scored exactly in integers; docs/kv-runtime.md) or None (the environment
    variable FLASHPORT_INDEX_NUMERICS, else fp32). Raises OptionError naming the value."""
    if value is not None and value not in INDEX_NUMERICS:
        raise OptionError(f"index numerics must be fp32 or release, not {value!r}")
    return value


def index_numerics_default() -> str:
    """FLASHPORT_INDEX_NUMERICS (fp32 | release), else fp32. Raises OptionError naming the variable."""
    import os

    v = os.environ.get(INDEX_NUMERICS_ENV, "fp32")
    if v not in INDEX_NUMERICS:
        raise OptionError(f"{INDEX_NUMERICS_ENV} must be fp32 or release, not {v!r}")
    return v


def parse_backend_options(pairs: list[str] | tuple[str, ...] | str | None) -> dict[str, str]:
    """{"KEY": "VALUE"} from `--backend-option KEY=VALUE` flags (one string, or several). Raises OptionError."""
    if pairs is None or pairs == "":
        return {}
    if isinstance(pairs, str):
        pairs = [pairs]
    out: dict[str, str] = {}
    for p in pairs:
        key, sep, val = str(p).partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.strip()):
            raise OptionError(f"backend option must be KEY=VALUE, not {p!r}")
        out[key.strip()] = val
    return out


@dataclass(frozen=True)
class EngineOptions:
    """Everything `load_engine` takes besides the path, as one record (what the CLI and the server build)."""

    backend: str = "auto"
    backend_options: dict = field(default_factory=dict)
    device: str | None = None
    deterministic: bool = False
    kv: KVOptions | None = None
    offload: OffloadOptions | None = None
    parallel: ParallelOptions | None = None
    public_key: str | Path | None = None  # a signer's public key file: bundles must carry a valid signature
    index_numerics: str | None = None  # the lightning indexer's numerics: fp32 | release (None: the environment's)

    def __post_init__(self):
        check_index_numerics(self.index_numerics)

    def kwargs(self) -> dict:
        """These options as keyword arguments of `flashport.load_engine`."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def engine_options(backend: str = "auto", execution_provider: str = "", plugin_ep_library: str = "",
                   backend_option: list[str] | tuple[str, ...] | str | None = None, device: str = "",
                   deterministic: bool = False, kv_dir: str = "", kv_strategy: str = "periodic:4096",
                   kv_dtype: str = "release", max_device_memory: str = "", offload_tier: str = "host",
                   ep: int = 1, pg_backend: str = "gloo", timeout: float = 30.0,
                   public_key: str = "", index_numerics: str = "") -> EngineOptions:
    """The EngineOptions that the engine flags of `flashport generate|chat|serve` and the benches describe
    (empty strings mean "not given"). Raises OptionError for a value that cannot work or a flag that needs
    another one (e.g. --execution-provider with a backend other than onnxruntime)."""
    options = parse_backend_options(backend_option)
    for flag, key, value in (("--execution-provider", "ep", execution_provider),
                             ("--plugin-ep-library", "plugin_ep_library", plugin_ep_library)):
        if value:
            if backend not in ("onnxruntime", "auto"):
                raise OptionError(f"{flag} with --backend {backend}: execution providers belong to the onnxruntime "
                                  "backend (use --backend onnxruntime)")
            options[key] = value
    if options.keys() & {"ep", "plugin_ep_library"} and backend == "auto":
        backend = "onnxruntime"
    if plugin_ep_library and not Path(plugin_ep_library).is_file():
        raise OptionError(f"--plugin-ep-library {plugin_ep_library}: no such file")
    if kv_strategy != "periodic:4096" and not kv_dir:
        raise OptionError("--kv-strategy without --kv-dir: the strategy says what the disk KV cache stores; give "
                          "--kv-dir DIR")
    if offload_tier != "host" and not max_device_memory:
        raise OptionError("--offload-tier without --max-device-memory: the tier holds the experts that do not "
                          "fit the device budget; give --max-device-memory SIZE")
    kv = KVOptions(kv_dir, kv_strategy, dtype=kv_dtype) if kv_dir else None
    offload = OffloadOptions(max_device_memory, offload_tier) if max_device_memory else None
    off = isinstance(ep, int) and not isinstance(ep, bool) and ep <= 1  # 0 or 1: one process
    parallel = None if off else ParallelOptions(ep, pg_backend, timeout)
    return EngineOptions(backend, options, device or None, bool(deterministic), kv, offload, parallel,
                         public_key or None, index_numerics or None)


def flags_of(fn, values: dict, skip: tuple[str, ...] = ()) -> list[str]:
    """`--name=value` flags for every parameter of `fn` (but the first positional ones without a default and
    `skip`) whose value in `values` differs from its default: a command line that repeats a call (what the
    expert-parallel ranks run). Lists and tuples repeat the flag."""
    import inspect

    out = []
    for name, p in inspect.signature(fn).parameters.items():
        if name in skip or name == "self" or p.default is inspect.Parameter.empty or name not in values:
            continue
        v = values[name]
        if v == p.default:
            continue
        flag = "--" + name.replace("_", "-")
        for item in (v if isinstance(v, (list, tuple)) else [v]):
            out.append(f"{flag}={item}" if not isinstance(item, bool) else (flag if item else f"--no{name}"))
    return out
