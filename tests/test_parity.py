"""Parity with transformers' DeepseekV4ForCausalLM on the same weights (the peer implementation).

Both read the same checkpoint (release format: FP8 blocks + MXFP4 experts + UE8M0 scales, or transformers'
own saved format). Bounds: max-abs logits difference <= 1e-4 in fp32 and 64 identical greedy tokens.
"""

import warnings

import pytest
import torch

from flashport.checkpoint import CheckpointReader
from flashport.model import SeqState, Transformer
from greedy import hf_greedy, ours_greedy

transformers = pytest.importorskip("transformers")
PROMPT_LEN = 640


def load_pair(path):
    from transformers import DeepseekV4ForCausalLM, logging as hf_logging

    hf_logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = DeepseekV4ForCausalLM.from_pretrained(str(path), dtype=torch.float32).float().eval()
    reader = CheckpointReader(path)
    ours = Transformer(reader.cfg)
    ours.load_state_dict(reader.load_state_dict())
    return hf, ours


def prompt(cfg, n=PROMPT_LEN, seed=0):
    return torch.randint(2, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("ckpt", ["tiny_release", "tiny_hf", "alt_release"])
@torch.no_grad()
def test_logits_match_transformers(ckpt, request):
    hf, ours = load_pair(request.getfixturevalue(ckpt))
    cfg = ours.cfg
    ids = prompt(cfg)
    # the prompt must cross several CSA and HCA windows and make the indexer drop entries
    assert PROMPT_LEN // cfg.csa_rate > 2 * cfg.index_topk and PROMPT_LEN // cfg.hca_rate >= 4
    ref = hf(input_ids=ids[None]).logits[0]
    got = ours(ids)
    assert got.shape == ref.shape == (PROMPT_LEN, cfg.vocab_size)
    diff = (got - ref).abs().max().item()
    assert diff <= 1e-4, f"max-abs logits difference {diff}"
    # chunked prefill through the decoding state gives the same logits
    state, parts = SeqState.empty(cfg), []
    for a in range(0, PROMPT_LEN, 97):
        parts.append(ours(ids[a:a + 97], state))
    assert (torch.cat(parts) - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("ckpt", ["tiny_release", "alt_release"])
@torch.no_grad()
def test_greedy_tokens_match_transformers(ckpt, request):
    hf, ours = load_pair(request.getfixturevalue(ckpt))
    ids = prompt(ours.cfg, seed=1)
    assert ours_greedy(ours, ids, 64) == hf_greedy(hf, ids, 64)


import flashport.backends.reference as ref  # noqa: E402
import flashport.model as fm  # noqa: E402

_rope = ref.rope


def _break_overlap(model, mp):
    """Drop the carried Ca half: every CSA entry then pools its own window only."""
    orig = fm.Compressor.forward

    def forward(self, x, ps, inv_freq):
        ps.overlap_kv = ps.overlap_gate = None
        return orig(self, x, ps, inv_freq)

    mp.setattr(fm.Compressor, "forward", forward)


BREAKS = {  # feature -> how to break it in the flashport model; the parity check must then fail
    "sinks": lambda m, mp: [b.attn.attn_sink.data.fill_(-1e9) for b in m.layers],
    "inverse_rope": lambda m, mp: mp.setattr(ref, "rope", lambda x, c, s, inverse=False:
                                             x if inverse else _rope(x, c, s)),
    "overlap": _break_overlap,
    "hash_routing": lambda m, mp: [mp.setattr(b.ffn.gate, "tid2eid", b.ffn.gate.tid2eid.roll(1, 0))
                                   for b in m.layers if b.ffn.gate.hashed],
    "sinkhorn": lambda m, mp: mp.setattr(ref, "sinkhorn", lambda c, iters, eps: c),
}


@pytest.mark.parametrize("feature", sorted(BREAKS))
@torch.no_grad()
def test_parity_detects_a_broken_feature(feature, tiny_release, monkeypatch):
    """The parity check is not vacuous: breaking any one V4 feature on purpose makes it fail."""
    hf, ours = load_pair(tiny_release)
    ids = prompt(ours.cfg, n=200, seed=2)
    ref = hf(input_ids=ids[None]).logits[0]
    assert (ours(ids) - ref).abs().max().item() <= 1e-4
    BREAKS[feature](ours, monkeypatch)
    state, parts = SeqState.empty(ours.cfg), []
    for a in range(0, 200, 50):  # chunked, so carried state (overlap) matters
        parts.append(ours(ids[a:a + 50], state))
    assert (torch.cat(parts) - ref).abs().max().item() > 1e-3
