"""Exact ties in the model's selections are broken as transformers' reference breaks them (torch.topk on the CPU).

With few indexer heads, many compressed entries score exactly 0 (every head's ReLU at 0), so the top-k boundary
often falls inside a run of equal scores; which of them are kept changes the attention. The rule
(`reference.topk_indices`) is the one the reference calls; these tests construct exact ties and check every
implementation of a selection against torch.topk on the same rows, and that the rule matters (a stable sort,
flashport's former rule, picks other entries on the same rows).
"""

import pytest
import torch

from flashport.backends import reference, torch_fast
from flashport.backends.reference import topk_indices


def tied_indexer_inputs(n, positive, T=12, Di=8, seed=0):
    """Two heads that agree on the sign of every key; all but `positive` keys point away: they score exactly 0."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(Di, generator=g)
    keys = torch.randn(n, Di, generator=g)
    sign = torch.full((n,), -1.0)
    sign[torch.randperm(n, generator=g)[:positive]] = 1.0
    keys = keys * (sign * (keys @ direction).sign())[:, None]
    q = direction.expand(T, 2, Di) * torch.tensor([1.0, 2.0]).view(1, 2, 1)
    weights = torch.rand(T, 2, generator=g) + 0.1
    # queries at the end of a prefill chunk: the last rows see every entry, earlier rows fewer
    visible = torch.arange(n)[None, :] < torch.linspace(n // 2, n, T).long()[:, None]
    return q, keys, weights, visible


def expected(q, keys, weights, visible, k):
    """transformers' DeepseekV4Indexer: the score row over every entry, future ones at -inf, then torch.topk."""
    scores = (torch.relu(torch.einsum("thd,nd->thn", q, keys)) * q.shape[-1] ** -0.5 * weights[..., None]).sum(1)
    scores = scores.masked_fill(~visible, float("-inf"))
    top = scores.topk(k, dim=-1).indices
    return torch.zeros_like(visible).scatter_(1, top, True) & visible, scores


# k*64 <= n runs torch's partial sort, larger k its nth_element: both tie behaviours are covered
@pytest.mark.parametrize("n,k,positive", [(1280, 16, 4), (300, 40, 10), (300, 120, 30)])
def test_indexer_ties_follow_the_reference(n, k, positive):
    q, keys, weights, visible = tied_indexer_inputs(n, positive)
    want, scores = expected(q, keys, weights, visible, k)
    kth = scores.topk(k, dim=-1).values[:, -1]
    assert (kth == 0).all() and ((scores == 0).sum(-1) > k).all()  # the boundary is inside a run of exact zeros
    for impl in (reference.indexer_topk, torch_fast.indexer_topk):
        assert torch.equal(impl(q, keys, weights, visible, k), want), impl.__module__
    # the rule matters: the former stable-sort rule (earliest tied entries win) picks other entries here
    stable = scores.sort(dim=-1, descending=True, stable=True).indices[:, :k]
    old = torch.zeros_like(visible).scatter_(1, stable, True) & visible
    assert not torch.equal(old, want)


def test_router_ties_follow_transformers():
    """Router top-k over biased scores with exactly tied experts: the same experts as transformers' router."""
    from flashport.config import ModelConfig
    from flashport.model import Gate

    tr = pytest.importorskip("transformers")
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4TopKRouter

    E, k, D = 64, 6, 32
    cfg = ModelConfig(hidden_size=D, n_routed_experts=E, num_experts_per_tok=k, num_hidden_layers=4,
                      compress_ratios=[0, 0, 0, 0], num_hash_layers=0)
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(4, D, generator=g)
    weight = rows[torch.arange(E) % 4]  # 16 identical copies of 4 experts: exact score ties
    gate = Gate(cfg, hashed=False)
    gate.weight.data.copy_(weight)
    gate.bias.data.zero_()
    hf = DeepseekV4TopKRouter(tr.DeepseekV4Config(hidden_size=D, n_routed_experts=E, num_experts_per_tok=k))
    hf.weight.data.copy_(weight)
    hf.e_score_correction_bias.zero_()
    x = torch.randn(50, D, generator=g)
    _, hf_w, hf_idx = hf(x)
    w, idx = gate(x, torch.zeros(50, dtype=torch.long))
    assert torch.equal(idx.sort(-1).values, hf_idx.sort(-1).values)
    order_ours, order_hf = idx.argsort(-1), hf_idx.argsort(-1)
    torch.testing.assert_close(w.gather(1, order_ours), hf_w.gather(1, order_hf))


def test_topk_indices_on_another_device_reselects_tied_rows(monkeypatch):
    """Off the CPU torch.topk breaks ties its own way: rows tied at the k-th place are selected on the CPU."""
    scores = torch.tensor([[3.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0] * 12, [5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.2, 0.1] * 12])
    calls = []

    class OtherDevice(torch.Tensor):  # a CPU tensor that claims another device and breaks ties backwards
        @property
        def device(self):
            return torch.device("meta")

        def topk(self, k, dim=-1, **kw):
            flipped = torch.Tensor.flip(self.as_subclass(torch.Tensor), [-1])
            res = flipped.topk(k, dim=dim)
            calls.append(k)
            n = self.shape[-1]
            return torch.return_types.topk((res.values, n - 1 - res.indices))

        def cpu(self):
            return self.as_subclass(torch.Tensor)

        def __getitem__(self, item):
            return self.as_subclass(torch.Tensor)[item]

    got = topk_indices(scores.as_subclass(OtherDevice), 20)
    want = scores.topk(20).indices
    assert torch.equal(got[0].sort().values, want[0].sort().values)  # tied row: re-selected on the CPU
    assert calls


@torch.no_grad()
def test_onnx_graph_defers_tied_selections_to_the_reference(tmp_path):
    """ONNX TopK keeps the lower index on ties; the graph flags a tie at a top-k boundary and the runtime redoes
    that step with the reference rule. On the issue's two-head config the logits then follow the torch reference
    and every step without a tie stays on the graph."""
    pytest.importorskip("onnxruntime")
    from flashport.backends.dispatch import Ops
    from flashport.backends.onnx_backend import OnnxRuntimeBackend
    from flashport.backends.onnx_export import export_model
    from flashport.backends.torch_backend import TorchBackend
    from flashport.checkpoint import init_weights
    from flashport.config import ModelConfig
    from flashport.model import SeqState, Transformer

    cfg = ModelConfig(vocab_size=512, hidden_size=128, num_hidden_layers=6, num_attention_heads=4, head_dim=64,
                      qk_rope_head_dim=16, q_lora_rank=64, o_groups=2, o_lora_rank=64, n_routed_experts=8,
                      num_experts_per_tok=2, moe_intermediate_size=64, index_n_heads=2, index_head_dim=64,
                      index_topk=6, sliding_window=24, compress_ratios=[0, 4, 128, 4, 0, 128],
                      num_nextn_predict_layers=0)
    model = Transformer(cfg)
    model.load_state_dict(init_weights(cfg, seed=0))
    model.set_ops(Ops(TorchBackend()))
    export_model(model, tmp_path, progress=False)
    om = OnnxRuntimeBackend(threads=1).bind_model(model, tmp_path)
    fallbacks = []
    real = om._reference_step
    om.__dict__["_reference_step"] = lambda *a: fallbacks.append(1) or real(*a)
    ids = torch.randint(2, cfg.vocab_size, (160,), generator=torch.Generator().manual_seed(0))
    ref_state, ort_state = SeqState.empty(cfg), SeqState.empty(cfg)
    ref = torch.cat([model(ids[a:a + 16], ref_state) for a in range(0, 160, 16)])
    got = torch.cat([om(ids[a:a + 16], ort_state) for a in range(0, 160, 16)])
    assert (ref - got).abs().max() < 1e-3
    assert 0 < len(fallbacks) < 10  # ties happened, and only those steps left the graph
