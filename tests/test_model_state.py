"""The decoding state: one-shot, chunked and token-by-token prefill reach the same state and logits."""

import pytest
import torch

from flashport.checkpoint import CheckpointReader
from flashport.model import SeqState, Transformer


@pytest.fixture(scope="module")
def model(tiny_release):
    r = CheckpointReader(tiny_release)
    m = Transformer(r.cfg)
    m.load_state_dict(r.load_state_dict())
    return m


@torch.no_grad()
@pytest.mark.parametrize("chunk", [1, 5, 32, 61])
def test_chunked_prefill_matches_one_shot(model, chunk):
    cfg = model.cfg
    n = 3 * cfg.kv_block_tokens + 7  # ends mid-block, mid-window
    ids = torch.randint(2, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(chunk))
    one = SeqState.empty(cfg)
    ref = model(ids, one)
    st, parts = SeqState.empty(cfg), []
    for a in range(0, n, chunk):
        parts.append(model(ids[a:a + chunk], st))
    assert (torch.cat(parts) - ref).abs().max() < 1e-4  # fp32 reassociation only
    a, b = one.tensors(), st.tensors()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert torch.allclose(a[k], b[k], atol=1e-5), k


@torch.no_grad()
def test_state_layout(model):
    """Fixed-size parts stay fixed; compressed entries grow by one per window, in blocks of lcm(rates)."""
    cfg = model.cfg
    n = 2 * cfg.kv_block_tokens + 3
    st = SeqState.empty(cfg)
    model(torch.randint(2, 100, (n,)), st)
    assert st.n_tokens == n
    for i, ls in enumerate(st.layers):
        assert ls.window.shape == (cfg.sliding_window, cfg.head_dim)
        kind = cfg.layer_kind(i)
        if kind == "swa":
            assert ls.comp is None and ls.index is None
            continue
        m = cfg.csa_rate if kind == "csa" else cfg.hca_rate
        assert ls.comp.entries.shape == (n // m, cfg.head_dim)
        assert ls.comp.kv.shape[0] == n % m
        if kind == "csa":
            assert ls.comp.overlap_kv.shape == (m, cfg.head_dim)
            assert ls.index.entries.shape == (n // m, cfg.index_head_dim)
    assert cfg.kv_block_tokens % cfg.csa_rate == 0 and cfg.kv_block_tokens % cfg.hca_rate == 0


@torch.no_grad()
def test_batched_sequences_match_single(model):
    """forward_batch over several sequences gives each one's own logits (continuous batching)."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(2, cfg.vocab_size, (n,), generator=g) for n in (40, 7, 70)]
    singles = [model(s) for s in seqs]
    states = [SeqState.empty(cfg) for _ in seqs]
    batched = model.forward_batch(seqs, states)
    for a, b in zip(singles, batched):
        assert (a - b).abs().max() < 1e-4


# ---------------------------------------------------------------------------------------------------------------
# KV numerics (flashport.quant.kv_numerics) and replay
# ---------------------------------------------------------------------------------------------------------------
def test_release_kv_numerics_follow_the_release_quantizer():
    """FP8 e4m3 in blocks of 64 non-RoPE values with a power-of-two (UE8M0) scale 2**ceil(log2(amax / 448)), BF16
    for the RoPE dims; packing is exact and idempotent (what is stored is what the model used)."""
    from flashport.quant.kv_numerics import kv_entry_bytes, pack_kv, round_kv, unpack_kv

    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 512, generator=g) * torch.logspace(-3, 3, 7)[:, None]
    x[0, :64] = 0.0  # an all-zero block keeps a finite scale (amax floor 1e-4)
    p = pack_kv(x, "release", 64)
    assert p["q"].dtype == torch.float8_e4m3fn and p["q"].shape == (7, 448)
    assert p["e"].dtype == torch.uint8 and p["e"].shape == (7, 7) and p["rope"].dtype == torch.bfloat16
    assert sum(t.numel() * t.element_size() for t in p.values()) == 7 * kv_entry_bytes(512, 64, "release") == 7 * 583
    blocks = x[:, :448].reshape(7, 7, 64)
    want = torch.ceil(torch.log2(blocks.abs().amax(-1).clamp_min(1e-4) / 448)).to(torch.int32) + 127
    assert torch.equal(p["e"].to(torch.int32), want)
    scale = 2.0 ** (want - 127).float()[..., None]
    ref = ((blocks / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale).reshape(7, 448)
    r = round_kv(x, "release", 64)
    assert torch.equal(r[:, :448], ref) and torch.equal(r[:, 448:], x[:, 448:].to(torch.bfloat16).float())
    assert torch.equal(r[0, :64], torch.zeros(64))
    assert torch.equal(unpack_kv(pack_kv(r, "release", 64), "release", 64), r)  # idempotent
    assert 0 < (r - x).abs().max() <= x.abs().max() / 16  # e4m3: 3 mantissa bits
    for dt, nbytes in (("bf16", 2 * 512), ("fp32", 4 * 512)):
        assert kv_entry_bytes(512, 64, dt) == nbytes
        assert torch.equal(unpack_kv(pack_kv(x, dt, 64), dt, 64), round_kv(x, dt, 64))
    assert round_kv(x, "fp32", 64) is x


@torch.no_grad()
@pytest.mark.parametrize("numerics", ["release", "bf16"])
def test_state_numerics_round_every_entry(model, numerics):
    """A state made in release / bf16 numerics holds compressed entries and indexer keys already rounded to them
    (packing them loses nothing), and its logits stay close to the fp32 state's."""
    from flashport.quant.kv_numerics import round_kv

    cfg = model.cfg
    ids = torch.randint(2, cfg.vocab_size, (2 * cfg.kv_block_tokens + 5,), generator=torch.Generator().manual_seed(4))
    st32, st = SeqState.empty(cfg), SeqState.empty(cfg, numerics)
    ref, got = model(ids, st32), model(ids, st)
    pools = [ps for ls in st.layers for ps in (ls.comp, ls.index) if ps is not None]
    assert pools and all(ps.numerics == numerics and ps.entries.shape[0] > 0 for ps in pools)
    assert all(torch.equal(round_kv(ps.entries, numerics, cfg.qk_rope_head_dim), ps.entries) for ps in pools)
    pools32 = [ps for ls in st32.layers for ps in (ls.comp, ls.index) if ps is not None]
    assert any(not torch.equal(a.entries, b.entries) for a, b in zip(pools, pools32))
    kl = (ref.softmax(-1) * (ref.log_softmax(-1) - got.log_softmax(-1))).sum(-1)  # random weights: chaotic
    assert not torch.equal(got, ref) and kl.mean() < 0.1 and (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    assert st.clone().layers[2].comp.numerics == numerics and "2.comp.numerics" not in st.tensors()


@torch.no_grad()
def test_replay_advances_the_compressors_without_appending(model):
    """PoolState.replay (the prefix cache's window rebuild): with the entries of a span already in the state,
    re-running the span rebuilds the same windows, partial windows and overlaps, appends no entry, and gives the
    same logits as the first run."""
    cfg = model.cfg
    B = cfg.kv_block_tokens
    ids = torch.randint(2, cfg.vocab_size, (3 * B,), generator=torch.Generator().manual_seed(5))
    full = SeqState.empty(cfg)
    model(ids[:B], full)
    ref = model(ids[B:], full)
    st = SeqState.empty(cfg)
    model(ids[:B], st)
    for ls_st, ls_full in zip(st.layers, full.layers):  # the span's entries come "from the cache"
        for part in ("comp", "index"):
            if getattr(ls_st, part) is not None:
                getattr(ls_st, part).entries = getattr(ls_full, part).entries.clone()
    pools = [ps for ls in st.layers for ps in (ls.comp, ls.index) if ps is not None]
    for ps in pools:
        ps.replay = True
    got = model(ids[B:], st)
    for ps in pools:
        ps.replay = False
    a, b = st.tensors(), full.tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (got - ref).abs().max() < 1e-4


def test_decode_keys_are_a_view_of_the_entries_not_a_copy(model):
    """PoolState.after (an HCA decode step's keys [window | entries]): equal to the torch.cat it replaces, a view of
    the store's buffer (no copy of the n entries), and never written where another state can see: a snapshot's
    entries, a clone's and the owner's own entries keep their values."""
    from flashport.model import PoolState

    g = torch.Generator().manual_seed(0)
    ps = PoolState(kv=torch.zeros(0, 8), gate=torch.zeros(0, 8), entries=torch.zeros(0, 8))
    ps.append(torch.randn(300, 8, generator=g))
    snapshot, store = ps.entries, None  # what a session snapshot shares
    before = snapshot.clone()
    for f in (3, 5, 4):
        front = torch.randn(f, 8, generator=g)
        keys = ps.after(front, reserve=5)
        store = store if f != 3 else ps.store
        assert ps.store is store and ps.store.valid_for(ps)  # made once, then reused at every step
        assert torch.equal(keys, torch.cat([front, before]))
        buf = ps.store.buf
        assert buf.data_ptr() <= keys.data_ptr() < buf.data_ptr() + buf.numel() * 4  # a view, not a copy
    assert torch.equal(snapshot, before) and torch.equal(ps.entries, before)
    copy_ = PoolState(**{k: v for k, v in vars(ps).items() if k != "store"})
    copy_.after(torch.ones(5, 8), reserve=5)  # not the owner: its own store, the owner's rows untouched
    assert copy_.store is not ps.store and torch.equal(ps.entries, before)
    ps.append(torch.ones(1, 8))  # appends still land after the entries, the scratch rows stay in front
    assert torch.equal(ps.after(torch.zeros(2, 8), reserve=5), torch.cat([torch.zeros(2, 8), before, torch.ones(1, 8)]))
    with pytest.raises(ValueError, match="6 front rows, 5 reserved"):
        ps.after(torch.zeros(6, 8), reserve=5)


@torch.no_grad()
def test_decode_logits_with_the_keys_view_equal_the_concatenation(model, monkeypatch):
    """A decode run with HCA keys as a view of the store equals one where every step concatenates (bit-exact: the
    same values in the same order reach the same attention op)."""
    from flashport.model import PoolState

    ids = torch.randint(2, model.cfg.vocab_size, (200,), generator=torch.Generator().manual_seed(3))

    def run():
        st = SeqState.empty(model.cfg)
        model(ids[:150], st)
        return torch.stack([model(ids[t:t + 1], st) for t in range(150, 200)])

    calls, after = [], PoolState.after
    monkeypatch.setattr(PoolState, "after", lambda self, front, reserve: calls.append(1) or after(self, front, reserve))
    fast = run()
    assert len(calls) >= 50  # every HCA layer at every step
    monkeypatch.setattr(PoolState, "after", lambda self, front, reserve: torch.cat([front, self.entries]))
    assert torch.equal(fast, run())
