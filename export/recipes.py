"""Recipes: which weight format every tensor of a model gets in a bundle.

A recipe maps tensor *classes* to formats (flashport.quant.formats names, plus "fp32" and "release"), with
per-layer overrides applied in order (later wins):

    {
      "name": "my-recipe",
      "extends": "int4-experts",                       # optional: start from a named recipe
      "formats": {"experts": "int4-g64", "head": "int8"},
      "overrides": [
        {"layers": ["hash", "last"], "formats": {"experts": "int8"}},   # hash-routed and last layer higher
        {"layers": ["0-1"], "formats": {"attention": "bf16"}},
        {"match": "layers.*.attn.wo_b.weight", "format": "int8"}        # fnmatch glob on tensor names
      ],
      "calibration": "gptq"                            # "rtn" or "gptq" (int4 / int8 experts and shared experts)
    }

Classes (from the release tensor names): experts (routed, `ffn.experts.E.w1|w2|w3`), shared_experts, attention
(`attn.wq_a|wq_b|wkv|wo_a|wo_b`), compressor (`compressor.wkv|wgate`, the attention's and the indexer's), indexer
(`indexer.wq_b|weights_proj`), gate (the router matrix), mtp_proj (the MTP block's `e_proj|h_proj`), embed, head.
Everything else (norms, hyper-connection mixes, sinks, positional biases, router bias, hash table) is class
"other" and always stays fp32 (int64 for the hash table): it is small and feeds exact-sensitive math.

Layer selectors: an int, "A-B" (inclusive), "first", "last" (of the main stack), "hash" (hash-routed layers),
"swa" / "csa" / "hca" (attention kind), "mtp" (the MTP blocks), "all".

"release" resolves per tensor to what the release checkpoint stores (FP8 e4m3 128x128 blocks, MXFP4 experts,
bf16, fp32), so the `release` recipe is lossless: a bundle made with it dequantizes to exactly the checkpoint's
values. embed and gate are not Linear layers: they are loaded as fp32 parameters, so only fp32 / bf16 / release
make sense for them.

Custom recipes are small JSON or TOML files with the fields above (`load_recipe(path)`).
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint import release_dtype
from ..config import ModelConfig
from ..model import param_shapes
from ..quant.formats import FORMATS, tensor_nbytes

CLASSES = ("experts", "shared_experts", "attention", "compressor", "indexer", "gate", "mtp_proj", "embed", "head")
LINEAR_CLASSES = ("experts", "shared_experts", "attention", "compressor", "indexer", "mtp_proj", "head")
PARAM_FORMATS = ("fp32", "bf16", "release")  # embed / gate: loaded as fp32 parameters
CALIBRATION_METHODS = ("rtn", "gptq")
GPTQ_CLASSES = ("experts", "shared_experts")  # what calibration="gptq" applies to (int4 / int8 formats only)


class RecipeError(ValueError):
    """A recipe that cannot be applied; the message names the field, format or pattern."""


_CLASS_RULES = [  # (regex on the name without the "layers.N." / "mtp.N." prefix, class), first match wins
    (r"^ffn\.experts\.\d+\.w[123]\.weight$", "experts"),
    (r"^ffn\.shared_experts\.w[123]\.weight$", "shared_experts"),
    (r"^attn\.(indexer\.)?compressor\.(wkv|wgate)\.weight$", "compressor"),
    (r"^attn\.indexer\.(wq_b|weights_proj)\.weight$", "indexer"),
    (r"^attn\.(wq_a|wq_b|wkv|wo_a|wo_b)\.weight$", "attention"),
    (r"^ffn\.gate\.weight$", "gate"),
    (r"^[eh]_proj\.weight$", "mtp_proj"),
]
_LAYER = re.compile(r"^(layers|mtp)\.(\d+)\.(.*)$")


def tensor_class(name: str, cfg: ModelConfig) -> tuple[str, int | None]:
    """Release tensor name -> (class, layer index). MTP block j has layer index num_hidden_layers + j."""
    m = _LAYER.match(name)
    if m is None:
        return {"embed.weight": "embed", "head.weight": "head"}.get(name, "other"), None
    layer = int(m.group(2)) + (cfg.num_hidden_layers if m.group(1) == "mtp" else 0)
    for pat, cls in _CLASS_RULES:
        if re.match(pat, m.group(3)):
            return cls, layer
    return "other", layer


def release_format(name: str, cfg: ModelConfig) -> str:
    """The format the release checkpoint stores `name` in (what "release" resolves to)."""
    kind = release_dtype(name)
    qc = cfg.quantization_config or {}
    if kind == "fp8" and qc:
        if list(qc.get("weight_block_size", (128, 128))) != [128, 128]:
            raise RecipeError(f"{name}: release FP8 block size {qc['weight_block_size']} has no bundle format "
                              "(only 128x128)")
        return "fp8-e4m3-block128" + ("-ue8m0" if qc.get("scale_fmt") == "ue8m0" else "")
    if kind == "fp4" and cfg.expert_dtype == "fp4":
        return "mxfp4"
    if kind == "int":
        return "int64"
    return "fp32" if kind == "fp32" else "bf16"


def _check_format(fmt: str, cls: str, where: str) -> None:
    if cls not in CLASSES:
        raise RecipeError(f"{where}: unknown tensor class {cls!r}; classes: {', '.join(CLASSES)}")
    allowed = PARAM_FORMATS if cls not in LINEAR_CLASSES else ("fp32", "release", *FORMATS)
    if fmt not in allowed:
        known = ", ".join(allowed)
        what = "unknown weight format" if fmt not in ("fp32", "release", *FORMATS) else \
            f"format not usable for {cls} (loaded as an fp32 parameter)"
        raise RecipeError(f"{where}: {what} {fmt!r} for {cls}; allowed: {known}")


@dataclass
class Override:
    layers: list | None = None           # selectors (see module docstring); with `formats`
    formats: dict[str, str] = field(default_factory=dict)
    match: str | None = None             # glob on tensor names; with `format`
    format: str | None = None

    def layer_set(self, cfg: ModelConfig) -> set[int]:
        n = cfg.num_hidden_layers
        out: set[int] = set()
        for sel in self.layers or []:
            s = str(sel).strip()
            if re.fullmatch(r"\d+", s):
                out.add(int(s))
            elif m := re.fullmatch(r"(\d+)-(\d+)", s):
                out.update(range(int(m.group(1)), int(m.group(2)) + 1))
            elif s == "all":
                out.update(range(n + cfg.num_nextn_predict_layers))
            elif s == "first":
                out.add(0)
            elif s == "last":
                out.add(n - 1)
            elif s == "hash":
                out.update(i for i in range(n) if cfg.is_hash_layer(i))
            elif s == "mtp":
                out.update(range(n, n + cfg.num_nextn_predict_layers))
            elif s in ("swa", "csa", "hca"):
                out.update(i for i in range(n) if cfg.layer_kind(i) == s)
            else:
                raise RecipeError(f"override layers: unknown selector {sel!r}; use an index, 'A-B', first, last, "
                                  "hash, swa, csa, hca, mtp or all")
        return out


@dataclass
class Recipe:
    name: str
    formats: dict[str, str]
    overrides: list[Override] = field(default_factory=list)
    calibration: str = "rtn"
    description: str = ""

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        where = f"recipe {self.name!r}"
        missing = [c for c in CLASSES if c not in self.formats]
        if missing:
            raise RecipeError(f"{where}: no format for {', '.join(missing)}")
        for cls, fmt in self.formats.items():
            _check_format(fmt, cls, f"{where} formats")
        for i, ov in enumerate(self.overrides):
            w = f"{where} override {i}"
            if (ov.layers is None) == (ov.match is None):
                raise RecipeError(f"{w}: give either 'layers' with 'formats' or 'match' with 'format'")
            if ov.match is not None and not ov.format:
                raise RecipeError(f"{w}: 'match' needs a 'format'")
            if ov.layers is not None and not ov.formats:
                raise RecipeError(f"{w}: 'layers' needs 'formats' (class -> format)")
            for cls, fmt in ov.formats.items():
                _check_format(fmt, cls, w)
        if self.calibration not in CALIBRATION_METHODS:
            raise RecipeError(f"{where}: unknown calibration {self.calibration!r}; known: "
                              f"{', '.join(CALIBRATION_METHODS)}")

    # -- applying ----------------------------------------------------------------------------------------------
    def assign(self, cfg: ModelConfig, names: list[str] | None = None) -> dict[str, str]:
        """Tensor name -> concrete format ("release" resolved, class "other" fixed) for every tensor of `cfg`
        (or of `names`). Raises RecipeError for a `match` pattern that names no tensor."""
        names = list(param_shapes(cfg)) if names is None else names
        layer_sets = [ov.layer_set(cfg) if ov.layers is not None else None for ov in self.overrides]
        used = [False] * len(self.overrides)
        out = {}
        for name in names:
            cls, layer = tensor_class(name, cfg)
            if cls == "other":
                out[name] = "int64" if release_dtype(name) == "int" else "fp32"
                continue
            fmt = self.formats[cls]
            for i, ov in enumerate(self.overrides):
                if ov.match is not None and fnmatch.fnmatchcase(name, ov.match):
                    _check_format(ov.format, cls, f"recipe {self.name!r} override {i} ({name})")
                    fmt, used[i] = ov.format, True
                elif layer is not None and layer_sets[i] and layer in layer_sets[i] and cls in ov.formats:
                    fmt, used[i] = ov.formats[cls], True
            out[name] = release_format(name, cfg) if fmt == "release" else fmt
        for i, ov in enumerate(self.overrides):
            if ov.match is not None and not used[i]:
                raise RecipeError(f"recipe {self.name!r} override {i}: pattern {ov.match!r} matches no tensor of "
                                  f"{cfg.name}")
        return out

    def calibrated(self, name: str, fmt: str, cfg: ModelConfig) -> bool:
        """Whether the export rounds `name` with GPTQ (needs calibration data) rather than round-to-nearest."""
        return (self.calibration == "gptq" and tensor_class(name, cfg)[0] in GPTQ_CLASSES
                and fmt in FORMATS and FORMATS[fmt].kind in ("int4", "int8"))

    # -- (de)serialisation -------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        ovs = []
        for ov in self.overrides:
            ovs.append({"layers": ov.layers, "formats": ov.formats} if ov.match is None
                       else {"match": ov.match, "format": ov.format})
        return {"name": self.name, "description": self.description, "formats": dict(self.formats),
                "overrides": ovs, "calibration": self.calibration}

    @classmethod
    def from_dict(cls, d: dict, where: str = "recipe") -> "Recipe":
        if not isinstance(d, dict):
            raise RecipeError(f"{where}: a recipe is a mapping, got {type(d).__name__}")
        unknown = set(d) - {"name", "description", "extends", "formats", "overrides", "calibration"}
        if unknown:
            raise RecipeError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        base = get_recipe(d["extends"]).to_dict() if "extends" in d else {"formats": {}, "overrides": []}
        formats = {**base["formats"], **(d.get("formats") or {})}
        overrides = []
        for i, o in enumerate(list(base["overrides"]) + list(d.get("overrides") or [])):
            if not isinstance(o, dict) or set(o) - {"layers", "formats", "match", "format"}:
                raise RecipeError(f"{where}: override {i} must be a mapping with layers+formats or match+format")
            layers = o.get("layers")
            if layers is not None and not isinstance(layers, list):
                layers = [layers]
            overrides.append(Override(layers, dict(o.get("formats") or {}), o.get("match"), o.get("format")))
        return cls(str(d.get("name", where)), formats, overrides, d.get("calibration", base.get("calibration", "rtn")),
                   d.get("description", ""))


# -------------------------------------------------------------------------------------------------------------
# Named recipes
# -------------------------------------------------------------------------------------------------------------
_SMALL = {"compressor": "bf16", "indexer": "bf16", "gate": "fp32", "embed": "bf16"}  # small, precision-sensitive

NAMED: dict[str, dict] = {
    "release": dict(
        description="the release's own formats (FP8 e4m3 128x128 blocks, MXFP4 experts, bf16): lossless",
        formats={c: "release" for c in CLASSES}),
    "int4-experts": dict(
        description="routed experts int4 (group 32, MatMulNBits layout), shared experts int8, attention FP8 per "
                    "channel, embed/head bf16",
        formats={**_SMALL, "experts": "int4-g32", "shared_experts": "int8", "attention": "fp8-e4m3-channel",
                 "mtp_proj": "fp8-e4m3-channel", "head": "bf16"}),
    "int8": dict(
        description="every projection int8 per output channel (W8A16), embed bf16",
        formats={**_SMALL, "experts": "int8", "shared_experts": "int8", "attention": "int8", "indexer": "int8",
                 "mtp_proj": "int8", "head": "int8"}),
    "w8a8-npu": dict(
        description="int8 weights with dynamic per-token int8 activations on every large projection (NPU style); "
                    "compressor, embed and head bf16",
        formats={**_SMALL, "experts": "w8a8", "shared_experts": "w8a8", "attention": "w8a8", "indexer": "w8a8",
                 "mtp_proj": "w8a8", "head": "bf16"}),
    "mixed-edge": dict(
        description="smallest: routed experts int4 group 64 asymmetric with GPTQ, int8 elsewhere; the hash-routed "
                    "and last layers keep int4 group 32 experts and bf16 attention",
        formats={**_SMALL, "experts": "int4-g64-asym", "shared_experts": "int8", "attention": "int8",
                 "indexer": "int8", "mtp_proj": "int8", "head": "int8"},
        overrides=[{"layers": ["hash", "last"], "formats": {"experts": "int4-g32", "attention": "bf16"}}],
        calibration="gptq"),
}


def recipe_names() -> list[str]:
    return list(NAMED)


def get_recipe(name: str) -> Recipe:
    if name not in NAMED:
        raise RecipeError(f"unknown recipe {name!r}; named recipes: {', '.join(NAMED)} (or a .json/.toml file)")
    return Recipe.from_dict({"name": name, **copy.deepcopy(NAMED[name])}, where=f"recipe {name!r}")


def load_recipe(spec: str | Path | dict | Recipe) -> Recipe:
    """A Recipe from a named recipe, a JSON/TOML file path, a dict or a Recipe."""
    if isinstance(spec, Recipe):
        return spec
    if isinstance(spec, dict):
        return Recipe.from_dict(spec)
    path = Path(str(spec))
    if str(spec) in NAMED or not path.suffix:
        return get_recipe(str(spec))
    if not path.exists():
        raise RecipeError(f"recipe file {path} does not exist; named recipes: {', '.join(NAMED)}")
    text = path.read_text()
    try:
        d = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise RecipeError(f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'} ({e})") from None
    d.setdefault("name", path.stem)
    return Recipe.from_dict(d, where=str(path))


def format_nbytes(fmt: str, shape: tuple[int, ...]) -> int:
    """Stored bytes of one tensor of `shape` in `fmt` (scales and padding included): quant's tensor_nbytes."""
    try:
        return tensor_nbytes(fmt, shape)
    except ValueError as e:
        raise RecipeError(str(e)) from None
