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
    with pytest.raises(CheckpointError, match=f"'layers.1.attn_norm.weight' in .*{shard.name}: has shape"):
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


# ---------------------------------------------------------------------------------------------------------------
# Broken weight data never loads silently: checked when first read, named by tensor and file
# ---------------------------------------------------------------------------------------------------------------
def _poke_byte(ck, name, index, value=0xFF):
    """Set one stored byte of `name` (its raw bytes, whatever the dtype)."""
    def fn(t):
        t = t.clone()
        t.view(torch.uint8)[index] = value
        return t
    return _rewrite_tensor(ck, name, fn)


@pytest.fixture
def broken_scale(tiny_release, tmp_path):
    """The issue's case: one MXFP4 scale byte of an expert set to 0xFF (NaN in UE8M0)."""
    ck = copy(tiny_release, tmp_path)
    shard = _poke_byte(ck, "layers.3.ffn.experts.0.w1.scale", (5, 1))
    return ck, shard


def test_nan_scale_refused_on_load(broken_scale):
    import flashport

    ck, shard = broken_scale
    with pytest.raises(CheckpointError) as e:
        flashport.Engine.load(ck, backend="torch")
    msg = str(e.value)
    assert "'layers.3.ffn.experts.0.w1.scale'" in msg and shard.name in msg and "0xFF" in msg and "\n" not in msg


def test_checks_are_lazy(broken_scale):
    """Opening and reading other tensors does not read (or check) the broken one: the release is 160 GB."""
    ck, _ = broken_scale
    r = CheckpointReader(ck)
    assert r.get("embed.weight").shape[0] == r.cfg.vocab_size
    r.get("layers.3.ffn.experts.1.w1.weight")
    with pytest.raises(CheckpointError, match="layers.3.ffn.experts.0.w1.scale"):
        r.raw("layers.3.ffn.experts.0.w1.weight")  # the bit-exact path (export passthrough) is checked too


def test_generate_exits_2_with_one_line(broken_scale, capsys):
    from flashport.cli import main

    ck, shard = broken_scale
    assert main(["generate", str(ck), "--prompt", "hi", "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("flashport: error: ")
    assert "layers.3.ffn.experts.0.w1.scale" in err and shard.name in err


def test_inspect_verify_checks_a_checkpoint(tiny_release, broken_scale, capsys):
    from flashport.cli import main

    assert main(["inspect", str(tiny_release), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "release layout" in out and "F8_E8M0" in out and "every tensor read" in out and ": OK" in out
    ck, _ = broken_scale
    assert main(["inspect", str(ck)]) == 0  # headers only: the data is not read
    capsys.readouterr()
    assert main(["inspect", str(ck), "--verify"]) == 2
    assert "layers.3.ffn.experts.0.w1.scale" in capsys.readouterr().err


BROKEN = {  # tensor -> (how to break it, what the error says)
    "fp8_scale_nan": ("layers.0.attn.wq_a.scale", lambda t: _set(t, 0xFF), "layers.0.attn.wq_a.scale", "0xFF"),
    "fp8_nan_code": ("layers.0.attn.wkv.weight", lambda t: _set(t, 0x7F), "layers.0.attn.wkv.weight", "NaN code"),
    "bf16_inf": ("layers.2.attn.compressor.wkv.weight", lambda t: _fill(t, float("inf")),
                 "layers.2.attn.compressor.wkv.weight", "non-finite"),
    "fp32_nan": ("layers.1.attn.attn_sink", lambda t: _fill(t, float("nan")), "layers.1.attn.attn_sink", "non-finite"),
    "tid2eid_range": ("layers.0.ffn.gate.tid2eid", lambda t: _fill(t, 8), "layers.0.ffn.gate.tid2eid",
                      "outside [0, n_routed_experts=8)"),
    "tid2eid_negative": ("layers.1.ffn.gate.tid2eid", lambda t: _fill(t, -1), "layers.1.ffn.gate.tid2eid", "outside"),
    "tid2eid_float": ("layers.1.ffn.gate.tid2eid", lambda t: t.float(), "layers.1.ffn.gate.tid2eid", "integers"),
    "norm_as_int": ("layers.2.ffn_norm.weight", lambda t: t.to(torch.int32), "layers.2.ffn_norm.weight",
                    "unsupported dtype"),
    "packed_fp4_shape": ("layers.4.ffn.experts.2.w2.weight", lambda t: t[:-1].clone(), "layers.4.ffn.experts.2.w2",
                         "stored shape"),
    "fp8_as_bf16": ("layers.0.attn.wq_b.weight", lambda t: t.to(torch.bfloat16), "layers.0.attn.wq_b.weight",
                    "with a .scale is not FP8"),
}


def _set(t, byte):
    t = t.clone()
    t.view(torch.uint8).view(-1)[0] = byte
    return t


def _fill(t, value):
    t = t.clone()
    t.view(-1)[-1] = value
    return t


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_data_is_refused(case, tiny_release, tmp_path):
    tensor, fn, named, says = BROKEN[case]
    ck = copy(tiny_release, tmp_path)
    shard = _rewrite_tensor(ck, tensor, fn)
    with pytest.raises(CheckpointError) as e:
        CheckpointReader(ck).load_state_dict()
    msg = str(e.value)
    assert named in msg and shard.name in msg and says in msg, msg
