"""KV byte accounting: what one sequence's KV costs for a config and a KV numerics, and whether it fits.

Per sequence (DESIGN.md section 3): compressed entries (CSA and HCA layers) and the CSA indexer's keys, per source
token, in the KV's numerics (flashport.quant.kv_numerics: release = FP8 e4m3 + BF16 RoPE dims, bf16, fp32); plus
a fixed part, kept in float32 (the windows of raw entries the model attends to as it computed them, the
compressors' partial windows and the CSA overlap halves).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..config import ModelConfig
from ..quant.kv_numerics import check_kv_dtype, kv_entry_bytes

FIXED_VALUE_BYTES = 4  # the fixed part (windows, partial windows, overlaps) is float32


@dataclass
class KVLayout:
    """Bytes of one sequence's KV for a config and a KV numerics."""

    compressed_per_token: float  # CSA + HCA entries and CSA indexer keys, per source token
    swa_per_token: int           # one raw sliding-window entry per layer (what storing every SWA entry writes)
    fixed_per_seq: int           # windows + largest compressor partial windows + CSA overlaps
    record_bytes: int            # one fixed-state record at a block boundary (windows + overlaps)
    block_bytes: int             # one block of compressed entries
    entries_per_token: float     # compressed attention entries (without indexer keys) per token
    dtype: str = "fp32"          # numerics of the compressed entries ("release", "bf16", "fp32"; "" when by value)

    def kv_bytes(self, n_tokens: int, sequences: int = 1) -> int:
        return int(sequences * (self.compressed_per_token * n_tokens + self.fixed_per_seq))


def kv_layout(cfg: ModelConfig, dtype: str | float = "fp32") -> KVLayout:
    """The KV layout of `cfg` with compressed entries in `dtype`: a KV numerics name ("release", "bf16", "fp32"),
    or bytes per stored value (a float, for planners that estimate; the fixed part then uses it too)."""
    W, Dh, Di, B, r = cfg.sliding_window, cfg.head_dim, cfg.index_head_dim, cfg.kv_block_tokens, cfg.qk_rope_head_dim
    if isinstance(dtype, str):
        check_kv_dtype(dtype)
        entry, key, fixed_b = kv_entry_bytes(Dh, r, dtype), kv_entry_bytes(Di, r, dtype), FIXED_VALUE_BYTES
    else:
        entry, key, fixed_b = Dh * dtype, Di * dtype, dtype
    comp = entries = 0.0
    fixed = record = 0
    for i in range(cfg.num_hidden_layers):
        fixed += W * Dh
        record += W * Dh
        kind = cfg.layer_kind(i)
        if kind == "csa":
            m = cfg.csa_rate
            entries += 1 / m
            comp += (entry + key) / m
            overlap = 2 * m * (Dh + Di)  # kv + gate halves, attention and indexer compressors
            fixed += 2 * (m - 1) * 2 * (Dh + Di) + overlap
            record += overlap
        elif kind == "hca":
            m = cfg.hca_rate
            entries += 1 / m
            comp += entry / m
            fixed += 2 * (m - 1) * Dh
    return KVLayout(comp, int(cfg.num_hidden_layers * Dh * fixed_b), int(fixed * fixed_b), int(record * fixed_b),
                    int(comp * B), entries, dtype if isinstance(dtype, str) else "")


def release_entry_bytes(cfg: ModelConfig, dim: int | None = None) -> int:
    """Bytes of one KV entry in the release's numerics: FP8 for the non-RoPE dims with one UE8M0 scale byte per 64,
    BF16 for the RoPE dims (583 B for V4-Flash's 512-dim entries: DESIGN.md section 3's "about 584")."""
    return kv_entry_bytes(dim or cfg.head_dim, cfg.qk_rope_head_dim, "release")


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


def format_bytes(n: float) -> str:
    """1536 -> "1.50 KiB" (binary units, two decimals, as `flashport plan` prints them)."""
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def check_fits(cfg: ModelConfig, n_tokens: int, sequences: int = 1, available: int | None = None,
               dtype: str = "fp32") -> None:
    """Raise MemoryError up front when the KV of `sequences` contexts of n_tokens cannot fit in host memory.
    The live sequence keeps its entries in float32 tensors whatever the KV numerics, so `dtype` defaults to it."""
    need = kv_layout(cfg, dtype).kv_bytes(n_tokens, sequences)
    avail = available_memory() if available is None else available
    if avail and need > avail:
        raise MemoryError(f"a context of {n_tokens} tokens x {sequences} sequence(s) needs {format_bytes(need)} "
                          f"of KV ({dtype}), only {format_bytes(avail)} of memory is available")
