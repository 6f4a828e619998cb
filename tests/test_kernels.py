"""flashport.kernels: each Triton kernel (run by the CPU interpreter) against its *_ref,
exactly or within the tolerance its module docstring documents."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (conftest does too)

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from flashport import kernels as K  # noqa: E402
from flashport.kernels.quant_gemm import QuantWeight  # noqa: E402

pytestmark = pytest.mark.skipif(not K.triton_usable(torch.zeros(1)),
                                reason="needs CUDA or TRITON_INTERPRET=1")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def make_int4(N, Kd, bs, zp=True, g=None, lead=()):
    g = g or gen(1)
    nb = math.ceil(Kd / bs)
    q = torch.randint(0, 256, (*lead, N, nb, bs // 2), dtype=torch.uint8, generator=g)
    # K padding: the packed weight holds zeros beyond K (as MatMulNBits writers do)
    flat = q.reshape(*lead, N, nb * bs // 2)
    if Kd % 2:
        flat[..., Kd // 2] &= 0x0F
    flat[..., (Kd + 1) // 2:] = 0
    s = torch.rand((*lead, N, nb), generator=g) + 0.01
    z = torch.randint(0, 256, (*lead, N, (nb + 1) // 2), dtype=torch.uint8, generator=g) if zp else None
    return q, s, z


def make_mxfp4(N, Kd, g=None, lead=(), lo=118, hi=136):
    g = g or gen(2)
    p = torch.randint(-128, 128, (*lead, N, Kd // 2), dtype=torch.int8, generator=g)
    e = torch.randint(lo, hi, (*lead, N, Kd // 32), dtype=torch.uint8, generator=g)
    return p, e


def assert_gemm_close(out, x, W, ref):
    """The documented GEMM bound: |out - ref| <= 1e-5 * (|x| @ |W|^T) + 1e-6."""
    bound = 1e-5 * (x.abs().float() @ W.abs().T) + 1e-6
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert torch.all((out - ref).abs() <= bound), (out - ref).abs().max()


def test_triton_path_is_taken():
    """The kernels really run in the interpreter here (not the torch fallback)."""
    from triton.runtime.interpreter import InterpretedFunction
    from flashport.kernels import quant_gemm
    assert isinstance(quant_gemm._qgemm_kernel, InterpretedFunction)


# ------------------------------------------------------------------------------ GEMMs
@pytest.mark.parametrize("M,N,Kd,bs,zp", [(1, 17, 80, 32, False), (5, 17, 80, 32, True),
                                          (3, 32, 64, 16, True), (18, 9, 40, 64, False)])
def test_int4_gemm(M, N, Kd, bs, zp):
    q, s, z = make_int4(N, Kd, bs, zp)
    x = torch.randn(M, Kd, generator=gen(3))
    W = K.dequant_int4_ref(q, s, z, bs, Kd)
    ref = K.int4_gemm_ref(x, q, s, z, bs)
    assert_gemm_close(K.int4_gemm(x, q, s, z, bs), x, W, ref)
    assert_gemm_close(K.int4_gemm(x, q, s, z, bs, split_k=2), x, W, ref)
    xb = x.bfloat16()                                          # bf16 activations, fp32 math
    assert_gemm_close(K.int4_gemm(xb, q, s, z, bs), xb, W, K.int4_gemm_ref(xb, q, s, z, bs))


def test_int4_reference_layout():
    """The reference reads MatMulNBits exactly: byte k//2, low nibble = even k, zp packed."""
    q = torch.zeros(1, 2, 2, dtype=torch.uint8)            # N=1, 2 blocks of 4
    q[0, 0, 0] = 0x31                                        # k0 = 1, k1 = 3
    q[0, 1, 1] = 0xF0                                        # k6 = 0, k7 = 15
    s = torch.tensor([[2.0, 0.5]])
    z = torch.tensor([[0x21]], dtype=torch.uint8)            # zp block0 = 1, block1 = 2
    W = K.dequant_int4_ref(q, s, z, 4)
    assert W.tolist() == [[0.0, 4.0, -2.0, -2.0, -1.0, -1.0, -1.0, 6.5]]
    assert K.dequant_int4_ref(q, s, None, 4)[0, 0].item() == (1 - 8) * 2.0


@pytest.mark.parametrize("fmt", ["int4", "mxfp4"])
def test_dequant_bit_exact_in_kernel(fmt):
    """x = identity picks single weights: the kernel's dequantization equals the reference's."""
    N, Kd = 19, 64
    if fmt == "int4":
        q, s, z = make_int4(N, Kd, 32)
        out, W = K.int4_gemm(torch.eye(Kd), q, s, z, 32), K.dequant_int4_ref(q, s, z, 32, Kd)
    else:
        p, e = make_mxfp4(N, Kd, lo=0, hi=200)               # includes the subnormal 2**-127
        out, W = K.mxfp4_gemm(torch.eye(Kd), p, e), K.dequant_mxfp4_ref(p, e)
    assert torch.equal(out, W.T)


def test_mxfp4_reference_values():
    p = torch.tensor([[0x21, 0xF8 - 256, 0x7E, 0x00]], dtype=torch.int8)  # K=8, one block
    e = torch.tensor([[128]], dtype=torch.uint8)                          # scale 2
    W = K.dequant_mxfp4_ref(p, e)
    assert W.tolist() == [[1.0, 2.0, -0.0, -12.0, -8.0, 12.0, 0.0, 0.0]]
    assert torch.equal(K.dequant_mxfp4_ref(p, e.view(torch.float8_e8m0fnu)), W)


@pytest.mark.parametrize("M", [1, 7])
def test_int8_and_mxfp4_gemm(M):
    N, Kd = 23, 96
    x = torch.randn(M, Kd, generator=gen(4))
    q8 = torch.randint(-128, 128, (N, Kd), dtype=torch.int8, generator=gen(5))
    s8 = torch.rand(N, generator=gen(6)) * 0.02
    assert_gemm_close(K.int8_gemm(x, q8, s8), x, K.dequant_int8_ref(q8, s8),
                      K.int8_gemm_ref(x, q8, s8))
    p, e = make_mxfp4(N, Kd)
    W = K.dequant_mxfp4_ref(p, e)
    ref = K.mxfp4_gemm_ref(x, p, e)
    assert_gemm_close(K.mxfp4_gemm(x, p, e), x, W, ref)
    assert_gemm_close(K.mxfp4_gemm(x, p, e.view(torch.float8_e8m0fnu)), x, W, ref)


@pytest.mark.parametrize("fmt", ["int4", "mxfp4"])
def test_batch_invariance(fmt):
    """Row i of a batch equals that row computed alone, bit for bit (also with split-K)."""
    N, Kd, M = 21, 96, 19
    x = torch.randn(M, Kd, generator=gen(7))
    if fmt == "int4":
        q, s, z = make_int4(N, Kd, 32)
        f = lambda a, sk=None: K.int4_gemm(a, q, s, z, 32, split_k=sk)  # noqa: E731
    else:
        p, e = make_mxfp4(N, Kd)
        f = lambda a, sk=None: K.mxfp4_gemm(a, p, e, split_k=sk)  # noqa: E731
    for sk in (None, 2):
        full = f(x, sk)
        for i in (0, 5, 17):
            assert torch.equal(full[i], f(x[i:i + 1], sk)[0])


# -------------------------------------------------------------------------------- MoE
def test_moe_sort():
    ids = torch.tensor([[2, 0], [2, 3], [0, 2]])
    tok, offs, order = K.moe_sort(ids, 5, return_order=True)
    assert offs.tolist() == [0, 2, 2, 5, 6, 6]                # experts 1 and 4 empty
    assert tok.tolist() == [0, 2, 0, 1, 2, 1]
    assert torch.equal(ids.flatten()[order], torch.tensor([0, 0, 2, 2, 2, 3]))
    assert torch.equal(order // 2, tok)


@pytest.mark.parametrize("fmt", ["int4", "int8", "mxfp4", "float"])
def test_moe_grouped_gemm(fmt):
    E, N, Kd = 4, 19, 64
    counts = [3, 0, 18, 1]                                    # expert 1 has no tokens
    offs = torch.tensor([0] + list(torch.tensor(counts).cumsum(0)), dtype=torch.int32)
    x = torch.randn(sum(counts), Kd, generator=gen(8))
    g = gen(9)
    if fmt == "int4":
        w = QuantWeight("int4", *make_int4(N, Kd, 32, lead=(E,)), block_size=32)
    elif fmt == "int8":
        w = QuantWeight("int8", torch.randint(-128, 128, (E, N, Kd), dtype=torch.int8, generator=g),
                        torch.rand(E, N, generator=g) * 0.02)
    elif fmt == "mxfp4":
        w = QuantWeight("mxfp4", *make_mxfp4(N, Kd, lead=(E,)))
    else:
        w = QuantWeight("float", torch.randn(E, N, Kd, generator=g))
    out = K.moe_grouped_gemm(x, offs, w)
    ref = K.moe_grouped_gemm_ref(x, offs, w)
    Wd = w.dequantize(Kd)
    bound = torch.cat([x[offs[e]:offs[e + 1]].abs() @ Wd[e].abs().T for e in range(E)])
    assert torch.all((out - ref).abs() <= 1e-5 * bound + 1e-6)


def test_moe_ffn_matches_reference_and_naive_loop():
    T, k, E, H, I, limit = 6, 3, 5, 64, 32, 1.5
    g = gen(10)
    x = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E - 1, generator=g)[:k] for _ in range(T)])  # expert 4 idle
    wts = torch.rand(T, k, generator=g)
    w1 = QuantWeight("int4", *make_int4(I, H, 32, lead=(E,), g=g), block_size=32)
    w3 = QuantWeight("mxfp4", *make_mxfp4(I, H, lead=(E,), g=g))
    w2 = QuantWeight("int4", *make_int4(H, I, 16, zp=False, lead=(E,), g=g), block_size=16)
    ref = K.moe_ffn_ref(x, ids, wts, w1, w3, w2, limit)
    # independent per-token loop with the clamped SwiGLU spelled out
    W1, W3, W2 = w1.dequantize(H), w3.dequantize(H), w2.dequantize(I)
    naive = torch.zeros(T, H)
    for t in range(T):
        for j in range(k):
            e = ids[t, j]
            gate = (W1[e] @ x[t]).clamp(max=limit)
            up = (W3[e] @ x[t]).clamp(-limit, limit)
            naive[t] += wts[t, j] * (W2[e] @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(ref, naive, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(K.moe_ffn(x, ids, wts, w1, w3, w2, limit), ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------- norm / rope
@pytest.mark.parametrize("D", [64, 100])
def test_rmsnorm(D):
    x = torch.randn(3, 5, D, generator=gen(11)) * 3
    w = torch.randn(D, generator=gen(12))
    torch.testing.assert_close(K.rmsnorm(x, w, 1e-6), K.rmsnorm_ref(x, w, 1e-6), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(K.rmsnorm_unweighted(x, 1e-6), K.rmsnorm_unweighted_ref(x, 1e-6),
                               rtol=1e-6, atol=1e-6)
    xb = x.bfloat16()
    torch.testing.assert_close(K.rmsnorm(xb, w, 1e-6), K.rmsnorm_ref(xb, w, 1e-6), rtol=1e-2, atol=1e-2)


def test_rope_interleaved_bit_exact_and_inverse():
    P, H, D, R = 5, 3, 24, 8
    x = torch.randn(P, H, D, generator=gen(13))
    ang = torch.rand(P, R // 2, generator=gen(14)) * 6
    cos, sin = ang.cos(), ang.sin()
    out = K.rope_interleaved(x, cos, sin, R)
    assert torch.equal(out, K.rope_interleaved_ref(x, cos, sin, R))
    assert torch.equal(out[..., :D - R], x[..., :D - R])       # only the last R channels rotate
    # interleaved pairs == complex multiplication by e^{i angle}
    z = torch.view_as_complex(x[..., D - R:].reshape(P, H, R // 2, 2).contiguous())
    zr = torch.view_as_real(z * torch.polar(torch.ones_like(ang), ang)[:, None]).flatten(-2)
    torch.testing.assert_close(out[..., D - R:], zr, rtol=1e-5, atol=1e-5)
    inv = K.rope_interleaved(out, cos, sin, R, inverse=True)
    assert torch.equal(inv, K.rope_interleaved_ref(out, cos, sin, R, inverse=True))
    torch.testing.assert_close(inv, x, rtol=1e-5, atol=1e-5)
    x2 = torch.randn(P, R, generator=gen(15))                 # rope_dim == D, no head dim
    assert torch.equal(K.rope_interleaved(x2, cos, sin, R), K.rope_interleaved_ref(x2, cos, sin, R))


# -------------------------------------------------------------------------- compress
@pytest.mark.parametrize("r", [4, 5, 8])
def test_compress_pool(r):
    W, C = 6, 40
    g = gen(16)
    kv, gate = torch.randn(W, r, C, generator=g), torch.randn(W, r, C, generator=g) * 3
    bias = torch.randn(r, C, generator=g)
    ref = K.compress_pool_ref(kv, gate, bias)
    torch.testing.assert_close(K.compress_pool(kv, gate, bias), ref, rtol=1e-5, atol=1e-6)
    p = torch.softmax(gate + bias, dim=1)                      # plain definition
    torch.testing.assert_close(ref, (kv * p).sum(1), rtol=1e-5, atol=1e-6)


def test_compress_pool_neg_inf():
    W, r, C = 3, 8, 20
    g = gen(17)
    kv, gate, bias = torch.randn(W, r, C, generator=g), torch.randn(W, r, C, generator=g), torch.randn(r, C, generator=g)
    gate[:, 4:] = float("-inf")                                # empty overlap slots
    gate[1, :, 3] = float("-inf")                              # an all -inf column
    out, ref = K.compress_pool(kv, gate, bias), K.compress_pool_ref(kv, gate, bias)
    assert not out.isnan().any() and not ref.isnan().any()
    assert out[1, 3].item() == 0.0 and ref[1, 3].item() == 0.0
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ref[0], K.compress_pool_ref(kv[:1, :4], gate[:1, :4], bias[:4])[0])


# ------------------------------------------------------------------------- attention
def _attn_inputs(B, H, D, S, n, seed):
    g = gen(seed)
    q = torch.randn(B, H, D, generator=g)
    kv = torch.randn(S, D, generator=g)
    idx = torch.randint(0, S, (B, n), generator=g)
    idx[torch.rand(B, n, generator=g) < 0.3] = -1
    return q, kv, idx, torch.randn(H, generator=g)


def test_sparse_attn_decode():
    q, kv, idx, sinks = _attn_inputs(3, 20, 48, 90, 37, 18)
    scale = 48 ** -0.5
    ref = K.sparse_attn_decode_ref(q, kv, idx, sinks, scale)
    torch.testing.assert_close(K.sparse_attn_decode(q, kv, idx.int(), sinks, scale), ref, rtol=1e-5, atol=1e-5)
    one = K.sparse_attn_decode(q[1], kv, idx[1], sinks, scale)
    torch.testing.assert_close(one, ref[1], rtol=1e-5, atol=1e-5)
    # reference against the literal definition: softmax over [logits, sink], drop the sink
    keep = idx[1][idx[1] >= 0]
    lg = torch.cat([q[1] @ kv[keep].T * scale, sinks[:, None]], 1)
    torch.testing.assert_close(ref[1], torch.softmax(lg, 1)[:, :-1] @ kv[keep], rtol=1e-5, atol=1e-5)


def test_sparse_attn_all_skipped_but_one():
    q, kv, idx, sinks = _attn_inputs(1, 4, 32, 50, 20, 19)
    idx[:] = -1
    idx[0, 13] = 7
    scale = 0.2
    out = K.sparse_attn_decode(q, kv, idx, sinks, scale)
    w = torch.sigmoid(q[0] @ kv[7] * scale - sinks)           # e^l / (e^l + e^sink)
    torch.testing.assert_close(out[0], w[:, None] * kv[7], rtol=1e-5, atol=1e-6)
    idx[:] = -1                                               # nothing at all: output 0, no NaN
    assert torch.equal(K.sparse_attn_decode(q, kv, idx, sinks, scale), torch.zeros_like(q))
    s_inf = torch.full_like(sinks, float("-inf"))
    assert torch.equal(K.sparse_attn_decode(q, kv, idx, s_inf, scale), torch.zeros_like(q))
    assert torch.equal(K.sparse_attn_decode_ref(q, kv, idx, s_inf, scale), torch.zeros_like(q))


# -------------------------------------------------------------------------- fallback
def test_wrappers_fall_back_to_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(2, 16)
    assert not K.triton_usable(x)
    w = torch.randn(16)
    assert torch.equal(K.rmsnorm(x, w), K.rmsnorm_ref(x, w))
    q8, s8 = torch.randint(-128, 128, (5, 16), dtype=torch.int8), torch.rand(5)
    assert torch.equal(K.int8_gemm(x, q8, s8), K.int8_gemm_ref(x, q8, s8))
