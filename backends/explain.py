"""`flashport backends [--explain PATH]`: what each backend can run, and a preflight for one model."""

from __future__ import annotations

from collections import Counter

from .contract import OPS
from .registry import create, discover


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n else "?"


def list_backends() -> str:
    lines = [f"{'backend':<14} {'source':<22} {'status':<10} details"]
    for info in sorted(discover().values(), key=lambda i: -i.priority):
        if not info.available:
            lines.append(f"{info.name:<14} {info.source:<22} {'missing':<10} {info.reason}")
            continue
        try:
            b = create(info.name)
        except Exception as e:  # noqa: BLE001 - report, keep listing
            lines.append(f"{info.name:<14} {info.source:<22} {'broken':<10} {e}")
            continue
        caps = b.capabilities()
        devs = ", ".join(f"{d.name} ({_gib(d.total_memory)})" for d in b.devices())
        native = sorted(op for op in OPS if caps.supports(op) and b.implements(op))
        note = f" [{info.reason}]" if info.reason else ""
        lines.append(f"{info.name:<14} {info.source:<22} {'ok':<10} devices: {devs}{note}")
        lines.append(f"{'':<48} native ops: {', '.join(native) or '-'}")
        fmts = sorted({f for op, v in caps.ops.items() if OPS.get(op) and not isinstance(v, bool) for f in v})
        if fmts:
            lines.append(f"{'':<48} weight formats: {', '.join(fmts)}")
    return "\n".join(lines)


def model_ops(path: str) -> Counter:
    """(op, weight format) -> how many weights (or call sites) use it, from the checkpoint's metadata alone."""
    from ..checkpoint import CheckpointReader
    from ..model import Transformer

    import torch

    reader = CheckpointReader(path)
    with torch.device("meta"):
        model = Transformer(reader.cfg)
    uses: Counter = Counter()
    fmt = reader.weight_formats() if hasattr(reader, "weight_formats") else {}
    for name, mod in model.named_modules():
        op = getattr(mod, "op", None)
        if op:  # expert projections run inside the moe op (routed and shared experts)
            key = "moe" if ".experts." in name or ".shared_experts." in name else op
            uses[(key, fmt.get(name + ".weight", "fp32"))] += 1
    for op, weighted in OPS.items():
        if not weighted:
            uses[(op, None)] += 1
    return uses


def explain_model(path: str, backend: str = "auto") -> str:
    b = create(backend)
    caps = b.capabilities()
    lines = [f"preflight of {path} on backend {b.name!r} (devices: {', '.join(d.name for d in b.devices())})",
             f"{'op':<16} {'weights':<24} {'sites':>5}  runs on"]
    n_fallback = 0
    for (op, fmt), n in sorted(model_ops(path).items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        native = caps.supports(op, fmt if OPS[op] else None) and b.implements(op)
        n_fallback += not native
        lines.append(f"{op:<16} {fmt or '-':<24} {n:>5}  {b.name if native else 'torch reference (fallback)'}")
    lines.append(f"{n_fallback} op/format pairs fall back to the torch reference" if n_fallback
                 else "every op runs natively")
    return "\n".join(lines)
