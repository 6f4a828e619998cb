"""Checkpoint reader: lazy, format-aware, and loud about bad input (naming the tensor and the file)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from flashport.checkpoint import CheckpointError, CheckpointReader, release_dtype
from flashport.config import ConfigError, ModelConfig
from flashport.model import param_count


def copy(src, tmp_path):
    dst = tmp_path / "ck"
    shutil.copytree(src, dst)
    return dst


def test_release_format_dtypes(tiny_release):
    r = CheckpointReader(tiny_release)
    assert r.format == "release"
    q, s = r.raw("layers.0.attn.wq_b.weight")
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu
    q, s = r.raw("layers.2.ffn.experts.1.w1.weight")
    assert q.dtype == torch.int8 and s.dtype == torch.float8_e8m0fnu and s.shape[1] * 32 == q.shape[1] * 2
    assert r.raw("embed.weight")[0].dtype == torch.bfloat16
    assert release_dtype("layers.3.attn.compressor.wkv.weight") == "bf16"


def test_hf_and_release_load_the_same_values(tiny_release, tiny_hf):
    a, b = CheckpointReader(tiny_release), CheckpointReader(tiny_hf)
    assert b.format == "hf"
    sa, sb = a.load_state_dict(), b.load_state_dict()
    assert set(sa) - set(sb) == {k for k in sa if k.startswith("mtp.")}  # transformers' format has no MTP block
    assert set(sb) <= set(sa)
    for k in sb:
        assert torch.equal(sa[k], sb[k]), k


def test_open_is_lazy(tiny_release, monkeypatch):
    """Opening reads headers only: no tensor data until asked (the 160 GB release must open instantly)."""
    import flashport.checkpoint as ck

    calls = []
    monkeypatch.setattr(ck.CheckpointReader, "_raw", lambda self, n: calls.append(n))
    r = ck.CheckpointReader(tiny_release)
    assert len(r.names()) > 100 and calls == []


def test_missing_shard(tiny_release, tmp_path):
    ck = copy(tiny_release, tmp_path)
    victim = sorted(ck.glob("*.safetensors"))[0]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"missing shard .*{victim.name}"):
        CheckpointReader(ck)


def test_truncated_shard(tiny_release, tmp_path):
    ck = copy(tiny_release, tmp_path)
    victim = sorted(ck.glob("*.safetensors"))[-1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=f"{victim.name}: truncated: tensor '.+'"):
        CheckpointReader(ck)


def test_corrupt_header(tiny_release, tmp_path):
    ck = copy(tiny_release, tmp_path)
    victim = sorted(ck.glob("*.safetensors"))[0]
    victim.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\0" * 64)
    with pytest.raises(CheckpointError, match=victim.name):
        CheckpointReader(ck)


def _rewrite_tensor(ck, name, fn):
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    shard = ck / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = fn(tensors[name])
    save_file(tensors, shard)
    return shard


def test_shape_disagrees_with_config(tiny_release, tmp_path):
    ck = copy(tiny_release, tmp_path)
    shard = _rewrite_tensor(ck, "layers.1.attn_norm.weight", lambda t: t[:-1].clone())
    with pytest.raises(CheckpointError, match=f"'layers.1.attn_norm.weight' in .*{shard.name} has shape"):
        CheckpointReader(ck).load_state_dict()


def test_unknown_dtype(tiny_release, tmp_path):
    ck = copy(tiny_release, tmp_path)
    shard = _rewrite_tensor(ck, "layers.1.attn_norm.weight", lambda t: t.to(torch.complex64))
    with pytest.raises(CheckpointError, match=f"'layers.1.attn_norm.weight' in .*{shard.name}: unsupported dtype"):
        CheckpointReader(ck).load_state_dict()


def test_missing_tensor(tiny_release, tmp_path):
    ck = copy(tiny_release, tmp_path)
    index_path = ck / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["layers.4.attn.attn_sink"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="missing, first: 'layers.4.attn.attn_sink'"):
        CheckpointReader(ck).load_state_dict()


def test_config_names_both_spellings(tiny_release, tiny_hf):
    a, b = ModelConfig.from_file(tiny_release), ModelConfig.from_file(tiny_hf)
    for f in ("compress_ratios", "csa_rate", "hca_rate", "num_hash_layers", "qk_rope_head_dim", "rope_scaling",
              "sliding_window", "index_topk", "o_groups", "hc_mult"):
        assert getattr(a, f) == getattr(b, f), f
    real = ModelConfig.preset("v4-flash")
    assert real.compress_ratios[:4] == [0, 0, 4, 128] and real.kv_block_tokens == 128
    assert 283e9 < param_count(real)["total"] < 286e9


def test_unknown_preset_and_bad_config(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        ModelConfig.preset("nope")
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(tmp_path)
    with pytest.raises(ConfigError, match="compress_ratios holds"):
        ModelConfig(num_hidden_layers=3, compress_ratios=[0, 4, 7])
