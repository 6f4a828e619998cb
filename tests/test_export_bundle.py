"""Bundles: export / inspect / load / generate for every shipped recipe, partitions, resumability, tampering."""

import json
import shutil

import pytest
import torch

from flashport.cli import main
from flashport.engine import Engine
from flashport.bundle import BundleError, MANIFEST, manifest_digest
from flashport.bundle import load_model as load_bundle
from flashport.export.bundle import JOURNAL, export, inspect_cli
from flashport.export.recipes import recipe_names
from flashport.model import Linear


def load_model(path, **kw):
    return load_bundle(path, **kw)[0]

PROMPT = "hello world, this is"


@pytest.fixture(scope="module")
def ref(tiny_release):
    return Engine.load(tiny_release, backend="torch")


@pytest.fixture(scope="module")
def release_bundle(tiny_release, tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "release"
    export(tiny_release, out, "release", progress=False)
    return out


@pytest.mark.parametrize("recipe", recipe_names())
def test_roundtrip_every_recipe(recipe, tiny_release, ref, tmp_path):
    out = tmp_path / recipe
    assert main(["export", str(tiny_release), str(out), "--recipe", recipe]) == 0
    m = json.loads((out / MANIFEST).read_text())
    assert m["recipe"]["name"] == recipe and m["schema_version"] == 1
    summary = inspect_cli(str(out), verify=True)
    assert recipe in summary and "sha256 of every file: OK" in summary
    model = load_model(out)
    for name, mod in model.named_modules():  # packed Linears keep no fp32 copy
        if isinstance(mod, Linear):
            fmt = m["tensors"][name + ".weight"]["format"]
            assert (mod.packed is None) == (fmt == "fp32") and (mod.weight.numel() == 0) == (fmt != "fp32")
    eng = Engine.load(out, backend="torch")
    lg, lr = eng.logits(ref.encode(PROMPT)), ref.logits(ref.encode(PROMPT))
    assert torch.isfinite(lg).all() and lg.shape == lr.shape
    gen = eng.generate(PROMPT, max_new_tokens=6)
    assert len(gen.token_ids) == 6 or gen.finish_reason == "stop"
    if recipe == "release":  # lossless: the same dequantized values, so the same logits and tokens
        assert torch.equal(lg, lr)
        assert gen.token_ids == ref.generate(PROMPT, max_new_tokens=6).token_ids
    else:
        assert not torch.equal(lg, lr)


def test_release_bundle_copies_release_bytes(release_bundle, tiny_release):
    from flashport.checkpoint import CheckpointReader

    reader, model = CheckpointReader(tiny_release), load_model(release_bundle)
    q = model.layers[3].ffn.experts[1].w2.packed
    raw, scale = reader.raw("layers.3.ffn.experts.1.w2.weight")
    assert q.fmt == "mxfp4" and torch.equal(q.tensors["weight"], raw)
    assert torch.equal(q.tensors["scale"].view(torch.uint8), scale.view(torch.uint8))
    assert torch.equal(q.dequantize(), reader.get("layers.3.ffn.experts.1.w2.weight"))


def test_ep_partitions_and_same_numerics(tiny_release, tmp_path, ref):
    out = tmp_path / "ep"
    m = export(tiny_release, out, "int8", devices="npu:0=1GiB,npu:1=1GiB", progress=False)
    assert m["placement"]["mode"] == "ep"
    from safetensors import safe_open

    for prefix, per_expert in m["placement"]["placement"].items():
        unit = f"layer-{int(prefix.split('.')[1]):03d}" if prefix.startswith("layers") else "mtp-0"
        for dev in ("npu0", "npu1"):
            with safe_open(out / dev / f"{unit}.safetensors", "pt") as f:
                held = {int(k.split(".ffn.experts.")[1].split(".")[0]) for k in f.keys()}
            assert held == {e for e, hs in enumerate(per_expert) if dev.replace("npu", "npu:") in hs}
    with safe_open(out / "common" / "layer-003.safetensors", "pt") as f:
        assert not any(".ffn.experts." in k for k in f.keys())
    single = tmp_path / "single"
    export(tiny_release, single, "int8", progress=False)
    ids = ref.encode(PROMPT)
    assert torch.equal(Engine.load(out).logits(ids), Engine.load(single).logits(ids))


def test_resume_skips_verified_units(tiny_release, tmp_path):
    out = tmp_path / "r"
    m1 = export(tiny_release, out, "int4-experts", progress=False)
    n = m1["export"]["units"]
    assert export(tiny_release, out, "int4-experts", progress=False)["export"]["units_skipped"] == n
    # an interrupted export: a journal, no manifest, one shard damaged -> only its unit is redone
    (out / JOURNAL).write_text(json.dumps({"bundle_id": m1["bundle_id"], "units": _units_from(m1)}))
    (out / MANIFEST).unlink()
    shard = out / "common" / "layer-002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    m2 = export(tiny_release, out, "int4-experts", progress=False)
    assert m2["export"]["units_skipped"] == n - 1 and not (out / JOURNAL).exists()
    # same tensors bit for bit (CRC32C per tensor); only the damaged unit's files were rewritten
    assert m2["tensors"] == m1["tensors"] and m2["files"].keys() == m1["files"].keys()
    assert {f for f in m1["files"] if m2["files"][f] != m1["files"][f]} <= {"common/layer-002.safetensors",
                                                                             "cpu/layer-002.safetensors"}
    load_model(out, verify=True)
    # another recipe into the same directory starts over and leaves no stale shard behind
    m3 = export(tiny_release, out, "int8", devices="npu:0=1GiB,npu:1=1GiB", progress=False)
    assert m3["export"]["units_skipped"] == 0 and not (out / "cpu").exists() or not any((out / "cpu").iterdir())


def _units_from(m):
    from flashport.export.bundle import _unit_of

    units = {}
    for name, e in m["tensors"].items():
        u = units.setdefault(_unit_of(name), {"files": {}, "tensors": {}})
        u["tensors"][name] = e
        u["files"].update({f: m["files"][f] for f in e["files"]})
    return units


@pytest.fixture
def copy(release_bundle, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(release_bundle, dst)
    return dst


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_byte(copy):
    _flip(copy / "cpu" / "layer-004.safetensors", -3)
    with pytest.raises(BundleError, match="sha256 does not match"):
        load_model(copy, verify=True)
    with pytest.raises(BundleError, match="CRC32C"):  # caught even without sha256
        load_model(copy, verify=False)
    with pytest.raises(BundleError, match="sha256"):
        inspect_cli(str(copy), verify=True)


def test_flipped_byte_env_verify(copy, monkeypatch):
    _flip(copy / "common" / "globals.safetensors", -7)
    monkeypatch.setenv("FLASHPORT_VERIFY", "1")
    with pytest.raises(BundleError, match="sha256 does not match"):
        Engine.load(copy)


def test_truncated_shard(copy):
    p = copy / "common" / "layer-001.safetensors"
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(BundleError, match="truncated"):
        load_model(copy)
    p.write_bytes(b"")
    with pytest.raises(BundleError, match="layer-001"):
        load_model(copy)


def test_edited_manifest(copy):
    mf = copy / MANIFEST
    m = json.loads(mf.read_text())
    m["tensors"]["layers.1.attn.wq_a.weight"]["format"] = "int8"
    mf.write_text(json.dumps(m))
    with pytest.raises(BundleError, match="modified after export"):
        load_model(copy)
    m["manifest_sha256"] = manifest_digest(m)  # an edit that also fixes the digest still cannot pass
    mf.write_text(json.dumps(m))
    with pytest.raises(BundleError, match="format int8 needs"):
        load_model(copy)
    m = json.loads((copy / MANIFEST).read_text())
    m["config"]["hidden_size"] = 256
    m["manifest_sha256"] = manifest_digest(m)
    mf.write_text(json.dumps(m))
    with pytest.raises(BundleError, match="shape"):
        load_model(copy)
    mf.write_text("{")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_model(copy)


def test_wrong_model_shard(copy, tmp_path, tiny_release):
    from flashport.checkpoint import make_checkpoint

    other_src = make_checkpoint(tmp_path / "seed1", "flash-tiny", seed=1)
    other = tmp_path / "other"
    export(other_src, other, "release", progress=False)
    shutil.copyfile(other / "common" / "layer-002.safetensors", copy / "common" / "layer-002.safetensors")
    with pytest.raises(BundleError, match="another export"):  # same size and layout, other weights
        load_model(copy)
    shutil.copyfile(copy / "common" / "layer-003.safetensors", copy / "common" / "layer-002.safetensors")
    with pytest.raises(BundleError):  # a shard moved to another place
        load_model(copy)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="no manifest.json"):
        load_model(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "flashport-bundle", "schema_version": 99}))
    with pytest.raises(BundleError, match="schema version 99"):
        load_model(tmp_path)


def test_cli_inspect_and_plan(release_bundle, capsys):
    assert main(["inspect", str(release_bundle)]) == 0
    out = capsys.readouterr().out
    assert "mxfp4" in out and "partition" in out
    assert main(["plan", "--model", str(release_bundle), "--devices", "cpu=1GiB"]) == 0
    assert main(["plan", "--model", "flash-tiny", "--devices", "cpu=1KiB"]) == 2
    assert "does not fit" in capsys.readouterr().err
