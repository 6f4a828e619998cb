"""ONNX Runtime against the torch backend on the same packed weights: logits within 1e-3 max-abs (fp32
activations) across one-shot prefill, chunked prefill and decode, and 64 identical greedy tokens.
Not bit-exact: ORT's kernels accumulate in another order."""

import pytest
import torch

from flashport.backends.dispatch import Ops
from flashport.backends.onnx_backend import OnnxRuntimeBackend
from flashport.backends.onnx_export import export_model, quantize_in_memory
from flashport.backends.torch_backend import TorchBackend
from flashport.checkpoint import init_weights
from flashport.config import ModelConfig
from flashport.model import SeqState, Transformer

TOL = 1e-3


# (preset, prompt length: crosses several CSA/HCA windows and makes the indexer drop entries, chunk cuts)
CASES = [
    pytest.param("flash-tiny", 150, [0, 7, 40, 41, 150], id="flash-tiny"),
    pytest.param("flash-mini", 300, [0, 3, 130, 131, 300], id="flash-mini", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("preset,n,cuts", CASES)
@torch.no_grad()
def test_onnx_matches_torch_backend(preset, n, cuts, tmp_path):
    cfg = ModelConfig.preset(preset)
    model = Transformer(cfg)
    model.load_state_dict(init_weights(cfg, seed=0))
    quantize_in_memory(model, "int4-g32").set_ops(Ops(TorchBackend()))
    export_model(model, tmp_path, progress=False)
    om = OnnxRuntimeBackend(threads=1).bind_model(model, tmp_path)
    ids = torch.randint(2, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(0))
    assert n // cfg.csa_rate > cfg.index_topk and n > 2 * cfg.hca_rate  # the indexer drops entries

    # one-shot prefill, all positions
    ref_state, ort_state = SeqState.empty(cfg), SeqState.empty(cfg)
    ref, got = model(ids, ref_state), om(ids, ort_state)
    assert (ref - got).abs().max() < TOL

    # chunked prefill (cuts inside and across compression windows) reaches the same logits and state
    chunked = SeqState.empty(cfg)
    got_c = torch.cat([om(ids[a:b], chunked) for a, b in zip(cuts, cuts[1:])])
    assert (ref - got_c).abs().max() < TOL
    want = ref_state.tensors()
    have = chunked.tensors()
    assert want.keys() == have.keys()
    for k in want:
        torch.testing.assert_close(have[k], want[k], atol=1e-4, rtol=0, msg=k)

    # 64 greedy decode steps from the chunked state: same tokens, logits within tolerance at every step
    lr, lo, toks_r, toks_o, worst = ref[-1], got_c[-1], [], [], 0.0
    for _ in range(64):
        toks_r.append(int(lr.argmax()))
        toks_o.append(int(lo.argmax()))
        lr = model(torch.tensor([toks_r[-1]]), ref_state)[-1]
        lo = om.forward_batch([torch.tensor([toks_o[-1]])], [chunked], all_logits=False)[0][0]
        worst = max(worst, (lr - lo).abs().max().item())
    assert toks_r == toks_o
    assert worst < TOL
