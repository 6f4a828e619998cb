"""Checkpoints flashport did not write: transformers' own `save_pretrained` output, read by `flashport.Engine.load`;
and flashport-written release files read by transformers. Logits within 1e-4 (max-abs, fp32) and equal greedy
tokens, on three configs: a complete transformers config, the issue's few-indexer-heads config (exact score ties
at the top-k boundary are common with two heads), and a config.json without any optional field.
"""

import math
import warnings

import pytest
import torch

import flashport
from flashport.checkpoint import CheckpointReader, checkpoint_layout, init_weights, write_checkpoint
from flashport.config import ModelConfig
from greedy import hf_greedy, ours_greedy

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM, logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()
CSA, HCA, SWA = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"
SHAPES = dict(vocab_size=8192, hidden_size=128, moe_intermediate_size=64, num_attention_heads=4, head_dim=64,
              q_lora_rank=64, num_experts_per_tok=2, n_routed_experts=8, o_groups=2, o_lora_rank=64)
CONFIGS = {
    # every field spelled out, non-V4 rates, YaRN, 16 indexer heads
    "full": dict(SHAPES, num_hidden_layers=5, layer_types=[SWA, CSA, HCA, CSA, HCA], compress_rates={CSA: 4, HCA: 32},
                 mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe", "moe"], sliding_window=32, index_n_heads=16,
                 index_head_dim=32, index_topk=12, partial_rotary_factor=0.25, hc_sinkhorn_iters=10,
                 rope_parameters={"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 256}),
    # the config: two indexer heads, so exact ties in the indexer's top-k are common
    "few_index_heads": dict(SHAPES, num_hidden_layers=6, compress_ratios=[0, 4, 128, 4, 0, 128], index_n_heads=2,
                            index_head_dim=64, index_topk=6, sliding_window=24),
    # nothing optional: transformers' defaults decide the schedule (HCA first), rates, rope width and no YaRN
    "minimal": dict(SHAPES, num_hidden_layers=4, sliding_window=16, index_n_heads=4, index_head_dim=32, index_topk=4),
}
PROMPT = 300


def random_hf_model(cfg: DeepseekV4Config, seed: int) -> DeepseekV4ForCausalLM:
    """transformers' model with weights far from its near-zero init (logits far from uniform, every gate active)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = DeepseekV4ForCausalLM(cfg).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "norm" in name or name.endswith(("scale", "hc_scale")):
                p.copy_(1 + 0.1 * r)
            elif name.endswith(("sinks", "position_bias", "base", "hc_base")):
                p.copy_(0.5 * r)
            elif "embed_tokens" in name:
                p.copy_(r)
            elif "lm_head" in name:
                p.copy_(3 * r / math.sqrt(p.shape[-1]))
            else:
                p.copy_(r / math.sqrt(p.shape[-1]))
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(torch.rand(b.shape[0], cfg.n_routed_experts, generator=g).argsort(-1)[:, : b.shape[1]])
            elif name.endswith("e_score_correction_bias"):
                b.copy_(0.5 * torch.randn(b.shape, generator=g))
    return model


def prompt(vocab, n=PROMPT, seed=0):
    return torch.randint(2, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def saved(request, tmp_path_factory):
    """(transformers model, its save_pretrained directory) per config."""
    cfg = DeepseekV4Config(**CONFIGS[request.param])
    hf = random_hf_model(cfg, seed=sorted(CONFIGS).index(request.param))
    d = tmp_path_factory.mktemp(f"saved-{request.param}")
    hf.save_pretrained(d)
    return request.param, hf, d


@torch.no_grad()
def test_engine_loads_save_pretrained(saved):
    name, hf, d = saved
    reader = CheckpointReader(d)
    assert reader.format == "transformers"
    assert "model.layers.0.attn.norm.weight" in reader.stored  # the kv norm's quirky name
    engine = flashport.Engine.load(d, backend="torch")
    ids = prompt(hf.config.vocab_size)
    ref = hf(input_ids=ids[None]).logits[0]
    got = engine.logits(ids.tolist())
    diff = (got - ref).abs().max().item()
    print(f"{name}: save_pretrained layout, max-abs logits difference {diff:.2e}")
    assert diff < 1e-4, f"{name}: max-abs logits difference {diff}"
    assert ours_greedy(engine.model, ids[:200], 24) == hf_greedy(hf, ids[:200], 24)


@torch.no_grad()
def test_in_memory_layout_loads_the_same(saved, tmp_path):
    """`save_pretrained(save_original_format=False)` (stacked experts, module names) holds the same tensors."""
    _, hf, d = saved
    hf.save_pretrained(tmp_path, save_original_format=False)
    a, b = CheckpointReader(d), CheckpointReader(tmp_path)
    assert b.format == "hf" and any(n.endswith("experts.gate_up_proj") for n in b.stored)
    sa, sb = a.load_state_dict(), b.load_state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("name", sorted(CONFIGS))
@torch.no_grad()
def test_transformers_reads_flashport_release_files(name, tmp_path):
    """The other direction: flashport writes release-format files (FP8 + MXFP4) of the same config, transformers
    reads them (its own dequantization) and both agree."""
    cfg = ModelConfig.from_dict(DeepseekV4Config(**CONFIGS[name]).to_dict())
    write_checkpoint(tmp_path, cfg, init_weights(cfg, seed=5), "release")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = DeepseekV4ForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).float().eval()
    engine = flashport.Engine.load(tmp_path, backend="torch")
    ids = prompt(cfg.vocab_size, seed=1)
    diff = (engine.logits(ids.tolist()) - hf(input_ids=ids[None]).logits[0]).abs().max().item()
    print(f"{name}: release layout, max-abs logits difference {diff:.2e}")
    assert diff < 1e-4, f"{name}: max-abs logits difference {diff}"


def test_layout_is_detected_from_names():
    assert checkpoint_layout(["layers.0.attn.wq_a.weight", "embed.weight", "head.weight"]) == "release"
    assert checkpoint_layout(["model.layers.0.attn.wq_a.weight", "model.embed_tokens.weight", "head.weight"]) \
        == "transformers"
    assert checkpoint_layout(["model.layers.0.self_attn.q_a_proj.weight", "lm_head.weight"]) == "hf"


@torch.no_grad()
def test_save_pretrained_of_a_model_read_in_module_names(saved, tmp_path):
    """A model transformers read from module-name files (`save_original_format=False`, or flashport's `--format hf`)
    and saved again with save_pretrained's defaults keeps the module names but writes every kv norm as `norm`
    (`model.layers.0.self_attn.norm.weight`): flashport reads those files as the same model."""
    _, hf, d = saved
    hf.save_pretrained(tmp_path / "modules", save_original_format=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = DeepseekV4ForCausalLM.from_pretrained(str(tmp_path / "modules"), dtype=torch.float32).float().eval()
    again.save_pretrained(tmp_path / "resaved")
    reader = CheckpointReader(tmp_path / "resaved")
    assert reader.format == "hf" and "model.layers.0.self_attn.norm.weight" in reader.stored
    sa, sb = CheckpointReader(d).load_state_dict(), reader.load_state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
