"""`flashport bench export`: export throughput and peak memory, the quality table of every shipped recipe, and
`flashport plan` for v4-flash on three hardware specs. Prints the tables that docs/export.md carries.

    flashport bench export [--preset flash-mini] [--model samples/models/flash-small] [--parts throughput,quality,plan]

- throughput: a fresh `preset` release checkpoint is exported (recipe int4-experts) in a child process, so its
  peak RSS (ru_maxrss) is the export's alone; printed next to a child that only imports flashport and opens the
  checkpoint (the floor), the checkpoint's fp32 size (what a non-streaming export would hold) and its largest
  layer in fp32 (what a streaming one should stay near).
- quality: every shipped recipe exported from `model` (samples/models/flash-small when it exists, else a random
  flash-tiny) and evaluated on its held-out text against the checkpoint itself (release precision): perplexity,
  mean KL, top-1 agreement. GPTQ recipes are calibrated on text that is not the held-out text (docs/*.md).
- plan: v4-flash, recipe int4-experts, on one 128 GB edge box with an SSD, 8 accelerators of 64 GB, and 4 of 32 GB.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMALL = ROOT / "samples" / "models" / "flash-small"

_CHILD = """
import json, sys, threading, time
import torch
from flashport.checkpoint import CheckpointReader

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))

peak_anon = [status("RssAnon")]
def sample():  # anonymous memory (heap, tensors); the mmapped checkpoint pages are file-backed and reclaimable
    while True:
        peak_anon[0] = max(peak_anon[0], status("RssAnon"))
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
mode, src, out, threads = sys.argv[1:5]
if int(threads):
    torch.set_num_threads(int(threads))
t = time.perf_counter()
if mode == "export":
    from flashport.export.bundle import export
    m = export(src, out, "int4-experts", progress=False, resume=False)
    read = m["export"]["source_bytes_read"]
else:
    CheckpointReader(src)
    read = 0
secs = time.perf_counter() - t
peak_anon[0] = max(peak_anon[0], status("RssAnon"))
# VmHWM: this process's peak RSS incl. file pages (ru_maxrss would carry the parent's peak across fork + exec)
print(json.dumps({"seconds": secs, "read": read, "peak_rss": status("VmHWM"), "peak_anon": peak_anon[0]}))
"""


def _child(mode: str, src: Path, out: Path, threads: int) -> dict:
    r = subprocess.run([sys.executable, "-c", _CHILD, mode, str(src), str(out), str(threads)], capture_output=True,
                       text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def throughput(preset: str = "flash-mini", work: Path | None = None, threads: int = 1) -> str:
    from flashport.checkpoint import make_checkpoint
    from flashport.config import ModelConfig
    from flashport.export.planner import model_shapes

    work = Path(work or tempfile.mkdtemp(prefix="fp-bench-export-"))
    src = work / f"{preset}-release"
    if not (src / "config.json").exists():
        make_checkpoint(src, preset, seed=0)
    cfg = ModelConfig.preset(preset)
    shapes = model_shapes(cfg)
    fp32 = sum(4 * _numel(s) for s in shapes.values())
    layer = max(sum(4 * _numel(s) for n, s in shapes.items() if n.startswith(f"layers.{i}."))
                for i in range(cfg.num_hidden_layers))
    base = _child("open", src, work / "unused", threads)
    runs = [_child("export", src, work / f"bundle-{k}", threads) for k in range(2)]
    best = min(runs, key=lambda r: r["seconds"])
    mb = best["read"] / 1e6
    rows = [f"export throughput, {preset} -> int4-experts (best of {len(runs)} fresh processes, torch threads "
            f"{threads or 'default'})",
            f"{'source read':>12} {'seconds':>8} {'MB/s':>7} {'peak RSS':>10} {'peak anon':>10} {'floor anon':>11} "
            f"{'export extra':>13} {'model fp32':>11} {'largest layer fp32':>19}",
            f"{mb:>9.1f} MB {best['seconds']:>8.2f} {mb / best['seconds']:>7.1f} {_mib(best['peak_rss']):>10} "
            f"{_mib(best['peak_anon']):>10} {_mib(base['peak_anon']):>11} "
            f"{_mib(best['peak_anon'] - base['peak_anon']):>13} {_mib(fp32):>11} {_mib(layer):>19}",
            "peak RSS includes the memory-mapped checkpoint pages (file-backed, reclaimable); anon = heap and tensors; "
            "floor: a process that imports flashport and opens the checkpoint; export extra = peak anon - floor anon"]
    return "\n".join(rows)


def quality(model: str | Path | None = None, max_tokens: int = 1024, work: Path | None = None) -> str:
    from flashport.checkpoint import make_checkpoint
    from flashport.export.bundle import export
    from flashport.export.evaluate import quality_table
    from flashport.export.recipes import get_recipe, recipe_names

    work = Path(work or tempfile.mkdtemp(prefix="fp-bench-quality-"))
    model = Path(model) if model else (SMALL if (SMALL / "config.json").exists() else None)
    if model is None:
        model = make_checkpoint(work / "flash-tiny", "flash-tiny", seed=0)
        heldout, what = (ROOT / "docs" / "kv-store.md").read_text(), "random flash-tiny (flash-small not trained yet)"
    else:
        held = model / "heldout.txt"
        heldout, what = (held.read_text() if held.exists() else (ROOT / "README.md").read_text()), str(model)
    calib = "\n".join(p.read_text() for p in sorted((ROOT / "docs").glob("*.md")) if p.name != "export.md")
    bundles = {}
    for name in recipe_names():
        out = work / f"q-{name}"
        t = time.perf_counter()
        gptq = get_recipe(name).calibration == "gptq"
        export(model, out, name, calib=calib if gptq else None, calib_tokens=1024, progress=False)
        print(f"  exported {name} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        bundles[name] = out
    table, res = quality_table(model, bundles, heldout, max_tokens)
    sizes = {name: sum(f["size"] for f in json.loads((b / "manifest.json").read_text())["files"].values())
             for name, b in bundles.items()}
    lines = table.splitlines()
    lines[0] += f" {'bundle MiB':>11}"
    for i, name in enumerate(res):
        if name in sizes:
            lines[i + 1] += f" {sizes[name] / 2**20:>11.2f}"
    return f"quality vs the release-precision model: {what}, {res['reference'].tokens} held-out tokens\n" + \
        "\n".join(lines)


PLAN_SPECS = {
    "edge box 128 GB + SSD": ("cpu=128GB,disk", "edge"),
    "8 x 64 GB accelerators": (",".join(f"npu:{i}=64GB" for i in range(8)) + ",cpu=512GB", "ep"),
    "4 x 32 GB accelerators": (",".join(f"npu:{i}=32GB" for i in range(4)) + ",cpu=256GB,disk", "auto"),
}


def plans(context: int = 131072, sequences: int = 4, recipe: str = "int4-experts") -> str:
    from flashport.config import ModelConfig
    from flashport.export.planner import PlanError, plan

    cfg = ModelConfig.preset("v4-flash")
    out = []
    for title, (devices, mode) in PLAN_SPECS.items():
        out.append(f"### {title}: --devices {devices} --mode {mode}")
        try:
            out.append(plan(cfg, devices, recipe, None, context, sequences, mode).table())
        except PlanError as e:
            out.append(f"refused: {e}")
            if mode != "edge":  # what the same hardware does as one edge node (accelerator + host + disk)
                out.append("--mode edge on the same devices:\n"
                           + plan(cfg, devices, recipe, None, context, sequences, "edge").table())
        out.append("")
    return "\n".join(out)


def run(preset: str = "flash-mini", model: str | None = None, parts: str = "throughput,quality,plan",
        max_tokens: int = 1024, context: int = 131072, sequences: int = 4, threads: int = 1) -> str:
    """Print the export benchmarks (see the module docstring). threads: torch intra-op threads (0: torch's
    default; 1 suits the shared 2-core machines, where more threads only contend)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    parts_l = [p.strip() for p in str(parts).split(",") if p.strip()]
    out = []
    if "throughput" in parts_l:
        out.append(throughput(preset, threads=threads))
    if "quality" in parts_l:
        out.append(quality(model, max_tokens))
    if "plan" in parts_l:
        out.append(plans(context, sequences))
    text = "\n\n".join(out)
    print(text)
    return ""


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"
