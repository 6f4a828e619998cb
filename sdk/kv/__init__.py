"""The long-context KV runtime: tiered block cache, the three sliding-window strategies, prefix reuse across
requests and restarts, bit-identical restore, KV numerics, metrics and memory accounting. See docs/kv-runtime.md
and docs/kv-store.md.

One module per job:

    layout      KV byte accounting (`kv_layout`, `check_fits`, `format_bytes`)
    strategies  what is stored of the sliding windows (`Strategy`: full, periodic:P, none)
    tiers       byte-budgeted LRU memory tiers (`MemoryTier`)
    store       the durable, crash-safe, size-capped disk store (`DiskKVStore`, `chain_hashes`)
    manager     keys, restore plans, storing blocks and records, metrics (`KVManager`, `model_identity`)
    prefill     the prefill-through-the-cache loop (`prefill_cached`, `chunk_spans`)
    cli         `flashport kv` (`kv_cli`) and the prefix-hit demo (`demo_prefix_hit`)

The numerics of stored entries (release FP8 + BF16, bf16, fp32) live below the model, in
flashport.quant.kv_numerics, because the model rounds entries as it makes them. This package imports the model
and below, never flashport.engine or anything above it.
"""

from ..quant.kv_numerics import KV_DTYPES
from .cli import demo_prefix_hit, kv_cli, weight_bytes
from .layout import KVLayout, available_memory, check_fits, format_bytes, kv_layout, release_entry_bytes
from .manager import KV_FORMAT, KVManager, KVRestoreError, PrefillStats, RestorePlan, SeqTracker, model_identity
from .prefill import chunk_spans, prefill_cached, replaying
from .store import DiskKVStore, KVStoreBusy, chain_hashes, check_not_in_use
from .strategies import Strategy
from .tiers import MemoryTier

__all__ = ["KV_DTYPES", "KV_FORMAT", "DiskKVStore", "KVLayout", "KVManager", "KVRestoreError", "KVStoreBusy", "check_not_in_use",
           "MemoryTier", "PrefillStats", "RestorePlan", "SeqTracker", "Strategy", "available_memory", "chain_hashes",
           "check_fits", "chunk_spans", "demo_prefix_hit", "format_bytes", "kv_cli", "kv_layout", "model_identity",
           "prefill_cached", "release_entry_bytes", "replaying", "weight_bytes"]
