"""Deployment bundles: `flashport export` writes one, `load_model` / `Engine.load` runs one, `flashport inspect`
summarises one.

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

Loading never trusts the bytes blindly. Always: the manifest's own digest (an edited manifest fails), schema and
format names, every file's size (a truncated shard fails) and safetensors header, each shard's embedded bundle id
and name (a shard from another bundle or another place fails), every tensor's dtype and shape against its format
and the config, and each tensor's CRC32C (a flipped byte fails). With verify (parameter or FLASHPORT_VERIFY=1):
also every file's sha256, the integrity record of the export.

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

import crc32c
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from ..backends.contract import QuantWeight
from ..checkpoint import CheckpointError, CheckpointReader, check_safetensors_file
from ..config import ModelConfig
from ..model import Linear, Transformer, rope_inv_freq
from ..quant.formats import FORMATS
from ..tokenizer import DEFAULT_PATH
from . import gptq
from .calibrate import calibrate, swiglu_hidden
from .planner import Plan, model_shapes, plan as make_plan
from .recipes import Recipe, load_recipe, tensor_class

log = logging.getLogger("flashport.export")

FORMAT = "flashport-bundle"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
JOURNAL = ".export-journal.json"
COMMON = "common"


class BundleError(ValueError):
    """A bundle that cannot be used (tampered, truncated, mismatched, wrong schema); the message names the file."""


# -------------------------------------------------------------------------------------------------------------
# small helpers
# -------------------------------------------------------------------------------------------------------------
def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _crc(t: torch.Tensor) -> int:
    t = t.contiguous()
    return crc32c.crc32c(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def _canonical(d: dict) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":"), default=str).encode()


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest without its own `manifest_sha256` field."""
    return hashlib.sha256(_canonical({k: v for k, v in manifest.items() if k != "manifest_sha256"})).hexdigest()


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


def _moe_prefix(name: str) -> str | None:
    """'layers.3.ffn.experts.7.w1.weight' -> 'layers.3' (routed experts only)."""
    return name.split(".ffn.experts.")[0] if ".ffn.experts." in name else None


def _expert_index(name: str) -> int:
    return int(name.split(".ffn.experts.")[1].split(".")[0])


# -------------------------------------------------------------------------------------------------------------
# Packing one tensor
# -------------------------------------------------------------------------------------------------------------
def _passthrough(reader: CheckpointReader, name: str, fmt: str) -> dict[str, torch.Tensor] | None:
    """The release's stored tensors for `name` when they already are `fmt` (bit-exact copy), else None."""
    if reader.format != "release" or fmt not in FORMATS:
        return None
    t, scale = reader.raw(name)
    if t.dim() != 2:
        return None
    N, K = t.shape[0], t.shape[1] * (2 if fmt == "mxfp4" else 1)
    got = {"weight": t} | ({"scale": scale} if scale is not None else {})
    if fmt == "mxfp4":
        got["shape"] = torch.tensor([N, K], dtype=torch.int64)
    specs = FORMATS[fmt].packed_shapes(N, K)
    if set(specs) != set(got) or any(tuple(got[k].shape) != s.shape or got[k].dtype != s.dtype
                                     for k, s in specs.items()):
        return None
    return {k: v.contiguous() for k, v in got.items()}


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


def _dequant(fmt: str, packed: dict[str, torch.Tensor]) -> torch.Tensor:
    if fmt in ("fp32", "int64"):
        return packed["weight"]
    return FORMATS[fmt].dequantize(packed)


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
                              "crc32c": {k: _crc(v) for k, v in packed.items()}}


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
    calib_id = hashlib.sha256(_canonical(cal.routing_stats())).hexdigest() if cal else None
    bundle_id = hashlib.sha256(_canonical({"schema": SCHEMA_VERSION, "source": source["sha256"],
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
            save_file(shard, str(tmp), metadata={"bundle_id": bundle_id, "shard": rel, "format": FORMAT})
            os.replace(tmp, path)
            unit_files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
        del u.shards
        journal["units"][unit] = {"files": unit_files, "tensors": u.entries}
        _write_json_atomic(out / JOURNAL, journal)
        tensors.update(u.entries)
        files.update(unit_files)

    extra = {}
    tok_src = reader.path / "tokenizer.json"
    shutil.copyfile(tok_src if tok_src.exists() else DEFAULT_PATH, out / "tokenizer.json")
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
        "placement": placement.to_dict(), "tokenizer": "tokenizer.json",
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
                hidden_in[base] = lc.rows(_expert_index(name)) if cls == "experts" else lc.x
            rows = hidden_in[base]
            if len(rows):
                if name.endswith(".w2.weight"):
                    w1 = _dequant(formats[base + ".w1.weight"], packed_w[base + ".w1.weight"])
                    w3 = _dequant(formats[base + ".w3.weight"], packed_w[base + ".w3.weight"])
                    H = gptq.hessian(swiglu_hidden(rows, w1, w3, cfg.swiglu_limit))
                else:
                    H = gptq.hessian(rows)
        packed = pack_tensor(reader, name, fmt, H)
        if name.endswith((".w1.weight", ".w3.weight")) and H is not None:
            packed_w[name] = packed
        prefix_e = _moe_prefix(name)
        parts = [COMMON] if prefix_e is None else [
            next(d.partition for d in placement.devices if d.name == dev)
            for dev in placement.devices_of(prefix_e, _expert_index(name))]
        u.add(name, fmt, shape, cls, layer, parts, packed)


def export_cli(src: str, out: str, recipe: str = "int4-experts", devices: str = "cpu=32GiB", calib: str | None = None,
               calib_tokens: int = 512, mode: str = "auto", context: int = 4096, sequences: int = 1,
               kv_dtype: str = "fp32", resume: bool = True) -> str:
    """Requantize checkpoint SRC with RECIPE and partition its experts over DEVICES into bundle directory OUT.

    recipe: release | int4-experts | int8 | w8a8-npu | mixed-edge, or a .json/.toml recipe file;
    devices: NAME=SIZE list for the placement (npu:0=64GiB,npu:1=64GiB,cpu=256GiB,disk); calib: a text file for
    calibration (routing statistics, GPTQ when the recipe asks for it), calib_tokens: how many of its tokens;
    mode: ep | edge | auto; context x sequences: the KV target the placement reserves; resume: skip shards a
    previous run of the same export wrote and that still verify.
    """
    m = export(src, out, recipe, devices, calib, calib_tokens, mode, context, sequences, kv_dtype, resume)
    e = m["export"]
    mb = e["source_bytes_read"] / 2**20
    return (f"wrote {out}: {len(m['tensors'])} tensors in {len(m['files'])} files, "
            f"{sum(f['size'] for f in m['files'].values()) / 2**20:.1f} MiB; read {mb:.1f} MiB of {src} in "
            f"{e['seconds']:.1f} s ({mb / max(e['seconds'], 1e-9):.1f} MB/s); units skipped (resume): "
            f"{e['units_skipped']}/{e['units']}")


# -------------------------------------------------------------------------------------------------------------
# Reading and checking
# -------------------------------------------------------------------------------------------------------------
def read_manifest(path: str | Path) -> dict:
    """The manifest of bundle directory `path`, checked: format, schema version, own digest."""
    path = Path(path)
    mf = path / MANIFEST
    if not mf.exists():
        raise BundleError(f"{path}: no {MANIFEST} (not a bundle, or an export that did not finish)")
    try:
        m = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{mf}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise BundleError(f"{mf}: not a flashport bundle manifest (format {m.get('format') if isinstance(m, dict) else None!r})")
    if m.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(f"{mf}: schema version {m.get('schema_version')!r}; this flashport reads version "
                          f"{SCHEMA_VERSION}: re-export the bundle")
    if m.get("manifest_sha256") != manifest_digest(m):
        raise BundleError(f"{mf}: the manifest was modified after export (its digest does not match); re-export "
                          "the bundle")
    for key in ("config", "tensors", "files", "bundle_id"):
        if key not in m:
            raise BundleError(f"{mf}: missing field {key!r}")
    return m


def check_files(path: str | Path, manifest: dict, verify: bool = False, progress: bool = False) -> None:
    """Sizes, safetensors headers and embedded bundle ids always; sha256 with verify. Raises BundleError."""
    path = Path(path)
    for rel, info in tqdm(manifest["files"].items(), desc="verify", unit="file", disable=not progress):
        p = path / rel
        if not p.exists():
            raise BundleError(f"{p}: missing file of bundle {path}")
        size = p.stat().st_size
        if size != info["size"]:
            raise BundleError(f"{p}: {size} bytes, the manifest says {info['size']} (truncated or replaced)")
        if rel.endswith(".safetensors"):
            try:
                check_safetensors_file(p)
            except CheckpointError as e:
                raise BundleError(str(e)) from None
        if rel.endswith(".safetensors") and "/" in rel:  # weight shards carry the bundle id and their own name
            with safe_open(p, "pt") as f:
                meta = f.metadata() or {}
            if meta.get("bundle_id") != manifest["bundle_id"] or meta.get("shard") != rel:
                raise BundleError(f"{p}: shard of bundle {meta.get('bundle_id')!r} ({meta.get('shard')!r}), not of "
                                  f"this bundle {manifest['bundle_id']!r} ({rel!r}): a file from another export")
        if verify and sha256_file(p) != info["sha256"]:
            raise BundleError(f"{p}: sha256 does not match the manifest (corrupted or modified)")


def _verify_default(verify: bool | None) -> bool:
    return os.environ.get("FLASHPORT_VERIFY", "") not in ("", "0") if verify is None else bool(verify)


def _expected_specs(fmt: str, shape: list[int]) -> dict[str, tuple[tuple, torch.dtype]]:
    if fmt == "fp32":
        return {"weight": (tuple(shape), torch.float32)}
    if fmt == "int64":
        return {"weight": (tuple(shape), torch.int64)}
    if fmt not in FORMATS:
        raise BundleError(f"unknown weight format {fmt!r} in the manifest")
    return {k: (s.shape, s.dtype) for k, s in FORMATS[fmt].packed_shapes(*shape).items()}


def load_model(path: str | Path, verify: bool | None = None, progress: bool = False) -> Transformer:
    """Build the model of bundle `path`: Linears get `packed = QuantWeight` (their fp32 weight is freed), the other
    tensors (norms, router, hyper-connections, sinks, embed) become fp32 parameters. Raises BundleError on any
    mismatch; verify (default: FLASHPORT_VERIFY=1) also checks every file's sha256."""
    path = Path(path)
    m = read_manifest(path)
    check_files(path, m, _verify_default(verify), progress)
    try:
        cfg = ModelConfig.from_dict(m["config"])
    except Exception as e:
        raise BundleError(f"{path / MANIFEST}: bad model config ({e})") from None
    shapes = model_shapes(cfg)
    entries = m["tensors"]
    has_mtp = any(n.startswith("mtp.") for n in entries)
    want = {n for n in shapes if has_mtp or not n.startswith("mtp.")}
    if set(entries) != want:
        extra, lack = sorted(set(entries) - want), sorted(want - set(entries))
        raise BundleError(f"{path}: manifest tensors do not match the {cfg.name} config: "
                          + (f"missing {lack[0]!r} ({len(lack)} in all) " if lack else "")
                          + (f"unexpected {extra[0]!r} ({len(extra)} in all)" if extra else ""))
    with torch.device("meta"):
        model = Transformer(cfg)
    if not has_mtp:
        model.mtp = torch.nn.ModuleList()
    handles: dict[str, object] = {}
    try:
        for name in tqdm(sorted(entries), desc="load", unit="tensor", disable=not progress):
            e = entries[name]
            if list(e["shape"]) != list(shapes[name]):
                raise BundleError(f"{name}: shape {e['shape']} in the manifest, the config implies {list(shapes[name])}")
            rel = e["files"][0]
            if rel not in m["files"]:
                raise BundleError(f"{name}: file {rel!r} is not listed in the manifest's files")
            if rel not in handles:
                handles[rel] = safe_open(path / rel, "pt")
            packed = _read_tensor(handles[rel], path / rel, name, e)
            _install(model, name, e, packed)
    finally:
        handles.clear()
    _rebuild_buffers(model)
    for name, a in list(model.named_parameters()) + list(model.named_buffers()):
        if a.is_meta:
            raise BundleError(f"{path}: {name} was not loaded")
    return model.eval()


def _read_tensor(handle, file: Path, name: str, e: dict) -> dict[str, torch.Tensor]:
    specs = _expected_specs(e["format"], e["shape"])
    out = {}
    for key, (shape, dtype) in specs.items():
        try:
            t = handle.get_tensor(f"{name}:{key}")
        except Exception:
            raise BundleError(f"{file}: tensor {name}:{key} is missing") from None
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise BundleError(f"{file}: {name}:{key} is {t.dtype} {tuple(t.shape)}, format {e['format']} needs "
                              f"{dtype} {tuple(shape)}")
        if _crc(t) != e["crc32c"].get(key):
            raise BundleError(f"{file}: {name}:{key} fails its CRC32C check (corrupted)")
        out[key] = t
    return out


def _install(model: Transformer, name: str, e: dict, packed: dict[str, torch.Tensor]) -> None:
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    fmt = e["format"]
    if isinstance(mod, Linear) and leaf == "weight":
        mod.handles = {}
        if fmt == "fp32":
            mod.weight, mod.packed = torch.nn.Parameter(packed["weight"], requires_grad=False), None
        else:  # the packed weight is the weight: no fp32 copy is kept
            mod.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
            mod.packed = QuantWeight(fmt, tuple(e["shape"]), packed)
        return
    t = _dequant(fmt, packed)
    if leaf in mod._buffers:
        mod._buffers[leaf] = t
    else:
        setattr(mod, leaf, torch.nn.Parameter(t.float() if t.is_floating_point() else t, requires_grad=False))


def _rebuild_buffers(model: Transformer) -> None:
    """Non-persistent buffers (the RoPE tables) are computed, not stored: rebuild them off the meta device."""
    for mod in model.modules():
        buf = mod._buffers.get("inv_freq")
        if buf is not None and buf.is_meta:
            mod._buffers["inv_freq"] = rope_inv_freq(model.cfg, compressed=mod.kind != "swa")


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
        b = sum(_nbytes(s, d) for s, d in _expected_specs(e["format"], e["shape"]).values())
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


def _nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * dtype.itemsize
