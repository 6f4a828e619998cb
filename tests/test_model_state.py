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
