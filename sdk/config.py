"""Model configuration: reads the release `config.json`, transformers' `DeepseekV4Config` names, and presets.

One dataclass holds every shape the model, the planner and the KV layout need. `from_dict` accepts
both spellings of the fields (the release's `compress_ratios` / `num_hash_layers` / `qk_rope_head_dim`
and transformers' `layer_types` / `mlp_layer_types` / `partial_rotary_factor`), so a directory of
either format opens the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

_RATIO_TO_LAYER_TYPE = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}


class ConfigError(ValueError):
    """A config file or preset that flashport cannot use; the message names the field."""


@dataclass
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 4096
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    head_dim: int = 512
    qk_rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    # MoE
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 2048
    num_hash_layers: int = 3
    routed_scaling_factor: float = 1.5
    scoring_func: str = "sqrtsoftplus"
    swiglu_limit: float = 10.0
    # attention kinds: one entry per layer, 0 = sliding only, csa_rate = CSA, hca_rate = HCA
    compress_ratios: list[int] = field(default_factory=list)
    csa_rate: int = 4
    hca_rate: int = 128
    sliding_window: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    # RoPE: plain theta on sliding-only layers, YaRN on compressed ones
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: dict = field(
        default_factory=lambda: {
            "type": "yarn", "factor": 16, "original_max_position_embeddings": 65536, "beta_fast": 32, "beta_slow": 1,
        }
    )
    max_position_embeddings: int = 1048576
    # manifold-constrained hyper-connections
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 1
    mtp_compress_ratio: int = 0  # attention kind of the MTP block (the release lists it after the main layers)
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    # release precision: FP8 e4m3 128x128 blocks for linears, MXFP4 experts
    quantization_config: dict | None = field(
        default_factory=lambda: {
            "quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "scale_fmt": "ue8m0",
            "activation_scheme": "dynamic",
        }
    )
    expert_dtype: str = "fp4"
    name: str = "custom"

    def __post_init__(self):
        for f in dataclasses.fields(self):  # JSON and transformers' strict config tell 1 from 1.0: keep floats floats
            if f.type == "float" and isinstance(getattr(self, f.name), int):
                setattr(self, f.name, float(getattr(self, f.name)))
        if not self.compress_ratios:
            # V4-Flash layout: two sliding-only layers, then CSA and HCA alternate
            self.compress_ratios = [0, 0] + [self.csa_rate if i % 2 == 0 else self.hca_rate
                                             for i in range(self.num_hidden_layers - 2)]
        if len(self.compress_ratios) > self.num_hidden_layers and self.num_nextn_predict_layers:
            self.mtp_compress_ratio = int(self.compress_ratios[self.num_hidden_layers])
        self.compress_ratios = [int(r) for r in self.compress_ratios[: self.num_hidden_layers]]
        self.validate()

    # -- derived shapes --------------------------------------------------------------------------
    @property
    def kv_block_tokens(self) -> int:
        """Source tokens per compressed-KV block: lcm of the compression rates (128 on V4-Flash)."""
        rates = [r for r in set(self.compress_ratios) if r] or [1]
        return math.lcm(*rates)

    def layer_kind(self, i: int) -> str:
        """'swa', 'csa' or 'hca'; layers past the main stack are the MTP blocks."""
        r = self.compress_ratios[i] if i < self.num_hidden_layers else self.mtp_compress_ratio
        return "swa" if r == 0 else ("csa" if r == self.csa_rate else "hca")

    def is_hash_layer(self, i: int) -> bool:
        return i < self.num_hash_layers

    @property
    def group_in_features(self) -> int:
        return self.num_attention_heads * self.head_dim // self.o_groups

    def validate(self):
        def need(cond, msg):
            if not cond:
                raise ConfigError(f"config ({self.name}): {msg}")

        for f in dataclasses.fields(self):  # a config.json value of the wrong type ("hidden_size": "abc"), named
            v, kinds = getattr(self, f.name), {"int": int, "float": (int, float)}.get(f.type)
            if kinds is not None and (isinstance(v, bool) or not isinstance(v, kinds)):
                need(False, f"{f.name} must be {'a whole number' if f.type == 'int' else 'a number'}, not {v!r}")
        need(len(self.compress_ratios) == self.num_hidden_layers,
             f"compress_ratios has {len(self.compress_ratios)} entries for {self.num_hidden_layers} layers")
        bad = sorted({r for r in self.compress_ratios if r not in (0, self.csa_rate, self.hca_rate)})
        need(not bad, f"compress_ratios holds {bad}; allowed: 0, csa_rate={self.csa_rate}, hca_rate={self.hca_rate}")
        need(self.csa_rate != self.hca_rate, "csa_rate and hca_rate must differ")
        need(0 < self.qk_rope_head_dim <= self.head_dim and self.qk_rope_head_dim % 2 == 0,
             f"qk_rope_head_dim={self.qk_rope_head_dim} must be even and at most head_dim={self.head_dim}")
        need(self.num_attention_heads * self.head_dim % self.o_groups == 0, "heads*head_dim not divisible by o_groups")
        need(0 < self.num_experts_per_tok <= self.n_routed_experts, "num_experts_per_tok must be in [1, n_routed_experts]")
        need(self.scoring_func == "sqrtsoftplus", f"scoring_func {self.scoring_func!r} unsupported (sqrtsoftplus only)")
        need(self.sliding_window >= 1, "sliding_window must be >= 1")
        need(self.index_head_dim % 2 == 0 and self.qk_rope_head_dim <= self.index_head_dim,
             "index_head_dim must be even and hold the rope dims")

    # -- (de)serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Release-style `config.json` fields (what `make-checkpoint --format release` writes), plus transformers'
        spellings of the schedule (`layer_types`, `compress_rates`, `mlp_layer_types`, `partial_rotary_factor`), so
        transformers and `from_dict` read the same model from it."""
        d = dataclasses.asdict(self)
        hf = self.to_hf_dict()
        d.update(model_type="deepseek_v4", architectures=["DeepseekV4ForCausalLM"], num_key_value_heads=1,
                 **{k: hf[k] for k in ("layer_types", "compress_rates", "mlp_layer_types", "partial_rotary_factor")})
        return d

    def to_hf_dict(self) -> dict:
        """transformers' `DeepseekV4Config` fields (what `--format hf` writes)."""
        kinds = {0: "sliding_attention", self.csa_rate: "compressed_sparse_attention",
                 self.hca_rate: "heavily_compressed_attention"}
        skip = {"compress_ratios", "csa_rate", "hca_rate", "num_hash_layers", "qk_rope_head_dim", "quantization_config",
                "expert_dtype", "name", "rope_scaling"}
        d = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        d.update(
            model_type="deepseek_v4", architectures=["DeepseekV4ForCausalLM"], num_key_value_heads=1,
            layer_types=[kinds[r] for r in self.compress_ratios],
            mlp_layer_types=["hash_moe" if self.is_hash_layer(i) else "moe" for i in range(self.num_hidden_layers)],
            compress_rates={"compressed_sparse_attention": self.csa_rate, "heavily_compressed_attention": self.hca_rate},
            partial_rotary_factor=self.qk_rope_head_dim / self.head_dim,
            rope_parameters={**{k: v for k, v in self.rope_scaling.items() if k != "type"},
                             "rope_type": self.rope_scaling.get("type", "default")} if self.rope_scaling else None,
            tie_word_embeddings=False, torch_dtype="float32",
        )
        return d

    @classmethod
    def from_dict(cls, d: dict, name: str = "custom", source: str = "config") -> "ModelConfig":
        """A config.json's fields -> ModelConfig, with transformers' `DeepseekV4Config` semantics.

        Every field transformers knows means here what it means there when absent, null or set (its defaults are
        the V4 code's, not V4-Flash's dataclass defaults above: e.g. no `rope_scaling` means no YaRN, no
        `layer_types` means transformers' HCA-first schedule), or is refused with a ConfigError naming the field
        and `source`: a wrong type or a null where transformers refuses one, and values flashport's model cannot
        honour (another activation, scoring function or RoPE type, biased MLPs, tied embeddings). Fields with no
        effect on inference in transformers (dropout, init range, aux-loss knobs, `num_key_value_heads`,
        `norm_topk_prob`) are type-checked and ignored, as there. See `parse_config`.
        """
        return parse_config(d, name=name, source=source)

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"no config.json at {path}")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: not a JSON object")
        return cls.from_dict(d, name=path.parent.name, source=str(path))

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return cls(**PRESETS[name], name=name)

    def override(self, changes: dict | str, source: str = "override") -> "ModelConfig":
        """This config with some config.json fields replaced (a dict or a JSON object string), read with
        transformers' semantics like a config.json (`from_dict`). A field given in one spelling replaces the
        config's other spellings of it: `compress_ratios` the schedule (`layer_types`, `compress_rates`),
        `num_hash_layers` `mlp_layer_types`, `qk_rope_head_dim` `partial_rotary_factor`, `rope_scaling`
        `rope_parameters`, and the reverse. Raises ConfigError for a field neither transformers nor flashport
        reads (naming the closest known one)."""
        if isinstance(changes, str):
            try:
                changes = json.loads(changes)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{source}: not valid JSON ({e})") from None
        if not isinstance(changes, dict):
            raise ConfigError(f"{source}: expected a JSON object of config.json fields, got {changes!r:.80}")
        d = self.to_dict()
        # a config.json may carry fields nobody reads (transformers keeps them); an override is typed by a person,
        # so a field that neither transformers nor flashport reads is a typo, not a no-op
        known = sorted(set(d) | set(HF_FIELDS) | set(_LEGACY))
        for k in changes:
            if k not in known:
                close = difflib.get_close_matches(str(k), known, n=1)
                raise ConfigError(f"{source}: unknown config.json field {k!r}"
                                  + (f"; did you mean {close[0]!r}?" if close else ""))
        # flashport's own names for the two rates (to_dict writes them; config.json has only compress_rates):
        # fold them into compress_rates so that they take effect (parse_config reads compress_rates)
        own_rates = {"csa_rate": _CSA, "hca_rate": _HCA}
        if own_rates.keys() & changes.keys():
            changes = dict(changes)
            rates = dict(changes.get("compress_rates") or d.get("compress_rates") or {})
            for k, kind in own_rates.items():
                if k in changes:
                    v = changes.pop(k)
                    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                        raise ConfigError(f"{source}: field {k!r}: must be a positive int, got {v!r}"[:200])
                    rates[kind] = v
            changes["compress_rates"] = rates
        spellings = [({"compress_ratios"}, {"layer_types", "compress_rates", "csa_rate", "hca_rate",
                                            "mtp_compress_ratio"}),
                     ({"num_hash_layers"}, {"mlp_layer_types"}), ({"qk_rope_head_dim"}, {"partial_rotary_factor"}),
                     ({"rope_scaling"}, {"rope_parameters"})]
        for a, b in spellings:
            for given, other in ((a, b), (b, a)):
                if given & changes.keys():
                    for k in other - changes.keys():
                        d.pop(k, None)
        return ModelConfig.from_dict({**d, **changes}, name=self.name, source=source)


# Small presets keep every feature of V4-Flash (sliding-only, CSA and HCA layers, hash routing, mHC, shared
# expert, sinks, grouped output projection, YaRN) at sizes where several CSA and HCA windows are reachable within
# a few hundred tokens and the indexer must drop entries (index_topk below the number of CSA entries).
# Linear dims are <= 128 or multiples of 128 so the FP8 128x128 block grid divides them exactly. Many indexer heads
# keep exact ties (every head's ReLU at 0) rare in random weights: a tie at the top-k boundary makes the
# selection depend on the sort algorithm, which no two implementations share.
PRESETS: dict[str, dict] = {
    "v4-flash": dict(),
    "flash-tiny": dict(
        vocab_size=8192, hidden_size=128, num_hidden_layers=6, num_attention_heads=4, head_dim=64, qk_rope_head_dim=16,
        q_lora_rank=64, o_groups=2, o_lora_rank=64, n_routed_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=64, num_hash_layers=3, csa_rate=4, hca_rate=32, sliding_window=32, index_n_heads=32,
        index_head_dim=32, index_topk=16,
    ),
    # the shipped trained model (samples/train_tiny.py): flash-mini's layout at a size whose release-format
    # checkpoint fits in 25 MB
    "flash-small": dict(
        vocab_size=8192, hidden_size=256, num_hidden_layers=8, num_attention_heads=4, head_dim=64, qk_rope_head_dim=16,
        q_lora_rank=128, o_groups=2, o_lora_rank=128, n_routed_experts=16, num_experts_per_tok=4,
        moe_intermediate_size=128, num_hash_layers=3, csa_rate=4, hca_rate=32, sliding_window=64, index_n_heads=16,
        index_head_dim=32, index_topk=32,
    ),
    "flash-mini": dict(
        vocab_size=8192, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, head_dim=128,
        qk_rope_head_dim=32, q_lora_rank=256, o_groups=4, o_lora_rank=256, n_routed_experts=32, num_experts_per_tok=4,
        moe_intermediate_size=128, num_hash_layers=3, csa_rate=4, hca_rate=64, sliding_window=64, index_n_heads=32,
        index_head_dim=64, index_topk=64,
    ),
}


# ---------------------------------------------------------------------------------------------------------------
# config.json -> ModelConfig with transformers' DeepseekV4Config semantics
# ---------------------------------------------------------------------------------------------------------------
_INT, _FLOAT, _NUM, _STR, _BOOL = (int,), (float,), (float, int), (str,), (bool,)
# transformers' DeepseekV4Config dataclass fields (a @strict dataclass: ints must be ints, floats must be floats,
# null only where the annotation allows it) -> (accepted JSON types, nullable)
HF_FIELDS: dict[str, tuple[tuple, bool]] = {
    "vocab_size": (_INT, False), "hidden_size": (_INT, False), "moe_intermediate_size": (_INT, False),
    "num_hidden_layers": (_INT, False), "num_attention_heads": (_INT, False), "num_key_value_heads": (_INT, False),
    "head_dim": (_INT, False), "q_lora_rank": (_INT, False), "num_experts_per_tok": (_INT, False),
    "n_routed_experts": (_INT, False), "n_shared_experts": (_INT, False), "scoring_func": (_STR, False),
    "norm_topk_prob": (_BOOL, False), "routed_scaling_factor": (_FLOAT, False),
    "max_position_embeddings": (_INT, False), "rope_theta": (_NUM, False), "layer_types": ((list,), True),
    "compress_rates": ((dict,), True), "compress_rope_theta": (_NUM, False), "hc_mult": (_INT, False),
    "hc_sinkhorn_iters": (_INT, False), "hc_eps": (_FLOAT, False), "mlp_layer_types": ((list,), True),
    "swiglu_limit": (_FLOAT, False), "sliding_window": (_INT, False), "o_groups": (_INT, False),
    "o_lora_rank": (_INT, False), "index_n_heads": (_INT, False), "index_head_dim": (_INT, False),
    "index_topk": (_INT, False), "num_nextn_predict_layers": (_INT, False), "output_router_logits": (_BOOL, False),
    "router_aux_loss_coef": (_FLOAT, False), "router_jitter_noise": (_FLOAT, False), "hidden_act": (_STR, False),
    "initializer_range": (_FLOAT, False), "rms_norm_eps": (_FLOAT, False), "use_cache": (_BOOL, False),
    "pad_token_id": (_INT, True), "bos_token_id": (_INT, True), "eos_token_id": ((int, list), True),
    "tie_word_embeddings": (_BOOL, False), "rope_parameters": ((dict,), True), "partial_rotary_factor": (_FLOAT, True),
    "attention_bias": (_BOOL, False), "mlp_bias": (_BOOL, False), "attention_dropout": (_FLOAT, False),
}
# the V4 code's defaults (transformers' DeepseekV4Config), which an absent field takes
HF_DEFAULTS: dict = {
    "vocab_size": 129280, "hidden_size": 4096, "moe_intermediate_size": 2048, "num_hidden_layers": 43,
    "num_attention_heads": 64, "head_dim": 512, "q_lora_rank": 1024, "num_experts_per_tok": 6, "n_routed_experts": 256,
    "n_shared_experts": 1, "scoring_func": "sqrtsoftplus", "routed_scaling_factor": 1.5,
    "max_position_embeddings": 1048576, "rope_theta": 10000.0, "compress_rope_theta": 160000.0, "hc_mult": 4,
    "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "swiglu_limit": 10.0, "sliding_window": 128, "o_groups": 8,
    "o_lora_rank": 1024, "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512, "num_nextn_predict_layers": 1,
    "hidden_act": "silu", "rms_norm_eps": 1e-6, "bos_token_id": 0, "eos_token_id": 1, "tie_word_embeddings": False,
    "mlp_bias": False,
}
# values the model here is built for; another value of these fields is refused (transformers would honour it)
_ONLY = {"scoring_func": "sqrtsoftplus", "hidden_act": "silu", "mlp_bias": False, "tie_word_embeddings": False,
         "n_shared_experts": 1}
# legacy (release / V3-style) spellings transformers folds in, with their types
_NONE = type(None)  # transformers treats a null legacy field as an absent one
_LEGACY = {"compress_ratios": (list, _NONE), "compress_rate_csa": (int, _NONE), "compress_rate_hca": (int, _NONE),
           "num_hash_layers": (int, _NONE), "qk_rope_head_dim": (int, _NONE), "rope_scaling": (dict, _NONE)}
_CSA, _HCA = "compressed_sparse_attention", "heavily_compressed_attention"
_LEGACY_RATIO = {0: "sliding_attention", 4: _CSA, 128: _HCA}  # transformers' map for `compress_ratios`


def parse_config(d: dict, name: str = "custom", source: str = "config") -> ModelConfig:
    """See `ModelConfig.from_dict`. Follows transformers 5.x `DeepseekV4Config.__post_init__` and its RoPE
    standardisation (`convert_rope_params_to_dict`, `_compute_yarn_parameters`) step by step."""

    def bad(field_: str, msg: str):
        raise ConfigError(f"{source}: field {field_!r}: {msg}")

    def typed(key: str, types: tuple, nullable: bool):
        v = d[key]
        if v is None:
            if not nullable:
                bad(key, "is null; transformers requires a value (omit the field for its default)")
            return None
        ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in types)
        if not ok:
            want = " or ".join(t.__name__ for t in types)
            bad(key, f"must be {want}, got {type(v).__name__} {v!r}"[:200])
        return v

    for key, (types, nullable) in HF_FIELDS.items():
        if key in d:
            typed(key, types, nullable)
    for key, types in _LEGACY.items():
        if key in d and not isinstance(d[key], types) or key in d and isinstance(d[key], bool):
            want = " or ".join(t.__name__ for t in types if t is not _NONE)
            bad(key, f"must be {want}, got {type(d[key]).__name__} {d[key]!r}"[:200])

    def get(key: str):
        return d[key] if d.get(key) is not None else HF_DEFAULTS.get(key)

    for key, want in _ONLY.items():
        if get(key) != want:
            bad(key, f"{get(key)!r} is not supported (flashport implements {want!r} only)")
    kw: dict = {k: get(k) for k in (
        "vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads", "head_dim",
        "q_lora_rank", "num_experts_per_tok", "n_routed_experts", "n_shared_experts", "scoring_func",
        "routed_scaling_factor", "max_position_embeddings", "hc_mult", "hc_sinkhorn_iters", "hc_eps", "swiglu_limit",
        "sliding_window", "o_groups", "o_lora_rank", "index_n_heads", "index_head_dim", "index_topk",
        "num_nextn_predict_layers", "rms_norm_eps")}
    n = kw["num_hidden_layers"]
    kw["name"] = d.get("name") if isinstance(d.get("name"), str) else name
    kw["bos_token_id"] = d["bos_token_id"] if "bos_token_id" in d else HF_DEFAULTS["bos_token_id"]
    eos = d["eos_token_id"] if "eos_token_id" in d else HF_DEFAULTS["eos_token_id"]
    if isinstance(eos, list):
        if not eos or not all(isinstance(e, int) and not isinstance(e, bool) for e in eos):
            bad("eos_token_id", f"must be an int or a non-empty list of ints, got {eos!r}")
        eos = eos[0]
    kw["eos_token_id"] = eos

    # compression rates per attention kind: compress_rates (null -> V4's 4 / 128), legacy scalars fold in
    rates = dict(d["compress_rates"]) if d.get("compress_rates") is not None else {_CSA: 4, _HCA: 128}
    for legacy, kind in (("compress_rate_csa", _CSA), ("compress_rate_hca", _HCA)):
        if d.get(legacy) is not None:
            rates[kind] = d[legacy]
    for kind in (_CSA, _HCA):
        r = rates.get(kind)
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            bad("compress_rates", f"needs a positive int for {kind!r}, got {r!r}")
    kw["csa_rate"], kw["hca_rate"] = rates[_CSA], rates[_HCA]

    # attention schedule: layer_types > legacy compress_ratios (0/4/128 only) > V4's default (2 HCA, then HCA/CSA)
    legacy_ratios = d.get("compress_ratios")
    types = d.get("layer_types")
    if types is None and legacy_ratios is not None:
        unknown = sorted({r for r in legacy_ratios if r not in _LEGACY_RATIO}, key=str)
        if unknown:
            bad("compress_ratios", f"holds {unknown}; transformers maps only 0, 4 and 128 (give layer_types and "
                                   "compress_rates for other rates)")
        types = [_LEGACY_RATIO[r] for r in legacy_ratios]
    if types is None:
        types = [_HCA] * min(n, 2) + [_CSA if i % 2 else _HCA for i in range(max(n - 2, 0))]
    types = list(types[:n])
    rate_of = {"sliding_attention": 0, _CSA: kw["csa_rate"], _HCA: kw["hca_rate"]}
    if len(types) != n or any(t not in rate_of for t in types):
        bad("layer_types" if d.get("layer_types") is not None else "compress_ratios",
            f"needs {n} entries from {sorted(rate_of)} (num_hidden_layers={n}), got {types!r}"[:300])
    kw["compress_ratios"] = [rate_of[t] for t in types]
    # flashport's MTP block: the release lists its kind after the main layers (transformers has no MTP)
    mtp = legacy_ratios[n] if legacy_ratios is not None and len(legacy_ratios) > n else d.get("mtp_compress_ratio", 0)
    kw["mtp_compress_ratio"] = {0: 0, 4: kw["csa_rate"], 128: kw["hca_rate"]}.get(mtp, mtp)

    # MoE schedule: mlp_layer_types > legacy num_hash_layers > 3 hash layers
    mlp = d.get("mlp_layer_types")
    if mlp is None:
        n_hash = d["num_hash_layers"] if d.get("num_hash_layers") is not None else 3
        mlp = ["hash_moe"] * min(n, n_hash) + ["moe"] * max(0, n - n_hash)
    mlp = list(mlp[:n])
    n_hash = sum(t == "hash_moe" for t in mlp)
    if len(mlp) != n or any(t not in ("hash_moe", "moe") for t in mlp) or mlp[:n_hash] != ["hash_moe"] * n_hash:
        bad("mlp_layer_types", f"needs {n} entries, 'hash_moe' first then 'moe' (the only schedule flashport "
                               f"runs), got {mlp!r}"[:300])
    kw["num_hash_layers"] = n_hash

    # RoPE. partial_rotary_factor: explicit > legacy qk_rope_head_dim / head_dim > 64/512
    prf_given = d.get("partial_rotary_factor")
    if prf_given is not None:
        prf = prf_given
    elif d.get("qk_rope_head_dim") is not None:
        prf = d["qk_rope_head_dim"] / kw["head_dim"]
    else:
        prf = 64 / 512
    rope_theta = get("rope_theta")
    rp = d.get("rope_scaling") or d.get("rope_parameters") or {}
    rp_field = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
    nested = isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict)
    if not nested and ("main" in rp or "compress" in rp):
        bad(rp_field, "give both 'main' and 'compress' as objects, or neither")
    if nested:  # per rope kind; missing keys default to the top-level rope_theta and partial_rotary_factor (or 1)
        main, comp = dict(rp["main"]), dict(rp["compress"])
        for sub in (main, comp):
            sub.setdefault("rope_theta", rope_theta)
            sub.setdefault("partial_rotary_factor", prf_given if prf_given is not None else 1.0)
    else:
        main = {"rope_type": "default", "rope_theta": rope_theta, "partial_rotary_factor": prf}
        comp = {**{k: v for k, v in rp.items() if k not in ("rope_theta", "partial_rotary_factor")},
                "rope_theta": get("compress_rope_theta"), "partial_rotary_factor": prf}
        comp.setdefault("rope_type", comp.get("type", "default"))
        if comp["rope_type"] == "yarn":
            comp.setdefault("attention_factor", 1.0)
    dims = []
    for label, sub in (("main", main), ("compress", comp)):
        kind = sub.get("rope_type", sub.get("type", "default"))
        if kind not in ("default", "yarn") or (label == "main" and kind != "default"):
            bad(rp_field, f"{label} RoPE type {kind!r} is not supported (main: default; compress: default or yarn)")
        if not isinstance(sub["rope_theta"], (int, float)) or isinstance(sub["rope_theta"], bool):
            bad(rp_field, f"{label} rope_theta must be a number, got {sub['rope_theta']!r}")
        dims.append(int(kw["head_dim"] * sub["partial_rotary_factor"]))
    if dims[0] != dims[1]:
        bad(rp_field, f"main and compress RoPE cover {dims[0]} and {dims[1]} dims; flashport needs one rope width")
    kw["qk_rope_head_dim"], kw["rope_theta"], kw["compress_rope_theta"] = dims[0], main["rope_theta"], comp["rope_theta"]
    kw["rope_scaling"] = None
    if comp.get("rope_type", comp.get("type")) == "yarn":
        if "factor" not in comp:
            bad(rp_field, "YaRN needs 'factor'")
        af = comp.get("attention_factor")
        if af is None or af != 1.0:  # unset: transformers derives an mscale (0.1 ln(factor) + 1) for nested dicts
            bad(rp_field, f"YaRN attention_factor {af!r}: only 1.0 (V4 scales neither cos nor sin) is supported")
        orig = comp.get("original_max_position_embeddings") or kw["max_position_embeddings"]
        factor = comp["factor"] if comp["factor"] is not None else kw["max_position_embeddings"] / orig
        kw["rope_scaling"] = {"type": "yarn", "factor": factor, "original_max_position_embeddings": orig,
                              "beta_fast": comp.get("beta_fast") or 32, "beta_slow": comp.get("beta_slow") or 1}

    qc = d.get("quantization_config")
    kw["quantization_config"] = qc if isinstance(qc, dict) else None
    ed = d.get("expert_dtype") or (qc.get("expert_dtype") if isinstance(qc, dict) else None)
    kw["expert_dtype"] = ed or ("fp4" if kw["quantization_config"] else "bf16")
    try:
        return ModelConfig(**kw)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
