"""Deployment bundles: `flashport export` writes one, `flashport inspect` summarises one; the runtime reads one
through flashport.bundle (`Engine.load`).

    flashport export CHECKPOINT OUT --recipe int4-experts --devices npu:0=64GiB,npu:1=64GiB [--calib text.txt]
    flashport inspect OUT [--verify]
    flashport generate OUT --prompt "..."

Layout of OUT:
    manifest.json                 schema version, model config, source identity, recipe (as given and as applied
                                  per tensor), placement, tokenizer, size + sha256 of every file, own digest
    common/globals.safetensors    embed, head, final norm and stream collapse
    common/layer-NNN.safetensors  layer N without its routed experts (every rank maps these)
    <device>/layer-NNN.safetensors  the routed experts of layer N placed on <device> (npu0/, cpu/, disk/, ...):
                                  a rank maps only its own directory; a replicated expert is stored in each
    common/mtp-J.safetensors, <device>/mtp-J.safetensors: the MTP block, the same way
    tokenizer.json, routing_stats.json (and activation_stats.safetensors after calibration)

Every packed tensor is stored as `<release name>:<key>` (e.g. `layers.3.ffn.experts.7.w1.weight:B`, `...:scales`),
the keys of its format in flashport.quant.formats; fp32 / int64 tensors as `<name>:weight`.

Export streams: one unit (globals, a layer, an MTP block) at a time through CheckpointReader, one tensor
dequantized at a time; the unit's packed tensors are written and freed before the next unit, so peak memory is
about one layer of *packed* weights plus one fp32 tensor (plus the calibration activations with --calib). A
journal (`.export-journal.json`) records each finished unit's shards with size and sha256; re-running the same
export skips units whose shards still verify, and a different export (source, recipe, placement or calibration)
into the same directory starts over. The manifest is written last, so a directory without one is never mistaken
for a finished bundle.

Reading (flashport.bundle) never trusts the bytes blindly: the manifest's digest, file sizes, headers, bundle ids,
every tensor's dtype, shape and CRC32C, and with verify every file's sha256.

Exactness: the `release` recipe copies the release's stored bytes (FP8 blocks, MXFP4, bf16) when the source is a
release-format checkpoint, so a release bundle dequantizes to exactly the checkpoint's values and generates the
same tokens. Other recipes are lossy by their formats (see docs/quant-formats.md, docs/export.md for measured
quality).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from ..bundle import (FORMAT, MANIFEST, SCHEMA_VERSION, BundleError, canonical_json, check_files, expert_index,
                      manifest_digest, moe_prefix, read_manifest, sha256_file, stored_nbytes, tensor_crc32c)
from ..checkpoint import CheckpointReader, save_tensors
from ..quant.formats import FORMATS, dequantize
from . import gptq
from .calibrate import calibrate, swiglu_hidden
from .planner import Plan, model_shapes, plan as make_plan
from .recipes import Recipe, load_recipe, tensor_class

log = logging.getLogger("flashport.export")

JOURNAL = ".export-journal.json"
COMMON = "common"


# -------------------------------------------------------------------------------------------------------------
# small helpers
# -------------------------------------------------------------------------------------------------------------
def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def source_identity(reader: CheckpointReader, sample: int = 1 << 20) -> dict:
    """What names the source checkpoint: sha256 over its config.json, its index, and per shard the size, the
    header and the first and last `sample` bytes of data. Two checkpoints of the same shapes differ in the sampled
    bytes; hashing all of a 160 GB release would take minutes for little more."""
    p = reader.path
    files = sorted({f.name: f.stat().st_size for f in set(reader.files.values())}.items())
    h = hashlib.sha256()
    h.update((p / "config.json").read_bytes())
    index = p / "model.safetensors.index.json"
    if index.exists():
        h.update(index.read_bytes())
    for name, size in files:
        h.update(f"{name}:{size}".encode())
        with open(p / name, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            h.update(f.read(n))  # the header: every tensor's name, dtype, shape and offsets
            h.update(f.read(sample))
            f.seek(max(8 + n, size - sample))
            h.update(f.read(sample))
    return {"path": str(p.resolve()), "format": reader.format, "sha256": h.hexdigest(),
            "config_sha256": hashlib.sha256((p / "config.json").read_bytes()).hexdigest(),
            "files": dict(files), "bytes": sum(s for _, s in files)}


def _unit_of(name: str) -> str:
    """Export unit of a tensor: 'globals', 'layer-NNN' or 'mtp-J'."""
    parts = name.split(".")
    if parts[0] == "layers":
        return f"layer-{int(parts[1]):03d}"
    if parts[0] == "mtp":
        return f"mtp-{int(parts[1])}"
    return "globals"


# -------------------------------------------------------------------------------------------------------------
# Packing one tensor
# -------------------------------------------------------------------------------------------------------------
def _passthrough(reader: CheckpointReader, name: str, fmt: str) -> dict[str, torch.Tensor] | None:
    """The release's stored tensors for `name` when they already are `fmt` (bit-exact copy), else None."""
    got = reader.packed(name, (fmt,)) if fmt in FORMATS else None
    return None if got is None else got[1]


def pack_tensor(reader: CheckpointReader, name: str, fmt: str, hessian: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
    """One source tensor in `fmt`: a bit-exact copy of the release bytes when they already are `fmt`, GPTQ with a
    Hessian, else the format's round-to-nearest `pack`."""
    if (same := _passthrough(reader, name, fmt)) is not None:
        return same
    w = reader.get(name)
    if fmt == "int64":
        return {"weight": w.long().contiguous()}
    if fmt == "fp32":
        return {"weight": w.float().contiguous()}
    if hessian is not None:
        return gptq.gptq_pack(w, hessian, fmt, name=name)
    return FORMATS[fmt].pack(w, name=name)


# -------------------------------------------------------------------------------------------------------------
# Export
# -------------------------------------------------------------------------------------------------------------
class _Unit:
    """The tensors of one export unit, packed, grouped by shard (partition)."""

    def __init__(self, unit: str):
        self.unit = unit
        self.shards: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)  # rel path -> {"name:key": tensor}
        self.entries: dict[str, dict] = {}

    def add(self, name: str, fmt: str, shape, cls: str, layer, partitions: list[str], packed: dict) -> None:
        files = [f"{part}/{self.unit}.safetensors" for part in partitions]
        for f in files:
            self.shards[f].update({f"{name}:{k}": v for k, v in packed.items()})
        self.entries[name] = {"format": fmt, "shape": list(shape), "class": cls, "layer": layer, "files": files,
                              "crc32c": {k: tensor_crc32c(v) for k, v in packed.items()}}


def _unit_names(names: list[str]) -> dict[str, list[str]]:
    units: dict[str, list[str]] = defaultdict(list)
    for n in names:
        units[_unit_of(n)].append(n)
    return dict(units)


def export(src: str | Path, out: str | Path, recipe: str | Recipe = "int4-experts", devices: str = "cpu=32GiB",
           calib: str | Path | None = None, calib_tokens: int = 512, mode: str = "auto", context: int = 4096,
           sequences: int = 1, kv_dtype: str = "fp32", resume: bool = True, progress: bool = True) -> dict:
    """Write a bundle of checkpoint `src` to `out`; returns the manifest. See the module docstring."""
    t0 = time.perf_counter()
    reader = CheckpointReader(src)
    cfg = reader.cfg
    recipe = load_recipe(recipe)
    shapes = model_shapes(cfg)
    names = [n for n in shapes if n in set(reader.names())]
    missing = [n for n in shapes if n not in set(names) and not n.startswith("mtp.")]
    if missing:
        raise BundleError(f"{src}: {len(missing)} tensors of the config are missing from the checkpoint, first "
                          f"{missing[0]!r}")
    formats = recipe.assign(cfg, names)
    cal = None
    if calib is not None:
        cal = calibrate(reader, calib, max_tokens=calib_tokens, progress=progress)
    elif recipe.calibration == "gptq":
        log.warning("recipe %s asks for GPTQ but no --calib text was given: rounding to nearest", recipe.name)
    placement = make_plan(cfg, devices, recipe, cal.routing_stats() if cal else None, context, sequences, mode,
                          kv_dtype, names=names)
    source = source_identity(reader)
    calib_id = hashlib.sha256(canonical_json(cal.routing_stats())).hexdigest() if cal else None
    bundle_id = hashlib.sha256(canonical_json({"schema": SCHEMA_VERSION, "source": source["sha256"],
                                           "recipe": recipe.to_dict(), "placement": placement.placement,
                                           "calibration": calib_id})).hexdigest()[:32]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    journal = _open_journal(out, bundle_id, resume)
    if (out / MANIFEST).exists():
        (out / MANIFEST).unlink()  # rewritten at the end; until then the directory is not a finished bundle

    units = _unit_names(names)
    tensors: dict[str, dict] = {}
    files: dict[str, dict] = {}
    read_bytes, skipped = 0, 0
    for unit in tqdm(units, desc="export", unit="unit", disable=not progress):
        done = journal["units"].get(unit)
        if done is not None and _shards_verify(out, done["files"]):
            tensors.update(done["tensors"])
            files.update(done["files"])
            skipped += 1
            continue
        u = _Unit(unit)
        for name in units[unit]:
            read_bytes += _source_bytes(reader, name)
        _pack_unit(u, reader, cfg, recipe, formats, shapes, units[unit], placement, cal)
        unit_files = {}
        for rel, shard in u.shards.items():
            path = out / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            save_tensors(shard, tmp, metadata={"bundle_id": bundle_id, "shard": rel, "format": FORMAT})
            os.replace(tmp, path)
            unit_files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        del u.shards
        journal["units"][unit] = {"files": unit_files, "tensors": u.entries}
        _write_json_atomic(out / JOURNAL, journal)
        tensors.update(u.entries)
        files.update(unit_files)

    extra = {}
    tok_src = reader.path / "tokenizer.json"
    if tok_src.exists():  # no stand-in: a bundle without one takes token ids (flashport.loader.load_tokenizer)
        shutil.copyfile(tok_src, out / "tokenizer.json")
        extra["tokenizer.json"] = out / "tokenizer.json"
    if cal is not None:
        for p in cal.save(out):
            extra[p.name] = p
    for rel, p in extra.items():
        files[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p)}

    manifest = {
        "format": FORMAT, "schema_version": SCHEMA_VERSION, "bundle_id": bundle_id,
        "flashport_version": _version(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": cfg.to_dict(), "source": source,
        "recipe": recipe.to_dict(),
        "calibration": {"method": recipe.calibration if cal else "rtn", "tokens": cal.tokens if cal else 0,
                        "text": cal.source if cal else None},
        "placement": placement.to_dict(), "tokenizer": "tokenizer.json" if tok_src.exists() else None,
        "routing_stats": "routing_stats.json" if cal else None,
        "tensors": tensors, "files": dict(sorted(files.items())),
        "export": {"seconds": round(time.perf_counter() - t0, 3), "source_bytes_read": read_bytes,
                   "units": len(units), "units_skipped": skipped},
    }
    manifest["manifest_sha256"] = manifest_digest(manifest)
    _remove_stale_shards(out, files)
    _write_json_atomic(out / MANIFEST, manifest)
    (out / JOURNAL).unlink(missing_ok=True)
    return manifest


def _remove_stale_shards(out: Path, keep: dict) -> None:
    """Shards an earlier, different export left in `out` (another placement): removed so that no rank maps them."""
    for p in out.glob("*/*.safetensors"):
        rel = p.relative_to(out).as_posix()
        if rel in keep:
            continue
        try:
            with safe_open(p, "pt") as f:
                ours = (f.metadata() or {}).get("format") == FORMAT
        except Exception:  # not a readable safetensors file: not ours to delete
            ours = False
        if ours:
            p.unlink()


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("flashport")
    except Exception:  # not installed (running from a source tree)
        return "unknown"


def _source_bytes(reader: CheckpointReader, name: str) -> int:
    t, scale = reader.raw(name)
    return t.numel() * t.element_size() + (scale.numel() * scale.element_size() if scale is not None else 0)


def _open_journal(out: Path, bundle_id: str, resume: bool) -> dict:
    path = out / JOURNAL
    if resume and path.exists():
        try:
            j = json.loads(path.read_text())
            if j.get("bundle_id") == bundle_id:
                return j
            log.warning("%s: journal of another export (%s): starting over", out, j.get("bundle_id"))
        except json.JSONDecodeError:
            log.warning("%s: unreadable journal: starting over", out)
    elif resume and (out / MANIFEST).exists():  # a finished bundle: its files serve as the journal
        try:
            m = json.loads((out / MANIFEST).read_text())
            if m.get("bundle_id") == bundle_id:
                units: dict = {}
                for name, e in m["tensors"].items():
                    unit = units.setdefault(_unit_of(name), {"files": {}, "tensors": {}})
                    unit["tensors"][name] = e
                    unit["files"].update({f: m["files"][f] for f in e["files"]})
                return {"bundle_id": bundle_id, "units": units}
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    return {"bundle_id": bundle_id, "units": {}}


def _shards_verify(out: Path, files: dict[str, dict]) -> bool:
    for rel, info in files.items():
        p = out / rel
        if not p.exists() or p.stat().st_size != info["size"] or sha256_file(p) != info["sha256"]:
            return False
    return True


def _pack_unit(u: _Unit, reader, cfg, recipe: Recipe, formats, shapes, names, placement: Plan, cal) -> None:
    """Pack the tensors of one unit into u (GPTQ for calibrated experts: w1/w3 on the routed inputs, then w2 on
    the hidden those *quantized* w1/w3 produce, as sequential GPTQ does)."""
    prefix = ".".join(names[0].split(".")[:2]) if names[0].startswith(("layers.", "mtp.")) else None
    lc = cal.layers.get(prefix) if cal and prefix else None
    hidden_in: dict[str, torch.Tensor] = {}  # expert base name -> its calibration rows
    packed_w: dict[str, dict] = {}
    order = sorted(names, key=lambda n: n.endswith(".w2.weight"))  # w1/w3 before w2: w2's Hessian needs them
    for name in order:
        fmt, shape = formats[name], shapes[name]
        cls, layer = tensor_class(name, cfg)
        H = None
        if lc is not None and lc.x is not None and recipe.calibrated(name, fmt, cfg):
            base = name.rsplit(".", 2)[0]  # layers.N.ffn.experts.E / layers.N.ffn.shared_experts
            if base not in hidden_in:
                hidden_in[base] = lc.rows(expert_index(name)) if cls == "experts" else lc.x
            rows = hidden_in[base]
            if len(rows):
                if name.endswith(".w2.weight"):
                    w1 = dequantize(formats[base + ".w1.weight"], packed_w[base + ".w1.weight"])
                    w3 = dequantize(formats[base + ".w3.weight"], packed_w[base + ".w3.weight"])
                    H = gptq.hessian(swiglu_hidden(rows, w1, w3, cfg.swiglu_limit))
                else:
                    H = gptq.hessian(rows)
        packed = pack_tensor(reader, name, fmt, H)
        if name.endswith((".w1.weight", ".w3.weight")) and H is not None:
            packed_w[name] = packed
        prefix_e = moe_prefix(name)
        parts = [COMMON] if prefix_e is None else [
            next(d.partition for d in placement.devices if d.name == dev)
            for dev in placement.devices_of(prefix_e, expert_index(name))]
        u.add(name, fmt, shape, cls, layer, parts, packed)


def export_cli(src: str, out: str, recipe: str = "int4-experts", devices: str = "cpu=32GiB", calib: str | None = None,
               calib_tokens: int = 512, mode: str = "auto", context: int = 4096, sequences: int = 1,
               kv_dtype: str = "fp32", resume: bool = True, sign: str = "") -> str:
    """Requantize checkpoint SRC with RECIPE and partition its experts over DEVICES into bundle directory OUT.

    recipe: release | int4-experts | int8 | w8a8-npu | mixed-edge, or a .json/.toml recipe file;
    devices: NAME=SIZE list for the placement (npu:0=64GiB,npu:1=64GiB,cpu=256GiB,disk); calib: a text file for
    calibration (routing statistics, GPTQ when the recipe asks for it), calib_tokens: how many of its tokens;
    mode: ep | edge | auto; context x sequences: the KV target the placement reserves; resume: skip shards a
    previous run of the same export wrote and that still verify. sign: an ed25519 private key FILE (PEM): the
    bundle's manifest is signed (manifest.sig.json; see flashport.signing and `flashport verify`).
    """
    from ..signing import SIGNATURE, load_private_key, sign_bundle

    if sign:
        load_private_key(sign)  # a bad key file is refused before any work
    m = export(src, out, recipe, devices, calib, calib_tokens, mode, context, sequences, kv_dtype, resume)
    (Path(out) / SIGNATURE).unlink(missing_ok=True)  # a previous export's signature signs another manifest
    signed = f"; signed ({sign_bundle(out, sign).name})" if sign else ""
    e = m["export"]
    mb = e["source_bytes_read"] / 2**20
    return (f"wrote {out}: {len(m['tensors'])} tensors in {len(m['files'])} files, "
            f"{sum(f['size'] for f in m['files'].values()) / 2**20:.1f} MiB; read {mb:.1f} MiB of {src} in "
            f"{e['seconds']:.1f} s ({mb / max(e['seconds'], 1e-9):.1f} MB/s); units skipped (resume): "
            f"{e['units_skipped']}/{e['units']}{signed}")


# -------------------------------------------------------------------------------------------------------------
# inspect
# -------------------------------------------------------------------------------------------------------------
def inspect_cli(bundle: str, verify: bool = False) -> str:
    """Summarise BUNDLE: model, source, recipe, bytes per format and per partition, placement; with --verify also
    every file's sha256 (raises on the first mismatch). A checkpoint directory instead gets
    `flashport.checkpoint.inspect_checkpoint` (with --verify: every tensor read and checked)."""
    path = Path(bundle)
    if not (path / MANIFEST).exists() and (path / "config.json").exists():  # a checkpoint, not a bundle
        from ..checkpoint import inspect_checkpoint

        return inspect_checkpoint(path, verify, progress=verify)
    m = read_manifest(path)
    check_files(path, m, verify, progress=verify)
    cfg = m["config"]
    rows = [f"bundle {path} (schema {m['schema_version']}, id {m['bundle_id']}, flashport {m['flashport_version']})",
            f"model: {cfg.get('name')} ({cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
            f"{cfg['n_routed_experts']} experts top-{cfg['num_experts_per_tok']})",
            f"source: {m['source']['path']} ({m['source']['format']}, sha256 {m['source']['sha256'][:16]}..., "
            f"{m['source']['bytes'] / 2**20:.1f} MiB)",
            f"recipe: {m['recipe']['name']} - {m['recipe']['description']}; calibration: "
            f"{m['calibration']['method']} ({m['calibration']['tokens']} tokens)", ""]
    by_fmt: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for name, e in m["tensors"].items():
        n = 1
        for s in e["shape"]:
            n *= s
        b = stored_nbytes(e)
        row = by_fmt[e["format"]]
        row[0], row[1], row[2] = row[0] + 1, row[1] + n, row[2] + b
    rows.append(f"{'format':<26} {'tensors':>8} {'params':>12} {'MiB':>10} {'bits/param':>10}")
    for fmt, (cnt, n, b) in sorted(by_fmt.items(), key=lambda kv: -kv[1][2]):
        rows.append(f"{fmt:<26} {cnt:>8} {n:>12,} {b / 2**20:>10.2f} {8 * b / max(n, 1):>10.2f}")
    rows.append("")
    by_part: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for rel, info in m["files"].items():
        part = rel.split("/")[0] if "/" in rel else "(top)"
        by_part[part][0] += 1
        by_part[part][1] += info["size"]
    rows.append(f"{'partition':<12} {'files':>6} {'MiB':>10}")
    for part, (cnt, b) in sorted(by_part.items()):
        rows.append(f"{part:<12} {cnt:>6} {b / 2**20:>10.2f}")
    rows += ["", Plan.from_dict(m["placement"]).table()]
    rows.append(f"\nchecks: sizes, headers, bundle ids{', sha256 of every file' if verify else ''}: OK")
    return "\n".join(rows)
