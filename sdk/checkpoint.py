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
from .quant.release import dequantize_fp8_block, dequantize_mxfp4, quantize_fp8_block, quantize_mxfp4


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


def hf_state_to_release(get, names: list[str], cfg: ModelConfig) -> dict:
    """Map transformers' tensor names to release names. Returns release name -> (loader thunk).

    Routed experts are stored merged by transformers (`gate_up_proj` [E, 2I, D], `down_proj` [E, D, I]); each
    release expert weight becomes a slice of them.
    """
    inverse = {release_to_hf(n): n for n in param_shapes(cfg)}
    out: dict = {}
    for hf in names:
        m = re.match(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$", hf)
        if m:
            layer, kind = m.groups()
            inter = cfg.moe_intermediate_size
            for e in range(cfg.n_routed_experts):
                base = f"layers.{layer}.ffn.experts.{e}"
                if kind == "down_proj":
                    out[f"{base}.w2.weight"] = (lambda hf=hf, e=e: get(hf)[e])
                else:
                    out[f"{base}.w1.weight"] = (lambda hf=hf, e=e: get(hf)[e, :inter])
                    out[f"{base}.w3.weight"] = (lambda hf=hf, e=e: get(hf)[e, inter:])
        elif hf in inverse:
            out[inverse[hf]] = (lambda hf=hf: get(hf))
        elif not hf.endswith("rotary_emb.inv_freq"):
            out[hf] = (lambda hf=hf: get(hf))  # unknown: reported by the shape check
    return out


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
    """Lazy access to a checkpoint directory's tensors under release names, dequantized to fp32 on request."""

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
        self.files: dict[str, Path] = {k: self.path / v for k, v in weight_map.items()}
        for f in sorted(set(self.files.values())):
            check_safetensors_file(f)
        self._handles: dict[Path, object] = {}
        names = list(self.files)
        self.format = "hf" if any(n.startswith("model.") or n == "lm_head.weight" for n in names) else "release"
        if self.format == "hf":
            self._thunks = hf_state_to_release(self._raw, names, self.cfg)
        else:
            self._thunks = {n: (lambda n=n: self._raw(n)) for n in names if not n.endswith(".scale")}

    def _raw(self, name: str) -> torch.Tensor:
        f = self.files[name]
        if f not in self._handles:
            self._handles[f] = safe_open(f, "pt")
        try:
            return self._handles[f].get_tensor(name)
        except Exception as e:  # safetensors raises its own types for unknown dtypes / bad offsets
            raise CheckpointError(f"tensor {name!r} in {f}: {e}") from None

    def names(self) -> list[str]:
        return list(self._thunks)

    def raw(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A tensor as stored (release names), with its `.scale` companion if it has one."""
        if name not in self._thunks:
            raise CheckpointError(f"tensor {name!r} not found in {self.path}")
        scale_name = name.removesuffix(".weight") + ".scale"
        scale = self._raw(scale_name) if scale_name in self.files else None
        return self._thunks[name](), scale

    def get(self, name: str) -> torch.Tensor:
        """A tensor dequantized to fp32 (int tensors stay int64)."""
        t, scale = self.raw(name)
        where = f"tensor {name!r} in {self.files.get(name, self.path)}"
        if scale is not None:
            if t.dtype == torch.float8_e4m3fn:
                block = tuple((self.cfg.quantization_config or {}).get("weight_block_size", (128, 128)))
                want = (math.ceil(t.shape[0] / block[0]), math.ceil(t.shape[1] / block[1]))
                if tuple(scale.shape) != want:
                    raise CheckpointError(f"{where}: scale grid {tuple(scale.shape)} does not match {want}")
                return dequantize_fp8_block(t, scale, block)
            if t.dtype in (torch.int8, torch.uint8):
                if tuple(scale.shape) != (t.shape[0], t.shape[1] * 2 // 32):
                    raise CheckpointError(f"{where}: MXFP4 scale shape {tuple(scale.shape)} does not fit {tuple(t.shape)}")
                return dequantize_mxfp4(t, scale)
            raise CheckpointError(f"{where}: dtype {t.dtype} with a .scale is not FP8 or packed FP4")
        if t.dtype in (torch.int32, torch.int64, torch.int16, torch.uint8, torch.int8):
            return t.long()
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise CheckpointError(f"{where}: unsupported dtype {t.dtype}")
        return t.float()

    def load_state_dict(self, shapes: dict[str, tuple] | None = None) -> dict[str, torch.Tensor]:
        """Every tensor the model needs, dequantized and shape-checked against the config."""
        shapes = shapes or param_shapes(self.cfg)
        if not any(n.startswith("mtp.") for n in self._thunks):  # e.g. saved by transformers, which drops MTP
            shapes = {n: s for n, s in shapes.items() if not n.startswith("mtp.")}
        missing = [n for n in shapes if n not in self._thunks]
        if missing:
            raise CheckpointError(f"{self.path}: {len(missing)} tensors missing, first: {missing[0]!r}")
        sd = {}
        for name, shape in shapes.items():
            t = self.get(name)
            if tuple(t.shape) != tuple(shape):
                raise CheckpointError(f"tensor {name!r} in {self.files.get(name, self.path)} has shape "
                                      f"{tuple(t.shape)}, config.json implies {tuple(shape)}")
            sd[name] = t
        return sd


# --------------------------------------------------------------------------------------------------------------
# Writing (make-checkpoint)
# --------------------------------------------------------------------------------------------------------------
def init_weights(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic random weights with release names, scaled so the logits are far from uniform."""
    g = torch.Generator().manual_seed(seed)

    def randn(shape, std):
        return torch.randn(shape, generator=g) * std

    sd = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith("tid2eid"):  # k distinct experts per token id
            sd[name] = torch.rand(shape[0], cfg.n_routed_experts, generator=g).argsort(-1)[:, : shape[1]].contiguous()
        elif name.endswith("norm.weight"):
            sd[name] = 1.0 + randn(shape, 0.1)
        elif name.endswith(("_scale",)):
            sd[name] = 1.0 + randn(shape, 0.1)
        elif name.endswith(("_base", "attn_sink", "gate.bias", ".ape")):
            sd[name] = randn(shape, 0.5)
        elif name == "embed.weight":
            sd[name] = randn(shape, 1.0)
        elif name == "head.weight":
            sd[name] = randn(shape, 3.0 / math.sqrt(shape[1]))
        else:  # linear weights [out, in]; hc_*_fn too
            sd[name] = randn(shape, 1.0 / math.sqrt(shape[-1]))
    return sd


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


def write_checkpoint(out: str | Path, cfg: ModelConfig, sd: dict[str, torch.Tensor], fmt: str = "release",
                     shard_bytes: int = 8 << 20, tokenizer_json: str | Path | None = None) -> Path:
    """Write `sd` (fp32, release names) as a sharded checkpoint: fmt 'release' (FP8 + MXFP4) or 'hf'
    (transformers names, fp32, the release-rounded values so both formats hold the same model)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "release":
        tensors: dict[str, torch.Tensor] = {}
        for name, t in sd.items():
            tensors.update(quantize_release(name, t, cfg))
        config = cfg.to_dict()
    elif fmt == "hf":
        # transformers has no MTP block (it drops `mtp.*` on load), so its format carries none
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
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}; use 'release' or 'hf'")

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


def make_checkpoint(out: str | Path, preset: str = "flash-tiny", seed: int = 0, fmt: str = "release") -> Path:
    from .tokenizer import DEFAULT_PATH

    cfg = ModelConfig.preset(preset)
    return write_checkpoint(out, cfg, init_weights(cfg, seed), fmt, tokenizer_json=DEFAULT_PATH)
