"""Expert offload: generation identical to the fully resident run, the cache really evicts and refetches, and a
budget that cannot hold the non-expert weights is refused by the planner."""

import pytest
import torch

from flashport.engine import Engine
from flashport.export.bundle import export
from flashport.export.planner import PlanError
from flashport.offload import FP32_RECIPE, OffloadError, expert_budget, load_engine

PROMPT = "the quick brown fox jumps over"


@pytest.fixture(scope="module")
def bundle(tiny_release, tmp_path_factory):
    out = tmp_path_factory.mktemp("offload") / "int8"
    export(tiny_release, out, "int8", progress=False)
    return out


@pytest.fixture(scope="module")
def resident(bundle):
    eng = Engine.load(bundle, backend="torch")
    ids = eng.encode(PROMPT)
    return ids, eng.logits(ids), eng.generate(ids, max_new_tokens=8).token_ids


def _budget(cfg, recipe, fraction):
    """Device bytes leaving `fraction` of all routed-expert bytes for experts."""
    huge = 1 << 40
    plan, left = expert_budget(cfg, huge, recipe)
    experts = plan.usage["device"].experts + plan.usage["host"].experts
    return huge - left + int(fraction * experts)


@pytest.mark.parametrize("tier,prefetch", [("host", True), ("disk", True), ("disk", False)])
def test_offload_generation_identical(bundle, resident, tier, prefetch):
    ids, ref_logits, ref_tokens = resident
    cfg = Engine.load(bundle, backend="torch").cfg
    import json

    recipe = json.loads((bundle / "manifest.json").read_text())["recipe"]
    eng = load_engine(bundle, max_device_memory=_budget(cfg, recipe, 0.25), tier=tier, backend="torch",
                      prefetch=prefetch)
    assert torch.equal(eng.logits(ids), ref_logits)  # bit-identical: same packed bytes, same ops
    assert eng.generate(ids, max_new_tokens=8).token_ids == ref_tokens
    eng.offload.drain()
    s = eng.offload.stats()
    assert s["misses"] + s["prefetch_waits"] > 0 and s["evictions"] > 0  # it really ran from a small cache
    assert s["cached_bytes"] <= s["capacity_bytes"]
    assert (s["bytes_read_disk"] > 0) == (tier == "disk")
    assert (s["prefetched"] > 0) == prefetch
    eng.offload.close()


def test_offload_checkpoint_host_tier(tiny_release):
    ref = Engine.load(tiny_release, backend="torch")
    ids = ref.encode(PROMPT)
    eng = load_engine(tiny_release, max_device_memory=_budget(ref.cfg, FP32_RECIPE, 0.1), backend="torch")
    assert torch.equal(eng.logits(ids), ref.logits(ids))
    assert eng.offload.stats()["evictions"] > 0
    with pytest.raises(OffloadError, match="bundle"):
        load_engine(tiny_release, max_device_memory="1GiB", tier="disk")


def test_budget_below_non_expert_weights_is_a_plan_error(bundle):
    with pytest.raises(PlanError, match="does not fit: device"):
        load_engine(bundle, max_device_memory="256KiB", tier="disk")
