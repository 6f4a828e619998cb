"""`flashport backends [--explain PATH]`: what each backend can run, and a preflight for one model.

Per-op backends run the ops (and weight formats) they claim and fall back, per op, to the torch reference for
the rest. Whole-step backends (contract 1.1, e.g. onnxruntime) run every decoder step as one graph: nothing falls
back per op, and an (op, format) pair their graph lacks is refused when the model is bound. Both listings say
which is which, and show ops degraded at run time (`dispatch.Ops`, marked in the cache) and whether `auto` may
pick a plugin (a passing conformance record).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .contract import OPS, WEIGHT_FORMATS, Capabilities
from .registry import BUILTINS, caps_from_json, conformance_record, create, degraded_marks, device_infos, discover


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n else "?"


def _formats(caps: Capabilities, op: str) -> list[str]:
    v = caps.ops.get(op, False)
    if v is True:
        return list(WEIGHT_FORMATS)
    return [f for f in WEIGHT_FORMATS if v and f in v]


def _describe(name: str, caps: Capabilities, native: list[str], describe: str) -> list[str]:
    """The capability lines of one available backend (after its name line)."""
    pad = " " * 48
    if caps.whole_step:
        lines = [f"{pad}runs whole decoder steps: {describe or 'one graph per step'}; no per-op fallback",
                 f"{pad}in the step graph: " + (", ".join(native) if len(native) < len(OPS) else "every op")]
        for op, weighted in OPS.items():
            if weighted and native.count(op):
                fmts = _formats(caps, op)
                lack = [f for f in WEIGHT_FORMATS if f not in fmts]
                lines.append(f"{pad}{op} weights: {', '.join(fmts) or '-'}"
                             + (f" (refused at load: {', '.join(lack)})" if lack else ""))
        return lines
    lines = [f"{pad}native ops: {', '.join(native) or '-'}"]
    fmts = sorted({f for op in native if OPS[op] for f in _formats(caps, op)})
    if fmts:
        lines.append(f"{pad}weight formats: {', '.join(fmts)}")
    rest = [op for op in OPS if op not in native]
    lines.append(f"{pad}falls back to the torch reference: {', '.join(rest) if rest else 'nothing'}")
    return lines


def list_backends() -> str:
    """Every backend: availability, devices, what runs natively and what falls back, run-time degradations, and
    for plugins whether `auto` may pick them. Plugins are probed in subprocesses (registry.discover)."""
    lines = [f"{'backend':<14} {'source':<22} {'status':<10} details"]
    for info in sorted(discover().values(), key=lambda i: -i.priority):
        if not info.available:
            lines.append(f"{info.name:<14} {info.source:<22} {'missing' if info.source == 'builtin' else 'broken':<10} "
                         f"{info.reason}")
            continue
        if info.name in BUILTINS:
            try:
                b = create(info.name)
            except Exception as e:  # noqa: BLE001 - report, keep listing
                lines.append(f"{info.name:<14} {info.source:<22} {'broken':<10} {e}")
                continue
            caps, devs, describe = b.capabilities(), b.devices(), b.describe()
            native = [op for op in OPS if caps.supports(op) and (caps.whole_step or b.implements(op))]
        else:  # from the plugin's subprocess probe: its code never runs in this process
            p = info.probe or {}
            caps, devs, describe = caps_from_json(p["capabilities"]), device_infos(p), p.get("describe", "")
            native = [op for op in OPS if caps.supports(op) and (caps.whole_step or op in p.get("implements", []))]
        marks = degraded_marks(info.name)
        status = "degraded" if marks else "ok"
        note = f" [{info.reason}]" if info.reason else ""
        dev = ", ".join(f"{d.name} ({_gib(d.total_memory)})" for d in devs)
        lines.append(f"{info.name:<14} {info.source:<22} {status:<10} devices: {dev}{note}")
        lines += _describe(info.name, caps, native, describe)
        for op, m in sorted(marks.items()):
            lines.append(f"{'':<48}degraded: {op} raised at run time ({m.get('time')}, pid {m.get('pid')}): "
                         f"{m.get('error')}; it ran on the torch reference (cleared by a passing "
                         f"`flashport conformance {info.name}`)")
        if info.name not in BUILTINS:
            ok, why = conformance_record(info.name)
            lines.append(f"{'':<48}auto: {'may pick it' if ok else 'never picks it'} ({why})")
    return "\n".join(lines)


# -- a model's ops and weight formats, from metadata alone ----------------------------------------------------------
_RELEASE_DTYPES = {"BF16": "bf16", "F32": "fp32", "F16": "fp16", "F64": "fp64"}


def _checkpoint_formats(reader) -> dict[str, str]:
    """Tensor name (release names) -> the weight format it is stored in, read from the safetensors headers:
    FP8 E4M3 with a block scale -> fp8-e4m3-block128[-ue8m0], packed FP4 with a scale -> mxfp4, else the dtype."""
    from safetensors import safe_open

    from ..checkpoint import release_to_hf

    qc = reader.cfg.quantization_config or {}
    fp8 = "fp8-e4m3-block128" + ("-ue8m0" if qc.get("scale_fmt") == "ue8m0" else "")
    stored = {}
    by_file: dict[Path, list[str]] = {}
    for name in reader.names():
        key = release_to_hf(name) if reader.format == "hf" else name
        if key in reader.files:
            by_file.setdefault(reader.files[key], []).append(name)
    for f, names in by_file.items():
        with safe_open(f, "pt") as h:
            for name in names:
                key = release_to_hf(name) if reader.format == "hf" else name
                dtype = h.get_slice(key).get_dtype()
                scaled = name.removesuffix(".weight") + ".scale" in reader.files
                if scaled and dtype.startswith("F8"):
                    stored[name] = fp8
                elif scaled and dtype in ("U8", "I8"):
                    stored[name] = "mxfp4"
                else:
                    stored[name] = _RELEASE_DTYPES.get(dtype, dtype.lower())
    return stored


def model_source(path: str | Path):
    """(config, {tensor name: stored format}, {tensor name: format the runtime runs it in}, kind) of a bundle or
    a checkpoint directory, from its metadata (no weights are read). A checkpoint's weights load dequantized to
    fp32 (export a bundle to run packed formats); a bundle's run as stored."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such model directory")
    if (path / "manifest.json").exists():
        from ..config import ModelConfig
        from ..bundle import read_manifest

        m = read_manifest(path)
        stored = {n: e["format"] for n, e in m["tensors"].items()}
        return ModelConfig.from_dict(m["config"]), stored, dict(stored), "bundle"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{path}: neither a bundle (manifest.json) nor a checkpoint (config.json)")
    from ..checkpoint import CheckpointReader

    reader = CheckpointReader(path)
    stored = _checkpoint_formats(reader)
    return reader.cfg, stored, {n: "fp32" for n in stored}, f"{reader.format} checkpoint"


def model_ops(path: str | Path) -> Counter:
    """(op, format it runs in, stored format) -> how many weights (or call sites) use it, from metadata alone."""
    cfg, stored, runs, _ = model_source(path)
    return _count_ops(cfg, stored, runs)


def _count_ops(cfg, stored: dict[str, str], runs: dict[str, str]) -> Counter:
    import torch

    from ..model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    uses: Counter = Counter()
    for name, mod in model.named_modules():
        op = getattr(mod, "op", None)
        if op:  # expert projections run inside the moe op (routed and shared experts)
            key = "moe" if ".experts." in name or ".shared_experts." in name else op
            w = name + ".weight"
            uses[(key, runs.get(w, "fp32"), stored.get(w, "fp32"))] += 1
    for op, weighted in OPS.items():
        if not weighted:
            uses[(op, None, None)] += 1
    return uses


def explain_model(path: str, backend: str = "auto") -> str:
    """Preflight of the model at `path` on `backend`: per (op, weight format), where it runs."""
    cfg, stored, runs, kind = model_source(path)  # a bad path fails before a backend starts
    uses = _count_ops(cfg, stored, runs)
    b = create(backend)
    caps = b.capabilities()
    marks = degraded_marks(b.name)
    lines = [f"preflight of {path} ({kind}) on backend {b.name!r} (devices: {', '.join(d.name for d in b.devices())})"]
    if caps.whole_step:
        lines.append(f"{b.name} runs whole decoder steps ({b.describe() or 'one graph per step'}): every op below "
                     f"runs inside that graph or the load is refused; nothing falls back per op")
    if kind.endswith("checkpoint"):
        lines.append("a checkpoint's weights load dequantized to fp32 (stored formats below); `flashport export` "
                     "a bundle to run packed formats")
    lines.append(f"{'op':<16} {'weights':<24} {'stored as':<24} {'sites':>5}  runs on")
    n_fallback = n_refused = 0
    for (op, fmt, st), n in sorted(uses.items(), key=lambda kv: (kv[0][0], str(kv[0][1]), str(kv[0][2]))):
        ok = caps.supports(op, fmt if OPS[op] else None) and (caps.whole_step or b.implements(op))
        if caps.whole_step:
            where = f"{b.name} (in the step graph)" if ok else "REFUSED: the step graph has no form for it"
            n_refused += not ok
        elif ok and op in marks:
            where = "torch reference (degraded: raised at run time)"
            n_fallback += 1
        else:
            where = b.name if ok else "torch reference (fallback)"
            n_fallback += not ok
        lines.append(f"{op:<16} {fmt or '-':<24} {st or '-':<24} {n:>5}  {where}")
    if caps.whole_step:
        lines.append(f"{n_refused} op/format pairs have no form in {b.name}'s step graph: loading this model on it "
                     f"is refused" if n_refused else f"every op runs inside {b.name}'s step graph")
    else:
        lines.append(f"{n_fallback} op/format pairs fall back to the torch reference" if n_fallback
                     else "every op runs natively")
    return "\n".join(lines)
