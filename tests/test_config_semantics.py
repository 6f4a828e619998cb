"""config.json means what transformers' DeepseekV4Config makes of it: field by field, absent, null and set.

For every field of transformers' `DeepseekV4Config` (introspected, not listed by hand) and the legacy spellings it
folds in, on two base configs (a complete transformers `to_dict()` and a minimal release-style one), each variant
is read by both. Where flashport accepts it, transformers must accept it too and both must describe the same model:
shapes, layer schedule and rates, hash layers, and the RoPE inverse frequencies and cos/sin scaling each layer kind
really uses (computed by transformers' own rotary module). Where flashport refuses, the message names the field.
"""

import dataclasses
import json
import warnings

import pytest
import torch

from flashport.config import ConfigError, ModelConfig
from flashport.model import rope_inv_freq

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV4Config, logging as hf_logging  # noqa: E402
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RotaryEmbedding  # noqa: E402

hf_logging.set_verbosity_error()
CSA, HCA, SWA = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"

SMALL = dict(vocab_size=512, hidden_size=128, moe_intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
             head_dim=64, q_lora_rank=64, num_experts_per_tok=2, n_routed_experts=4, o_groups=2, o_lora_rank=64,
             sliding_window=16, index_n_heads=4, index_head_dim=32, index_topk=4)
BASE_HF = DeepseekV4Config(**SMALL, partial_rotary_factor=0.25,
                           compress_rates={CSA: 4, HCA: 32},
                           rope_parameters={"rope_type": "yarn", "factor": 16.0,
                                            "original_max_position_embeddings": 65536}).to_dict()
BASE_RELEASE = {  # what the release's config.json spells (legacy names, no transformers-only fields)
    **SMALL, "model_type": "deepseek_v4", "architectures": ["DeepseekV4ForCausalLM"], "qk_rope_head_dim": 16,
    "compress_ratios": [0, 0, 4, 128, 4, 128, 0], "num_hash_layers": 2, "rope_theta": 10000.0,
    "compress_rope_theta": 160000.0, "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings":
                                                      65536, "beta_fast": 32, "beta_slow": 1},
    "scoring_func": "sqrtsoftplus", "routed_scaling_factor": 1.5, "swiglu_limit": 10.0, "hc_mult": 4,
    "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-6, "num_nextn_predict_layers": 1,
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                            "scale_fmt": "ue8m0"}, "expert_dtype": "fp4",
}
# a value other than the default for every field (and legacy spelling)
SET = {
    "transformers_version": "4.0.0", "architectures": ["Other"], "output_hidden_states": True, "return_dict": False,
    "dtype": "bfloat16", "chunk_size_feed_forward": 1, "is_encoder_decoder": False, "id2label": {"0": "a"},
    "label2id": {"a": 0}, "problem_type": "regression",
    "vocab_size": 600, "hidden_size": 256, "moe_intermediate_size": 96, "num_hidden_layers": 5,
    "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 128, "q_lora_rank": 96, "num_experts_per_tok": 3,
    "n_routed_experts": 6, "n_shared_experts": 2, "scoring_func": "sigmoid", "norm_topk_prob": False,
    "routed_scaling_factor": 2.5, "max_position_embeddings": 4096, "rope_theta": 5000.0,
    "layer_types": [SWA, CSA, HCA, CSA, HCA, SWA], "compress_rates": {CSA: 8, HCA: 16}, "compress_rope_theta": 40000.0,
    "hc_mult": 2, "hc_sinkhorn_iters": 7, "hc_eps": 1e-5, "mlp_layer_types": ["hash_moe"] + ["moe"] * 5,
    "swiglu_limit": 7.0, "sliding_window": 20, "o_groups": 4, "o_lora_rank": 32, "index_n_heads": 3,
    "index_head_dim": 48, "index_topk": 5, "num_nextn_predict_layers": 0, "output_router_logits": True,
    "router_aux_loss_coef": 0.1, "router_jitter_noise": 0.1, "hidden_act": "gelu", "initializer_range": 0.5,
    "rms_norm_eps": 1e-5, "use_cache": False, "pad_token_id": 3, "bos_token_id": 5, "eos_token_id": [7, 8],
    "tie_word_embeddings": True, "partial_rotary_factor": 0.5, "attention_bias": True, "mlp_bias": True,
    "attention_dropout": 0.1,
    "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                        "beta_fast": 16, "beta_slow": 2},
    # legacy spellings
    "compress_ratios": [0, 4, 128, 128, 4, 0], "compress_rate_csa": 8, "compress_rate_hca": 64,
    "num_hash_layers": 1, "qk_rope_head_dim": 32,
    "rope_scaling": {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 2048},
}
# set values flashport's model does not implement: refused, naming the field
REFUSED_WHEN_SET = {"n_shared_experts", "scoring_func", "hidden_act", "tie_word_embeddings", "mlp_bias"}
LEGACY = ["compress_ratios", "compress_rate_csa", "compress_rate_hca", "num_hash_layers", "qk_rope_head_dim",
          "rope_scaling"]


def hf_fields():
    return [f.name for f in dataclasses.fields(DeepseekV4Config)]


def scalars(c):
    keys = ["vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads", "head_dim",
            "q_lora_rank", "num_experts_per_tok", "n_routed_experts", "routed_scaling_factor",
            "max_position_embeddings", "hc_mult", "hc_sinkhorn_iters", "hc_eps", "swiglu_limit", "sliding_window",
            "o_groups", "o_lora_rank", "index_n_heads", "index_head_dim", "index_topk", "num_nextn_predict_layers",
            "rms_norm_eps", "bos_token_id", "scoring_func"]
    return {k: getattr(c, k) for k in keys}


def hf_meaning(c):
    rot = DeepseekV4RotaryEmbedding(c)
    eos = c.eos_token_id[0] if isinstance(c.eos_token_id, list) else c.eos_token_id
    return {**scalars(c), "eos": eos, "shared_width": c.intermediate_size, "act": c.hidden_act,
            "mlp_bias": c.mlp_bias, "tied": c.tie_word_embeddings,
            "kinds": [(t, 0 if t == SWA else c.compress_rates[t]) for t in c.layer_types],
            "hash": [t == "hash_moe" for t in c.mlp_layer_types],
            "rope": {k: (getattr(rot, f"{k}_inv_freq"), float(getattr(rot, f"{k}_attention_scaling")))
                     for k in ("main", "compress")}}


def fp_meaning(m: ModelConfig):
    kind = {0: SWA, m.csa_rate: CSA, m.hca_rate: HCA}
    return {**scalars(m), "eos": m.eos_token_id, "shared_width": m.moe_intermediate_size * m.n_shared_experts,
            "act": "silu", "mlp_bias": False, "tied": False,
            "kinds": [(kind[r], r) for r in m.compress_ratios],
            "hash": [m.is_hash_layer(i) for i in range(m.num_hidden_layers)],
            "rope": {"main": (rope_inv_freq(m, False), 1.0), "compress": (rope_inv_freq(m, True), 1.0)}}


def same(a, b):
    for k in a:
        if k == "rope":
            for kind in a[k]:
                (fa, sa), (fb, sb) = a[k][kind], b[k][kind]
                if fa.shape != fb.shape or not torch.allclose(fa, fb, rtol=1e-6, atol=0) or sa != sb:
                    return f"rope {kind}: {fa.shape} {fb.shape} scaling {sa} {sb}"
        elif a[k] != b[k]:
            return f"{k}: transformers {a[k]!r}, flashport {b[k]!r}"
    return None


def both(d):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = hf_meaning(DeepseekV4Config.from_dict(json.loads(json.dumps(d))))
    except Exception as e:  # transformers refuses (strict types, validation, or its model cannot be built)
        hf = e
    try:
        fp = fp_meaning(ModelConfig.from_dict(json.loads(json.dumps(d)), source="cfg.json"))
    except ConfigError as e:
        fp = e
    return hf, fp


def hf_runs(d) -> bool:
    """Whether transformers' model of this config runs a short forward (its config may accept what it cannot run)."""
    from transformers import DeepseekV4ForCausalLM

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = DeepseekV4Config.from_dict(json.loads(json.dumps(d)))
            with torch.device("meta"):
                DeepseekV4ForCausalLM(cfg)  # shapes agree
            model = DeepseekV4ForCausalLM(cfg).eval()
            with torch.no_grad():
                model(input_ids=torch.arange(2, 2 + 40)[None] % cfg.vocab_size)
        return True
    except Exception:
        return False


CASES = [(base, field, case) for base in ("hf", "release") for field in hf_fields() + LEGACY
         for case in ("absent", "null", "set")]


@pytest.mark.parametrize("base,field,case", CASES, ids=[f"{b}-{f}-{c}" for b, f, c in CASES])
def test_field_means_what_transformers_makes_of_it(base, field, case):
    d = dict(BASE_HF if base == "hf" else BASE_RELEASE)
    if case == "absent":
        d.pop(field, None)
    else:
        d[field] = None if case == "null" else SET[field]
    hf, fp = both(d)
    if isinstance(fp, ConfigError):
        assert "cfg.json" in str(fp) and "\n" not in str(fp)
        if isinstance(hf, Exception) or not hf_runs(d):  # transformers refuses the config or cannot run its model
            return
        # else refusing is allowed only for values flashport's model does not implement, naming the field
        assert case == "set" and field in REFUSED_WHEN_SET, f"flashport refuses what transformers runs: {fp}"
        assert repr(field) in str(fp), f"refusal does not name {field!r}: {fp}"
        return
    assert not isinstance(hf, Exception), f"flashport accepts what transformers refuses ({hf!r:.200})"
    diff = same(hf, fp)
    assert diff is None, diff


def test_fields_are_all_covered():
    """The test above covers every field transformers knows (a new transformers field fails here first)."""
    assert set(hf_fields()) <= set(SET)
    assert len(hf_fields()) > 40


def test_absent_rope_scaling_means_no_yarn():
    """The issue's example: a release config without rope_scaling: plain theta on compressed layers too."""
    d = dict(BASE_RELEASE)
    del d["rope_scaling"]
    cfg = ModelConfig.from_dict(d)
    assert cfg.rope_scaling is None
    base = cfg.compress_rope_theta
    dim = cfg.qk_rope_head_dim
    plain = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    assert torch.equal(rope_inv_freq(cfg, True), plain)


def test_wrong_type_is_one_clear_error(tmp_path):
    d = dict(BASE_RELEASE, hidden_size="abc")
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_file(tmp_path)
    msg = str(e.value)
    assert "'hidden_size'" in msg and str(tmp_path / "config.json") in msg and "\n" not in msg
    for bad in ({"hc_eps": 1}, {"num_hidden_layers": True}, {"layer_types": "swa"}, {"rope_scaling": [1]}):
        with pytest.raises(ConfigError, match=repr(next(iter(bad)))):
            ModelConfig.from_dict(dict(BASE_RELEASE, **bad))


@pytest.mark.parametrize("preset", ["v4-flash", "flash-tiny", "flash-small", "flash-mini"])
def test_presets_round_trip(preset):
    """Presets keep working, and what flashport writes reads back as the same config, in transformers too."""
    cfg = ModelConfig.preset(preset)
    assert ModelConfig.from_dict(cfg.to_dict(), name=preset) == cfg
    # transformers' format carries no quantization (the hf writer stores dequantized values)
    unquantized = dataclasses.replace(cfg, quantization_config=None, expert_dtype="bf16")
    assert ModelConfig.from_dict(cfg.to_hf_dict(), name=preset) == unquantized
    hf = hf_meaning(DeepseekV4Config.from_dict(cfg.to_dict()))
    assert same(hf, fp_meaning(cfg)) is None
