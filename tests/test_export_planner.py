"""Placement planner: device specs, EP balance with replicas, edge tiers by hotness, refusals, v4-flash shapes."""

import pytest
import torch

from flashport.config import ModelConfig
from flashport.export.planner import (PlanError, kv_bytes, parse_devices, parse_size, plan, plan_cli,
                                      weight_bytes)
from flashport.export.recipes import get_recipe
from flashport.kv import kv_layout

V4 = ModelConfig.preset("v4-flash")


def _zipf_stats(cfg, seed=0):
    """Skewed routing counts per layer (a few hot experts), like measured MoE routing."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for p in [f"layers.{i}" for i in range(cfg.num_hidden_layers)] + ["mtp.0"]:
        ranks = torch.randperm(cfg.n_routed_experts, generator=g) + 1
        layers[p] = (100000 / ranks.double() ** 1.1).round().long().tolist()
    return {"tokens": 1000, "layers": layers}


def test_sizes_and_devices():
    assert parse_size("64GiB") == 64 << 30 and parse_size("128GB") == 128 * 10**9 and parse_size("512") == 512
    devs = parse_devices("npu:0=64GiB,npu:1=64GiB,cpu=256GiB,disk")
    assert [(d.name, d.kind, d.partition) for d in devs] == [("npu:0", "accel", "npu0"), ("npu:1", "accel", "npu1"),
                                                            ("cpu", "host", "cpu"), ("disk", "disk", "disk")]
    assert devs[3].budget is None
    for bad, word in [("npu:0", "needs a memory budget"), ("npu:0=64XB", "cannot read size"),
                      ("cpu=1G,cpu=2G", "twice"), ("", "no devices"), ("n p u=1G", "NAME=SIZE")]:
        with pytest.raises(PlanError, match=word):
            parse_devices(bad)


def test_weight_and_kv_accounting():
    cfg = ModelConfig.preset("flash-tiny")
    wb = weight_bytes(cfg, get_recipe("int4-experts"))
    # one routed expert = w1, w3 [I, D] + w2 [D, I] in int4-g32: 4 bits + one fp32 scale per 32 = 5 bits/weight
    I, D = cfg.moe_intermediate_size, cfg.hidden_size
    assert wb.expert["layers.3"] == 3 * I * D * 5 // 8 + 3 * 16  # + the int64 [2] shape of each
    per_tok, fixed = kv_bytes(cfg, "fp32")
    lay = kv_layout(cfg, 4)
    assert per_tok == lay.compressed_per_token and fixed == lay.fixed_per_seq
    assert kv_bytes(cfg, "bf16")[0] == per_tok / 2
    with pytest.raises(PlanError, match="kv_dtype"):
        kv_bytes(cfg, "int3")


def test_ep_v4_flash_on_8x64gb_balances_with_replicas():
    p = plan(V4, ",".join(f"npu:{i}=64GB" for i in range(8)), "int4-experts", _zipf_stats(V4), context=131072,
             sequences=8)
    assert len(p.placement) == V4.num_hidden_layers + 1  # + the MTP block
    for prefix, per_expert in p.placement.items():
        assert len(per_expert) == 256 and all(per_expert)
        slots = {}
        for holders in per_expert:
            assert len(set(holders)) == len(holders)  # never two copies on one rank
            for d in holders:
                slots[d] = slots.get(d, 0) + 1
        assert len(set(slots.values())) == 1  # every rank holds as many experts
    assert p.imbalance["mean"] < p.imbalance["no_replicas_mean"]
    assert p.imbalance["max"] < 1.25
    for u in p.usage.values():
        assert u.total <= 64 * 10**9
    assert p.kv_capacity_tokens >= 131072 * 8
    t = p.table()
    assert "npu:7" in t and "imbalance" in t and "KV capacity" in t


def test_edge_pins_hot_experts_and_spills_to_disk():
    stats = _zipf_stats(V4, seed=1)
    p = plan(V4, "cpu=128GB,disk", "int4-experts", stats, context=65536, sequences=1)
    hot_cpu = [stats["layers"][q][e] / sum(stats["layers"][q]) for q, per in p.placement.items()
               for e, h in enumerate(per) if h == ["cpu"]]
    on_disk = [stats["layers"][q][e] / sum(stats["layers"][q]) for q, per in p.placement.items()
               for e, h in enumerate(per) if h == ["disk"]]
    assert hot_cpu and on_disk and min(hot_cpu) >= max(on_disk)
    assert p.usage["cpu"].total <= 128 * 10**9
    assert p.usage["cpu"].load > 0.8  # skewed routing: most activations served from memory
    assert p.fetch_bytes_per_token["disk"] > 0


def test_refusals_are_clear():
    with pytest.raises(PlanError, match="non-expert weights"):
        plan(V4, "cpu=8GiB,disk", "int4-experts")
    with pytest.raises(PlanError, match="each of the 4 ranks"):
        plan(V4, ",".join(f"npu:{i}=32GB" for i in range(4)), "int4-experts")
    with pytest.raises(PlanError, match="add host memory or a disk"):
        plan(V4, "cpu=128GB", "int4-experts")
    with pytest.raises(PlanError, match="KV"):
        plan(V4, "cpu=128GB,disk", "int4-experts", context=1048576, sequences=64)
    with pytest.raises(PlanError, match="two or more accelerators"):
        plan(V4, "npu:0=64GB,cpu=64GB", "int4-experts", mode="ep")


def test_plan_cli_small_model_uniform(capsys):
    out = plan_cli("flash-tiny", "npu:0=1GiB,npu:1=1GiB", recipe="int8", context=4096, sequences=2)
    assert "mode ep" in out and "uniform" in out and "mean 1.000" in out
