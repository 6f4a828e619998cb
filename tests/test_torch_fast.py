"""Fast CPU ops (backends/torch_fast.py, backends/cpu_quant.py) against the torch reference: bit-exact where the
module docstrings claim it, else within the stated tolerance; and greedy generation through the fast path."""

import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import math

import pytest
import torch

from flashport.backends import cpu_build, cpu_quant, reference, torch_fast
from flashport.backends.contract import FUSED, QuantWeight
from flashport.backends.dispatch import Ops
from flashport.quant.formats import get_format

G = torch.Generator().manual_seed(0)


def randn(*shape, scale=1.0):
    return torch.randn(*shape, generator=G) * scale


def close(out, ref, atol=1e-5, rtol=1e-5):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)


needs_ext = pytest.mark.skipif(cpu_quant.ext() is None, reason="the C++ kernels did not build here")


@pytest.fixture(autouse=True)
def _decode_split_always(monkeypatch):
    """Decode GEMVs split over the threads whatever the machine's load (torch_fast.DECODE_SPLIT), so the tests on 2+
    threads run the split paths on a busy machine too."""
    monkeypatch.setattr(torch_fast, "DECODE_SPLIT", True)


def test_decode_split_follows_the_machine_load(monkeypatch):
    """DECODE_SPLIT None: decode splits over torch's threads while the 1-minute load average says the machine is
    not oversubscribed (<= cores + 1), else runs on one; True / False force it; one thread never splits."""
    monkeypatch.setattr(torch_fast, "DECODE_SPLIT", None)
    monkeypatch.setattr(torch_fast.os, "cpu_count", lambda: 2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for load, want in ((1.9, 2), (2.9, 2), (3.2, 1), (6.0, 1)):
            monkeypatch.setattr(torch_fast.os, "getloadavg", lambda load=load: (load, load, load))
            monkeypatch.setattr(torch_fast, "_LOAD", [float("-inf"), True])  # re-check now
            assert torch_fast._split_threads() == want
        monkeypatch.setattr(torch_fast, "DECODE_SPLIT", True)
        assert torch_fast._split_threads() == 2
        monkeypatch.setattr(torch_fast, "DECODE_SPLIT", False)
        assert torch_fast._split_threads() == 1 and torch_fast._parts(object()) == []
        torch.set_num_threads(1)
        monkeypatch.setattr(torch_fast, "DECODE_SPLIT", True)
        assert torch_fast._split_threads() == 1
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- weightless ops
@pytest.mark.parametrize("shape", [(1, 64), (5, 4, 64), (3, 32)])
@pytest.mark.parametrize("inverse", [False, True])
def test_rope_bit_exact(shape, inverse):
    x, ang = randn(*shape), randn(shape[0], 8)
    out = torch_fast.rope(x, ang.cos(), ang.sin(), inverse)
    assert torch.equal(out, reference.rope(x, ang.cos(), ang.sin(), inverse))
    assert not torch.equal(out, x)


@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm(with_weight):
    x, w = randn(7, 3, 96, scale=3.0), randn(96) if with_weight else None
    close(torch_fast.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6))


@pytest.mark.parametrize("T", [1, 19])
def test_hc_pre_post(T):
    n, d = 4, 48
    streams, fn, base, scale = randn(T, n, d), randn((2 + n) * n, n * d, scale=0.1), randn((2 + n) * n), randn(3)
    out = torch_fast.hc_pre(streams, fn, base, scale, 20, 1e-6, 1e-6)
    ref = reference.hc_pre(streams, fn, base, scale, 20, 1e-6, 1e-6)
    for a, b in zip(out, ref):
        close(a, b)
    block_out = randn(T, d)
    close(torch_fast.hc_post(block_out, streams, ref[1], ref[2]), reference.hc_post(block_out, streams, ref[1], ref[2]))


@pytest.mark.parametrize("impl,T,S", [(impl, T, S) for impl in ("attention", "sdpa_attention")
                                       for T, S in ((1, 40), (6, 70), (1, 200))] + [("attention", 20, 90)])
def test_attention(impl, T, S):
    """Decode rows (T <= 8) run the C++ kernel (`attention`) or SDPA (`sdpa_attention`, without the kernels),
    prefill (T = 20) the online-softmax kernel (or the blocked reference): each within 1e-5 of the reference."""
    H, Dh = 4, 32
    q, keys, sink = randn(T, H, Dh), randn(S, Dh), randn(H)
    bias = torch.zeros(T, S).masked_fill_(torch.rand(T, S, generator=G) < 0.3, float("-inf"))
    bias[0] = float("-inf")  # a query that sees nothing but the sink: output 0
    out = getattr(torch_fast, impl)(q, keys, bias, sink, Dh ** -0.5)
    close(out, reference.attention(q, keys, bias, sink, Dh ** -0.5))
    assert out[0].abs().max() == 0


@needs_ext
def test_decode_attention_runs_the_kernel(monkeypatch):
    """A decode step's attention is one C++ call (not SDPA): the kernel's own result, within 1e-5 of the reference
    at the real decode shape (no mask: bias 0, the sink in the denominator)."""
    monkeypatch.setattr(torch_fast, "sdpa_attention", None)  # would raise if the decode path fell back to it
    q, keys, sink = randn(1, 8, 128), randn(130, 128), randn(8)
    bias = torch.zeros(1, 130)
    out = torch_fast.attention(q, keys, bias, sink, 128 ** -0.5)
    close(out, reference.attention(q, keys, bias, sink, 128 ** -0.5))
    before = torch.get_num_threads()  # the heads split over 2 threads: each head computed alone, the same bits
    torch.set_num_threads(1 if before > 1 else 2)
    try:
        assert torch.equal(torch_fast.attention(q, keys, bias, sink, 128 ** -0.5), out)
    finally:
        torch.set_num_threads(before)


@needs_ext
@pytest.mark.parametrize("S,H,Dh", [(1, 4, 64), (63, 3, 32), (64, 8, 128), (1025, 4, 64), (5000, 5, 24), (9000, 4, 64)])
def test_decode_attention_kernel(S, H, Dh):
    """The decode kernel (split-K over segments of 1024 keys, merged in segment order) within 1e-5 relative of the
    reference, a partial last tile and segment, heads not a multiple of the group of 4, growing logits (the
    running max moves), and the same bits at 1 and 2 threads, split or not (the items, a segment of keys for a group
    of heads, do not depend on the thread count)."""
    mod = cpu_quant.ext()
    q, keys, sink = randn(1, H, Dh), randn(S, Dh) * torch.linspace(0.2, 3.0, S)[:, None], randn(H)
    q += keys.mean(0)
    out = mod.decode_attention(q, keys, sink, Dh ** -0.5)
    close(out, reference.attention(q, keys, torch.zeros(1, S), sink, Dh ** -0.5))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = mod.decode_attention(q, keys, sink, Dh ** -0.5)
        torch.set_num_threads(2)
        assert torch.equal(one, mod.decode_attention(q, keys, sink, Dh ** -0.5))
        assert torch.equal(one, mod.decode_attention(q, keys, sink, Dh ** -0.5, True))  # items split from 64K
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(torch_fast.attention(q, keys, torch.zeros(1, S), sink, Dh ** -0.5), out)  # the op's path


@needs_ext
@pytest.mark.parametrize("T,S,Dh", [(37, 1000, 64), (130, 70, 32), (9, 64, 24), (16, 129, 64)])
def test_flash_attention_kernel(T, S, Dh):
    """The prefill kernel (online softmax over tiles of 64 keys, blocks of 16 queries) within 1e-5 relative of the
    reference: T and S not multiples of the block and tile, -inf columns, a row that sees only the sink (output
    0), whole tiles hidden from a block, logits that grow along the keys (the running max moves every tile, so
    the rescaling is exercised) and an HCA-like mask (a window of raw keys plus a prefix of the entries)."""
    H = 4
    mod = cpu_quant.ext()
    q, keys, sink = randn(T, H, Dh), randn(S, Dh), randn(H)
    keys = keys * torch.linspace(0.2, 3.0, S)[:, None]  # later keys larger: the max grows tile after tile
    q[:, :, :] += keys.mean(0)  # ... and aligned with the queries
    bias = torch.zeros(T, S).masked_fill_(torch.rand(T, S, generator=G) < 0.3, float("-inf"))
    bias[0] = float("-inf")  # only the sink
    if S > 100:
        bias[1:, 64:128] = float("-inf")  # a tile no query of any block sees
    out = mod.flash_attention(q, keys, bias, sink, Dh ** -0.5)
    close(out, reference.attention(q, keys, bias, sink, Dh ** -0.5))
    assert out[0].abs().max() == 0
    W = 8  # HCA-like: query t sees raw keys [t, t + W) and entries [0, t // 4) after the raw ones
    cols = torch.arange(S)[None, :]
    t = torch.arange(T)[:, None]
    hca = torch.zeros(T, S).masked_fill_(~(((cols >= t) & (cols < t + W)) | ((cols >= T + W) & (cols < T + W + t // 4))),
                                        float("-inf"))
    close(mod.flash_attention(q, keys, hca, sink, Dh ** -0.5), reference.attention(q, keys, hca, sink, Dh ** -0.5))


@needs_ext
def test_prefill_attention_runs_the_kernel(monkeypatch):
    """A prefill chunk's attention (T > GEMV_MAX_ROWS) is one C++ call, not the blocked torch path."""
    T, S, H, Dh = 40, 300, 4, 64
    q, keys, sink = randn(T, H, Dh), randn(S, Dh), randn(H)
    bias = torch.zeros(T, S)
    ref = reference.attention(q, keys, bias, sink, Dh ** -0.5)
    monkeypatch.setattr(torch_fast.reference, "attention", None)  # the blocked path calls it per block
    close(torch_fast.attention(q, keys, bias, sink, Dh ** -0.5), ref)


def test_indexer_topk_selection():
    T, Hi, Di, n, k = 5, 8, 32, 40, 7
    q, keys, weights = randn(T, Hi, Di), randn(n, Di), randn(T, Hi).abs()
    visible = torch.arange(n)[None] < torch.tensor([3, 10, 20, 30, 40])[:, None]
    out = torch_fast.indexer_topk(q, keys, weights, visible, k)
    assert torch.equal(out, reference.indexer_topk(q, keys, weights, visible, k))
    zero = torch.zeros_like(q)  # all scores tie at 0: the earliest visible entries win, as in the reference
    assert torch.equal(torch_fast.indexer_topk(zero, keys, weights, visible, k),
                       reference.indexer_topk(zero, keys, weights, visible, k))


def test_indexer_topk_ties_at_kth_score_and_short_context():
    T, Hi, Di, n, k = 3, 4, 16, 50, 9
    keys, weights = randn(n, Di), randn(T, Hi).abs()
    keys[10:30] = keys[5]  # 21 identical keys: their scores tie, and the k-th score falls among them
    q = randn(T, Hi, Di)
    q[:, :, :] = keys[5] + 0.01 * randn(T, Hi, Di)  # makes keys[5] (and its copies) score highest
    visible = torch.arange(n)[None] < torch.tensor([50, 25, 8])[:, None]
    out = torch_fast.indexer_topk(q, keys, weights, visible, k)
    assert torch.equal(out, reference.indexer_topk(q, keys, weights, visible, k))
    assert out[0].sum() == k and out[2].sum() == 8
    short = visible[:, :k]  # n <= k: every visible entry is chosen, without scoring
    assert torch.equal(torch_fast.indexer_topk(q, keys[:k], weights, short, k),
                       reference.indexer_topk(q, keys[:k], weights, short, k))


@needs_ext
def test_indexer_decode_scores_kernel(monkeypatch):
    """Decode rows (T <= GEMV_MAX_ROWS) score in one C++ call (`indexer_scores`), within 1e-5 of the reference's
    einsum; the selection over those scores equals the reference's."""
    T, Hi, Di, n, k = 2, 16, 64, 300, 20
    q, keys, weights = randn(T, Hi, Di), randn(n, Di), randn(T, Hi).abs()
    w = weights * Di ** -0.5
    want = (torch.einsum("thd,nd->thn", q, keys).relu() * w[..., None]).sum(1)
    close(cpu_quant.ext().indexer_scores(q, keys, w), want)
    calls = []
    real = cpu_quant.ext().indexer_scores
    monkeypatch.setattr(torch_fast, "_fast", lambda *t: type("M", (), {
        "indexer_scores": staticmethod(lambda *a: calls.append(1) or real(*a))})())
    visible = torch.arange(n)[None] < torch.tensor([n, 200])[:, None]
    assert torch.equal(torch_fast.indexer_topk(q, keys, weights, visible, k),
                       reference.indexer_topk(q, keys, weights, visible, k)) and calls


def test_indexer_topk_scores_in_row_blocks(monkeypatch):
    monkeypatch.setattr(torch_fast, "SCORE_ELEMENTS", 4 * 8 * 40)  # 4 rows per block
    T, Hi, Di, n, k = 11, 8, 16, 40, 6
    q, keys, weights = randn(T, Hi, Di), randn(n, Di), randn(T, Hi).abs()
    visible = torch.ones(T, n, dtype=torch.bool)
    assert torch.equal(torch_fast.indexer_topk(q, keys, weights, visible, k),
                       reference.indexer_topk(q, keys, weights, visible, k))


@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_prefill_attention_visits_only_visible_keys(path, monkeypatch):
    """T > GEMV_MAX_ROWS, a V4-like mask (sliding window plus a few compressed entries), against the reference
    over the dense mask: the C++ online-softmax kernel (tiles hidden from a block skipped), and without the
    extension the blocked torch path (per block of queries, only the keys it can see)."""
    if path == "torch":
        monkeypatch.setattr(torch_fast, "_fast", lambda *t: None)
    elif cpu_quant.ext() is None:
        pytest.skip("the C++ kernels did not build here")
    T, W, n, H, Dh = 150, 16, 30, 4, 32
    q, keys, sink = randn(T, H, Dh), randn(T + n, Dh), randn(H)
    dist = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    raw = torch.zeros(T, T).masked_fill_((dist < 0) | (dist >= W), float("-inf"))
    comp = torch.zeros(T, n).masked_fill_(torch.rand(T, n, generator=G) < 0.8, float("-inf"))
    bias = torch.cat([raw, comp], dim=1)
    bias[3] = float("-inf")  # a query that sees nothing: output 0 (the sink takes everything)
    out = torch_fast.attention(q, keys, bias, sink, Dh ** -0.5)
    close(out, reference.attention(q, keys, bias, sink, Dh ** -0.5))
    assert out[3].abs().max() == 0


def test_rope_table_matches_direct_computation():
    from flashport.config import ModelConfig
    from flashport.model import RopeTable, rope_cos_sin, rope_inv_freq

    inv = rope_inv_freq(ModelConfig.preset("flash-tiny"), compressed=True)
    table = RopeTable.of(inv)
    assert RopeTable.of(inv.clone()) is table  # shared by every layer with these frequencies
    for start, stop, step in [(0, 5, 1), (1000, 1003, 1), (8, 40, 4), (0, 1, 1)]:
        cos, sin = table(start, stop, step)
        ref = rope_cos_sin(inv, torch.arange(start, stop, step))
        torch.testing.assert_close(cos, ref[0], atol=1e-6, rtol=0)  # libm vs vectorised cos: within an ulp
        torch.testing.assert_close(sin, ref[1], atol=1e-6, rtol=0)
        assert cos.shape == (len(range(start, stop, step)), len(inv))


def test_rope_table_pages_are_bounded_and_chunking_independent(monkeypatch):
    """Positions across page boundaries equal the direct computation, a position's bits do not depend on the call
    that asked for it, and the table keeps at most MAX_PAGES pages whatever the context (memory flat at 1M)."""
    from flashport.config import ModelConfig
    from flashport.model import RopeTable, rope_cos_sin, rope_inv_freq

    monkeypatch.setattr(RopeTable, "PAGE", 64)
    monkeypatch.setattr(RopeTable, "MAX_PAGES", 3)
    inv = rope_inv_freq(ModelConfig.preset("flash-tiny"), compressed=False)
    table = RopeTable(inv)
    whole = table(0, 640)
    for start, stop, step in [(60, 70, 1), (56, 300, 4), (0, 640, 128), (63, 64, 1), (64, 64, 1)]:
        cos, sin = table(start, stop, step)
        ref = rope_cos_sin(inv, torch.arange(start, stop, step))
        torch.testing.assert_close(cos, ref[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(sin, ref[1], atol=1e-6, rtol=0)
        assert torch.equal(cos, whole[0][start:stop:step]) and torch.equal(sin, whole[1][start:stop:step])
        assert len(table.pages) <= 3
    for p in (639, 5, 330):  # one position at a time (decode), pages dropped and recomputed in between
        assert torch.equal(table(p, p + 1)[0], whole[0][p:p + 1])


# ---------------------------------------------------------------- weights
FORMATS = ["fp32", "bf16", "int8", "w8a8", "int4-g32", "int4-g64-asym", "int4-g128", "int4-g32-asym",
           "fp8-e4m3-block128-ue8m0", "fp8-e4m3-block128", "mxfp4"]


def quant(fmt, N, K, seed=0):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * 0.05
    if fmt == "fp32":
        return QuantWeight("fp32", (N, K), {"weight": w})
    return QuantWeight(fmt, (N, K), get_format(fmt).pack(w))


@needs_ext
@pytest.mark.parametrize("fmt", ["fp8-e4m3-block128-ue8m0", "mxfp4", "bf16", "int8", "int4-g32", "fp32"])
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("acts", ["fp32", "int8"])
def test_decode_linear_split_over_threads_bit_identical(fmt, threads, acts):
    """On more than one thread a decode GEMV of torch_fast.SPLIT_MIN multiply-adds or more runs split by rows in one
    parallel region: the same bits as on one thread (an fp32 weight, which cannot be split, as before); with
    int8 activations the parts keep them (a part that dropped the flag would run the exact kernel: other bits)."""
    N, K = 392, 200  # FP8: three 128-row scale blocks and a partial fourth
    w = cpu_quant.upload(quant(fmt, N, K, seed=3), decode_activations=acts)
    assert N * K >= torch_fast.SPLIT_MIN
    for T in (1, 3):
        x = randn(T, K)
        before = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            want = torch_fast.linear(x, w)
            torch.set_num_threads(threads)
            got = torch_fast.linear(x, w)
            parts = torch_fast._parts(w)
        finally:
            torch.set_num_threads(before)
        assert torch.equal(got, want) and torch.equal(want, cpu_quant.linear(x, w))
        assert (len(parts) == 1) == (fmt == "fp32")


def linear_bound(x, w):
    """|y - y_ref| <= 1e-5 * (|x| @ |W|.T) + 1e-6: fp32 accumulation in another order."""
    return 1e-5 * (x.abs() @ w.abs().T) + 1e-6


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("T", [1, 3, cpu_quant.GEMV_MAX_ROWS + 5])
def test_linear_formats(fmt, T):
    N, K = 72, 200  # K not a multiple of the int4 group: padded blocks
    qw = quant(fmt, N, K)
    cw = cpu_quant.upload(qw)
    dense = qw.dequantize()
    assert torch.equal(cw.dequantize(), dense)  # dequantization is bit-exact with quant.formats
    x = randn(T, K)
    y, ref = torch_fast.linear(x, cw), reference.linear(x, dense)
    assert y.shape == (T, N)
    assert ((y - ref).abs() <= linear_bound(x, dense)).all()


@needs_ext
@pytest.mark.parametrize("fmt", ["fp8-e4m3-block128-ue8m0", "int4-g32", "int4-g64-asym"])
@pytest.mark.parametrize("N,K", [(301, 200), (130, 128), (64, 520), (67, 4096 + 96)])
def test_decode_rows_bit_identical_to_a_batch_row(fmt, N, K):
    """One decode row runs the 4-weight-rows-at-a-time kernels (K <= 512 for FP8, K > 4096 for every format), several
    activation rows the one-row kernel: int4 and FP8 form each output in the same order, so a decode result is
    bit-identical to the same row inside a batch (N not a multiple of 4, row blocks of 128 crossed, a K tail inside
    a scale block / an int4 group; also the grouped projection). All within the reference tolerance."""
    qw = quant(fmt, N, K, seed=3)
    cw = cpu_quant.upload(qw)
    assert cw.fmt == (cpu_quant.FMT_FP8 if fmt.startswith("fp8") else cpu_quant.FMT_I4)
    x = randn(2, K)
    assert torch.equal(cpu_quant.linear(x[:1], cw), cpu_quant.linear(x, cw)[:1])
    assert ((cpu_quant.linear(x[:1], cw) - x[:1] @ cw.dequantize().T).abs()
            <= linear_bound(x[:1], cw.dequantize())).all()
    if N % 2 == 0:  # two groups of N / 2 rows
        xg = randn(2, 2, K)
        assert torch.equal(cpu_quant.grouped_linear(xg[:1], cw), cpu_quant.grouped_linear(xg, cw)[:1])


@needs_ext
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4-g128", "fp8-e4m3-block128-ue8m0"])
def test_long_rows_decode_within_tolerance(fmt):
    """K > 4096 (the four-rows-per-pass decode kernels, prefetched) and N not a multiple of 4: within the
    reference's tolerance for one and for several activation rows."""
    N, K = 37, 4096 + 160
    qw = quant(fmt, N, K, seed=5)
    cw = cpu_quant.upload(qw)
    dense = qw.dequantize()
    for T in (1, 2, cpu_quant.GEMV_MAX_ROWS):
        x = randn(T, K)
        assert ((cpu_quant.linear(x, cw) - x @ dense.T).abs() <= linear_bound(x, dense)).all()


@needs_ext
def test_bf16_prefill_option_is_opt_in_and_decode_stays_exact():
    """prefill_matmul="bf16" (a backend option) changes only the GEMMs of more than GEMV_MAX_ROWS rows, within the
    measured bf16 error; decode rows equal the default path's bit for bit; the default stays the fp32 GEMM; a
    wrong value is one clear error."""
    from flashport.backends.registry import BackendError, create

    qw = quant("int4-g32", 96, 512, seed=7)
    dense = qw.dequantize()
    fp32, bf16 = cpu_quant.upload(qw), torch_fast.FastTorchBackend(prefill_matmul="bf16").upload(qw)
    assert torch_fast.FastTorchBackend().upload(qw).prefill_bf16 is False
    x = randn(cpu_quant.GEMV_MAX_ROWS + 24, 512)
    ref = x.double() @ dense.double().T
    err = lambda y: float((y.double() - ref).abs().max() / ref.abs().max())  # noqa: E731
    assert err(cpu_quant.linear(x, fp32)) < 1e-5 < err(cpu_quant.linear(x, bf16)) < 1e-2
    assert torch.equal(cpu_quant.linear(x[:3], bf16), cpu_quant.linear(x[:3], fp32))
    assert create("torch", prefill_matmul="bf16").prefill_matmul == "bf16"
    with pytest.raises((ValueError, BackendError), match="prefill_matmul"):
        create("torch", prefill_matmul="fp16")


@needs_ext
def test_fp8_every_code_dequantizes_bit_exactly():
    """Every finite e4m3 code (subnormals, both signs, zero and -0) through the kernels' vector conversion equals
    quant.release's dequantization bit for bit, at several power-of-two block scales."""
    from flashport.quant.release import dequantize_fp8_block

    finite = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)  # 0x7F, 0xFF: NaN
    codes = finite.repeat(256 * 2 // len(finite) + 1)[:512].view(1, 512).repeat(130, 1)  # [130, 512]
    scale = torch.tensor([[2.0 ** -3, 1.0, 2.0 ** 4, 2.0 ** -9]] * 2)  # [ceil(130/128), 512/128]
    cw = cpu_quant.CpuWeight(cpu_quant.FMT_FP8, (130, 512), codes.contiguous(), scale)
    ref = dequantize_fp8_block(codes.view(torch.float8_e4m3fn), scale)
    assert torch.equal(cw.dequantize().view(torch.int32), ref.view(torch.int32))


@needs_ext
def test_mxfp4_every_code_and_scale_dequantizes_bit_exactly():
    """Every e2m1 code (both zeros, both signs) at every finite UE8M0 scale byte (2^-127 .. 2^127) through the
    kernels' vector and scalar (partial last block) conversion equals quant.release's dequantization bit for bit."""
    from flashport.quant.release import dequantize_mxfp4

    K = 16 * 32 + 16  # 16 full blocks, then a partial one: the scalar tail
    codes = torch.arange(16, dtype=torch.uint8).repeat(K // 16 + 1)[:K + 16]  # padded to whole blocks
    packed = (codes[0::2] | (codes[1::2] << 4)).view(1, -1).repeat(255, 1)  # [255, 17 * 16]
    scale = torch.arange(255, dtype=torch.uint8).view(255, 1).repeat(1, 17)  # row r: every block 2^(r - 127)
    scale[:, 1::2] = scale.flip(0)[:, 1::2]  # and a different scale in every other block
    cw = cpu_quant.CpuWeight(cpu_quant.FMT_MXFP4, (255, K), packed.contiguous(), scale.contiguous(), group=32)
    ref = dequantize_mxfp4(packed, scale)[:, :K]
    assert torch.equal(cw.dequantize().view(torch.int32), ref.view(torch.int32))
    rows = slice(90, 165)  # scales 2^-37 .. 2^37 (the GEMV, per-block sums times the scale: tolerance-bound)
    cw = cpu_quant.CpuWeight(cpu_quant.FMT_MXFP4, (75, K), packed[rows].contiguous(), scale[rows].contiguous(), group=32)
    x = randn(3, K)
    y = cpu_quant.linear(x, cw)
    assert ((y - x @ ref[rows].T).abs() <= linear_bound(x, ref[rows])).all()


def test_upload_reads_release_bytes_in_place():
    """A release weight's upload is a view of the packed tensors (no second copy): FP8 codes, MXFP4 nibbles and
    scale bytes, bf16 weights."""
    w = torch.randn(256, 320, generator=torch.Generator().manual_seed(4)) * 0.05
    for fmt, key, layout in [("fp8-e4m3-block128-ue8m0", "weight", cpu_quant.FMT_FP8),
                             ("mxfp4", "weight", cpu_quant.FMT_MXFP4), ("mxfp4", "scale", cpu_quant.FMT_MXFP4),
                             ("bf16", "weight", cpu_quant.FMT_BF16)]:
        qw = QuantWeight(fmt, (256, 320), get_format(fmt).pack(w))
        cw = cpu_quant.upload(qw)
        assert cw.fmt == layout
        held = {"weight": cw.w, "scale": cw.scale}[key]
        assert held.data_ptr() == qw.tensors[key].data_ptr(), (fmt, key)
        assert torch.equal(cw.dequantize(), qw.dequantize())


def test_upload_keeps_compact_exact_storage():
    exact = torch.randn(16, 64).bfloat16().float()  # like every dequantized release weight (FP8 / MXFP4)
    assert cpu_quant.upload(QuantWeight("fp32", (16, 64), {"weight": exact})).fmt == cpu_quant.FMT_BF16
    fp8 = get_format("fp8-e4m3-block128-ue8m0")
    release_like = fp8.dequantize(fp8.pack(torch.randn(200, 300)))  # a dequantized release FP8 weight
    cw = cpu_quant.upload(QuantWeight("fp32", (200, 300), {"weight": release_like}))
    assert cw.fmt == cpu_quant.FMT_FP8 and cw.nbytes < 200 * 300 * 1.01 and torch.equal(cw.dequantize(), release_like)
    inexact = exact + 1e-4
    cw = cpu_quant.upload(QuantWeight("fp32", (16, 64), {"weight": inexact}))
    assert cw.fmt == cpu_quant.FMT_F32 and torch.equal(cw.dequantize(), inexact)
    qw = quant("int4-g32", 64, 256)
    cw = cpu_quant.upload(qw)
    assert cw.fmt == cpu_quant.FMT_I4 and cw.nbytes * 8 <= 64 * 256 * 5  # stays packed: 5 bits per weight (scales included)


@pytest.mark.parametrize("fmt", ["bf16", "int4-g64", "fp32"])
@pytest.mark.parametrize("T", [1, cpu_quant.GEMV_MAX_ROWS + 1])
def test_grouped_linear(fmt, T):
    Gr, R, I = 4, 24, 64
    qw = quant(fmt, Gr * R, I)
    dense, x = qw.dequantize(), randn(T, Gr, I)
    out, ref = torch_fast.grouped_linear(x, cpu_quant.upload(qw)), reference.grouped_linear(x, dense)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T", [1, 4, cpu_quant.GEMV_MAX_ROWS + 7])
def test_moe_mixed_formats(T):
    D, I, E, k = 64, 32, 6, 2
    fmts = ["bf16", "int4-g32", "int8", "fp32", "int4-g32-asym", "mxfp4"]  # per-expert mixed quantization
    qws = [tuple(quant(fmts[e], *shape, seed=10 * e + j) for j, shape in enumerate([(I, D), (I, D), (D, I)]))
           for e in range(E)]
    x, weights = randn(T, D), torch.rand(T, k, generator=G)
    idx = torch.stack([torch.randperm(E - 1, generator=G)[:k] for _ in range(T)])  # expert E-1 gets no token
    fast = [tuple(cpu_quant.upload(w) for w in ws) for ws in qws]
    dense = [tuple(w.dequantize() for w in ws) for ws in qws]
    out, ref = torch_fast.moe(x, weights, idx, fast, 10.0), reference.moe(x, weights, idx, dense, 10.0)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_torch_fallback_without_extension(monkeypatch):
    """No compiler on the machine: the same ops still work through torch code."""
    monkeypatch.setattr(cpu_quant, "ext", lambda: None)
    qw = quant("int4-g32-asym", 40, 96)
    cw = cpu_quant.upload(qw)
    assert cw.native is None and torch.equal(cw.dequantize(), qw.dequantize())
    x = randn(2, 96)
    torch.testing.assert_close(torch_fast.linear(x, cw), x @ qw.dequantize().T, atol=1e-5, rtol=1e-5)
    ang, v = randn(2, 8), randn(2, 32)
    assert torch.equal(torch_fast.rope(v, ang.cos(), ang.sin()), reference.rope(v, ang.cos(), ang.sin()))
    close(torch_fast.hc_post(v, randn(2, 4, 32), randn(2, 4), randn(2, 4, 4)).shape and v, v)
    idx, weights = torch.tensor([[0]]), torch.ones(1, 1)
    ex = [(cpu_quant.upload(quant("bf16", 16, 96)), cpu_quant.upload(quant("bf16", 16, 96, 1)),
           cpu_quant.upload(quant("bf16", 96, 16, 2)))]
    dense = [tuple(w.dequantize() for w in ex[0])]
    torch.testing.assert_close(torch_fast.moe(x[:1], weights, idx, ex, 10.0),
                               reference.moe(x[:1], weights, idx, dense, 10.0))


def test_dispatch_expert_views_cached_per_model_without_keeping_it_alive():
    """Ops resolves a model's experts once (a view per nn.ModuleList), and holds that view weakly: a dropped
    model's experts are freed even by a long-lived Ops (the global REFERENCE). Results equal the reference."""
    import gc
    import weakref

    from flashport.backends.dispatch import REFERENCE
    from flashport.model import Expert

    experts = torch.nn.ModuleList(Expert(16, 8) for _ in range(3))
    for p in experts.parameters():
        p.data.normal_(generator=G)
    x, idx, w = randn(2, 16), torch.tensor([[0, 2], [1, 2]]), torch.rand(2, 2, generator=G)
    dense = [tuple(getattr(ex, n).weight for n in ("w1", "w3", "w2")) for ex in experts]
    for ops in (REFERENCE, Ops(torch_fast.FastTorchBackend())):
        out = ops.moe(x, w, idx, experts, 10.0)
        assert ops._experts[experts] is not None  # cached: the next step reuses the resolved Linears
        torch.testing.assert_close(ops.moe(x, w, idx, experts, 10.0), out)
        torch.testing.assert_close(out, reference.moe(x, w, idx, dense, 10.0), atol=1e-5, rtol=1e-5)
    ref = weakref.ref(experts)
    del experts, dense
    gc.collect()
    assert ref() is None


@needs_ext
@pytest.mark.parametrize("T", [1, 19])
def test_hc_head(T):
    """The C++ final collapse of the streams: tolerance-bound (1e-5) against the reference."""
    n, d = 4, 48
    streams, fn, base, scale = randn(T, n, d), randn(n, n * d, scale=0.1), randn(n), randn(1)
    out = torch_fast.hc_head(streams, fn, base, scale, 1e-6, 1e-6)
    close(out, reference.hc_head(streams, fn, base, scale, 1e-6, 1e-6))


# ---------------------------------------------------------------- fused sequences (contract.FUSED)
@needs_ext
@pytest.mark.parametrize("T", [1, 3, cpu_quant.GEMV_MAX_ROWS + 4])
def test_fused_mhc_sequences_bit_identical_to_the_ops(T):
    """hc_pre_norm = hc_pre then rms_norm; hc_post_pre_norm = hc_post then hc_pre_norm: torch.equal with the fast
    ops one by one (which are tolerance-bound against the reference, test_hc_pre_post)."""
    n, d, f = 4, 48, torch_fast
    streams, fn, base, scale = randn(T, n, d), randn((2 + n) * n, n * d, scale=0.1), randn((2 + n) * n), randn(3)
    w, out = randn(d), randn(T, d)
    hc = (20, 1e-6, 1e-5)
    x, post, comb = f.hc_pre(streams, fn, base, scale, *hc)
    fused = f.hc_pre_norm(streams, fn, base, scale, *hc, w, 1e-6)
    for a, b in zip(fused, (f.rms_norm(x, w, 1e-6), post, comb)):
        assert torch.equal(a, b)
    s = f.hc_post(out, streams, post, comb)
    fused = f.hc_post_pre_norm(out, streams, post, comb, fn, base, scale, *hc, w, 1e-6)
    for a, b in zip(fused, (s, *f.hc_pre_norm(s, fn, base, scale, *hc, w, 1e-6))):
        assert torch.equal(a, b)


@needs_ext
@pytest.mark.parametrize("fmt", ["fp8-e4m3-block128-ue8m0", "bf16", "int4-g32"])
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_fused_attention_sequences_bit_identical_to_the_ops(fmt, T, threads):
    """attn_project (wq_a, q_norm, wq_b, head norm, rope; wkv, kv_norm, rope) and attn_output (decode attention,
    inverse rope, grouped wo_a, wo_b) equal the fast ops one by one bit for bit, in every weight format, on one
    thread and split by rows over 2 or 3 (FP8's 128-row scale blocks: wq_b and wo_a's groups split, the rest not)."""
    f, D, R, H, Dh, G, S = torch_fast, 128, 64, 4, 64, 2, 37
    up = {name: cpu_quant.upload(quant(fmt, *shape, seed=i)) for i, (name, shape) in enumerate(
        {"wq_a": (R, D), "wq_b": (H * Dh, R), "wkv": (Dh, D), "wo_a": (G * 128, H * Dh // G),
         "wo_b": (D, G * 128)}.items())}
    x, qn, kvn, ang = randn(T, D), randn(R), randn(Dh), randn(T, 8)
    cos, sin = ang.cos(), ang.sin()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        qr, q, kv = f.attn_project(x, up["wq_a"], qn, up["wq_b"], up["wkv"], kvn, cos, sin, H, 1e-6)
        keys, sink = randn(S, Dh), randn(H)
        out = f.attn_output(q, keys, sink, Dh ** -0.5, cos, sin, up["wo_a"], G, up["wo_b"])
    finally:
        torch.set_num_threads(before)
    qr1 = f.rms_norm(f.linear(x, up["wq_a"]), qn, 1e-6)
    q1 = f.rope(f.rms_norm(f.linear(qr1, up["wq_b"]).view(T, H, Dh), None, 1e-6), cos, sin)
    kv1 = f.rope(f.rms_norm(f.linear(x, up["wkv"]), kvn, 1e-6), cos, sin)
    assert torch.equal(qr, qr1) and torch.equal(q, q1) and torch.equal(kv, kv1)
    o = f.rope(f.attention(q, keys, torch.zeros(T, S), sink, Dh ** -0.5), cos, sin, inverse=True)
    assert torch.equal(out, f.linear(f.grouped_linear(o.reshape(T, G, -1), up["wo_a"]).flatten(1), up["wo_b"]))
    # not on the fast path: None, and the model runs the ops one by one
    assert f.attn_project(x, up["wq_a"].dequantize(), qn, up["wq_b"], up["wkv"], kvn, cos, sin, H, 1e-6) is None
    assert f.attn_output(q.double(), keys, sink, 1.0, cos, sin, up["wo_a"], G, up["wo_b"]) is None


@needs_ext
@pytest.mark.parametrize("fmt", ["fp8-e4m3-block128-ue8m0", "bf16", "int4-g32"])
@pytest.mark.parametrize("T,b", [(1, 0), (1, 3), (3, 2), (cpu_quant.GEMV_MAX_ROWS + 4, 1)])
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_compress_project_bit_identical_to_the_ops(fmt, T, b, threads):
    """compress_project = (cat([kv, linear(x, wkv)]), cat([gate, linear(x, wgate)])) bit for bit, with and without
    buffered rows, decode and prefill rows, 1 and 2 threads (its two GEMVs share one parallel region)."""
    f, D, C = torch_fast, 128, 96
    wkv, wgate = cpu_quant.upload(quant(fmt, C, D, seed=1)), cpu_quant.upload(quant(fmt, C, D, seed=2))
    x, kv, gate = randn(T, D), randn(b, C), randn(b, C)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = f.compress_project(x, kv, gate, wkv, wgate)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got[0], torch.cat([kv, f.linear(x, wkv)]))
    assert torch.equal(got[1], torch.cat([gate, f.linear(x, wgate)]))
    assert f.compress_project(x, kv, gate, wkv.dequantize(), wgate) is None  # not on the fast path


def _unfused_backend():
    be = torch_fast.FastTorchBackend()
    for name in FUSED:
        setattr(be, name, None)
    return be


@needs_ext
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_decode_bit_identical_to_the_ops_one_by_one(tiny_release, threads):
    """A whole model (flash-tiny: hash and biased routers, SWA / CSA / HCA layers) with every fused sequence
    (gated_moe included) gives bit-identical logits and decode state to the same fast ops run one by one, over a
    prefill and decode steps, on 1 thread and on 2 (the fused sequences' GEMVs split by rows); every fused sequence
    ran."""
    from flashport.engine import Engine

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _fused_decode_equals_the_ops(tiny_release, Engine)
    finally:
        torch.set_num_threads(before)


def _fused_decode_equals_the_ops(tiny_release, Engine):

    eng = Engine.load(tiny_release, backend="torch")
    fused_be, calls = torch_fast.FastTorchBackend(), {}
    for name in FUSED:
        def counted(*a, _f=getattr(torch_fast, name), _n=name):
            calls[_n] = calls.get(_n, 0) + 1
            return _f(*a)
        setattr(fused_be, name, counted)
    prompt = torch.randint(2, 4000, (70,), generator=torch.Generator().manual_seed(3))
    runs = []
    for be in (fused_be, _unfused_backend()):
        eng.model.set_ops(Ops(be))
        st, out = eng.new_state(), []
        with torch.no_grad():
            out.append(eng.model(prompt, st))
            tok = int(out[-1][-1].argmax())
            for _ in range(6):
                out.append(eng.model(torch.tensor([tok]), st))
                tok = int(out[-1][-1].argmax())
        runs.append((out, st.tensors()))
    (fo, fs), (po, ps) = runs
    assert all(torch.equal(a, b) for a, b in zip(fo, po))
    assert fs.keys() == ps.keys() and all(torch.equal(fs[k], ps[k]) for k in fs)
    assert set(calls) == set(FUSED) and min(calls.values()) > 0


def _moe_layer(fmt, k, T, hashed, ties, seed=0):
    """A model.MoE (16 routed experts of 64 x 128 in `fmt`, the shared one in FP8) with its inputs; ties: every
    router score equal (zero gate weights and bias: torch.topk's own tie rule decides the picks)."""
    from flashport.config import PRESETS, ModelConfig
    from flashport.model import MoE

    cfg = ModelConfig(**{**PRESETS["flash-tiny"], "n_routed_experts": 16, "num_experts_per_tok": k})
    moe = MoE(cfg, 0 if hashed else cfg.num_hash_layers)
    gen = torch.Generator().manual_seed(seed)
    moe.gate.weight.data.copy_(torch.randn(16, 128, generator=gen) * (0.0 if ties else 0.3))
    if hashed:  # a token's row may name one expert twice: that expert then gets more rows than tokens
        moe.gate.tid2eid.copy_(torch.randint(0, 16, moe.gate.tid2eid.shape, generator=gen))
    else:
        moe.gate.bias.data.copy_(torch.zeros(16) if ties else torch.randn(16, generator=gen) * 0.1)
    for i, lin in enumerate(m for m in moe.modules() if type(m).__name__ == "Linear"):
        shared = any(lin is getattr(moe.shared_experts, n) for n in ("w1", "w2", "w3"))
        lin.packed = quant("fp8-e4m3-block128-ue8m0" if shared else fmt, *lin.weight.shape, seed=seed + i)
    return moe, torch.randn(T, 128, generator=gen), torch.randint(0, 8192, (T,), generator=gen)


_MOE_FORMATS = ["mxfp4", "fp8-e4m3-block128-ue8m0", "int4-g32"]


@needs_ext
@pytest.mark.parametrize("fmt,k,T,threads", [
    *((f, k, T, 1) for f in _MOE_FORMATS for k in (1, 4, 6, 8) for T in (1, 3, cpu_quant.GEMV_MAX_ROWS + 4)),
    # 2 threads: each parallel region waits for a descheduled thread on a loaded machine, so fewer cases
    ("mxfp4", 6, 1, 2), ("fp8-e4m3-block128-ue8m0", 4, 3, 2), ("int4-g32", 8, 1, 2)])
def test_gated_moe_bit_identical_to_the_ops(fmt, k, T, threads):
    """The fused gated_moe (its router in C++, the experts' GEMVs in two parallel regions with w2 split by rows)
    equals model.Gate + the moe op for the routed experts + the moe op for the shared one, bit for bit: biased and
    hash routers (a hash row may repeat an expert), every score tied (torch.topk's tie rule, by the fallback),
    k below and at 8 (ATen's sum order), decode and prefill rows, 1 and 2 threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for hashed, ties in ((False, False), (False, True), (True, False)):
            moe, x, ids = _moe_layer(fmt, k, T, hashed, ties, seed=k * 10 + T)
            with torch.no_grad():
                moe.apply(lambda m: setattr(m, "ops", Ops(_unfused_backend())))
                want = moe(x, ids)
                ops = Ops(torch_fast.FastTorchBackend())
                moe.apply(lambda m: setattr(m, "ops", ops))
                got = ops.gated_moe(x, ids, moe.gate.weight, moe.gate.tid2eid if hashed else None,
                                    None if hashed else moe.gate.bias, k, moe.gate.cfg.routed_scaling_factor,
                                    moe.experts, moe.shared_experts, moe.limit)
            assert got is not None and torch.equal(got, want), (hashed, ties)
    finally:
        torch.set_num_threads(before)


@needs_ext
def test_router_hooks_still_fire_on_the_fast_path(tiny_release):
    """A forward hook on a router (offload's prefetcher, calibration) sees every call: the MoE then runs op by
    op instead of the fused gated_moe, with the same result."""
    from flashport.engine import Engine

    eng = Engine.load(tiny_release, backend="torch")
    eng.model.set_ops(Ops(torch_fast.FastTorchBackend()))
    prompt = torch.randint(2, 4000, (9,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = eng.model(prompt)
        seen = []
        eng.model.layers[1].ffn.gate.register_forward_hook(lambda mod, inp, out: seen.append(out[1]))
        got = eng.model(prompt)
    assert len(seen) == 1 and seen[0].shape == (9, eng.cfg.num_experts_per_tok) and torch.equal(got, want)


def test_fused_sequence_that_raises_degrades_to_the_ops(tiny_release):
    """A fused sequence that raises is contained like an op: that call reruns op by op (same result), the
    sequence is listed as degraded, and it is never tried again."""
    from flashport.engine import Engine

    eng = Engine.load(tiny_release, backend="torch")
    prompt = torch.randint(2, 4000, (20,), generator=torch.Generator().manual_seed(4))
    eng.model.set_ops(Ops(_unfused_backend()))
    with torch.no_grad():
        want = eng.model(prompt)
    be, tries = torch_fast.FastTorchBackend(), []

    def broken(*a):
        tries.append(1)
        raise RuntimeError("kernel fault")

    be.attn_project = broken
    ops = Ops(be)
    eng.model.set_ops(ops)
    with torch.no_grad():
        got = eng.model(prompt)
        eng.model(prompt)
    assert torch.equal(got, want) and len(tries) == 1 and "attn_project" in ops.degraded


# ---------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def mini_release(tmp_path_factory):
    from flashport.checkpoint import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("mini-release"), "flash-mini", seed=0, fmt="release")


@needs_ext
@pytest.mark.parametrize("ckpt,prompt_len", [
    ("tiny_release", 150),
    # 300 tokens: more compressed entries than index_topk (the indexer's selection runs), a complete HCA entry
    pytest.param("mini_release", 300, marks=pytest.mark.slow),
])
def test_generation_matches_reference(ckpt, prompt_len, request):
    """Greedy tokens of the fast path (C++ attention, MoE, GEMV...) equal the reference ops' on flash-tiny and
    flash-mini, and the logits stay within 1e-3."""
    from flashport.engine import Engine

    eng = Engine.load(request.getfixturevalue(ckpt), backend="torch")
    prompt = torch.randint(2, 4000, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    ref_logits = eng.logits(prompt)
    ref = eng.generate(prompt, max_new_tokens=24).token_ids
    eng.model.set_ops(Ops(torch_fast.FastTorchBackend()))
    fast_logits = eng.logits(prompt)
    fast = eng.generate(prompt, max_new_tokens=24).token_ids
    assert (fast_logits - ref_logits).abs().max() < 1e-3
    assert fast == ref
    ops = eng.model.ops
    assert not ops.fallbacks  # every op ran on the fast backend
    lin = eng.model.layers[0].attn.wq_a
    assert ops.handle(lin).fmt == cpu_quant.FMT_FP8  # release FP8 weights kept as FP8, losslessly
    expert = eng.model.layers[0].ffn.experts[0].w1
    assert ops.handle(expert).fmt == cpu_quant.FMT_MXFP4  # MXFP4 experts read as stored (0.5 byte per weight)


def test_bench_decode_rows_and_roofline(tiny_release, monkeypatch):
    """`bench decode` prints flashport vs transformers per row with the ratio and the decode roofline fraction;
    with peer=False transformers is not run at all and its cells print '-'."""
    from flashport.bench import decode

    def no_peer(*a):
        raise AssertionError("transformers ran with peer=False")

    monkeypatch.setattr(decode, "_transformers", no_peer)
    out = decode.run(path=str(tiny_release), prompt_lens=(16,), decode_tokens=2, peer=False)
    pre, dec = (line.split() for line in out.splitlines()[-3:-1])
    assert pre[:2] == ["16", "prefill"] and dec[:2] == ["16", "decode"]
    assert pre[4:6] == ["-", "-"] and dec[4:6] == ["-", "-"] and dec[-1].endswith("%") and pre[-1] == "-"
    # the last line as the peer tool (../shared/tools/peer-llamacpp/run) reads it: fields 1 and 2 between bars
    bars = out.splitlines()[-1].split("|")
    assert (float(bars[1].split()[1]), float(bars[2].split()[1])) == (float(pre[3]), float(dec[3]))
    monkeypatch.setattr(decode, "_transformers", lambda *a: (100.0, 10.0))
    dec = decode.run(path=str(tiny_release), prompt_lens=(16,), decode_tokens=2).splitlines()[-2].split()
    assert float(dec[4]) == 10.0 and dec[5] == f"{float(dec[3]) / 10.0:.2f}x"


def test_step_ms_times_greedy_decode_steps(tiny_release):
    """bench.decode.step_ms (docs/performance.md's side-by-side figure): CPU and wall ms per step, and the greedy
    tokens, the same as a plain greedy decode of the same prompt."""
    from flashport.bench.decode import step_ms
    from flashport.engine import Engine

    r = step_ms(str(tiny_release), threads=1, prompt_len=12, reps=2, steps=2)
    assert r["cpu_ms"] > 0 and r["wall_ms"] > 0 and len(r["tokens"]) == 3 + 2 * 2
    eng = Engine.load(tiny_release)
    eng.model.set_ops(Ops(torch_fast.FastTorchBackend()))
    prompt = torch.randint(2, 4000, (12,), generator=torch.Generator().manual_seed(0)).tolist()
    assert eng.generate(prompt, max_new_tokens=8).token_ids[1:] == r["tokens"]


def test_decode_bytes_per_token_counts_the_uploaded_layout(tiny_release):
    """Weights read per decode token: FP8 Linears at 1 byte per weight (+ scales) in the fast path, fp32 on the
    reference; the routed experts at num_experts_per_tok / n_routed_experts of their bytes."""
    from flashport.bench.decode import decode_bytes_per_token
    from flashport.engine import Engine

    from flashport.model import Linear

    model = Engine.load(tiny_release, backend="torch").model
    cfg = model.cfg
    ref = decode_bytes_per_token(model, Ops())
    share = cfg.num_experts_per_tok / cfg.n_routed_experts
    expect = 0.0
    for name, mod in model.named_modules():
        if name.startswith("mtp") or name == "embed":
            continue
        for pname, p in mod.named_parameters(recurse=False):  # a Linear counts its logical [N, K] in fp32
            n = math.prod(mod.qweight.shape) if isinstance(mod, Linear) and pname == "weight" else p.numel()
            expect += (share if ".experts." in name else 1) * n * 4
    assert ref == int(expect + cfg.hidden_size * model.embed.weight.element_size())  # one row as stored
    if cpu_quant.ext() is not None:
        fast = decode_bytes_per_token(model, Ops(torch_fast.FastTorchBackend()))
        wq_a = math.prod(model.layers[0].attn.wq_a.qweight.shape)
        assert ref - fast > 0.7 * 3 * wq_a  # at least wq_a saved its 3 of 4 bytes per weight
        assert fast < ref / 2


def test_deterministic_mode_is_torch_backends():
    from flashport.backends.torch_backend import TorchBackend

    b, plain = torch_fast.FastTorchBackend(deterministic=True), TorchBackend(deterministic=True)
    try:
        for op in ("rms_norm", "hc_pre", "linear", "moe"):
            assert getattr(b, op).__qualname__ == getattr(plain, op).__qualname__, op
        assert isinstance(b.upload(quant("int8", 8, 32)), torch.Tensor)
        # the fused sequences would bypass the batch-invariant ops: none is offered
        assert all(Ops(b)._fused_fn(name) is None for name in FUSED)
    finally:
        torch.use_deterministic_algorithms(False)


# ---------------------------------------------------------------- the kernel build as users meet it (cpu_build)
# A module with no torch headers: compiles in about a second, so the build machinery is tested without the
# real kernels' 30-60 s (TORCH_EXTENSION_NAME is set by torch's build)
TINY_CPP = """#include <Python.h>
#define FP_STR2(x) #x
#define FP_STR(x) FP_STR2(x)
#define FP_CAT(a, b) a##b
#define FP_INIT(n) FP_CAT(PyInit_, n)
static PyModuleDef def = {PyModuleDef_HEAD_INIT, FP_STR(TORCH_EXTENSION_NAME), nullptr, -1, nullptr};
PyMODINIT_FUNC FP_INIT(TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&def); }
// %s
"""

LOADER = """import sys
from flashport.backends import cpu_build
mod = cpu_build.load_extension("fp_tiny", [sys.argv[1]], what="test kernels")
print("status", cpu_build.last_status["fp_tiny"], mod.__name__, flush=True)
"""

needs_compiler = pytest.mark.skipif(not shutil.which("c++"), reason="no C++ compiler here")


@pytest.fixture
def kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHPORT_KERNEL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "loader.py").write_text(LOADER)
    return tmp_path


def tiny_source(root: Path, variant: str = "v1") -> Path:
    (root / "src").mkdir(exist_ok=True)
    src = root / "src" / "tiny.cpp"
    src.write_text(TINY_CPP % variant)
    return src


def wait_for_line(stream, text: str, lines: int = 50) -> bool:
    return any(text in stream.readline() for _ in range(lines))


def run_loader(root: Path, src: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(root / "loader.py"), str(src)], capture_output=True, text=True,
                          timeout=timeout, env=os.environ.copy(), check=False)


@needs_compiler
def test_build_said_once_then_cached(kernel_cache):
    """First load builds (one line on stderr before, one after); a fresh process with unchanged sources imports the
    cached library without running the build; a changed source builds into another directory."""
    src = tiny_source(kernel_cache)
    first = run_loader(kernel_cache, src)
    assert first.returncode == 0, first.stderr
    assert "status built" in first.stdout
    assert re.search(r"^flashport: building test kernels, once \(~\d+ s\)\.\.\.$", first.stderr, re.MULTILINE)
    assert re.search(r"^flashport: test kernels built in \d+ s \(cached in ", first.stderr, re.MULTILINE)
    d = cpu_build.build_dir("fp_tiny", [src])
    lib = next(d.glob("fp_tiny_*.so"))
    stamp = lib.stat().st_mtime_ns
    again = run_loader(kernel_cache, src)
    assert again.returncode == 0 and "status cached" in again.stdout, again.stderr
    assert "building" not in again.stderr and lib.stat().st_mtime_ns == stamp
    assert not (d / "lock").exists()
    src.write_text(TINY_CPP % "v2")
    changed = run_loader(kernel_cache, src)
    assert "status built" in changed.stdout and cpu_build.build_dir("fp_tiny", [src]) != d


@needs_compiler
def test_stale_lock_of_a_killed_build_does_not_hang(kernel_cache):
    """A build killed with SIGKILL leaves torch's lock file behind (its existence is the lock, so torch alone would
    wait forever). The next load waits while the holder lives, then goes on: the flock died with its process and
    the stale file is removed with a message."""
    src = tiny_source(kernel_cache)
    d = cpu_build.build_dir("fp_tiny", [src])
    holder = subprocess.Popen(
        [sys.executable, "-c", f"""import sys, time
from pathlib import Path
from flashport.backends import cpu_build
d = Path({str(d)!r}); d.mkdir(parents=True)
with cpu_build.exclusive(d / cpu_build.LOCK, "test kernels"):
    (d / cpu_build.TORCH_LOCK).touch()  # what torch's build holds while it compiles
    print("held", flush=True)
    time.sleep(600)
"""], stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        assert holder.stdout.readline().strip() == "held"
        waiter = subprocess.Popen([sys.executable, str(kernel_cache / "loader.py"), str(src)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=os.environ.copy())
        assert wait_for_line(waiter.stderr, "waiting for another process")
        assert waiter.poll() is None  # it waits while the holder lives
    finally:
        holder.kill()  # SIGKILL: no cleanup runs in the holder
        holder.wait()
    try:
        out, err = waiter.communicate(timeout=300)
    finally:
        waiter.kill()
    assert waiter.returncode == 0, err
    assert "removing a stale build lock" in err and "status built" in out
    assert not (d / cpu_build.TORCH_LOCK).exists()


SLOW_BUILD = """import sys, threading
from flashport.backends import cpu_build
done = threading.Event()
def build():
    try:
        cpu_build.load_extension("fp_slow", [sys.argv[1]], what="test kernels")
    except Exception as e:  # what cpu_quant.ext() does with a build error: fall back to torch and go on
        print("went on after", type(e).__name__, flush=True)
    except BaseException as e:
        print("stopped by", type(e).__name__, flush=True)
        raise
    finally:
        done.set()
if sys.argv[2] == "main":
    build()
else:  # a program that loads its engine in a worker thread: only the main thread gets KeyboardInterrupt
    threading.Thread(target=build).start()
    while True:
        try:
            if done.wait(0.1):
                break
        except KeyboardInterrupt:
            print("main interrupted", flush=True)
"""


@needs_compiler
@pytest.mark.parametrize("where", ["main", "thread"])
def test_ctrl_c_during_the_build_stops_it(kernel_cache, where):
    """Ctrl-C (SIGINT to the terminal's process group: Python, ninja and the compiler) while the compiler runs stops
    the build promptly with KeyboardInterrupt, also in a worker thread, where torch reports the killed compiler as a
    failed build (which would fall back to torch and go on); and it leaves no lock held."""
    src = kernel_cache / "src" / "slow.cpp"
    src.parent.mkdir()
    src.write_text("#include <torch/extension.h>\nPYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}\n")  # ~15 s to build
    (kernel_cache / "slow.py").write_text(SLOW_BUILD)
    p = subprocess.Popen([sys.executable, str(kernel_cache / "slow.py"), str(src), where], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=os.environ.copy(), start_new_session=True)
    try:
        assert wait_for_line(p.stderr, "building test kernels")
        time.sleep(2)  # the compiler is running now
        t0 = time.monotonic()
        os.killpg(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=60)
        assert time.monotonic() - t0 < 30
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert "stopped by KeyboardInterrupt" in out and "went on" not in out, (out, err)
    d = cpu_build.build_dir("fp_slow", [src])
    fd = os.open(d / cpu_build.LOCK, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody holds it any more
    finally:
        os.close(fd)


@needs_ext
def test_real_kernels_not_rebuilt_by_a_fresh_process():
    """The CPU kernels built (or found) by this process are found, not rebuilt, by a fresh one."""
    lib = Path(cpu_quant.ext().__file__)
    stamp = lib.stat().st_mtime_ns
    code = ("from flashport.backends import cpu_quant, cpu_build\n"
            "assert cpu_quant.ext() is not None\nprint(cpu_build.last_status['flashport_cpu'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=os.environ.copy(), check=False)
    assert r.returncode == 0 and r.stdout.strip() == "cached" and "building" not in r.stderr, r.stderr
    assert lib.stat().st_mtime_ns == stamp


def test_kernel_constants_have_one_source():
    """The C++ constants shared with Python come from cpu_quant.KERNEL_CONSTANTS (built from flashport.quant) as -D
    flags; the sources define none of them and common.h refuses to build without them."""
    from flashport.quant.formats import FORMATS, INT4_FORMATS, INT4_ZERO_POINT
    from flashport.quant.release import FP8_BLOCK

    k = cpu_quant.KERNEL_CONSTANTS
    assert k["FLASHPORT_MAX_ROWS"] == cpu_quant.GEMV_MAX_ROWS and k["FLASHPORT_FP8_BLOCK"] == FP8_BLOCK
    assert k["FLASHPORT_INT4_ZERO_POINT"] == INT4_ZERO_POINT
    assert k["FLASHPORT_INT4_MAX_GROUP"] == max(FORMATS[f].group for f in INT4_FORMATS)
    assert [k[f"FLASHPORT_FMT_{n}"] for n in ("F32", "BF16", "I8", "I4", "FP8")] == [
        cpu_quant.FMT_F32, cpu_quant.FMT_BF16, cpu_quant.FMT_I8, cpu_quant.FMT_I4, cpu_quant.FMT_FP8]
    texts = {p.name: p.read_text() for p in cpu_quant.KERNEL_DIR.iterdir() if p.suffix in (".cpp", ".h")}
    assert set(cpu_quant.KERNEL_SOURCES) | {"common.h"} <= set(texts)
    assert not any(re.search(r"#\s*define\s+FLASHPORT_(?!DISPATCH_T|AVX512)", t) for t in texts.values())
    assert all(name in texts["common.h"] for name in k)
    assert "#error" in texts["common.h"]


def test_kernel_sources_ship_in_the_package(tmp_path):
    """setuptools' build of the package (what a wheel holds) carries every kernel source to where cpu_quant looks."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").exists():
        pytest.skip("not a source checkout")
    r = subprocess.run([sys.executable, "-c", "import setuptools; setuptools.setup()", "-q", "build_py",
                        "--build-lib", str(tmp_path)], cwd=root, capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr
    built = tmp_path / "flashport" / "kernels" / "cpu"
    assert sorted(p.name for p in built.iterdir()) == sorted(
        p.name for p in cpu_quant.KERNEL_DIR.iterdir() if p.suffix in (".cpp", ".h"))
    assert (tmp_path / "flashport" / "backends" / "cpu_quant.py").resolve().parents[1] / "kernels" / "cpu" == built
