"""Expert offload: generation identical to the fully resident run, the cache really evicts and refetches, and a
budget that cannot hold the non-expert weights is refused before any expert is read."""

import pytest
import torch

from flashport import OffloadOptions, OptionError, load_engine
from flashport.export.bundle import export
from flashport.offload import OffloadError

PROMPT = "the quick brown fox jumps over"


@pytest.fixture(scope="module")
def bundle(tiny_release, tmp_path_factory):
    out = tmp_path_factory.mktemp("offload") / "int8"
    export(tiny_release, out, "int8", progress=False)
    return out


@pytest.fixture(scope="module")
def resident(bundle):
    eng = load_engine(bundle, backend="torch")
    ids = eng.encode(PROMPT)
    return ids, eng.logits(ids), eng.generate(ids, max_new_tokens=8).token_ids


def _budget(path, fraction, tier="host"):
    """Device bytes leaving `fraction` of all routed-expert bytes for experts."""
    eng = load_engine(path, backend="torch", offload=OffloadOptions(1 << 40, tier=tier))
    needs = eng.offload.needs
    eng.close()
    return needs.fixed + int(fraction * needs.experts)


@pytest.mark.parametrize("tier,prefetch", [("host", True), ("disk", True), ("disk", False)])
def test_offload_generation_identical(bundle, resident, tier, prefetch):
    ids, ref_logits, ref_tokens = resident
    eng = load_engine(bundle, backend="torch",
                      offload=OffloadOptions(_budget(bundle, 0.25), tier=tier, prefetch=prefetch))
    assert torch.equal(eng.logits(ids), ref_logits)  # bit-identical: same packed bytes, same ops
    assert eng.generate(ids, max_new_tokens=8).token_ids == ref_tokens
    eng.offload.drain()
    s = eng.offload.stats()
    assert s["misses"] + s["prefetch_waits"] > 0 and s["evictions"] > 0  # it really ran from a small cache
    assert s["cached_bytes"] <= s["capacity_bytes"]
    assert (s["bytes_read_disk"] > 0) == (tier == "disk")
    assert (s["prefetched"] > 0) == prefetch
    eng.close()


def test_offload_checkpoint_host_tier(tiny_release):
    ref = load_engine(tiny_release, backend="torch")
    ids = ref.encode(PROMPT)
    eng = load_engine(tiny_release, backend="torch", offload=OffloadOptions(_budget(tiny_release, 0.1)))
    assert torch.equal(eng.logits(ids), ref.logits(ids))
    assert eng.offload.stats()["evictions"] > 0
    with pytest.raises(OptionError, match="disk tier reads experts from a bundle"):  # before anything is read
        load_engine(tiny_release, offload=OffloadOptions("1GiB", tier="disk"))


def test_budget_below_non_expert_weights_is_refused(bundle):
    with pytest.raises(OffloadError, match="does not fit: the device needs .* non-expert weights"):
        load_engine(bundle, offload=OffloadOptions("256KiB", tier="disk"))
