"""Reading deployment bundles: the runtime half of the bundle format (flashport.export writes them).

Layout of a bundle directory (written by `flashport export`, see flashport.export.bundle):
    manifest.json                 schema version, model config, source identity, recipe, placement, tokenizer,
                                  size + sha256 of every file, its own digest
    common/globals.safetensors    embed, head, final norm and stream collapse
    common/layer-NNN.safetensors  layer N without its routed experts (every rank maps these)
    <device>/layer-NNN.safetensors  the routed experts of layer N placed on <device> (npu0/, cpu/, disk/, ...)
    tokenizer.json, routing_stats.json

Every packed tensor is stored as `<release name>:<key>`, the keys of its format in flashport.quant.formats;
fp32 / int64 tensors as `<name>:weight`.

Loading never trusts the bytes blindly. Always: the manifest's own digest (an edited manifest fails), schema and
format names, every read file's size (a truncated shard fails) and safetensors header, each shard's embedded
bundle id and name (a shard from another bundle or another place fails), every tensor's dtype and shape against
its format and the config, and each tensor's CRC32C (a flipped byte fails). With verify (parameter or
FLASHPORT_VERIFY=1): also every read file's sha256. Errors are `BundleError`s naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import crc32c
import torch
from safetensors import safe_open
from tqdm import tqdm

from .backends.contract import QuantWeight
from .checkpoint import CheckpointError, check_safetensors_file
from .config import ModelConfig
from .model import Linear, Transformer, param_shapes, rope_inv_freq
from .quant.formats import FORMATS

FORMAT = "flashport-bundle"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
ROUTING_STATS = "routing_stats.json"


class BundleError(ValueError):
    """A bundle that cannot be used (tampered, truncated, mismatched, wrong schema); the message names the file."""


def is_bundle(path: str | Path) -> bool:
    """Whether `path` is meant as a bundle directory (it holds a manifest, or shards in a bundle's layout)."""
    path = Path(path)
    return (path / MANIFEST).exists() or (path / "common" / "globals.safetensors").exists()


# -------------------------------------------------------------------------------------------------------------
# Digests
# -------------------------------------------------------------------------------------------------------------
def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tensor_crc32c(t: torch.Tensor) -> int:
    """CRC32C of a tensor's bytes (the per-tensor check of the manifest)."""
    t = t.contiguous()
    return crc32c.crc32c(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def canonical_json(d: dict) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":"), default=str).encode()


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest without its own `manifest_sha256` field."""
    return hashlib.sha256(canonical_json({k: v for k, v in manifest.items() if k != "manifest_sha256"})).hexdigest()


def verify_default(verify: bool | None) -> bool:
    """verify as given, else FLASHPORT_VERIFY=1 from the environment."""
    return os.environ.get("FLASHPORT_VERIFY", "") not in ("", "0") if verify is None else bool(verify)


# -------------------------------------------------------------------------------------------------------------
# Manifest and files
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
        raise BundleError(f"{mf}: not a flashport bundle manifest "
                          f"(format {m.get('format') if isinstance(m, dict) else None!r})")
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


def bundle_config(path: str | Path, manifest: dict | None = None) -> ModelConfig:
    """The model config a bundle's manifest records. Raises BundleError."""
    m = read_manifest(path) if manifest is None else manifest
    try:
        return ModelConfig.from_dict(m["config"])
    except Exception as e:  # noqa: BLE001 - any bad field: the manifest is unusable
        raise BundleError(f"{Path(path) / MANIFEST}: bad model config ({e})") from None


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


def expected_specs(fmt: str, shape: list[int]) -> dict[str, tuple[tuple, torch.dtype]]:
    """key -> (shape, dtype) of the stored tensors of one weight of logical `shape` in format `fmt`."""
    if fmt == "fp32":
        return {"weight": (tuple(shape), torch.float32)}
    if fmt == "int64":
        return {"weight": (tuple(shape), torch.int64)}
    if fmt not in FORMATS:
        raise BundleError(f"unknown weight format {fmt!r} in the manifest")
    return {k: (s.shape, s.dtype) for k, s in FORMATS[fmt].packed_shapes(*shape).items()}


def stored_nbytes(entry: dict) -> int:
    """Bytes a manifest tensor entry occupies in its format."""
    return sum(torch.Size(s).numel() * d.itemsize for s, d in expected_specs(entry["format"], entry["shape"]).values())


def moe_prefix(name: str) -> str | None:
    """'layers.3.ffn.experts.7.w1.weight' -> 'layers.3' (routed experts only, else None)."""
    return name.split(".ffn.experts.")[0] if ".ffn.experts." in name else None


def expert_index(name: str) -> int:
    """'layers.3.ffn.experts.7.w1.weight' -> 7."""
    return int(name.split(".ffn.experts.")[1].split(".")[0])


def read_tensor(handle, file: Path, name: str, e: dict) -> dict[str, torch.Tensor]:
    """The stored tensors of manifest entry `e` from an open safetensors handle, shape/dtype/CRC32C checked."""
    specs = expected_specs(e["format"], e["shape"])
    out = {}
    for key, (shape, dtype) in specs.items():
        try:
            t = handle.get_tensor(f"{name}:{key}")
        except Exception:  # noqa: BLE001 - safetensors raises its own types
            raise BundleError(f"{file}: tensor {name}:{key} is missing") from None
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise BundleError(f"{file}: {name}:{key} is {t.dtype} {tuple(t.shape)}, format {e['format']} needs "
                              f"{dtype} {tuple(shape)}")
        if tensor_crc32c(t) != e["crc32c"].get(key):
            raise BundleError(f"{file}: {name}:{key} fails its CRC32C check (corrupted)")
        out[key] = t
    return out


def load_routing_stats(path: str | Path) -> dict:
    """routing_stats.json (a file, or a directory / bundle holding one) -> {"tokens", "layers": {prefix: counts}}.
    Raises FileNotFoundError, or ValueError for a file that is not routing statistics."""
    path = Path(path)
    f = path / ROUTING_STATS if path.is_dir() else path
    if not f.exists():
        raise FileNotFoundError(f"no routing statistics at {f} (write them with flashport export --calib, or "
                                "flashport.export.calibrate.calibrate(...).save(dir))")
    try:
        d = json.loads(f.read_text())
        if not isinstance(d["layers"], dict) or not isinstance(d["tokens"], int):
            raise TypeError("layers must be a mapping and tokens an int")
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{f}: not a routing statistics file ({e})") from None
    return d


# -------------------------------------------------------------------------------------------------------------
# The model
# -------------------------------------------------------------------------------------------------------------
KeepExpert = Callable[[str, int], bool]


def load_model(path: str | Path, verify: bool | None = None, progress: bool = False,
               keep_expert: KeepExpert | None = None, prefer_partition: str | None = None
               ) -> tuple[Transformer, dict]:
    """Build the model of bundle `path` -> (model, manifest).

    Linears get `packed = QuantWeight` (no fp32 copy is kept), the other tensors (norms, router,
    hyper-connections, sinks, embed) become fp32 parameters. keep_expert(prefix, e): read only the routed
    experts it accepts (None: all); the others get placeholder Linears (the right format, no data) that must never
    run (expert parallelism and offload fill them in). prefer_partition: read an expert from that partition's
    shard when it holds a copy. Only the files read are checked. Raises BundleError on any mismatch; verify
    (default: FLASHPORT_VERIFY=1) also checks the sha256 of every file read."""
    path = Path(path)
    m = read_manifest(path)
    cfg = bundle_config(path, m)
    shapes = param_shapes(cfg)
    entries = m["tensors"]
    has_mtp = any(n.startswith("mtp.") for n in entries)
    want = {n for n in shapes if has_mtp or not n.startswith("mtp.")}
    if set(entries) != want:
        extra, lack = sorted(set(entries) - want), sorted(want - set(entries))
        raise BundleError(f"{path}: manifest tensors do not match the {cfg.name} config: "
                          + (f"missing {lack[0]!r} ({len(lack)} in all) " if lack else "")
                          + (f"unexpected {extra[0]!r} ({len(extra)} in all)" if extra else ""))

    def wanted(name: str) -> bool:
        prefix = moe_prefix(name)
        return prefix is None or keep_expert is None or keep_expert(prefix, expert_index(name))

    def file_of(name: str) -> str:
        files = entries[name]["files"]
        own = [f for f in files if prefer_partition and f.split("/")[0] == prefer_partition]
        return (own or files)[0]

    read = {n: file_of(n) for n in entries if wanted(n)}
    for name, rel in read.items():
        if list(entries[name]["shape"]) != list(shapes[name]):
            raise BundleError(f"{name}: shape {entries[name]['shape']} in the manifest, the config implies "
                              f"{list(shapes[name])}")
        if rel not in m["files"]:
            raise BundleError(f"{name}: file {rel!r} is not listed in the manifest's files")
    check_files(path, {**m, "files": {f: m["files"][f] for f in set(read.values())}}, verify_default(verify), progress)
    with torch.device("meta"):
        model = Transformer(cfg)
    if not has_mtp:
        model.mtp = torch.nn.ModuleList()
    handles: dict[str, object] = {}
    try:
        for name in tqdm(sorted(entries), desc="load", unit="tensor", disable=not progress):
            e = entries[name]
            if name not in read:  # an expert held elsewhere: a placeholder with its format, no bytes
                install_placeholder(model, name, e["format"], tuple(e["shape"]))
                continue
            rel = read[name]
            if rel not in handles:
                handles[rel] = safe_open(path / rel, "pt")
            install_tensor(model, name, e["format"], tuple(e["shape"]), read_tensor(handles[rel], path / rel, name, e))
    finally:
        handles.clear()
    rebuild_buffers(model)
    for name, a in list(model.named_parameters()) + list(model.named_buffers()):
        if a.is_meta:
            raise BundleError(f"{path}: {name} was not loaded")
    return model.eval(), m


def install_placeholder(model: Transformer, name: str, fmt: str, shape: tuple[int, int]) -> None:
    """Make Linear `name` a placeholder: its format and shape, no data (an expert this process does not hold)."""
    lin = model.get_submodule(name.rpartition(".")[0])
    lin.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
    lin.packed, lin.handles = QuantWeight(fmt, shape, {}), {}


def install_tensor(model: Transformer, name: str, fmt: str, shape: tuple, packed: dict[str, torch.Tensor]) -> None:
    """Put a stored tensor into the model: a Linear's weight stays packed; anything else is dequantized."""
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    if isinstance(mod, Linear) and leaf == "weight":
        mod.handles = {}
        if fmt == "fp32":
            mod.weight, mod.packed = torch.nn.Parameter(packed["weight"], requires_grad=False), None
        else:  # the packed weight is the weight: no fp32 copy is kept
            mod.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
            mod.packed = QuantWeight(fmt, tuple(shape), packed)
        return
    t = packed["weight"] if fmt in ("fp32", "int64") else FORMATS[fmt].dequantize(packed)
    if leaf in mod._buffers:
        mod._buffers[leaf] = t
    else:
        setattr(mod, leaf, torch.nn.Parameter(t.float() if t.is_floating_point() else t, requires_grad=False))


def rebuild_buffers(model: Transformer) -> None:
    """Non-persistent buffers (the RoPE tables) are computed, not stored: rebuild them off the meta device."""
    for mod in model.modules():
        buf = mod._buffers.get("inv_freq")
        if buf is not None and buf.is_meta:
            mod._buffers["inv_freq"] = rope_inv_freq(model.cfg, compressed=mod.kind != "swa")
