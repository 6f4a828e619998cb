"""Recipes: named recipes, per-layer overrides, custom JSON/TOML files, clear errors."""

import json

import pytest

from flashport.config import ModelConfig
from flashport.export.recipes import (CLASSES, RecipeError, Recipe, get_recipe, load_recipe, recipe_names,
                                      tensor_class)

CFG = ModelConfig.preset("flash-tiny")  # 6 layers, hash layers 0-2, MTP block = layer 6


def test_tensor_classes():
    c = lambda n: tensor_class(n, CFG)  # noqa: E731
    assert c("layers.3.ffn.experts.7.w1.weight") == ("experts", 3)
    assert c("layers.3.ffn.shared_experts.w2.weight") == ("shared_experts", 3)
    assert c("layers.2.attn.wo_a.weight") == ("attention", 2)
    assert c("layers.2.attn.compressor.wgate.weight") == ("compressor", 2)
    assert c("layers.2.attn.indexer.compressor.wkv.weight") == ("compressor", 2)
    assert c("layers.2.attn.indexer.weights_proj.weight") == ("indexer", 2)
    assert c("layers.4.ffn.gate.weight") == ("gate", 4)
    assert c("mtp.0.e_proj.weight") == ("mtp_proj", 6)
    assert c("mtp.0.ffn.experts.1.w3.weight") == ("experts", 6)
    assert c("embed.weight") == ("embed", None) and c("head.weight") == ("head", None)
    assert c("layers.1.attn_norm.weight")[0] == c("layers.1.hc_attn_fn")[0] == c("layers.0.ffn.gate.tid2eid")[0] \
        == "other"


def test_named_recipes_assign_every_tensor():
    assert set(recipe_names()) >= {"release", "int4-experts", "int8", "w8a8-npu", "mixed-edge"}
    for name in recipe_names():
        a = get_recipe(name).assign(CFG)
        assert len(a) > 300 and all(isinstance(f, str) for f in a.values())
        assert a["layers.1.attn_norm.weight"] == "fp32" and a["layers.0.ffn.gate.tid2eid"] == "int64"


def test_release_recipe_resolves_to_release_storage():
    a = get_recipe("release").assign(CFG)
    assert a["layers.3.ffn.experts.0.w1.weight"] == "mxfp4"
    assert a["layers.3.attn.wq_a.weight"] == "fp8-e4m3-block128-ue8m0"
    assert a["layers.3.ffn.shared_experts.w1.weight"] == "fp8-e4m3-block128-ue8m0"
    assert a["layers.3.ffn.gate.weight"] == a["embed.weight"] == a["head.weight"] == "bf16"
    assert a["layers.3.attn.attn_sink"] == "fp32"


def test_int4_experts_and_mixed_edge_overrides():
    a = get_recipe("int4-experts").assign(CFG)
    assert a["layers.4.ffn.experts.5.w2.weight"] == "int4-g32"
    assert a["layers.4.ffn.shared_experts.w2.weight"] == "int8"
    assert a["layers.4.attn.wq_b.weight"] == "fp8-e4m3-channel"
    assert a["embed.weight"] == a["head.weight"] == "bf16"
    m = get_recipe("mixed-edge").assign(CFG)
    for hashed_or_last in (0, 2, 5):
        assert m[f"layers.{hashed_or_last}.ffn.experts.1.w1.weight"] == "int4-g32"
        assert m[f"layers.{hashed_or_last}.attn.wq_a.weight"] == "bf16"
    assert m["layers.3.ffn.experts.1.w1.weight"] == "int4-g64-asym"
    assert m["layers.3.attn.wq_a.weight"] == "int8"
    assert get_recipe("mixed-edge").calibration == "gptq"


def test_custom_json_and_toml(tmp_path):
    j = tmp_path / "r.json"
    j.write_text(json.dumps({"extends": "int8", "formats": {"experts": "int4-g128"},
                             "overrides": [{"layers": ["csa"], "formats": {"experts": "int4-g32-asym"}},
                                           {"match": "layers.5.attn.wo_b.weight", "format": "bf16"}]}))
    r = load_recipe(j)
    assert r.name == "r"
    a = r.assign(CFG)
    csa = [i for i in range(6) if CFG.layer_kind(i) == "csa"]
    hca = [i for i in range(6) if CFG.layer_kind(i) == "hca"]
    assert a[f"layers.{csa[0]}.ffn.experts.0.w1.weight"] == "int4-g32-asym"
    assert a[f"layers.{hca[0]}.ffn.experts.0.w1.weight"] == "int4-g128"
    assert a["layers.5.attn.wo_b.weight"] == "bf16" and a["layers.4.attn.wo_b.weight"] == "int8"
    t = tmp_path / "r.toml"
    t.write_text('name = "t"\nextends = "release"\ncalibration = "gptq"\n[formats]\nexperts = "int4-g64"\n'
                 '[[overrides]]\nlayers = ["1-2", "last"]\nformats = { experts = "int8" }\n')
    a = load_recipe(t).assign(CFG)
    assert [a[f"layers.{i}.ffn.experts.0.w2.weight"] for i in range(6)] == \
        ["int4-g64", "int8", "int8", "int4-g64", "int4-g64", "int8"]
    assert a["layers.0.attn.wq_a.weight"] == "fp8-e4m3-block128-ue8m0"


@pytest.mark.parametrize("spec, words", [
    ({"extends": "int8", "formats": {"experts": "int3-g32"}}, ["unknown weight format", "int3-g32"]),
    ({"extends": "int8", "formats": {"expertz": "int8"}}, ["unknown tensor class", "expertz"]),
    ({"extends": "int8", "formats": {"embed": "int4-g32"}}, ["embed", "fp32 parameter"]),
    ({"extends": "int8", "overrides": [{"layers": ["middle"], "formats": {"experts": "int8"}}]}, ["selector", "middle"]),
    ({"extends": "int8", "overrides": [{"match": "layers.*.nothing", "format": "int8"}]}, ["matches no tensor"]),
    ({"extends": "int8", "calibration": "magic"}, ["calibration", "magic"]),
    ({"extends": "int8", "colour": 1}, ["unknown field", "colour"]),
    ({"formats": {"experts": "int8"}}, ["no format for"]),
    ({"extends": "nope"}, ["unknown recipe", "nope"]),
])
def test_recipe_errors_name_the_problem(spec, words):
    with pytest.raises(RecipeError) as e:
        load_recipe(spec).assign(CFG)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_bad_recipe_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(RecipeError, match="not valid JSON"):
        load_recipe(p)
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.toml")


def test_roundtrip_to_dict():
    for name in recipe_names():
        r = get_recipe(name)
        assert Recipe.from_dict(r.to_dict()).assign(CFG) == r.assign(CFG)
    assert set(CLASSES) == set(get_recipe("int8").formats)
