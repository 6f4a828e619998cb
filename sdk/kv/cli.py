"""`flashport kv` (KV accounting per model and numerics) and the prefix-hit demo (samples/demo.py)."""

from __future__ import annotations

from pathlib import Path

from ..config import PRESETS, ModelConfig
from ..model import param_count
from ..options import KVOptions
from ..quant.kv_numerics import KV_DTYPES
from .layout import available_memory, format_bytes, kv_layout

# bytes per parameter as the release stores it (DESIGN.md section 2): routed experts FP4 e2m1 with one UE8M0
# scale per 32 values, embeddings and head BF16, the other linear weights FP8 e4m3 (one scale per 128x128
# block: negligible); norms, sinks and hc_* are a rounding error of the total
RELEASE_PARAM_BYTES = {"routed_experts": 0.5 + 1 / 32, "embed_head": 2.0, "other": 1.0}


def weight_bytes(cfg: ModelConfig, path: Path | None = None) -> tuple[int, str]:
    """(bytes, how they were counted) of a model's weights: the safetensors files of a checkpoint directory, or
    the release's storage of the config's parameters (see RELEASE_PARAM_BYTES)."""
    if path is not None and path.is_dir():
        files = list(path.glob("*.safetensors"))
        if files:
            return sum(f.stat().st_size for f in files), "files"
    groups = param_count(cfg)
    return int(sum(groups.get(g, 0) * b for g, b in RELEASE_PARAM_BYTES.items())), "release"


def kv_cli(preset_or_path: str = "v4-flash", context: int = 1048576, sequences: int = 1,
           memory_gb: float | None = None, dtype: str = "release") -> str:
    """KV memory accounting: bytes per token in the KV numerics DTYPE and whether CONTEXT tokens x SEQUENCES fit.

    preset_or_path: a preset name, a checkpoint directory, or "all" (every preset side by side).
    memory_gb: the memory to plan for (default: this machine's available memory).
    dtype: the numerics of the compressed entries and indexer keys: release (FP8 e4m3 + BF16 RoPE dims), bf16
    or fp32 (--kv-dtype).
    """
    if dtype not in KV_DTYPES:
        raise ValueError(f"kv dtype must be one of {', '.join(KV_DTYPES)}, not {dtype!r}")
    names = sorted(PRESETS) if preset_or_path == "all" else [preset_or_path]
    avail = int(memory_gb * (1 << 30)) if memory_gb else available_memory()
    rows = [f"KV accounting: context {context} tokens x {sequences} sequence(s); KV numerics {dtype}; "
            f"memory {format_bytes(avail)}",
            f"{'model':<14} {'layers':>6} {'block':>5} {'comp B/tok':>10} {'fp32 B/tok':>10} {'SWA B/tok':>9} "
            f"{'fixed/seq':>10} {'KV stored':>10} {'KV live':>10} {'weights':>10} {'fits':>5}"]
    how = set()
    for name in names:
        path = Path(name) if Path(name).exists() else None
        cfg = ModelConfig.from_file(name) if path is not None else ModelConfig.preset(name)
        lay, lay32 = kv_layout(cfg, dtype), kv_layout(cfg, "fp32")
        total, live = lay.kv_bytes(context, sequences), lay32.kv_bytes(context, sequences)
        weights, counted = weight_bytes(cfg, path)
        how.add(counted)
        fits = "yes" if live + weights <= avail else "NO"
        rows.append(f"{cfg.name:<14} {cfg.num_hidden_layers:>6} {cfg.kv_block_tokens:>5} "
                    f"{lay.compressed_per_token:>10.0f} {lay32.compressed_per_token:>10.0f} {lay.swa_per_token:>9} "
                    f"{format_bytes(lay.fixed_per_seq):>10} {format_bytes(total):>10} {format_bytes(live):>10} "
                    f"{format_bytes(weights):>10} "
                    f"{fits:>5}")
    rows.append(f"comp B/tok: compressed entries + indexer keys per token in {dtype} numerics (on disk and in the "
                "cache's memory tiers; release = FP8 e4m3 + one UE8M0 scale per 64 values + BF16 RoPE dims); "
                "fp32 B/tok: the same in fp32; SWA B/tok: one raw window entry per layer (fp32); KV stored = comp x "
                "context + fixed, per sequence; KV live: a running sequence keeps its entries as float32 tensors "
                "(holding the rounded values), so fits = KV live + weights <= memory; weights: "
                + " / ".join({"files": "the checkpoint's safetensors files",
                              "release": "the release's stored bytes (FP4 experts, FP8 linears, BF16 embeddings)"}[h]
                             for h in sorted(how)) + ".")
    return "\n".join(rows)


def demo_prefix_hit(engine, kv_dir: str | Path | None = None, strategy: str = "periodic:4096",
                    doc_blocks: int = 24) -> str:
    """Two requests that share a long document prefix; the second one's prefix is served from the disk tier
    (the memory tier is emptied in between). Returns printable lines with the tokens loaded and recomputed."""
    import tempfile

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
                     f"({format_bytes(s['bytes_read'])} from {s['read_from'] or '-'}), recomputed {s['recomputed_tokens']}, "
                     f"new {s['new_tokens']}; prefill {s['seconds'] * 1e3:.0f} ms")
    st = kv.stats()
    if st["ttft"]["hit_speedup"]:
        lines.append(f"time to first token on the hit: {st['ttft']['hit_speedup']:.1f}x faster than recomputing")
    return "\n".join(lines)