"""Weight formats: release FP8/MXFP4 exactness, MatMulNBits layout (checked against onnxruntime),
registry invariants and property-based round trips."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from flashport.quant import formats as F, release as R
from flashport.quant.formats import (
    FORMATS, Int4BlockFormat, Int8ChannelFormat, get_format, quantization_error, to_matmulnbits, w8a8_matmul,
)

F32_MAX = torch.finfo(torch.float32).max
TINY = 2.0**-149  # smallest fp32 subnormal
HYP = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def bits_equal(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def fp8_dequant_tf():
    fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
    return fp8.Fp8Dequantize(None)._dequantize_one


# ---------------------------------------------------------------- release formats
def test_e2m1_table_matches_transformers():
    fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")
    assert R.E2M1_VALUES == fp8.Fp8Dequantize._FP4_E2M1_LUT
    assert [math.copysign(1, v) for v in R.E2M1_VALUES[8:]] == [-1.0] * 8


def test_e8m0_helpers():
    b = torch.arange(255, dtype=torch.uint8)
    f = R.e8m0_to_float(b)
    assert torch.equal(f, torch.tensor([2.0 ** (i - 127) for i in range(255)], dtype=torch.float32))
    assert torch.equal(R.e8m0_to_float(b.view(R.E8M0)), f)
    assert torch.equal(R.float_to_e8m0(f).view(torch.uint8), b)  # powers of two exact
    assert torch.isnan(R.e8m0_to_float(torch.tensor([255], dtype=torch.uint8))).all()
    up = R.float_to_e8m0(torch.tensor([3.0, 0.3, 0.0, 1e-45, 3e38]))  # round up, saturate
    assert R.e8m0_to_float(up).tolist() == [4.0, 0.5, 2.0**-127, 2.0**-127, 2.0**127]


def test_e2m1_rounding_ties_to_even():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.26, 5.01, 100.0, 0.0])
    assert R.e2m1_round(x).tolist() == [0, 2, 2, 4, 4, 6, 6, 1, 7, 7, 0]


def test_mxfp4_nibble_order():
    w = torch.zeros(1, 32)
    w[0, 0], w[0, 1], w[0, 2] = 6.0, -0.5, 1.0  # amax 6 -> scale 1
    packed, scale = R.quantize_mxfp4(w)
    u8 = packed.view(torch.uint8)
    assert u8[0, 0].item() == 0x7 | (0x9 << 4)  # low nibble = k=0 (6.0), high = k=1 (-0.5)
    assert u8[0, 1].item() == 0x2 and scale.view(torch.uint8).item() == 127
    assert packed.dtype == torch.int8 and scale.dtype == torch.float8_e8m0fnu


@pytest.mark.parametrize("shape", [(4, 64), (3, 7, 96), (1, 32)])
def test_mxfp4_exact_and_matches_transformers(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.logspace(-3, 3, shape[-1] // 32).repeat_interleave(32)
    packed, scale = R.quantize_mxfp4(w)
    assert packed.shape == (*shape[:-1], shape[-1] // 2) and scale.shape == (*shape[:-1], shape[-1] // 32)
    d = R.dequantize_mxfp4(packed, scale)
    assert torch.equal(d.bfloat16().float(), d)  # exactly representable in bf16
    assert bits_equal(R.dequantize_mxfp4(packed, scale.view(torch.uint8)), d)  # uint8 exponent bytes
    tf = torch.stack([fp8_dequant_tf()(p, s, torch.float32) for p, s in zip(packed.reshape(-1, *packed.shape[-2:]), scale.reshape(-1, *scale.shape[-2:]))]) if len(shape) == 3 else fp8_dequant_tf()(packed, scale, torch.float32)
    assert bits_equal(tf.reshape(d.shape), d)
    assert bits_equal(fp8_dequant_tf()(packed, scale, torch.bfloat16).reshape(d.shape), d.bfloat16()) if len(shape) == 2 else True
    p2, s2 = R.quantize_mxfp4(d)  # re-quantization reproduces bytes and scales
    assert bits_equal(p2, packed) and bits_equal(s2, scale)
    assert ((d - w).abs() <= R.e8m0_to_float(scale).repeat_interleave(32, -1) * 2).all()


def test_mxfp4_errors():
    with pytest.raises(ValueError, match="K % 32"):
        R.quantize_mxfp4(torch.randn(2, 33))
    with pytest.raises(ValueError, match="experts.3.w1"):
        R.quantize_mxfp4(torch.tensor([[math.nan] + [0.0] * 31]), name="experts.3.w1")


@pytest.mark.parametrize("scale_fmt", ["ue8m0", "fp32"])
def test_fp8_block_matches_transformers(scale_fmt):
    torch.manual_seed(1)
    w = torch.randn(256, 384) * torch.tensor([1e-3, 1.0, 50.0]).repeat_interleave(128)
    q, s = R.quantize_fp8_block(w, scale_fmt=scale_fmt)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (2, 3)
    assert s.dtype == (torch.float8_e8m0fnu if scale_fmt == "ue8m0" else torch.float32)
    d = R.dequantize_fp8_block(q, s)
    assert bits_equal(fp8_dequant_tf()(q, s, torch.float32), d)
    assert q.float().abs().max() <= 448
    if scale_fmt == "ue8m0":
        assert torch.equal(d.bfloat16().float(), d)  # exact in bf16
        assert bits_equal(R.dequantize_fp8_block(q, s.view(torch.uint8)), d)
        q2, s2 = R.quantize_fp8_block(d, scale_fmt="ue8m0")
        assert bits_equal(q2, q) and bits_equal(s2, s)
        # minimal power of two: at half the scale the block max would round past 448 (blocks are nonzero)
        amax = R._block_amax(w, (128, 128))
        assert (amax / (R.e8m0_to_float(s) / 2) > 464).all() and (amax / R.e8m0_to_float(s) <= 464).all()


def test_fp8_block_partial_blocks_and_errors():
    torch.manual_seed(2)
    w = torch.randn(130, 200)
    for fmt in ("ue8m0", "fp32"):
        q, s = R.quantize_fp8_block(w, scale_fmt=fmt)
        assert s.shape == (2, 2)
        d = R.dequantize_fp8_block(q, s)
        step = R._expand_blocks(R.scale_to_float(s), w.shape, (128, 128)) * 2.0**-10  # e4m3 subnormal half-step
        assert d.shape == w.shape and ((d - w).abs() <= w.abs() / 16 + step).all()
    with pytest.raises(ValueError, match="wq_a"):
        R.quantize_fp8_block(torch.tensor([[1.0, math.inf]]), name="layers.0.attn.wq_a.weight")
    with pytest.raises(ValueError, match="scale_fmt"):
        R.quantize_fp8_block(w, scale_fmt="e5m2")


# ---------------------------------------------------------------- ONNX Runtime MatMulNBits pins the int4 layout
INT4 = [n for n, f in FORMATS.items() if isinstance(f, Int4BlockFormat)]


@pytest.mark.parametrize("name", INT4)
@pytest.mark.parametrize("N,K", [(8, 64), (5, 100), (3, 300)])
def test_int4_matches_onnxruntime_matmulnbits(name, N, K):
    ort = pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    torch.manual_seed(N * K)
    fmt = get_format(name)
    w, x = torch.randn(N, K), torch.randn(3, K)
    w[0, : min(K, fmt.block)] = 0  # an all-zero group
    w[1] = w[1].abs() + 0.1  # all-positive row: exercises nonzero zero points
    inputs, attrs = to_matmulnbits(fmt.pack(w), fmt.block)
    assert attrs == {"K": K, "N": N, "bits": 4, "block_size": fmt.block}
    node = helper.make_node("MatMulNBits", ["A", *inputs], ["Y"], domain="com.microsoft", accuracy_level=0, **attrs)
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [3, K])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [3, N])],
        [numpy_helper.from_array(v.numpy(), k) for k, v in inputs.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    y = torch.from_numpy(ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"A": x.numpy()})[0])
    ref = x.double() @ fmt.dequantize(fmt.pack(w)).double().T
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 1e-4


# ---------------------------------------------------------------- registry
def test_registry():
    assert set(FORMATS) == {
        "bf16", "fp8-e4m3-block128", "fp8-e4m3-block128-ue8m0", "fp8-e4m3-channel", "mxfp4", "int8", "w8a8",
        *(f"int4-g{g}{a}" for g in (32, 64, 128) for a in ("", "-asym"))}
    with pytest.raises(ValueError, match="known: .*int4-g32"):
        get_format("q4_k")
    assert get_format(FORMATS["bf16"]) is FORMATS["bf16"]
    bits = {n: f.bits for n, f in FORMATS.items()}
    assert bits["bf16"] == 16 and bits["mxfp4"] == 4.25 and bits["int4-g32"] == 5.0 and bits["int4-g128-asym"] == 4.28125
    assert FORMATS["int4-g32"].bits_per_weight(1, 33) == 8 * (2 * 16 + 2 * 4) / 33  # padding counted


@pytest.mark.parametrize("name", list(FORMATS))
def test_shapes_keys_and_safetensors(name, tmp_path):
    from safetensors.torch import load_file, save_file

    fmt = get_format(name)
    for N, K in [(1, 1), (3, 33), (4, 130)]:
        p = fmt.pack(torch.randn(N, K))
        spec = fmt.packed_shapes(N, K)
        assert {k: (tuple(v.shape), v.dtype) for k, v in p.items()} == {k: (s.shape, s.dtype) for k, s in spec.items()}
    save_file(p, tmp_path / "w.safetensors")  # file API (safetensors 0.8's bytes load lacks F8_E8M0)
    back = load_file(tmp_path / "w.safetensors")
    assert back.keys() == p.keys() and all(bits_equal(back[k], p[k]) for k in p)
    assert bits_equal(fmt.dequantize(back), fmt.dequantize(p))


def test_bf16_lossless_on_bf16_input():
    w = torch.randn(5, 7).bfloat16().float()
    assert quantization_error(w, "bf16") == {"max_abs": 0.0, "rmse": 0.0, "rel_rmse": 0.0}


def test_w8a8_matmul_reference():
    torch.manual_seed(3)
    w, x = torch.randn(48, 200), torch.randn(2, 5, 200)
    p = get_format("w8a8").pack(w)
    y = w8a8_matmul(x, p)
    ref = x @ w.T
    assert y.shape == (2, 5, 48)
    assert ((y - ref).norm() / ref.norm()).item() < 2e-2  # tolerance-bound, not exact
    # integer accumulation is exact: equals the float64 product of the dequantized operands
    sx = R.round_up_scale(x.abs().amax(-1), 127.0)
    xd = torch.round(x.double() / sx.double()[..., None]) * sx.double()[..., None]
    exact = xd @ get_format("int8").dequantize(p).double().T
    assert torch.allclose(y.double(), exact, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="x"):
        w8a8_matmul(torch.full((1, 200), math.nan), p)


# ---------------------------------------------------------------- property-based
@st.composite
def weights(draw):
    N = draw(st.sampled_from([1, 2, 3, 5]))
    K = draw(st.sampled_from([1, 2, 31, 33, 64, 65, 130]))
    kind = draw(st.sampled_from(["normal", "zero_groups", "extreme", "mixed"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if kind == "normal":
        return torch.randn(N, K, generator=g) * 10.0 ** draw(st.integers(-30, 30))
    if kind == "zero_groups":
        w = torch.randn(N, K, generator=g)
        w[:, : draw(st.integers(0, K))] = 0
        w[draw(st.integers(0, N - 1))] = 0
        return w
    pool = torch.tensor([F32_MAX, -F32_MAX, TINY, -TINY, 2.0**-126, 0.0, -0.0, 1.0, 3e38, 1e-40])
    w = pool[torch.randint(len(pool), (N, K), generator=g)]
    return w if kind == "extreme" else w * (torch.rand(N, K, generator=g) < 0.5) + torch.randn(N, K, generator=g) * 1e-3


def scale_per_element(fmt, p, N, K):
    """The quantization step (in float64) that applies to each element, for the int formats."""
    if isinstance(fmt, Int4BlockFormat):
        return p["scales"].double().repeat_interleave(fmt.block, -1)[:, :K]
    return p["scale"].double()[:, None].expand(N, K)


@pytest.mark.parametrize("name", list(FORMATS))
@HYP
@given(w=weights())
def test_roundtrip_properties(name, w):
    fmt = get_format(name)
    N, K = w.shape
    p = fmt.pack(w, name="t")
    d = fmt.dequantize(p)
    assert d.shape == (N, K) and d.dtype == torch.float32 and torch.isfinite(d).all()
    assert all(bits_equal(a, b) for a, b in zip(fmt.repack(fmt.unpack(p)).values(), p.values()))
    assert fmt.repack(fmt.unpack(p)).keys() == p.keys()
    err, w64, d64 = (d.double() - w.double()).abs(), w.double(), d.double()
    if isinstance(fmt, (Int4BlockFormat, Int8ChannelFormat)):
        s = scale_per_element(fmt, p, N, K)
        assert (err <= s / 2 * (1 + 1e-9) + d64.abs() * 2.0**-24 + TINY).all()
        assert (d[w == 0] == 0).all()
    elif name == "bf16":
        assert (err <= w64.abs() * 2.0**-8 + 2.0**-134).all()
    elif name.startswith("fp8"):
        s = R.e8m0_to_float(p["scale"]).double() if p["scale"].dtype == R.E8M0 else p["scale"].double()
        s = R._expand_blocks(s, w.shape, fmt.block) if s.dim() == 2 else s[:, None]
        assert (err <= w64.abs() / 16 + s * 2.0**-10 + d64.abs() * 2.0**-23 + TINY).all()
    else:  # mxfp4: within 2 scale steps (OCP rule may clip (6, 8)*scale to 6)
        s = R.e8m0_to_float(p["scale"]).double().repeat_interleave(32, -1)[:, :K]
        assert (err <= 2 * s).all()
    if name in ("mxfp4", "fp8-e4m3-block128-ue8m0"):  # exact formats: requantization is the identity
        assert all(bits_equal(a, b) for a, b in zip(fmt.pack(d).values(), p.values()))
        if name == "mxfp4" or (R.e8m0_to_float(p["scale"]) >= 2.0**-124).all():
            ok = d.abs() < F32_MAX  # values saturated at fp32 max (amax within 2**-8 of it) are not bf16 numbers
            assert torch.equal(d[ok].bfloat16().float(), d[ok])  # dequantized values are bf16 numbers


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_rejected(name, bad):
    w = torch.zeros(2, 40)
    w[1, 7] = bad
    with pytest.raises(ValueError, match=r"layers\.1\.ffn\.w2"):
        get_format(name).pack(w, name="layers.1.ffn.w2.weight")


@pytest.mark.parametrize("name", list(FORMATS))
def test_all_zero_weight(name):
    fmt = get_format(name)
    p = fmt.pack(torch.zeros(3, 70))
    d = fmt.dequantize(p)
    assert torch.equal(d, torch.zeros(3, 70))
    assert all(torch.isfinite(v.float()).all() for v in p.values() if v.is_floating_point())


# ---------------------------------------------------------------- one vocabulary: specs, bytes and dequantization agree
def _pack_any(name, w):
    return {"weight": w.float()} if name == "fp32" else get_format(name).pack(w)


@HYP
@given(name=st.sampled_from(F.WEIGHT_FORMATS), N=st.integers(1, 40), K=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_specs_bytes_and_dequantize_agree(name, N, K, seed):
    """For every weight format and shape: the packed tensors are exactly tensor_specs, tensor_nbytes is their bytes,
    and every dequantization path (the module function, the format, the contract's QuantWeight, the triton and
    C++ kernels' torch references) gives the same bits."""
    from flashport.backends import cpu_quant
    from flashport.backends.contract import QuantWeight
    from flashport.kernels import quant_gemm as qg

    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * 3
    p = _pack_any(name, w)
    specs = F.tensor_specs(name, (N, K))
    assert {k: (tuple(v.shape), v.dtype) for k, v in p.items()} == {k: (s.shape, s.dtype) for k, s in specs.items()}
    assert F.tensor_nbytes(name, (N, K)) == sum(v.numel() * v.element_size() for v in p.values())
    assert F.tensor_nbytes(name, [N, K]) == QuantWeight(name, (N, K), p).nbytes
    d = F.dequantize(name, p)
    assert d.shape == (N, K) and d.dtype == torch.float32
    assert bits_equal(QuantWeight(name, (N, K), p).dequantize(), d)
    if name == "fp32":
        assert torch.equal(d, w)
        return
    fmt = get_format(name)
    assert bits_equal(fmt.dequantize(p), d)
    meta = sum(specs[k].nbytes for k in fmt.meta_keys if k in specs)
    assert fmt.bits_per_weight(N, K) == 8 * (F.tensor_nbytes(name, (N, K)) - meta) / (N * K)
    # the attributes describe the layout
    if fmt.kind == "int4":
        nb = -(-K // fmt.group)
        assert p["B"].shape == (N, nb, fmt.group // 2) and p["scales"].shape == (N, nb)
        assert ("zero_points" in p) == (not fmt.symmetric) and name in F.INT4_FORMATS
        assert bits_equal(F.dequantize_int4(p["B"], p["scales"], p.get("zero_points"), K), d)
        assert bits_equal(qg.dequant_int4_ref(p["B"], p["scales"], p.get("zero_points"), fmt.group, K), d)
        stacked = F.dequantize_int4(p["B"][None].expand(2, -1, -1, -1), p["scales"][None].expand(2, -1, -1),
                                    None if fmt.symmetric else p["zero_points"][None].expand(2, -1, -1), K)
        assert bits_equal(stacked[1], d)  # leading (expert) dims
    elif fmt.kind == "mxfp4":
        assert p["scale"].shape == (N, -(-K // fmt.group)) and fmt.group == R.MXFP4_BLOCK
        assert bits_equal(qg.dequant_mxfp4_ref(p["weight"], p["scale"])[:, :K], d)
    elif fmt.group is None and fmt.kind != "bf16":  # one scale per output row
        assert name in F.CHANNEL_FORMATS and p["scale"].shape == (N,)
        assert bits_equal(F.dequantize_channel(p["weight"], p["scale"]), d)
        if fmt.kind == "int8":
            assert bits_equal(qg.dequant_int8_ref(p["weight"], p["scale"]), d)
    elif fmt.kind == "fp8":
        assert p["scale"].shape == (-(-N // fmt.group), -(-K // fmt.group))
    assert fmt.symmetric == (not name.endswith("-asym"))
    if fmt.kind in ("int4", "int8") or fmt.group == R.FP8_BLOCK:  # the CPU kernels' own layouts, torch path
        cw = cpu_quant.CpuWeight.from_quant(QuantWeight(name, (N, K), p))
        cw.native = None
        assert bits_equal(cw.dequantize(), d)


def test_vocabulary_is_the_contracts():
    from flashport.backends import contract
    from flashport.kernels.backend import KERNEL_FORMATS

    assert contract.WEIGHT_FORMATS is F.WEIGHT_FORMATS  # plugin authors' name for it, the same object
    assert F.WEIGHT_FORMATS == ("fp32", "bf16", "fp8-e4m3-block128", "fp8-e4m3-block128-ue8m0", "fp8-e4m3-channel",
                                "mxfp4", "int8", "w8a8", "int4-g32", "int4-g64", "int4-g128", "int4-g32-asym",
                                "int4-g64-asym", "int4-g128-asym")
    assert F.CHANNEL_FORMATS == ("fp8-e4m3-channel", "int8", "w8a8")
    assert {(get_format(n).group, get_format(n).symmetric) for n in F.INT4_FORMATS} == {
        (g, s) for g in (32, 64, 128) for s in (True, False)}
    assert KERNEL_FORMATS <= set(F.WEIGHT_FORMATS)
    assert F.tensor_specs("int64", (3, 4, 5)) == {"weight": F.TensorSpec((3, 4, 5), torch.int64)}
    assert F.tensor_nbytes("fp32", (7,)) == 28
    with pytest.raises(ValueError, match="needs a 2-D"):
        F.tensor_specs("int8", (2, 3, 4))
    with pytest.raises(ValueError, match="unknown weight format"):
        F.tensor_nbytes("q4_k", (2, 3))


def test_format_names_are_parsed_only_in_quant():
    """No module outside flashport.quant derives a group size or a family from a format's name: it asks quant."""
    import re
    from pathlib import Path

    import flashport

    root = Path(flashport.__file__).resolve().parents[1]
    bad = re.compile(r"""split\(\s*["']-g|\.startswith\(\s*["'](int4|int8|fp8|mxfp4)|f["']int4-g\{|["']-asym["']""")
    offenders = []
    for d in ("sdk", "backends", "kernels", "export", "bench"):
        for f in (root / d).rglob("*.py"):
            offenders += [f"{f.relative_to(root)}:{i}" for i, line in enumerate(f.read_text().splitlines(), 1)
                          if bad.search(line)]
    assert not offenders, offenders
