"""Per-op decode throughput against the machine's memory bandwidth, measured side by side in one run.

    flashport bench ops [--backend torch] [--shapes 4096x2048,2048x4096,8192x16384] [--fmt int4-g32] [--threads 0]
                        [--moe 4096x2048x6] [--prefill 512x4096x2048] [--ort/--noort] [--report FILE.json]

Decode is memory-bound: a one-token GEMV reads every weight byte once and does 2 flops per weight. So each row
reports the time, the bytes the op must read (packed weights plus scales for quantized formats, fp32 for the
dense matmul, the keys for attention), that divided by the time (GB/s), and the fraction of the read bandwidth
measured in the same run (a large torch sum). Weights are read cold, as in a decode step (every layer's weights
are different): a shape smaller than COLD_BYTES is timed over enough copies of its weights, one per call in turn,
to pass COLD_BYTES (a single copy would sit in the caches and post more than 100%). For the linear shapes (N x K weights) it compares, on the same
weights: the backend's quantized linear (through the contract: upload once, then `linear`; the fast CPU path
of the torch backend is picked up automatically), a plain fp32 matmul (`x @ W.T`), and ONNX Runtime's
MatMulNBits (int4 formats, accuracy_level=4) as the reference point for a well-optimised int4 GEMV. A backend with a
`decode_activations` option (the torch backend) gets a second row for the linears and the MoE with
decode_activations=int8 (its opt-in int8-activation GEMV: tolerance-bound, see backends/cpu_quant.py). The MoE row
is one decode token through k routed experts (hidden x width x k: V4-Flash's 4096x2048x6 reads [2048, 4096] w1 / w3
and [4096, 2048] w2 per expert). The prefill rows time one T x K @ K x N linear (rows x in x out) above the GEMV row
limit: the backend's default path, its opt-in bf16 GEMM when it has one (the torch backend's prefill_matmul), and
torch's fp32 matmul, in GFLOP/s. Outputs are checked against the reference (max relative error printed) so a fast
wrong kernel cannot post a good figure.

--backend takes a registered name or module:factory (e.g. flashport.backends.torch_fast:FastTorchBackend).
"""

from __future__ import annotations

import inspect
import itertools
import json
import statistics
import time

import torch

from ..backends import reference
from ..backends.contract import QuantWeight
from ..quant.formats import INT4_FORMATS, get_format, to_matmulnbits

ROW_CHUNK = 1024  # pack big weights in row chunks: the packers work in float64
COLD_BYTES = 96 << 20  # weights read per timed sequence: over the caches (the project machines: 32 MB of L3)
MAX_COPIES = 64  # copies of one weight at most (a tiny weight stays cache-resident)


def _timeit(fn, repeat: int, min_seconds: float = 0.2) -> float:
    """Median seconds of one call (after a warm-up), at least `repeat` calls and `min_seconds` of calls."""
    fn()
    times, t_end = [], time.perf_counter() + min_seconds
    while len(times) < repeat or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rotate(fn, items: list):
    """A call of fn on the next of items in turn (cold weights: each call reads a copy the last calls did not)."""
    it = itertools.cycle(items)
    return lambda: fn(next(it))


def _copies(nbytes: int) -> int:
    """Copies of a weight to rotate over so that the timed calls read COLD_BYTES (1 for big weights)."""
    return min(MAX_COPIES, max(1, -(-COLD_BYTES // max(nbytes, 1))))


def _clone(qw: QuantWeight) -> QuantWeight:
    return QuantWeight(qw.fmt, qw.shape, {k: v.clone() for k, v in qw.tensors.items()})


def read_bandwidth(nbytes: int = 512 << 20, repeat: int = 5) -> float:
    """Bytes/s of a torch sum over a tensor far larger than the caches (best of `repeat`)."""
    t = torch.ones(nbytes // 4)
    best = min(_timeit(lambda: t.sum(), 1, 0) for _ in range(repeat))
    return nbytes / best


def pack_rows(fmt: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """get_format(fmt).pack in row chunks (every format is row-wise), so a 8192x16384 weight fits in memory."""
    f = get_format(fmt)
    parts = [f.pack(w[i:i + ROW_CHUNK]) for i in range(0, w.shape[0], ROW_CHUNK)]
    out = {k: torch.cat([p[k] for p in parts]) for k in parts[0] if k != "shape"}
    if "shape" in parts[0]:
        out["shape"] = torch.tensor(list(w.shape), dtype=torch.int64)
    return out


def _ort_matmulnbits(packed: dict, fmt: str, n: int, k: int, threads: int):
    """A one-node ONNX graph: MatMulNBits over the packed int4 weight (accuracy_level=4: int8 activations)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    block = get_format(fmt).group
    inputs, attrs = to_matmulnbits(packed, block)
    inits = [numpy_helper.from_array(v.numpy(), name) for name, v in inputs.items()]
    node = helper.make_node("MatMulNBits", ["A", *inputs], ["Y"], domain="com.microsoft", accuracy_level=4, **attrs)
    graph = helper.make_graph([node], "gemv", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(sess.run(None, {"A": np.ascontiguousarray(x.numpy())})[0])


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def _make_backend(name: str, options: dict | None = None):
    from ..backends.registry import create, load_factory

    return load_factory(name)(**(options or {})) if ":" in name else create(name, **(options or {}))


def _shape(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.lower().split("x"))


def run(backend: str = "torch", shapes: str = "4096x2048,2048x4096,8192x16384", fmt: str = "int4-g32",
        threads: int = 0, moe: str = "4096x2048x6", ort: bool = True, repeat: int = 20, report: str = "",
        seed: int = 0, backend_options: dict | None = None, prefill: str = "512x4096x2048"):
    """Print one row per (op, shape, path): ms, GB/s of the bytes the op must read, % of measured bandwidth.
    backend_options: keyword arguments of the backend's factory (e.g. {"ep": "CPUExecutionProvider"})."""
    from tqdm import tqdm

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    b = _make_backend(backend, backend_options)
    bw = read_bandwidth()
    rows: list[dict] = []

    def add(op, shape, path, seconds, nbytes, err=None, vs=None, flops=None):
        rows.append({"op": op, "shape": shape, "path": path, "ms": seconds * 1e3, "bytes": nbytes,
                     "gb_s": nbytes / seconds / 1e9, "of_bandwidth": nbytes / seconds / bw, "rel_err": err,
                     "vs_fp32": vs, "gflop_s": flops / seconds / 1e9 if flops else None})

    decode_paths = [(b, f"{b.name} {fmt}")]  # the default decode GEMV, and the opt-in int8 activations
    if "decode_activations" in inspect.signature(type(b)).parameters:
        decode_paths.append((_make_backend(backend, {**(backend_options or {}), "decode_activations": "int8"}),
                             f"{b.name} {fmt} decode_activations=int8"))
    shape_list = [_shape(s) for s in str(shapes).split(",") if s]
    for n, k in tqdm(shape_list, desc="linear shapes", unit="shape"):
        w = torch.randn(n, k) * k ** -0.5  # [N, K]
        x = torch.randn(1, k)
        qw = QuantWeight(fmt, (n, k), pack_rows(fmt, w))
        del w
        w = qw.dequantize()  # the same weight values in fp32: every path computes the same product
        ref = reference.linear(x, w)
        ws = [w] + [w.clone() for _ in range(_copies(n * k * 4) - 1)]
        t_fp32 = _timeit(_rotate(lambda wi: x @ wi.T, ws), repeat)
        add("linear", f"{n}x{k}", "fp32 matmul", t_fp32, n * k * 4, _rel_err(x @ w.T, ref))
        del w, ws
        for bb, name in decode_paths:
            hs = [bb.upload(qw)] + [bb.upload(_clone(qw)) for _ in range(_copies(qw.nbytes) - 1)]
            t_b = _timeit(_rotate(lambda hi: bb.linear(x, hi), hs), repeat)
            add("linear", f"{n}x{k}", name, t_b, qw.nbytes, _rel_err(bb.linear(x, hs[0]), ref), t_fp32 / t_b)
            del hs
        if ort and fmt in INT4_FORMATS:
            try:
                f = _ort_matmulnbits(qw.tensors, fmt, n, k, threads)
            except ImportError:
                print("onnxruntime is not installed: no MatMulNBits reference point (pip install 'flashport[onnx]')")
            else:  # (one copy: ONNX Runtime prepacks its weight)
                t_o = _timeit(lambda: f(x), repeat)
                add("linear", f"{n}x{k}", f"onnxruntime MatMulNBits {fmt} acc4", t_o, qw.nbytes, _rel_err(f(x), ref),
                    t_fp32 / t_o)

    if moe:  # one decode token through k routed experts of hidden x width
        d, inter, k = _shape(moe)
        packs = [[QuantWeight(fmt, s, pack_rows(fmt, torch.randn(*s) * s[1] ** -0.5))
                  for s in ((inter, d), (inter, d), (d, inter))] for _ in range(k)]
        x, idx = torch.randn(1, d), torch.arange(k)[None]
        weights = torch.full((1, k), 1.5 / k)
        ref = reference.moe(x, weights, idx, [tuple(q.dequantize() for q in e) for e in packs], 10.0)
        nbytes = sum(q.nbytes for e in packs for q in e)
        moe_rows = []
        for bb, name in decode_paths:
            experts = [tuple(bb.upload(q) for q in e) for e in packs]
            t = _timeit(lambda: bb.moe(x, weights, idx, experts, 10.0), repeat)
            add("moe", f"{d}x{inter} k={k}", name, t, nbytes, _rel_err(bb.moe(x, weights, idx, experts, 10.0), ref))
            moe_rows.append(rows[-1])
            del experts
        dense = [tuple(q.dequantize() for q in e) for e in packs]
        t32 = _timeit(lambda: reference.moe(x, weights, idx, dense, 10.0), repeat)
        add("moe", f"{d}x{inter} k={k}", "fp32 reference", t32, sum(w.numel() * 4 for e in dense for w in e), 0.0)
        for r in moe_rows:
            r["vs_fp32"] = t32 / (r["ms"] / 1e3)

    if prefill:  # one prefill linear: T rows x K in x N out, above the GEMV row limit
        t_rows, k, n = _shape(prefill)
        qw = QuantWeight(fmt, (n, k), pack_rows(fmt, torch.randn(n, k) * k ** -0.5))
        w, x = qw.dequantize(), torch.randn(t_rows, k)
        ref, flops, reps = reference.linear(x, w), 2 * t_rows * k * n, max(3, repeat // 4)
        t32 = _timeit(lambda: x @ w.T, reps)
        add("prefill", f"{t_rows}x{k}->{n}", "fp32 matmul", t32, qw.nbytes, 0.0, flops=flops)
        paths = [(b, f"{b.name} {fmt}")]
        if "prefill_matmul" in inspect.signature(type(b)).parameters:
            paths.append((_make_backend(backend, {**(backend_options or {}), "prefill_matmul": "bf16"}),
                          f"{b.name} {fmt} prefill_matmul=bf16"))
        for bb, name in paths:
            h = bb.upload(qw)
            t = _timeit(lambda: bb.linear(x, h), reps)
            add("prefill", f"{t_rows}x{k}->{n}", name, t, qw.nbytes, _rel_err(bb.linear(x, h), ref), t32 / t, flops)
        del w, h

    # weightless decode ops at V4-Flash shapes (64 heads of 512, window 128 + top-512 compressed entries)
    q, keys = torch.randn(1, 64, 512), torch.randn(128 + 512, 512)
    bias, sink = torch.zeros(1, 640), torch.zeros(64)
    t = _timeit(lambda: b.attention(q, keys, bias, sink, 512 ** -0.5), repeat)
    add("attention", "decode H=64 Dh=512 S=640", b.name, t, keys.numel() * 4 + q.numel() * 8,
        _rel_err(b.attention(q, keys, bias, sink, 512 ** -0.5), reference.attention(q, keys, bias, sink, 512 ** -0.5)))
    xn, wn = torch.randn(1, 4096), torch.randn(4096)
    t = _timeit(lambda: b.rms_norm(xn, wn, 1e-6), repeat)
    add("rms_norm", "1x4096", b.name, t, xn.numel() * 12, _rel_err(b.rms_norm(xn, wn, 1e-6), reference.rms_norm(xn, wn, 1e-6)))

    print(f"backend {b.name!r}, weights {fmt}, torch threads {torch.get_num_threads()}; "
          f"measured read bandwidth {bw / 1e9:.1f} GB/s (torch sum over 512 MiB); weights read cold")
    print(f"{'op':<10} {'shape':<24} {'path':<38} {'ms':>9} {'GB/s':>7} {'of bw':>6} {'vs fp32':>8} {'rel err':>9}"
          f" {'GFLOP/s':>8}")
    for r in rows:
        vs = f"{r['vs_fp32']:.2f}x" if r["vs_fp32"] else ""
        err = f"{r['rel_err']:.1e}" if r["rel_err"] is not None else ""
        gf = f"{r['gflop_s']:.0f}" if r["gflop_s"] else ""
        gb, of = (f"{r['gb_s']:>7.1f}", f"{r['of_bandwidth']:>6.0%}") if r["op"] != "prefill" else (f"{'':>7}", f"{'':>6}")
        print(f"{r['op']:<10} {r['shape']:<24} {r['path']:<38} {r['ms']:>9.3f} {gb} {of} {vs:>8} {err:>9} {gf:>8}")
    if report:
        with open(report, "w") as f:
            json.dump({"backend": b.name, "fmt": fmt, "bandwidth_gb_s": bw / 1e9, "threads": torch.get_num_threads(),
                       "rows": rows}, f, indent=2)
        print(f"report written to {report}")
