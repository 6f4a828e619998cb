"""Checkpoint I/O: read release-format and transformers-format checkpoints lazily; write small ones.

Release format (DESIGN.md section 2): sharded safetensors + `model.safetensors.index.json`, native names
(`layers.N.attn.wq_a.weight`), FP8 e4m3 linears with a `.scale` companion per 128x128 block (fp32 or UE8M0),
routed experts as FP4 e2m1 packed two per int8 byte with one UE8M0 `.scale` per 1x32 block, bf16/fp32 elsewhere.

Reading memory-maps every shard (`safe_open`) and pulls one tensor at a time, so opening the 160 GB release reads
only the headers. Every problem names the tensor and the file.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .model import param_shapes
from .quant.formats import FORMATS
from .quant.release import (dequantize_fp8_block, dequantize_mxfp4, fp8_problem, quantize_fp8_block, quantize_mxfp4,
                            scale_problem)


class CheckpointError(ValueError):
    """A checkpoint flashport cannot read; the message names the tensor and the file."""


# Linears the release stores as FP8 blocks; routed experts are MXFP4; the rest bf16 (matrices) or fp32.
_FP8 = re.compile(r"(attn\.(wq_a|wq_b|wkv|wo_a|wo_b)|indexer\.wq_b|shared_experts\.w[123]|[eh]_proj)\.weight$")
_FP4 = re.compile(r"ffn\.experts\.\d+\.w[123]\.weight$")
_BF16 = re.compile(r"^(embed|head)\.weight$|ffn\.gate\.weight$|compressor\.(wkv|wgate)\.weight$|weights_proj\.weight$")
_EXPERT = re.compile(r"^(.*\.ffn\.experts)\.(\d+)\.(w[123])\.weight$")


def umask() -> int:
    """The process's file-creation mask (read from /proc on Linux, where reading it does not change it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it (not thread-safe; restored at once)
    os.umask(mask)
    return mask


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, with the file's mode following the umask (0666 & ~umask) like every other file
    flashport writes: safetensors creates it 0600, so a service account could not read a bundle someone exported."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~umask())


def release_dtype(name: str) -> str:
    """How the release stores a tensor: 'fp8', 'fp4', 'bf16', 'fp32' or 'int'."""
    if name.endswith("tid2eid"):
        return "int"
    if _FP4.search(name):
        return "fp4"
    if _FP8.search(name):
        return "fp8"
    return "bf16" if _BF16.search(name) else "fp32"


# --------------------------------------------------------------------------------------------------------------
# transformers names <-> release names
# --------------------------------------------------------------------------------------------------------------
_HF_RENAMES = [  # release fragment -> transformers fragment, applied in order (see transformers' conversion_mapping)
    (r"^embed\.weight$", "model.embed_tokens.weight"), (r"^head\.weight$", "lm_head.weight"),
    (r"^norm\.weight$", "model.norm.weight"), (r"^hc_head_(fn|base|scale)$", r"model.hc_head.hc_\1"),
    (r"^layers\.", "model.layers."), (r"\.attn\.indexer\.compressor\.", ".self_attn.compressor.indexer."),
    (r"\.attn\.indexer\.wq_b\.", ".self_attn.compressor.indexer.q_b_proj."),
    (r"\.attn\.indexer\.weights_proj\.", ".self_attn.compressor.indexer.scorer.weights_proj."),
    (r"\.attn\.", ".self_attn."), (r"\.ffn\.", ".mlp."), (r"\.attn_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."), (r"\.hc_(attn|ffn)_(fn|base|scale)$", r".\1_hc.\2"),
    (r"\.attn_sink$", ".sinks"), (r"\.(compressor|indexer)\.norm\.", r".\1.kv_norm."), (r"\.ape$", ".position_bias"), (r"\.wq_a\.", ".q_a_proj."),
    (r"\.wq_b\.", ".q_b_proj."), (r"\.wkv\.", ".kv_proj."), (r"\.wgate\.", ".gate_proj."), (r"\.wo_a\.", ".o_a_proj."),
    (r"\.wo_b\.", ".o_b_proj."), (r"\.q_norm\.", ".q_a_norm."), (r"\.gate\.bias$", ".gate.e_score_correction_bias"),
    (r"\.shared_experts\.w1\.", ".shared_experts.gate_proj."), (r"\.shared_experts\.w2\.", ".shared_experts.down_proj."),
    (r"\.shared_experts\.w3\.", ".shared_experts.up_proj."),
]


def release_to_hf(name: str) -> str:
    for pat, rep in _HF_RENAMES:
        name = re.sub(pat, rep, name)
    return name


# transformers' save_pretrained (5.x, `save_original_format=True`, its default) writes the release's names back
# under `model.`, except for the globals and one quirk of its reversed renaming (`\.norm\.` -> `.kv_norm.` turns the
# attention's `kv_norm` into `norm`). Applied in order to a name with `model.` stripped.
_SAVED_RENAMES = [
    (r"^embed_tokens\.weight$", "embed.weight"), (r"^lm_head\.weight$", "head.weight"),
    (r"^hc_head\.hc_(fn|base|scale)$", r"hc_head_\1"), (r"^(layers\.\d+\.attn)\.norm\.weight$", r"\1.kv_norm.weight"),
]
_STACKED = re.compile(r"^(layers\.\d+)\.(?:ffn|mlp)\.experts\.(gate_up_proj|down_proj)$")


def checkpoint_layout(names) -> str:
    """Which writer's names a checkpoint holds, from the names alone:

    'release'      the release's native names (`layers.0.attn.wq_a.weight`, `embed.weight`);
    'transformers' transformers 5.x `save_pretrained` (release names under `model.`: `model.layers.0.attn.wq_a.weight`,
                   `model.embed_tokens.weight`, `head.weight`, `model.layers.0.attn.norm.weight` for the kv norm);
    'hf'           transformers' in-memory module names (`model.layers.0.self_attn.q_a_proj.weight`, experts stacked
                   as `mlp.experts.gate_up_proj`): `save_pretrained(..., save_original_format=False)` and flashport's
                   own `--format hf` writer.
    """
    names = list(names)
    if any(".self_attn." in n or ".mlp." in n or ".attn_hc." in n or n == "lm_head.weight" for n in names):
        return "hf"
    return "transformers" if any(n.startswith("model.") for n in names) else "release"


def saved_to_release(name: str) -> str:
    """A name in transformers' `save_pretrained` layout -> the release's name (unknown names pass through)."""
    name = name.removeprefix("model.")
    for pat, rep in _SAVED_RENAMES:
        name = re.sub(pat, rep, name)
    return name


def source_map(names: list[str], cfg: ModelConfig) -> tuple[str, dict[str, tuple[str, tuple | None]]]:
    """(layout, release name -> (stored name, index into it or None)) for the tensors of a checkpoint.

    Routed experts stored stacked (transformers' in-memory `gate_up_proj` [E, 2I, D] = w1 then w3 along dim 1,
    `down_proj` [E, D, I]) become one slice per release expert weight. Scale companions (`.scale`) are mapped with
    their weight, under the release name `<base>.scale`. Names that match nothing pass through (the shape check
    reports them).
    """
    layout = checkpoint_layout(names)
    inverse = {}
    if layout == "hf":
        for n in param_shapes(cfg):
            hf = release_to_hf(n)
            inverse[hf] = n
            # transformers' save_pretrained of a model it read in these names keeps them but writes every `kv_norm`
            # as `norm` (the same reversed-renaming quirk as _SAVED_RENAMES): both spellings name the kv norm
            inverse[hf.replace(".kv_norm.", ".norm.")] = n
    inter = cfg.moe_intermediate_size
    out: dict[str, tuple[str, tuple | None]] = {}
    for stored in names:
        if stored.endswith("rotary_emb.inv_freq"):
            continue
        if layout == "hf":
            rel = inverse.get(stored) or stored.removeprefix("model.")
        elif layout == "transformers":
            rel = saved_to_release(stored)
        else:
            rel = stored
        m = _STACKED.match(rel)
        if m:
            prefix, kind = m.groups()
            for e in range(cfg.n_routed_experts):
                base = f"{prefix}.ffn.experts.{e}"
                if kind == "down_proj":
                    out[f"{base}.w2.weight"] = (stored, (e,))
                else:
                    out[f"{base}.w1.weight"] = (stored, (e, slice(0, inter)))
                    out[f"{base}.w3.weight"] = (stored, (e, slice(inter, None)))
        else:
            out[rel] = (stored, None)
    return layout, out


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------
# bytes per element of the safetensors dtypes flashport writes or reads (others: offsets checked, sizes not)
_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def check_safetensors_file(path: Path) -> None:
    """Fail early, naming the file and what is wrong, if a shard is missing, truncated or has a bad header.

    The header is checked the way safetensors checks it when it opens the file (so a damaged header is a one-line
    CheckpointError here, never a SafetensorError later): valid JSON of {name: {dtype, shape, data_offsets}},
    each tensor's byte span matching its dtype and shape, the spans contiguous from 0 and ending at the file's
    end."""
    if not path.exists():
        raise CheckpointError(f"missing shard {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated (no safetensors header)")
        n = struct.unpack("<Q", head)[0]
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated or not a safetensors file (header of {n} bytes, file {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    spans = []
    for name, v in header.items():
        if name == "__metadata__":
            if not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values()):
                raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ is not a map of strings)")
            continue
        where = f"{path}: corrupt safetensors header: tensor {name!r}"
        if not isinstance(v, dict) or set(v) != {"dtype", "shape", "data_offsets"}:
            keys = sorted(v) if isinstance(v, dict) else type(v).__name__
            raise CheckpointError(f"{where} has {keys}, not dtype, shape and data_offsets")
        shape, offs, dtype = v["shape"], v["data_offsets"], v["dtype"]
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise CheckpointError(f"{where} has an invalid shape {shape!r}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)
                and 0 <= offs[0] <= offs[1]):
            raise CheckpointError(f"{where} has invalid data_offsets {offs!r}")
        if not isinstance(dtype, str):
            raise CheckpointError(f"{where} has an invalid dtype {dtype!r}")
        if dtype in _ST_ITEMSIZE and offs[1] - offs[0] != math.prod(shape) * _ST_ITEMSIZE[dtype]:
            raise CheckpointError(f"{where}: {dtype} {shape} needs {math.prod(shape) * _ST_ITEMSIZE[dtype]} bytes, "
                                  f"its data_offsets span {offs[1] - offs[0]}")
        spans.append((offs[0], offs[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {name!r} starts at data byte {begin}, "
                                  f"the previous one ends at {end} (overlapping or a gap)")
        end = stop
    if 8 + n + end != size:
        bad = max(spans)[2] if spans else "(none)"
        if 8 + n + end > size:
            raise CheckpointError(f"{path}: truncated: tensor {bad!r} ends at byte {8 + n + end}, file has {size}")
        raise CheckpointError(f"{path}: {size - 8 - n - end} bytes after the last tensor {bad!r} (corrupt header or "
                              f"appended data)")


class CheckpointReader:
    """Lazy access to a checkpoint directory's tensors under release names, dequantized to fp32 on request.

    The layout (release, transformers' `save_pretrained`, transformers' in-memory names) is detected from the tensor
    names (`checkpoint_layout`); `format` is that layout. Opening reads the config and the shard headers only.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint directory {self.path} does not exist")
        self.cfg = ModelConfig.from_file(self.path)
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.path}: no *.safetensors files and no model.safetensors.index.json")
            weight_map = {}
            for f in files:
                check_safetensors_file(f)
                with safe_open(f, "pt") as h:
                    weight_map.update({k: f.name for k in h.keys()})
        self.stored: dict[str, Path] = {k: self.path / v for k, v in weight_map.items()}  # stored name -> shard
        for f in sorted(set(self.stored.values())):
            check_safetensors_file(f)
        self._handles: dict[Path, object] = {}
        self.format, src = source_map(list(self.stored), self.cfg)
        self._src = {n: v for n, v in src.items() if not n.endswith(".scale")}
        self._scale = {n.removesuffix(".scale") + ".weight": v for n, v in src.items() if n.endswith(".scale")}
        # release name -> the file that holds it (error messages, source identity)
        self.files: dict[str, Path] = {n: self.stored[v[0]] for n, v in src.items()}

    def _raw(self, name: str) -> torch.Tensor:
        """A stored tensor by its stored name."""
        f = self.stored[name]
        if f not in self._handles:
            self._handles[f] = safe_open(f, "pt")
        try:
            return self._handles[f].get_tensor(name)
        except Exception as e:  # safetensors raises its own types for unknown dtypes / bad offsets
            raise CheckpointError(f"tensor {name!r} in {f}: {e}") from None

    def _read(self, entry: tuple[str, tuple | None]) -> torch.Tensor:
        stored, index = entry
        t = self._raw(stored)
        return t if index is None else t[index].contiguous()

    def where(self, name: str) -> str:
        """'tensor NAME in FILE' for messages (the stored name when it differs from the release name)."""
        entry = self._src.get(name) or self._scale.get(name.removesuffix(".scale") + ".weight")
        if entry is None:
            return f"tensor {name!r} in {self.path}"
        shown = name if entry[0] == name or name.endswith(".scale") else f"{name} (stored as {entry[0]})"
        return f"tensor {shown!r} in {self.stored[entry[0]]}"

    def names(self) -> list[str]:
        return list(self._src)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Release name -> the (dequantized) shape config.json implies; the MTP block only if the files carry it
        (transformers drops it)."""
        if "_shapes" not in self.__dict__:
            shapes = param_shapes(self.cfg)
            if not any(n.startswith("mtp.") for n in self._src):
                shapes = {n: s for n, s in shapes.items() if not n.startswith("mtp.")}
            self.__dict__["_shapes"] = shapes
        return self.__dict__["_shapes"]

    def raw(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A tensor as stored (release names), with its `.scale` companion if it has one.

        Checked when read (nothing is read up front), each problem a CheckpointError naming tensor and file: the
        dtype and stored shape against config.json (FP8 [N, K] or packed FP4 [N, K/2] with their scale grids, float
        elsewhere, integers only for `tid2eid`), scales finite and >= 0 (no UE8M0 0xFF), no FP8 NaN codes, and
        `tid2eid` entries within [0, n_routed_experts)."""
        if name not in self._src:
            raise CheckpointError(f"tensor {name!r} not found in {self.path}")
        scale_entry = self._scale.get(name)
        t = self._read(self._src[name])
        scale = None if scale_entry is None else self._read(scale_entry)
        self._check(name, t, scale)
        return t, scale

    def _check(self, name: str, t: torch.Tensor, scale: torch.Tensor | None) -> None:
        def fail(msg: str, which: str = name):
            raise CheckpointError(f"{self.where(which)}: {msg}")

        want = self.shapes.get(name)
        if scale is not None:
            scale_name = name.removesuffix(".weight") + ".scale"
            if (why := scale_problem(scale)) is not None:
                fail(why, scale_name)
            if t.dtype == torch.float8_e4m3fn:
                stored = want
                if (why := fp8_problem(t)) is not None:
                    fail(why)
            elif t.dtype in (torch.int8, torch.uint8):
                stored = None if want is None else (*want[:-1], want[-1] // 2)
            else:
                fail(f"dtype {t.dtype} with a .scale is not FP8 (F8_E4M3) or packed FP4 (I8)")
            if stored is not None and tuple(t.shape) != tuple(stored):
                fail(f"stored shape {tuple(t.shape)}, config.json implies {tuple(stored)} ({t.dtype})")
            return
        if name.endswith("tid2eid"):
            if t.is_floating_point() or t.dtype == torch.bool:
                fail(f"dtype {t.dtype}: a token -> expert table holds integers")
            e = self.cfg.n_routed_experts
            bad = (t < 0) | (t >= e)
            if bool(bad.any()):
                i = tuple(int(v) for v in bad.nonzero()[0].tolist())
                fail(f"expert id {int(t[i])} at index {i} outside [0, n_routed_experts={e})")
        elif t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            fail(f"unsupported dtype {t.dtype} (expected a float tensor: F32, BF16 or F16)")
        if want is not None and tuple(t.shape) != tuple(want):
            fail(f"has shape {tuple(t.shape)}, config.json implies {tuple(want)}")

    def packed(self, name: str, formats: tuple[str, ...] = ("fp8-e4m3-block128-ue8m0", "fp8-e4m3-block128",
                                                               "mxfp4", "bf16")) -> tuple[str, dict[str, torch.Tensor]] | None:
        """A release-layout weight as stored, in the first of `formats` (flashport.quant.formats) whose packed
        tensors it is bit for bit -> (format, tensors), else None (another layout, or not stored quantized).
        Checked as `raw` does (float weights also finite); the stored codes and scales dequantize to exactly what
        `get` returns. The tensors are views of the memory-mapped files (no copy)."""
        if self.format != "release" or name not in self._src:
            return None
        t, scale = self.raw(name)
        if t.dim() != 2:
            return None
        for fmt in formats:
            N, K = t.shape[0], t.shape[1] * (2 if fmt == "mxfp4" else 1)
            got = {"weight": t} | ({"scale": scale} if scale is not None else {}) | \
                ({"shape": torch.tensor([N, K])} if fmt == "mxfp4" else {})
            specs = FORMATS[fmt].packed_shapes(N, K)
            if set(specs) == set(got) and all(tuple(got[k].shape) == tuple(sp.shape) and got[k].dtype == sp.dtype
                                              for k, sp in specs.items()):
                if scale is None:  # a float weight (bf16): its values are what the math uses
                    check_finite_blocks(t, self.where(name))
                return fmt, {k: v.contiguous() for k, v in got.items()}
        return None

    def stored_float(self, name: str) -> torch.Tensor | None:
        """A float tensor kept as stored (bf16, fp16 or fp32; a view of the memory-mapped file, not a copy), checked
        as `raw` does and finite (in row blocks: no full-size temporary), or None when it is stored quantized or as
        integers. For tensors the model reads only a few rows of (the embedding)."""
        t, scale = self.raw(name)
        if scale is not None or not t.is_floating_point():
            return None
        check_finite_blocks(t, self.where(name))
        return t

    def get(self, name: str) -> torch.Tensor:
        """A tensor dequantized to fp32 (int tensors stay int64), checked as `raw` does and finite."""
        t, scale = self.raw(name)
        where = self.where(name)
        if scale is not None:
            if t.dtype == torch.float8_e4m3fn:
                block = tuple((self.cfg.quantization_config or {}).get("weight_block_size", (128, 128)))
                want = (math.ceil(t.shape[0] / block[0]), math.ceil(t.shape[1] / block[1]))
                if tuple(scale.shape) != want:
                    raise CheckpointError(f"{where}: scale grid {tuple(scale.shape)} does not match {want}")
                out = dequantize_fp8_block(t, scale, block)
            else:
                if tuple(scale.shape) != (t.shape[0], t.shape[1] * 2 // 32):
                    raise CheckpointError(f"{where}: MXFP4 scale shape {tuple(scale.shape)} does not fit {tuple(t.shape)}")
                out = dequantize_mxfp4(t, scale)
        elif not t.is_floating_point():
            return t.long()
        else:
            out = t.float()
        if not bool(torch.isfinite(out).all()):
            bad = ~torch.isfinite(out)
            raise CheckpointError(f"{where}: {int(bad.sum())} non-finite value(s) (NaN/Inf), first at index "
                                  f"{tuple(int(v) for v in bad.nonzero()[0].tolist())}")
        return out

    def check_complete(self, shapes: dict[str, tuple] | None = None) -> None:
        """Raise CheckpointError when a tensor the model needs (`shapes`, default: the config's) is not stored."""
        missing = [n for n in (shapes or self.shapes) if n not in self._src]
        if missing:
            raise CheckpointError(f"{self.path} ({self.format} layout): {len(missing)} tensors missing, "
                                  f"first: {missing[0]!r}")

    def get_shaped(self, name: str, shape: tuple) -> torch.Tensor:
        """`get`, with the dequantized shape checked against `shape` (what config.json implies)."""
        t = self.get(name)
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"{self.where(name)} has shape {tuple(t.shape)}, config.json implies "
                                  f"{tuple(shape)}")
        return t

    def load_state_dict(self, shapes: dict[str, tuple] | None = None) -> dict[str, torch.Tensor]:
        """Every tensor the model needs, dequantized and checked (see `raw`, `get`)."""
        shapes = shapes or self.shapes
        self.check_complete(shapes)
        return {name: self.get_shaped(name, shape) for name, shape in shapes.items()}


FINITE_BLOCK = 1 << 20  # elements checked at a time by check_finite_blocks (small: the temporaries stay small)


def check_finite_blocks(t: torch.Tensor, where: str) -> None:
    """Raise CheckpointError naming `where` when the float tensor `t` holds NaN or Inf. Checked FINITE_BLOCK
    elements at a time, so a GB-sized tensor needs no GB-sized temporary."""
    flat = t.reshape(-1)
    for i in range(0, flat.numel(), FINITE_BLOCK):
        bad = ~torch.isfinite(flat[i:i + FINITE_BLOCK])
        if bool(bad.any()):
            j = i + int(bad.nonzero()[0, 0])
            index = tuple(int(v) for v in torch.unravel_index(torch.tensor(j), t.shape))
            raise CheckpointError(f"{where}: {int(bad.sum())}+ non-finite value(s) (NaN/Inf), first at index {index}")


def inspect_checkpoint(path: str | Path, verify: bool = False, progress: bool = False) -> str:
    """Summary of a checkpoint directory (`flashport inspect PATH [--verify]`): layout, tensors and bytes by dtype.

    Always checked (headers only): config.json, every shard's safetensors header and size, that every tensor the
    config implies is present and no tensor is unknown. With verify, every tensor is read once, one at a time, with
    every check of `CheckpointReader.raw` / `get` (dtypes and shapes against config.json, scales finite and >= 0,
    no UE8M0 0xFF or FP8 NaN codes, tid2eid within range, every dequantized value finite). Raises CheckpointError
    (or ConfigError) naming tensor and file at the first problem."""
    from collections import Counter

    from tqdm import tqdm

    reader = CheckpointReader(path)
    shapes = reader.shapes
    missing = [n for n in shapes if n not in reader._src]
    if missing:
        raise CheckpointError(f"{reader.path} ({reader.format} layout): {len(missing)} tensors missing, "
                              f"first: {missing[0]!r}")
    unknown = [n for n in reader._src if n not in shapes] + [n.removesuffix(".weight") + ".scale"
                                                             for n in reader._scale if n not in reader._src]
    if unknown:
        raise CheckpointError(f"{reader.where(unknown[0])}: not a tensor of this config ({len(unknown)} unknown)")
    dtypes: Counter = Counter()
    nbytes: Counter = Counter()
    for f in sorted(set(reader.stored.values())):
        with safe_open(f, "pt") as h:
            for k in h.keys():
                sl = h.get_slice(k)
                dtypes[sl.get_dtype()] += 1
                nbytes[sl.get_dtype()] += math.prod(sl.get_shape()) * (
                    {"F32": 4, "I64": 8, "I32": 4, "F16": 2, "BF16": 2}.get(sl.get_dtype(), 1))
    if verify:
        for name in tqdm(shapes, desc="verify", unit="tensor", disable=not progress):
            reader.get(name)
    rows = [f"checkpoint {reader.path} ({reader.format} layout, {len(set(reader.stored.values()))} shard(s))",
            f"model: {reader.cfg.name} ({reader.cfg.num_hidden_layers} layers, hidden {reader.cfg.hidden_size}, "
            f"{reader.cfg.n_routed_experts} experts top-{reader.cfg.num_experts_per_tok})", "",
            f"{'dtype':<10} {'tensors':>8} {'MiB':>10}"]
    rows += [f"{d:<10} {dtypes[d]:>8} {nbytes[d] / 2**20:>10.2f}" for d in sorted(dtypes)]
    checks = "config.json, shard headers and sizes, every tensor present and known"
    if verify:
        checks += (f"; every tensor read ({len(shapes)}): dtypes and shapes against config.json, scales finite and "
                   ">= 0 (no UE8M0 0xFF), no FP8 NaN codes, tid2eid within [0, n_routed_experts), values finite")
    rows.append(f"\nchecks: {checks}: OK")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------------------------
# Writing (make-checkpoint)
# --------------------------------------------------------------------------------------------------------------
def iter_weights(cfg: ModelConfig, seed: int = 0):
    """Deterministic random weights with release names, one fp32 tensor at a time (param_shapes order), scaled so
    the logits are far from uniform. Streaming: a writer holds one tensor, never the model (`write_checkpoint`)."""
    g = torch.Generator().manual_seed(seed)

    def randn(shape, std):
        return torch.randn(shape, generator=g) * std

    for name, shape in param_shapes(cfg).items():
        if name.endswith("tid2eid"):  # k distinct experts per token id
            t = torch.rand(shape[0], cfg.n_routed_experts, generator=g).argsort(-1)[:, : shape[1]].contiguous()
        elif name.endswith("norm.weight"):
            t = 1.0 + randn(shape, 0.1)
        elif name.endswith(("_scale",)):
            t = 1.0 + randn(shape, 0.1)
        elif name.endswith(("_base", "attn_sink", "gate.bias", ".ape")):
            t = randn(shape, 0.5)
        elif name == "embed.weight":
            t = randn(shape, 1.0)
        elif name == "head.weight":
            t = randn(shape, 3.0 / math.sqrt(shape[1]))
        else:  # linear weights [out, in]; hc_*_fn too
            t = randn(shape, 1.0 / math.sqrt(shape[-1]))
        yield name, t


def init_weights(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """`iter_weights` as one dict (small models)."""
    return dict(iter_weights(cfg, seed))


def stored_nbytes(name: str, shape: tuple[int, ...], cfg: ModelConfig) -> int:
    """Bytes the release format stores for one tensor of this (dequantized) shape, scales included."""
    kind, n = release_dtype(name), math.prod(shape)
    qc = cfg.quantization_config or {}
    if kind == "fp8" and qc:
        bn, bk = qc.get("weight_block_size", (128, 128))
        return n + math.ceil(shape[0] / bn) * math.ceil(shape[1] / bk) * (1 if qc.get("scale_fmt", "ue8m0") == "ue8m0"
                                                                          else 4)
    if kind == "fp4" and cfg.expert_dtype == "fp4":
        return n // 2 + n // 32
    return n * {"int": 8, "fp32": 4}.get(kind, 2)


def quantize_release(name: str, t: torch.Tensor, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """One fp32 tensor -> the tensors the release stores for it (weight and maybe `.scale`)."""
    kind = release_dtype(name)
    base = name.removesuffix(".weight")
    qc = cfg.quantization_config or {}
    if kind == "fp8" and qc:
        q, s = quantize_fp8_block(t, tuple(qc.get("weight_block_size", (128, 128))), qc.get("scale_fmt", "ue8m0"), name)
        return {name: q, base + ".scale": s}
    if kind == "fp4" and cfg.expert_dtype == "fp4":
        q, s = quantize_mxfp4(t, name)
        return {name: q, base + ".scale": s}
    if kind == "int":
        return {name: t.to(torch.int64)}
    return {name: t.to(torch.bfloat16 if kind in ("bf16", "fp8", "fp4") else torch.float32).contiguous()}


def release_roundtrip(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The fp32 values a release-format save of `sd` will load back as."""
    out = {}
    for name, t in sd.items():
        stored = quantize_release(name, t, cfg)
        scale = stored.get(name.removesuffix(".weight") + ".scale")
        q = stored[name]
        if scale is None:
            out[name] = q.long() if name.endswith("tid2eid") else q.float()
        elif q.dtype == torch.float8_e4m3fn:
            out[name] = dequantize_fp8_block(q, scale, tuple(cfg.quantization_config.get("weight_block_size", (128, 128))))
        else:
            out[name] = dequantize_mxfp4(q, scale)
    return out


def write_checkpoint(out: str | Path, cfg: ModelConfig, sd, fmt: str = "release", shard_bytes: int = 8 << 20,
                     tokenizer_json: str | Path | None = None) -> Path:
    """Write `sd` (fp32, release names: a dict, or an iterable of (name, tensor) pairs in `param_shapes` order) as a
    sharded checkpoint: fmt 'release' (FP8 e4m3 + UE8M0 block scales, MXFP4 experts, bf16/fp32 elsewhere: the
    release's dtypes) or 'hf' (transformers names, fp32, the release-rounded values so both formats hold the same
    model; needs a dict).

    The release format is written streaming: the shards are planned from the shapes, and each tensor is quantized
    and dropped as it comes, so at most one fp32 tensor plus one shard of stored bytes is held (a V4-Flash-shaped
    checkpoint never exists in fp32)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "release":
        shapes = {n: tuple(t.shape) for n, t in sd.items()} if isinstance(sd, dict) else param_shapes(cfg)
        items = sd.items() if isinstance(sd, dict) else sd
        plan, size = [[]], 0  # shard -> names, in the order they come
        for name, shape in shapes.items():
            nbytes = stored_nbytes(name, shape, cfg)
            if plan[-1] and size + nbytes > shard_bytes:
                plan.append([])
                size = 0
            plan[-1].append(name)
            size += nbytes
        shard_of = {name: i for i, names in enumerate(plan) for name in names}
        fname = [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))]
        weight_map, total, cur, done = {}, 0, {}, 0
        for name, t in items:
            if shard_of.get(name) != done or name not in shapes:
                raise ValueError(f"write_checkpoint: tensor {name!r} out of order (shard plan follows the shapes)")
            stored = quantize_release(name, t, cfg)
            del t
            cur.update(stored)
            if name == plan[done][-1]:  # the shard is complete: write it and let its tensors go
                save_tensors(cur, out / fname[done], metadata={"format": "pt"})
                weight_map.update({k: fname[done] for k in cur})
                total += sum(v.numel() * v.element_size() for v in cur.values())
                cur, done = {}, done + 1
        if done != len(plan):
            raise ValueError(f"write_checkpoint: {plan[done][0]!r} and later tensors were not given")
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        if tokenizer_json is not None:
            (out / "tokenizer.json").write_bytes(Path(tokenizer_json).read_bytes())
        return out
    if fmt != "hf":
        raise ValueError(f"unknown checkpoint format {fmt!r}; use 'release' or 'hf'")
    # transformers has no MTP block (it drops `mtp.*` on load), so its format carries none
    sd = dict(sd)
    rt = release_roundtrip({k: v for k, v in sd.items() if not k.startswith("mtp.")}, cfg)
    tensors, experts = {}, {}
    for name, t in rt.items():
        m = _EXPERT.match(name)
        if m:
            experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = t
        else:
            tensors[release_to_hf(name)] = t.contiguous()
    for (prefix, w), per in experts.items():
        if w == "w2":
            continue
        stacked = lambda ww: torch.stack([experts[(prefix, ww)][e] for e in range(cfg.n_routed_experts)])  # noqa
        hf_prefix = release_to_hf(prefix + ".x").removesuffix(".x")
        tensors[hf_prefix + ".gate_up_proj"] = torch.cat([stacked("w1"), stacked("w3")], dim=1).contiguous()
        tensors[hf_prefix + ".down_proj"] = stacked("w2").contiguous()
    config = cfg.to_hf_dict()
    shards, cur, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if cur and size + nbytes > shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name], size = tensors[name], size + nbytes
    shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_tensors(shard, out / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer_json is not None:
        (out / "tokenizer.json").write_bytes(Path(tokenizer_json).read_bytes())
    return out


def make_checkpoint(out: str | Path, preset: str = "flash-tiny", seed: int = 0, fmt: str = "release",
                    override: dict | str | None = None) -> Path:
    """A deterministic random checkpoint of `preset`, with `override` (a dict or a JSON object string of config.json
    fields, e.g. `{"num_hidden_layers": 3, "n_routed_experts": 16}`) applied as `ModelConfig.override` does.
    The release format is written streaming, in shards of 8 MiB (1 GiB once the model passes 256 MiB stored)."""
    from .tokenizer import DEFAULT_PATH

    cfg = ModelConfig.preset(preset)
    if override:
        cfg = cfg.override(override)
    total = sum(stored_nbytes(n, s, cfg) for n, s in param_shapes(cfg).items())
    shard = 8 << 20 if total < 256 << 20 else 1 << 30
    weights = iter_weights(cfg, seed) if fmt == "release" else init_weights(cfg, seed)
    # the shipped tokenizer has 8192 ids: only a model with at least as many ids can use it
    tok = DEFAULT_PATH if cfg.vocab_size >= 8192 else None
    return write_checkpoint(out, cfg, weights, fmt, shard_bytes=shard, tokenizer_json=tok)
