"""V4-Flash's real per-head shapes and dtypes from `make-checkpoint --preset v4-flash --override ...`.

The checkpoint maker writes the release's dtypes (F8_E4M3 + F8_E8M0 block scales, I8-packed FP4 experts + F8_E8M0,
BF16 / F32 where the release keeps them), streaming one tensor at a time; transformers reads the same files and
its logits agree with flashport's over a prompt long enough that the 512-entry indexer drops entries. CI runs the
real head, rope, indexer and window shapes (head_dim 512, 64 rope dims, indexer heads of 128 with top-512, window
128, YaRN) at a reduced width (hidden 256, 4 heads, 8 experts, 3 layers).
"""

import json
import warnings
import weakref

import pytest
import torch
from safetensors import safe_open

import flashport
from flashport.checkpoint import iter_weights, make_checkpoint, release_dtype, write_checkpoint
from flashport.config import ModelConfig

REDUCED = {"num_hidden_layers": 3, "n_routed_experts": 8, "compress_ratios": [0, 4, 128], "num_nextn_predict_layers": 0,
           "hidden_size": 256, "num_attention_heads": 4, "q_lora_rank": 128, "o_groups": 2, "o_lora_rank": 128,
           "moe_intermediate_size": 128, "index_n_heads": 8, "vocab_size": 8192}
PROMPT = 2100  # > 4 * 512: CSA layers hold more compressed entries than the indexer keeps


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("v4-reduced"), "v4-flash", seed=0, override=json.dumps(REDUCED))


def stored(path):
    out = {}
    for f in path.glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            out.update({k: h.get_slice(k).get_dtype() for k in h.keys()})
    return out


def test_release_dtypes_and_real_shapes(real):
    cfg = ModelConfig.from_file(real)
    assert (cfg.head_dim, cfg.qk_rope_head_dim, cfg.index_head_dim, cfg.index_topk, cfg.sliding_window) == \
        (512, 64, 128, 512, 128)
    assert cfg.rope_scaling["factor"] == 16 and cfg.compress_ratios == [0, 4, 128] and cfg.n_routed_experts == 8
    dt = stored(real)
    assert dt["layers.1.attn.wq_b.weight"] == "F8_E4M3" and dt["layers.1.attn.wq_b.scale"] == "F8_E8M0"
    assert dt["layers.2.ffn.shared_experts.w2.weight"] == "F8_E4M3"
    assert dt["layers.2.ffn.experts.7.w1.weight"] == "I8" and dt["layers.2.ffn.experts.7.w1.scale"] == "F8_E8M0"
    assert dt["embed.weight"] == dt["head.weight"] == dt["layers.1.attn.indexer.compressor.wkv.weight"] == "BF16"
    assert dt["layers.0.attn.attn_sink"] == dt["norm.weight"] == dt["layers.0.hc_attn_fn"] == "F32"
    index = json.loads((real / "model.safetensors.index.json").read_text())
    assert all(f.startswith("model-") and "-of-" in f for f in index["weight_map"].values())


def test_writer_streams_one_tensor_at_a_time(tmp_path):
    """The release writer holds at most one fp32 tensor it converts: each is quantized (or cast) and dropped
    before the next is made (tensors stored as fp32 / int64 are their own stored bytes, held until their shard
    is written)."""
    cfg = ModelConfig.preset("flash-tiny")
    alive, worst = [], 0

    def tracked():
        nonlocal worst
        for name, t in iter_weights(cfg, seed=0):
            worst = max(worst, sum(r() is not None for r in alive))
            if release_dtype(name) not in ("fp32", "int"):
                alive.append(weakref.ref(t))
            yield name, t

    write_checkpoint(tmp_path, cfg, tracked(), "release", shard_bytes=1 << 20)
    assert len(alive) > 100 and worst <= 1


@torch.no_grad()
def test_logits_match_transformers_on_real_shapes(real):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.DeepseekV4ForCausalLM.from_pretrained(str(real), dtype=torch.float32).float().eval()
    engine = flashport.Engine.load(real, backend="torch")
    ids = torch.randint(2, 8192, (PROMPT,), generator=torch.Generator().manual_seed(0))
    ref = hf(input_ids=ids[None]).logits[0]
    got = engine.logits(ids.tolist())
    diff = (got - ref).abs().max().item()
    print(f"v4-flash shapes at reduced width, release files, {PROMPT} tokens: max-abs logits difference {diff:.2e}")
    assert diff < 1e-4
