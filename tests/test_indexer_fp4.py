"""The lightning indexer in the release's numerics (quant/index_numerics.py, backends/indexer_fp4.py, the C++
kernel kernels/cpu/indexer_fp4.cpp) and the preallocated compressed entries (model.PoolState / EntryStore)."""

import copy
import math

import pytest
import torch

from flashport.backends import cpu_quant, reference
from flashport.backends.indexer_fp4 import Fp4Keys, rotate_quantize, scores, select
from flashport.config import PRESETS, ModelConfig
from flashport.model import PoolState, SeqState, Transformer
from flashport.quant.index_numerics import fp4_dequantize, fp4_quantize, fp4_round, hadamard, index_scores

GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def fp4_brute(x: torch.Tensor) -> torch.Tensor:
    """An independent FP4 simulation: per block of 32 the smallest power-of-two scale that brings amax within 6,
    then the nearest e2m1 value, ties to the even encoding (even index in GRID)."""
    out = torch.empty_like(x)
    for r in range(x.shape[0]):
        for b in range(0, x.shape[1], 32):
            blk = x[r, b:b + 32]
            amax = max(float(blk.abs().max()), 6 * 2.0 ** -126)
            e = -130
            while amax / 2.0 ** e > 6:
                e += 1
            for j, v in enumerate(blk.tolist()):
                y = min(abs(v) / 2.0 ** e, 6.0)
                dist = (GRID - y).abs()
                best = [i for i in range(8) if dist[i] == dist.min()]
                i = best[0] if len(best) == 1 else next(i for i in best if i % 2 == 0)
                out[r, b + j] = math.copysign(float(GRID[i]) * 2.0 ** e, v)
    return out


def test_fp4_quantize_is_the_release_recipe():
    torch.manual_seed(0)
    x = torch.randn(6, 64) * torch.logspace(-3, 3, 6)[:, None]
    # exact midpoints between e2m1 values, scaled: round-to-nearest-even decides them
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -0.75, -2.5, -5.0, 6.0])
    x[0, :12] = mids
    x[0, 12:32] = 0.1
    x[1, :32] = 0.0  # an all-zero block: the amax floor keeps a finite scale
    got = fp4_round(x)
    assert torch.equal(got, fp4_brute(x))
    assert got[0, :12].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -1.0, -2.0, -4.0, 6.0]
    codes, e = fp4_quantize(x)
    assert codes.dtype == torch.int8 and set(codes.abs().unique().tolist()) <= {0, 1, 2, 3, 4, 6, 8, 12}
    assert torch.equal(fp4_dequantize(codes, e), got)
    assert torch.equal(fp4_round(got), got)  # idempotent: stored keys re-quantize to themselves


@pytest.mark.skipif(cpu_quant.ext() is None, reason="C++ extension unavailable")
def test_rotate_quantize_kernel_is_bit_identical():
    torch.manual_seed(1)
    x = torch.randn(300, 4, 64) * torch.logspace(-4, 4, 300)[:, None, None]
    x[0, 0] = 0.0  # rotated to exact e2m1 midpoints: 8 * (a e0 + b e1) -> +-(a + b), +-(a - b) = 5, 3.5
    x[0, 0, 0], x[0, 0, 1] = 8 * 4.25, 8 * 0.75
    c, e = rotate_quantize(x)
    assert set(c[0, 0].abs().tolist()) == {8}  # 5 and 3.5 (scale 1) both round to 4: ties to even
    c2, e2 = fp4_quantize(hadamard(x))
    assert torch.equal(c, c2) and torch.equal(e, e2)
    y = torch.zeros(2, 32)  # zeros: the amax floor
    y[1] = 1.0
    assert torch.equal(torch.cat(rotate_quantize(y), 1), torch.cat(fp4_quantize(hadamard(y)), 1))


def test_hadamard_is_orthonormal():
    q, k = torch.randn(5, 128, dtype=torch.float64), torch.randn(7, 128, dtype=torch.float64)
    assert torch.allclose(hadamard(q) @ hadamard(k).T, q @ k.T, atol=1e-10)
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(torch.randn(2, 48))


def _problem(T, H, D, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    qc, qe = fp4_quantize(torch.randn(T, H, D, generator=g) * 3)
    kc, ke = fp4_quantize(torch.randn(n, D, generator=g))
    w = torch.randn(T, H, generator=g)
    keys = Fp4Keys(D, capacity=16)
    for a in range(0, n, 37):  # appended in pieces, across several capacity doublings
        keys.append(kc[a:a + 37], ke[a:a + 37])
    return qc, qe, w, keys, kc, ke


needs_ext = pytest.mark.skipif(cpu_quant.ext() is None, reason="C++ extension unavailable")


@needs_ext
@pytest.mark.parametrize("D", [32, 64])
def test_kernel_scores_are_bit_identical_to_the_torch_reference(D):
    qc, qe, w, keys, kc, ke = _problem(5, 7, D, 301)
    kc2, ke2 = keys.rows()
    assert torch.equal(kc2, kc) and torch.equal(ke2, ke)
    want = index_scores(qc, qe, w, kc, ke)
    got = scores(qc, qe, w, keys, 301)
    assert torch.equal(got, want)
    # and the integer numerics equal fp64 dot products of the dequantized values (only the head sum rounds)
    q64, k64 = fp4_dequantize(qc, qe).double(), fp4_dequantize(kc, ke).double()
    exact = (torch.einsum("thd,nd->thn", q64, k64).clamp_min(0) * w.double()[..., None]).sum(1)
    assert torch.allclose(got.double(), exact, rtol=1e-5, atol=1e-5 * float(exact.abs().max()))


def _reference_sets(qc, qe, w, kc, ke, limits, k):
    s = index_scores(qc, qe, w, kc, ke)
    s = s.masked_fill(torch.arange(s.shape[1])[None, :] >= limits[:, None], float("-inf"))
    top = reference.topk_indices(s, min(k, s.shape[1]))
    return [set(r[r < int(lim)].tolist()) for r, lim in zip(top, limits)]


@pytest.mark.parametrize("T", [1, 40])  # decode (entry segments in parallel) and prefill (query blocks)
def test_select_picks_the_reference_top_k(T):
    n, k = 5000, 16
    qc, qe, w, keys, kc, ke = _problem(T, 8, 32, n, seed=T)
    limits = torch.randint(0, n + 1, (T,))
    limits[0] = n
    if T > 1:
        limits[1], limits[2] = 3, k  # fewer visible entries than k: all of them, -1 padded
    idx = select(qc, qe, w, keys, limits, n, k)
    want = _reference_sets(qc, qe, w, kc, ke, limits, k)
    assert [set(r[r >= 0].tolist()) for r in idx] == want
    assert all(int((r >= 0).sum()) == min(k, int(lim)) for r, lim in zip(idx, limits))


def test_select_breaks_ties_by_the_reference_rule():
    """Entries with identical keys tie exactly; which of them fill the last places is torch.topk's CPU choice
    over the full row (reference.topk_indices), not the kernel's heap order."""
    n, k, D = 600, 16, 32
    qc, qe, w, _, kc, ke = _problem(3, 4, D, n, seed=3)
    kc[100:400], ke[100:400] = kc[7], ke[7]  # 300 copies of one key: they all score the same
    w = w.abs()
    qc[:] = kc[7].view(1, 1, D)  # queries aligned with it: the copies are the top scores, tied across the cut
    qe[:] = 0
    keys = Fp4Keys(D)
    keys.append(kc, ke)
    limits = torch.tensor([n, 500, 350])
    s = index_scores(qc, qe, w, kc, ke)
    assert (s[:, 100:400] == s[:, 7:8]).all() and (s.topk(k + 1).values[:, -1] == s.topk(k).values[:, -1]).all()
    idx = select(qc, qe, w, keys, limits, n, k)
    assert [set(r[r >= 0].tolist()) for r in idx] == _reference_sets(qc, qe, w, kc, ke, limits, k)


def test_entries_are_appended_in_place_and_copies_stay_valid():
    ps = PoolState(torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, 4))
    ps.append(torch.ones(3, 4))
    ptr = ps.entries.data_ptr()
    for i in range(20):
        ps.append(torch.full((2, 4), float(i)))
    assert ps.entries.shape == (43, 4) and ps.entries.data_ptr() == ptr  # no copy per append (capacity 256)
    snap = copy.copy(ps)  # a session snapshot: shares the view
    before = snap.entries.clone()
    ps.append(torch.full((5, 4), 7.0))  # the owner appends past the snapshot's rows
    snap.append(torch.full((1, 4), -1.0))  # the snapshot continues on its own rows
    assert torch.equal(snap.entries[:43], before) and snap.entries[43].eq(-1).all()
    assert ps.entries[43:].eq(7).all() and ps.entries.shape[0] == 48
    ps.entries = torch.randn(10, 4)  # a restore assigns entries: the next append starts from them
    ps.append(torch.zeros(1, 4))
    assert ps.entries.shape[0] == 11 and ps.entries[10].eq(0).all()


def test_release_numerics_indexer_in_the_model():
    """With the release's indexer numerics the indexer's keys are rotated FP4 values and its picks come from the
    FP4 kernel; a prefill in chunks stays close to one shot; off by default (transformers' fp32 indexer)."""
    torch.manual_seed(0)
    cfg = ModelConfig(**PRESETS["flash-tiny"])
    model = Transformer(cfg)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    ids = torch.randint(0, cfg.vocab_size, (160,))
    one, chunked = SeqState.empty(cfg, "release", True), SeqState.empty(cfg, "release", True)
    with torch.no_grad():
        a = model(ids, one)
        b = torch.cat([model(ids[i:i + 40], chunked) for i in range(0, len(ids), 40)])
    idx = one.layers[2].index
    assert idx.entries.shape[0] == 40 > cfg.index_topk
    assert torch.equal(fp4_round(idx.entries), idx.entries)
    assert torch.isfinite(a).all() and torch.allclose(a, b, atol=1e-3)
    fp32 = SeqState.empty(cfg, "release")
    assert not fp32.layers[2].index.official
    with torch.no_grad():
        c = model(ids, fp32)
    assert not torch.equal(fp32.layers[2].index.entries, idx.entries)  # the fp32 path is transformers' (unrotated)
    assert (a - c).abs().max() < 1.0


def test_official_index_numerics_switch(monkeypatch):
    cfg = ModelConfig(**PRESETS["flash-tiny"])
    monkeypatch.setenv("FLASHPORT_INDEX_NUMERICS", "release")
    assert SeqState.empty(cfg).layers[2].index.official and SeqState.empty(cfg).clone().layers[2].index.official
    monkeypatch.setenv("FLASHPORT_INDEX_NUMERICS", "fp4")
    with pytest.raises(ValueError, match="FLASHPORT_INDEX_NUMERICS must be fp32 or release"):
        SeqState.empty(cfg)


def test_a_cloned_state_owns_its_store_from_the_start():
    """SeqState.clone copies each pool's store (rows and FP4 codes) once: the copy's first append writes in place
    (rebuilding the store there cost ~15 ms per step at 64K tokens), and neither state sees the other's rows."""
    cfg = ModelConfig(**PRESETS["flash-tiny"])
    state = SeqState.empty(cfg, "release", True)
    idx = state.layers[2].index
    idx.append(torch.randn(40, cfg.index_head_dim), fp4=True)
    copy_ = state.clone()
    cidx = copy_.layers[2].index
    assert cidx.store is not None and cidx.store.valid_for(cidx) and cidx.store.fp4.n == 40
    ptr = cidx.entries.data_ptr()
    cidx.append(torch.zeros(1, cfg.index_head_dim), fp4=True)
    idx.append(torch.ones(1, cfg.index_head_dim), fp4=True)
    assert cidx.entries.data_ptr() == ptr and cidx.entries[40].eq(0).all() and idx.entries[40].eq(1).all()
    assert torch.equal(cidx.entries[:40], idx.entries[:40])
    assert torch.equal(cidx.fp4_keys().rows()[0][:40], idx.fp4_keys().rows()[0][:40])
    assert cidx.fp4_keys().n == idx.fp4_keys().n == 41


def test_index_numerics_is_an_engine_option(tiny_release, tmp_path, monkeypatch):
    """`index_numerics` (load_engine, EngineOptions, `--index-numerics`) chooses the indexer's numerics of every
    new sequence with or without a KV cache, overrides FLASHPORT_INDEX_NUMERICS, names the cache's namespace
    (caches of different indexer numerics never mix), and a bad value is refused before any weight is read."""
    from flashport.engine import Engine
    from flashport.options import EngineOptions, KVOptions, OptionError

    monkeypatch.setenv("FLASHPORT_INDEX_NUMERICS", "release")
    eng = Engine.load(tiny_release, index_numerics="fp32")
    assert not eng.new_state().layers[2].index.official
    monkeypatch.delenv("FLASHPORT_INDEX_NUMERICS")
    eng = Engine.load(tiny_release)
    assert eng.index_numerics == "fp32" and not eng.new_state().layers[2].index.official
    namespaces = []
    for numerics in ("release", "fp32"):
        eng = Engine.load(tiny_release, index_numerics=numerics, kv=KVOptions(tmp_path / numerics))
        st = eng.new_state()
        assert st.layers[2].index.official == (numerics == "release")
        namespaces.append(eng.kv.namespace)
        ids = list(range(3, 3 + 2 * eng.cfg.kv_block_tokens + 5))
        state, logits, stats = eng.prefill_cached(ids, progress=False)
        assert state.layers[2].index.official == (numerics == "release")
        eng.close()
    assert namespaces[0] != namespaces[1] and namespaces[0].replace("-fp4index", "") == namespaces[1]
    for bad in ("fp4", "FP32", 1):
        with pytest.raises(OptionError, match="index numerics must be fp32 or release"):
            Engine.load(tmp_path / "missing", index_numerics=bad)  # refused before the path is even looked at
        with pytest.raises(OptionError, match="index numerics must be fp32 or release"):
            EngineOptions(index_numerics=bad)
    monkeypatch.setenv("FLASHPORT_INDEX_NUMERICS", "fp8")
    with pytest.raises(OptionError, match="FLASHPORT_INDEX_NUMERICS must be fp32 or release"):
        Engine.load(tmp_path / "missing")


def test_index_numerics_flag(tiny_release, capsys):
    """`--index-numerics` on generate: a typo is one line naming the flag and the closest value, exit 2; release
    with a whole-step backend (its own graph has transformers' indexer) is refused naming both options."""
    from flashport.cli import main

    assert main(["generate", str(tiny_release), "--prompt", "hi", "--index-numerics", "relase"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--index-numerics" in err[0] and "did you mean release" in err[0]
    assert main(["generate", str(tiny_release), "--prompt", "hi", "--max-new-tokens", "2", "--index-numerics",
                 "release", "--json"]) == 0
    capsys.readouterr()
    assert main(["generate", str(tiny_release), "--prompt", "hi", "--index-numerics", "release", "--backend",
                 "onnxruntime"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "index numerics release with backend onnxruntime" in err[0]
