"""Model configuration: reads the release `config.json`, transformers' `DeepseekV4Config` names, and presets.

One dataclass holds every shape the model, the planner and the KV layout need. `from_dict` accepts
both spellings of the fields (the release's `compress_ratios` / `num_hash_layers` / `qk_rope_head_dim`
and transformers' `layer_types` / `mlp_layer_types` / `partial_rotary_factor`), so a directory of
either format opens the same way.
"""

from __future__ import annotations

import dataclasses
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
    bos_token_id: int = 0
    eos_token_id: int = 1
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
        """Release-style `config.json` fields (what `make-checkpoint --format release` writes)."""
        d = dataclasses.asdict(self)
        d.update(model_type="deepseek_v4", architectures=["DeepseekV4ForCausalLM"], num_key_value_heads=1)
        if (self.csa_rate, self.hca_rate) != (4, 128):  # transformers maps compress_ratios through {0, 4, 128} only
            hf = self.to_hf_dict()
            d.update(layer_types=hf["layer_types"], compress_rates=hf["compress_rates"])
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
    def from_dict(cls, d: dict, name: str = "custom") -> "ModelConfig":
        d = dict(d)
        kw: dict = {"name": d.get("name", name)}
        known = {f.name for f in dataclasses.fields(cls)}
        for k, v in d.items():
            if k in known and k != "name":
                kw[k] = v
        # transformers' spellings
        if "compress_rates" in d and isinstance(d["compress_rates"], dict):
            kw["csa_rate"] = d["compress_rates"].get("compressed_sparse_attention", 4)
            kw["hca_rate"] = d["compress_rates"].get("heavily_compressed_attention", 128)
        if "compress_rate_csa" in d:
            kw["csa_rate"] = d["compress_rate_csa"]
        if "compress_rate_hca" in d:
            kw["hca_rate"] = d["compress_rate_hca"]
        if "layer_types" in d and "compress_ratios" not in d:
            rate = {"sliding_attention": 0, "compressed_sparse_attention": kw.get("csa_rate", 4),
                    "heavily_compressed_attention": kw.get("hca_rate", 128)}
            try:
                kw["compress_ratios"] = [rate[t] for t in d["layer_types"]]
            except KeyError as e:
                raise ConfigError(f"config: unknown layer type {e.args[0]!r} in layer_types") from None
        elif "compress_ratios" in d:
            # the release lists only 0/4/128 per layer; small presets may use other rates, inferred here
            ratios = [int(r) for r in d["compress_ratios"]]
            nonzero = sorted({r for r in ratios if r})
            if "csa_rate" not in d and nonzero:
                kw["csa_rate"] = nonzero[0]
            if "hca_rate" not in d and len(nonzero) > 1:
                kw["hca_rate"] = nonzero[-1]
        if "mlp_layer_types" in d and "num_hash_layers" not in d:
            kw["num_hash_layers"] = sum(t == "hash_moe" for t in d["mlp_layer_types"])
        if "partial_rotary_factor" in d and "qk_rope_head_dim" not in d and d["partial_rotary_factor"]:
            kw["qk_rope_head_dim"] = int(round(d["partial_rotary_factor"] * d.get("head_dim", cls.head_dim)))
        rp = d.get("rope_parameters")
        if isinstance(rp, dict) and "rope_scaling" not in d:
            if isinstance(rp.get("compress"), dict):
                rp = rp["compress"]
            if rp.get("rope_type", rp.get("type")) == "yarn":
                kw["rope_scaling"] = {"type": "yarn", **{k: v for k, v in rp.items()
                                                         if k in ("factor", "original_max_position_embeddings",
                                                                  "beta_fast", "beta_slow")}}
        qc = d.get("quantization_config")
        if isinstance(qc, dict) and "expert_dtype" in qc and "expert_dtype" not in d:
            kw["expert_dtype"] = qc["expert_dtype"]
        for k in ("eos_token_id", "bos_token_id"):
            if isinstance(kw.get(k), list):
                kw[k] = kw[k][0]
        try:
            return cls(**kw)
        except TypeError as e:
            raise ConfigError(f"config: {e}") from None

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
        return cls.from_dict(d, name=path.parent.name)

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return cls(**PRESETS[name], name=name)


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
