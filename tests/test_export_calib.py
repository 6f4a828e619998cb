"""Calibration (routing counts, activation statistics, layer-by-layer run) and GPTQ against round-to-nearest."""

import pytest
import torch

from flashport.checkpoint import CheckpointReader
from flashport.engine import Engine
from flashport.export import gptq
from flashport.export.calibrate import Calibration, calibrate, calibration_ids, load_routing_stats
from flashport.quant.formats import get_format

TEXT = ("The quick brown fox jumps over the lazy dog. A checkpoint is read one layer at a time, and every "
        "expert sees the tokens its router sends it. ") * 12


def _calib_like(n, K, seed):
    """Inputs like a layer's: correlated channels, a few with large magnitude (what makes RTN costly)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, K, generator=g) @ (torch.randn(K, K, generator=g) / K ** 0.5) + 0.1 * torch.randn(n, K, generator=g)
    x[:, :4] *= 8
    return x


@pytest.mark.parametrize("fmt, N, K", [("int4-g32", 48, 96), ("int4-g64-asym", 40, 100), ("int4-g128", 32, 160),
                                        ("int8", 32, 64)])
def test_gptq_beats_rtn_on_held_out_rows(fmt, N, K):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(1)) / K ** 0.5
    x = _calib_like(768, K, seed=2)
    f = get_format(fmt)
    packed = gptq.gptq_pack(w, gptq.hessian(x[:512]), fmt)
    # the same layout as round-to-nearest: same keys, shapes, dtypes; unpack/repack is the identity
    assert {k: (tuple(v.shape), v.dtype) for k, v in packed.items()} == \
        {k: (s.shape, s.dtype) for k, s in f.packed_shapes(N, K).items()}
    assert all(torch.equal(a, packed[k]) for k, a in f.repack(f.unpack(packed)).items())
    rtn = gptq.output_error(x[512:], w, f.pack(w), fmt)
    got = gptq.output_error(x[512:], w, packed, fmt)
    assert got < 0.85 * rtn, (got, rtn)


def test_gptq_rejects_bad_input():
    w = torch.randn(8, 32)
    with pytest.raises(ValueError, match="GPTQ supports"):
        gptq.gptq_pack(w, torch.eye(32), "mxfp4")
    with pytest.raises(ValueError, match="Hessian"):
        gptq.gptq_pack(w, torch.eye(16), "int4-g32", name="w")
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="layers.1.x"):
        gptq.gptq_pack(w, torch.eye(32), "int4-g32", name="layers.1.x")


@pytest.fixture(scope="module")
def cal(tiny_release):
    return calibrate(tiny_release, TEXT, max_tokens=200, seq_len=100, progress=False)


def test_calibration_counts_match_the_full_model(cal, tiny_release):
    cfg = CheckpointReader(tiny_release).cfg
    assert cal.tokens == 200 and set(cal.layers) == {f"layers.{i}" for i in range(cfg.num_hidden_layers)}
    # the layer-by-layer run routes exactly like the whole model run sequence by sequence
    eng = Engine.load(tiny_release, backend="torch")
    seen = {}
    hooks = [blk.ffn.gate.register_forward_hook(lambda m, i, o, k=k: seen.setdefault(k, []).append(o[1]))
             for k, blk in enumerate(eng.model.layers)]
    for seg in calibration_ids(TEXT, eng.tokenizer, 200, 100):
        eng.logits(seg)
    for h in hooks:
        h.remove()
    for k in range(cfg.num_hidden_layers):
        idx = torch.cat(seen[k])
        counts = torch.bincount(idx.flatten(), minlength=cfg.n_routed_experts)
        assert torch.equal(counts, cal.layers[f"layers.{k}"].counts), k
        assert int(counts.sum()) == 200 * cfg.num_experts_per_tok


def test_activation_statistics(cal, tiny_release, tmp_path):
    lc = cal.layers["layers.4"]
    for e in range(len(lc.counts)):
        rows = lc.rows(e)
        assert len(rows) == int(lc.counts[e])
        if len(rows):
            torch.testing.assert_close(lc.x_sq[e], rows.square().mean(0))
            assert bool((lc.h_sq[e] > 0).any())
        else:
            assert not bool(lc.x_sq[e].any())
    cal.save(tmp_path)
    back = Calibration.load(tmp_path)
    assert torch.equal(back.layers["layers.4"].counts, lc.counts)
    torch.testing.assert_close(back.layers["layers.4"].x_sq, lc.x_sq)
    assert load_routing_stats(tmp_path / "routing_stats.json")["tokens"] == 200
    (tmp_path / "bad.json").write_text('{"layers": 3}')
    with pytest.raises(ValueError, match="not a routing statistics file"):
        load_routing_stats(tmp_path / "bad.json")


def test_gptq_lowers_expert_error_on_model_activations(cal, tiny_release):
    """On the tiny model's own routed inputs (one half to calibrate, the other to measure), GPTQ's w1 output error
    summed over a layer's experts is below round-to-nearest's."""
    reader = CheckpointReader(tiny_release)
    lc = cal.layers["layers.3"]
    err = {"rtn": 0.0, "gptq": 0.0}
    for e in range(len(lc.counts)):
        rows = lc.rows(e)
        if len(rows) < 16:
            continue
        fit, held = rows[::2], rows[1::2]
        w = reader.get(f"layers.3.ffn.experts.{e}.w1.weight")
        f = get_format("int4-g32")
        err["rtn"] += gptq.output_error(held, w, f.pack(w), "int4-g32")
        err["gptq"] += gptq.output_error(held, w, gptq.gptq_pack(w, gptq.hessian(fit), "int4-g32"), "int4-g32")
    assert 0 < err["gptq"] < 0.9 * err["rtn"], err
