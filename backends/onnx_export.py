"""Export a flashport model (bundle or checkpoint) to one ONNX graph of a whole decoder step.

    flashport export-onnx BUNDLE OUT [--opset 21] [--accuracy-level 0] [--dequantize-unsupported]

What the graph computes: one chunk of T tokens of ONE sequence, every layer, from token ids to logits, exactly the
math of `flashport.model` (same op order where it matters). The per-sequence state is explicit:

    inputs   ids [T] int64, start [] int64 (= state.n_tokens), logit_rows [R] int64 (rows whose logits to return)
             l{i}.window [w, Dh] and, for compressed layers, l{i}.comp.* / l{i}.index.* (PoolState fields)
    outputs  logits [R, V]; the fixed-size parts in full (window, tails, overlap: `NAME.out`), and only the NEW
             compressed entries of this chunk (`l{i}.comp.entries_new`): the runtime appends them, so the
             append-only cache (disk tier, prefix reuse) stays flashport's and no step copies it back.

CSA's overlap state is None before the first full window; the graph always takes it, fed as zeros (kv) and -inf
(gate), which is what `Compressor` substitutes for None. The runtime maps it back (None while no entry exists).

Weights: int4 (`int4-g32/64/128[-asym]`) linears run as com.microsoft MatMulNBits on the bundle's packed bytes;
int4 routed experts run as one com.microsoft QMoE per layer (interleaved SwiGLU with activation_alpha=1,
activation_beta=0, swiglu_limit=L is exactly V4's silu(min(gate, L)) * clamp(up, -L, L); routing computed in the
graph like the reference and passed as a one-hot selection plus `router_weights`). The gate/up rows are
interleaved (a byte re-layout, no requantization). fp32 weights are MatMul initializers; bf16 weights are bf16
initializers cast once (exact); per-channel fp8-e4m3-channel / int8 / w8a8 linears keep their codes and run as
standard Cast * scale + MatMul (exact dequantization, fp32 activations; the grouped `wo_a` in these
formats is stored dequantized, exactly). Formats with no such form (fp8 128x128 blocks, mxfp4) raise
`UnsupportedWeightFormat` unless `dequantize_unsupported=True`, which stores them dequantized as fp32.
fp32/bf16 routed experts run densely over all experts with standard ops (fine for checkpoints of small models).
Every other op is a standard opset-21 op. Weights go to one external data file `model.onnx.data`.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from tqdm import tqdm

from ..config import ModelConfig
from ..model import Attention, Compressor, Linear, MoE, Transformer
from ..quant.formats import CHANNEL_FORMATS, INT4_FORMATS, get_format, to_matmulnbits

MANIFEST = "onnx_manifest.json"
GRAPH = "model.onnx"
DATA = "model.onnx.data"
EXPORT_VERSION = 2  # 2: the `selection_ties` output (see StepExporter.tie_flag)
# per-output-channel formats: the stored codes, Cast and scaled per row in the graph: exact (folded once)
DQ_FORMATS = CHANNEL_FORMATS
NATIVE_FORMATS = ("fp32", "bf16") + INT4_FORMATS + DQ_FORMATS  # what the graph runs on the stored weights
INT64_MAX = np.iinfo(np.int64).max
INLINE_BYTES = 1024   # smaller initializers stay inside model.onnx
ALIGN = 4096          # large initializers start on a page, so ORT can map them instead of copying


class UnsupportedWeightFormat(ValueError):
    """A weight format MatMulNBits/QMoE cannot express (the message names the weight and the way out)."""


def state_names(cfg: ModelConfig, i: int) -> dict[str, list[str]]:
    """Layer i's state fields as graph inputs: {"window": [...], "comp": [...], "index": [...]} (field names)."""
    kind = cfg.layer_kind(i)
    pool = ["kv", "gate", "entries"] + (["overlap_kv", "overlap_gate"] if kind == "csa" else [])
    return {"window": [""], **({"comp": pool} if kind != "swa" else {}), **({"index": pool} if kind == "csa" else {})}


# ---------------------------------------------------------------------------------------------------------------
# Graph builder: nodes + initializers streamed to the external data file
# ---------------------------------------------------------------------------------------------------------------
class Graph:
    def __init__(self, data_path: Path):
        self.nodes: list = []
        self.inits: list = []
        self.inputs: list = []
        self.outputs: list = []
        self._n = 0
        self._consts: dict = {}
        self._data, self._loc, self._off = open(data_path, "wb"), data_path.name, 0
        self.data_bytes = 0

    def close(self):
        self._data.close()

    def fresh(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def op(self, op_type: str, *inputs: str, n_out: int = 1, out: str | None = None, domain: str = "", **attrs):
        outs = [out] if out else [self.fresh(op_type) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, domain=domain or None, **attrs))
        return outs[0] if n_out == 1 else outs

    def weight(self, name: str, t: torch.Tensor | np.ndarray) -> str:
        """An initializer: inline when small, else appended to the external data file."""
        if isinstance(t, torch.Tensor):
            t = t.detach().contiguous().cpu()
            if t.dtype == torch.bfloat16:
                arr, dtype = t.view(torch.int16).numpy(), TensorProto.BFLOAT16
            elif t.dtype == torch.float8_e4m3fn:
                arr, dtype = t.view(torch.uint8).numpy(), TensorProto.FLOAT8E4M3FN
            else:
                arr = t.numpy()
                dtype = helper.np_dtype_to_tensor_dtype(arr.dtype)
        else:
            # np.asarray keeps a 0-d scalar 0-d (np.ascontiguousarray would make it [1] and break declared shapes)
            arr, dtype = np.asarray(t, order="C"), helper.np_dtype_to_tensor_dtype(t.dtype)
        raw = arr.tobytes()
        tp = TensorProto(name=name, data_type=dtype, dims=list(arr.shape))
        if len(raw) < INLINE_BYTES:
            tp.raw_data = raw
        else:
            pad = -self._off % ALIGN
            self._data.write(b"\0" * pad)
            self._off += pad
            self._data.write(raw)
            tp.data_location = TensorProto.EXTERNAL
            for k, v in (("location", self._loc), ("offset", str(self._off)), ("length", str(len(raw)))):
                tp.external_data.add(key=k, value=v)
            self._off += len(raw)
            self.data_bytes += len(raw)
        self.inits.append(tp)
        return name

    def const(self, value, dtype=np.int64) -> str:
        """A small constant (deduplicated): ints default to int64 1-D, floats to float32."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.weight(self.fresh("c"), arr)
        return self._consts[key]

    def f(self, value) -> str:
        return self.const(value, np.float32)

    def dim(self, x: str, axis: int) -> str:
        """x.shape[axis] as an int64 [1] tensor."""
        return self.op("Shape", x, start=axis, end=axis + 1)

    def scalar(self, x1: str) -> str:
        return self.op("Squeeze", x1, self.const([0]))

    def slice(self, x: str, start, end, axis: int) -> str:
        s = start if isinstance(start, str) else self.const([start])
        e = end if isinstance(end, str) else self.const([end])
        return self.op("Slice", x, s, e, self.const([axis]))

    def io(self, name: str, elem, shape, is_input: bool):
        (self.inputs if is_input else self.outputs).append(helper.make_tensor_value_info(name, elem, shape))


# ---------------------------------------------------------------------------------------------------------------
# The step exporter: mirrors flashport.model module by module
# ---------------------------------------------------------------------------------------------------------------
class StepExporter:
    def __init__(self, model: Transformer, g: Graph, accuracy_level: int = 0, dequantize_unsupported: bool = False):
        self.model, self.cfg, self.g = model, model.cfg, g
        self.ties: list[str] = []  # per selection: 1.0 when some row had a tie at its top-k boundary
        self.accuracy_level, self.dequantize_unsupported = accuracy_level, dequantize_unsupported
        self.formats: Counter = Counter()
        self._rope_cache: dict = {}

    # -- weights -------------------------------------------------------------------------------------------------
    def _qweight(self, lin: Linear, name: str):
        qw = lin.qweight
        if qw.fmt in NATIVE_FORMATS:
            return qw
        if not self.dequantize_unsupported:
            raise UnsupportedWeightFormat(
                f"{name}: weight format {qw.fmt!r} has no MatMulNBits/QMoE form (supported: "
                f"{', '.join(NATIVE_FORMATS)}); re-export the bundle with int4 weights or pass "
                f"--dequantize-unsupported to store it as fp32")
        return self._qweight_fp32(qw)

    @staticmethod
    def _qweight_fp32(qw):
        from .contract import QuantWeight

        return QuantWeight("fp32", qw.shape, {"weight": qw.dequantize()})

    def _dense(self, qw, name: str) -> torch.Tensor:
        return qw.tensors["weight"] if qw.fmt in ("fp32", "bf16") else qw.dequantize()

    def _fp32_init(self, name: str, w: torch.Tensor) -> str:
        """A dense weight initializer as fp32 (bf16 stays bf16 on disk and is cast once: exact)."""
        if w.dtype == torch.bfloat16:
            return self.g.op("Cast", self.g.weight(name, w), to=TensorProto.FLOAT)
        return self.g.weight(name, w.float())

    def lin(self, x: str, lin: Linear, name: str) -> str:
        """x [.., K] -> [.., N]: MatMulNBits for int4, MatMul otherwise."""
        g, qw = self.g, self._qweight(lin, name)
        self.formats[qw.fmt] += 1
        if qw.fmt in INT4_FORMATS:
            fmt = get_format(qw.fmt)
            ins, attrs = to_matmulnbits(qw.tensors, fmt.block)
            names = [g.weight(f"{name}.{k}", ins[k].contiguous()) for k in ("B", "scales")]
            if "zero_points" in ins:
                names.append(g.weight(f"{name}.zero_points", ins["zero_points"].contiguous()))
            return g.op("MatMulNBits", x, *names, domain="com.microsoft", accuracy_level=self.accuracy_level,
                        **attrs)
        if qw.fmt in DQ_FORMATS:  # W8A16: codes [N, K] times one scale per output channel, as the reference does
            # Cast + Mul rather than DequantizeLinear: ORT fuses DequantizeLinear(int8) + MatMul into a matmul with
            # int8 activations (measured: 4e-2 off on the logits); Cast + Mul folds to an fp32 weight once
            w = g.op("Mul", g.op("Cast", g.weight(name, qw.tensors["weight"]), to=TensorProto.FLOAT),
                     g.weight(name + ".scale", qw.tensors["scale"].float().reshape(-1, 1)))  # [N, K]
            return g.op("MatMul", x, g.op("Transpose", w, perm=[1, 0]))
        return g.op("MatMul", x, self._fp32_init(name + ".T", self._dense(qw, name).T.contiguous()))

    def grouped_lin(self, x: str, lin: Linear, name: str) -> str:
        """x [T, G, I] -> [T, G, R]: group g meets rows g*R.. of the weight (block-diagonal)."""
        g, qw, G = self.g, self._qweight(lin, name), self.cfg.o_groups
        self.formats[qw.fmt] += 1
        N, K = qw.shape
        R = N // G
        if qw.fmt in INT4_FORMATS:  # one MatMulNBits per group on its rows of the packed weight (exact slices)
            fmt = get_format(qw.fmt)
            outs = []
            for gi in range(G):
                part = {k: v[gi * R:(gi + 1) * R] for k, v in qw.tensors.items() if k != "shape"}
                part["shape"] = torch.tensor([R, K])
                ins, attrs = to_matmulnbits(part, fmt.block)
                names = [g.weight(f"{name}.g{gi}.{k}", ins[k].contiguous()) for k in ("B", "scales")]
                if "zero_points" in ins:
                    names.append(g.weight(f"{name}.g{gi}.zero_points", ins["zero_points"].contiguous()))
                xg = g.op("Gather", x, g.const(gi), axis=1)  # [T, I]
                y = g.op("MatMulNBits", xg, *names, domain="com.microsoft", accuracy_level=self.accuracy_level,
                         **attrs)
                outs.append(g.op("Unsqueeze", y, g.const([1])))
            return g.op("Concat", *outs, axis=1)
        w = self._dense(qw, name)
        w = w.reshape(G, R, K).transpose(1, 2).contiguous()  # [G, I, R]
        y = g.op("MatMul", g.op("Transpose", x, perm=[1, 0, 2]), self._fp32_init(name + ".T", w))  # [G, T, R]
        return g.op("Transpose", y, perm=[1, 0, 2])

    # -- small math ------------------------------------------------------------------------------------------------
    def rms(self, x: str, weight: torch.Tensor | None, eps: float, name: str = "") -> str:
        g = self.g
        ms = g.op("ReduceMean", g.op("Mul", x, x), g.const([-1]), keepdims=1)
        y = g.op("Mul", x, g.op("Reciprocal", g.op("Sqrt", g.op("Add", ms, g.f(eps)))))
        return y if weight is None else g.op("Mul", g.weight(name, weight.float()), y)

    def cos_sin(self, pos: str, inv_freq: torch.Tensor, key) -> tuple[str, str]:
        """pos int64 [T] -> cos, sin [T, r/2] (cached per (positions, frequency table))."""
        k = (pos, key)
        if k not in self._rope_cache:
            g = self.g
            inv = g.weight(g.fresh("inv_freq"), inv_freq.float().reshape(1, -1))
            fr = g.op("Mul", g.op("Unsqueeze", g.op("Cast", pos, to=TensorProto.FLOAT), g.const([1])), inv)
            self._rope_cache[k] = (g.op("Cos", fr), g.op("Sin", fr))
        return self._rope_cache[k]

    def rope(self, x: str, cos: str, sin: str, dim: int, rank: int, inverse: bool = False) -> str:
        """Interleaved RoPE on the last r channels of x [T, Dh] (rank 2) or [T, H, Dh] (rank 3). Static sizes in
        the reshapes (no -1): T may be 0 (a chunk that completes no compressor window)."""
        g, r = self.g, self.cfg.qk_rope_head_dim  # rotated channels (cos/sin hold r/2 frequencies)
        nope, rot = g.slice(x, 0, dim - r, -1), g.slice(x, dim - r, dim, -1)
        rot = g.op("Reshape", rot, g.const([0, r // 2, 2] if rank == 2 else [0, 0, r // 2, 2]))
        x1, x2 = g.op("Split", rot, axis=-1, num_outputs=2, n_out=2)  # [.., r/2, 1]
        axes = g.const([-1] if rank == 2 else [1, 3])
        c, s = g.op("Unsqueeze", cos, axes), g.op("Unsqueeze", sin, axes)
        if inverse:
            s = g.op("Neg", s)
        y1 = g.op("Sub", g.op("Mul", x1, c), g.op("Mul", x2, s))
        y2 = g.op("Add", g.op("Mul", x2, c), g.op("Mul", x1, s))
        y = g.op("Reshape", g.op("Concat", y1, y2, axis=-1), g.const([0, r] if rank == 2 else [0, 0, r]))
        return g.op("Concat", nope, y, axis=-1)

    def neg_inf_where(self, keep: str) -> str:
        """bool mask -> 0 where kept, -inf elsewhere."""
        return self.g.op("Where", keep, self.g.f(0.0), self.g.f(-math.inf))

    def visible(self, n_rows: str, pos: str, rate: int) -> str:
        """[T, n] bool: entry j is complete at the query at pos, j < (pos + 1) // rate."""
        g = self.g
        j = g.op("Range", g.const(0), g.scalar(n_rows), g.const(1))
        lim = g.op("Div", g.op("Add", pos, g.const(1)), g.const(rate))
        return g.op("Less", g.op("Unsqueeze", j, g.const([0])), g.op("Unsqueeze", lim, g.const([1])))

    # -- mHC ------------------------------------------------------------------------------------------------------
    def hc_pre(self, streams: str, fn, base, scale, name: str) -> tuple[str, str, str]:
        g, cfg, n = self.g, self.cfg, self.cfg.hc_mult
        eps = cfg.hc_eps
        flat = g.op("Reshape", streams, g.const([0, -1]))
        mix = g.op("MatMul", self.rms(flat, None, cfg.rms_norm_eps), g.weight(name + "_fn.T", fn.T.contiguous()))
        m_pre, m_post, m_comb = g.op("Split", mix, g.const([n, n, n * n]), axis=1, n_out=3)
        sc = [g.f(float(scale[i])) for i in range(3)]
        pre = g.op("Add", g.op("Sigmoid", g.op("Add", g.op("Mul", m_pre, sc[0]), g.weight(name + "_base.pre", base[:n]))),
                   g.f(eps))
        post = g.op("Mul", g.f(2.0), g.op("Sigmoid", g.op("Add", g.op("Mul", m_post, sc[1]),
                                                          g.weight(name + "_base.post", base[n:2 * n]))))
        comb = g.op("Add", g.op("Mul", g.op("Reshape", m_comb, g.const([-1, n, n])), sc[2]),
                    g.weight(name + "_base.comb", base[2 * n:].reshape(n, n).contiguous()))
        comb = g.op("Add", g.op("Softmax", comb, axis=-1), g.f(eps))
        # Sinkhorn: columns first, then alternate rows / columns
        comb = g.op("Div", comb, g.op("Add", g.op("ReduceSum", comb, g.const([-2]), keepdims=1), g.f(eps)))
        for _ in range(cfg.hc_sinkhorn_iters - 1):
            comb = g.op("Div", comb, g.op("Add", g.op("ReduceSum", comb, g.const([-1]), keepdims=1), g.f(eps)))
            comb = g.op("Div", comb, g.op("Add", g.op("ReduceSum", comb, g.const([-2]), keepdims=1), g.f(eps)))
        x = g.op("ReduceSum", g.op("Mul", g.op("Unsqueeze", pre, g.const([-1])), streams), g.const([1]), keepdims=0)
        return x, post, comb

    def hc_post(self, out: str, streams: str, post: str, comb: str) -> str:
        g = self.g
        spread = g.op("Mul", g.op("Unsqueeze", post, g.const([-1])), g.op("Unsqueeze", out, g.const([1])))
        mixed = g.op("MatMul", g.op("Transpose", comb, perm=[0, 2, 1]), streams)  # sum over comb's first index
        return g.op("Add", spread, mixed)

    # -- attention ------------------------------------------------------------------------------------------------
    def compressor(self, comp: Compressor, x: str, prefix: str, name: str, ins: dict, outs: dict) -> str:
        """Appends this chunk's full windows; returns all entries [n, d]. Mirrors model.Compressor.forward."""
        g, m, d = self.g, comp.rate, comp.dim
        c = 2 * d if comp.overlap else d
        kv = g.op("Concat", ins[prefix + ".kv"], self.lin(x, comp.wkv, name + ".wkv.weight"), axis=0)  # [B, C]
        gate = g.op("Concat", ins[prefix + ".gate"], self.lin(x, comp.wgate, name + ".wgate.weight"), axis=0)
        w = g.op("Div", g.dim(kv, 0), g.const([m]))  # full windows, [1]
        wm = g.op("Mul", w, g.const([m]))
        g.op("Identity", g.slice(kv, wm, INT64_MAX, 0), out=outs[prefix + ".kv"])
        g.op("Identity", g.slice(gate, wm, INT64_MAX, 0), out=outs[prefix + ".gate"])
        shape = g.op("Concat", w, g.const([m, c]), axis=0)
        kvw = g.op("Reshape", g.slice(kv, 0, wm, 0), shape)  # [w, m, C]
        gw = g.op("Add", g.op("Reshape", g.slice(gate, 0, wm, 0), shape), g.weight(name + ".ape", comp.ape.float()))
        if comp.overlap:  # Ca of window j-1 (or the stored overlap) joins Cb of window j
            def series(t, prev, out_name):
                ca = g.op("Concat", g.op("Unsqueeze", ins[prev], g.const([0])), g.slice(t, 0, d, 2), axis=0)
                g.op("Squeeze", g.slice(ca, -1, INT64_MAX, 0), g.const([0]), out=outs[out_name])
                return g.op("Concat", g.slice(ca, 0, -1, 0), g.slice(t, d, 2 * d, 2), axis=1)  # [w, 2m, d]

            kvw = series(kvw, prefix + ".overlap_kv", prefix + ".overlap_kv")
            gw = series(gw, prefix + ".overlap_gate", prefix + ".overlap_gate")
        pooled = g.op("ReduceSum", g.op("Mul", kvw, g.op("Softmax", gw, axis=1)), g.const([1]), keepdims=0)  # [w, d]
        new = self.rms(pooled, comp.norm.weight, comp.norm.eps, name + ".norm.weight")
        n0 = g.scalar(g.dim(ins[prefix + ".entries"], 0))
        epos = g.op("Mul", g.op("Range", n0, g.op("Add", n0, g.scalar(w)), g.const(1)), g.const(m))
        inv = self.model_inv_freq[id(comp)]
        cos, sin = self.cos_sin(epos, inv, ("c", id(inv)))
        g.op("Identity", self.rope(new, cos, sin, d, rank=2), out=outs[prefix + ".entries_new"])
        return g.op("Concat", ins[prefix + ".entries"], outs[prefix + ".entries_new"], axis=0)

    def tie_flag(self, scores: str, top_values: str, k: str) -> None:
        """Record whether any row of scores [T, n] has a finite tie at the k-th place (top_values: TopK's sorted
        values [T, k]): more than k entries score at least the k-th value. Such a selection may differ from the
        reference's; the graph's `selection_ties` output makes the runtime redo the step with the reference."""
        g = self.g
        kth = g.op("ReduceMin", top_values, g.const([1]), keepdims=1)  # [T, 1]
        count = g.op("ReduceSum", g.op("Cast", g.op("GreaterOrEqual", scores, kth), to=TensorProto.INT64),
                     g.const([1]), keepdims=1)  # [T, 1]
        finite = g.op("Not", g.op("IsInf", kth))
        tied = g.op("And", g.op("Greater", count, k), finite)
        self.ties.append(g.op("ReduceMax", g.op("Cast", tied, to=TensorProto.FLOAT), keepdims=0))

    def indexer(self, idx, x, qr, pos, cos, sin, name, ins, outs) -> str:
        """-> [T, n] bias: 0 for the top-k visible compressed entries, -inf elsewhere."""
        g = self.g
        keys = self.compressor(idx.compressor, x, "index", name + ".compressor", ins, outs)  # [n, Di]
        n = g.dim(keys, 0)
        vis = self.visible(n, pos, idx.rate)
        q = g.op("Reshape", self.lin(qr, idx.wq_b, name + ".wq_b.weight"), g.const([0, idx.n_heads, idx.dim]))
        q = self.rope(q, cos, sin, idx.dim, rank=3)  # [T, Hi, Di]
        wts = g.op("Mul", self.lin(x, idx.weights_proj, name + ".weights_proj.weight"), g.f(idx.n_heads ** -0.5))
        sc = g.op("Mul", g.op("Relu", g.op("MatMul", q, g.op("Transpose", keys, perm=[1, 0]))), g.f(idx.dim ** -0.5))
        sc = g.op("ReduceSum", g.op("Mul", sc, g.op("Unsqueeze", wts, g.const([2]))), g.const([1]), keepdims=0)
        sc = g.op("Where", vis, sc, g.f(-math.inf))  # [T, n]
        # one extra never-visible column keeps TopK's k >= 1 when there is no entry yet. ONNX TopK breaks ties
        # towards the lower index, not as the reference (torch.topk on the CPU, reference.topk_indices): a tie at
        # the k-th place is flagged and the runtime redoes that step with the reference (see tie_flag)
        T = g.dim(x, 0)
        pad = g.op("Concat", sc, g.op("Expand", g.f([[-math.inf]]), g.op("Concat", T, g.const([1]), axis=0)), axis=1)
        k = g.op("Min", g.const([idx.topk]), g.op("Add", n, g.const([1])))
        vals, top = g.op("TopK", pad, k, axis=-1, largest=1, sorted=1, n_out=2)
        self.tie_flag(sc, vals, k)
        hit = g.op("ScatterElements", g.op("ConstantOfShape", g.op("Shape", pad),
                                           value=helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0])),
                   top, g.op("ConstantOfShape", g.op("Shape", top),
                             value=helper.make_tensor("o", TensorProto.FLOAT, [1], [1.0])), axis=1)
        chosen = g.op("And", g.op("Greater", g.slice(hit, 0, n, 1), g.f(0.5)), vis)
        return self.neg_inf_where(chosen)

    def attention(self, att: Attention, x: str, pos: str, start: str, name: str, ins: dict, outs: dict) -> str:
        g, cfg = self.g, self.cfg
        H, Dh, W = cfg.num_attention_heads, cfg.head_dim, cfg.sliding_window
        cos, sin = self.cos_sin(pos, att.inv_freq, ("p", att.kind == "swa"))
        qr = self.rms(self.lin(x, att.wq_a, name + ".wq_a.weight"), att.q_norm.weight, att.q_norm.eps,
                      name + ".q_norm.weight")
        q = g.op("Reshape", self.lin(qr, att.wq_b, name + ".wq_b.weight"), g.const([0, H, Dh]))
        q = self.rope(self.rms(q, None, cfg.rms_norm_eps), cos, sin, Dh, rank=3)  # [T, H, Dh]
        kv = self.rms(self.lin(x, att.wkv, name + ".wkv.weight"), att.kv_norm.weight, att.kv_norm.eps,
                      name + ".kv_norm.weight")
        kv = self.rope(kv, cos, sin, Dh, rank=2)  # [T, Dh]

        # sliding window: previous raw entries plus this chunk; query at p sees keys in (p - W, p]
        keys = g.op("Concat", ins["window"], kv, axis=0)  # [S, Dh]
        k0 = g.op("Sub", start, g.scalar(g.dim(ins["window"], 0)))
        key_pos = g.op("Range", k0, g.op("Add", k0, g.scalar(g.dim(keys, 0))), g.const(1))
        dist = g.op("Sub", g.op("Unsqueeze", pos, g.const([1])), g.op("Unsqueeze", key_pos, g.const([0])))
        hidden = g.op("Or", g.op("Less", dist, g.const(0)), g.op("GreaterOrEqual", dist, g.const(W)))
        bias = g.op("Where", hidden, g.f(-math.inf), g.f(0.0))  # [T, S]
        g.op("Identity", g.slice(keys, -W, INT64_MAX, 0), out=outs["window"])

        if att.kind != "swa":
            entries = self.compressor(att.compressor, x, "comp", name + ".compressor", ins, outs)  # [n, Dh]
            if att.kind == "csa":
                comp_bias = self.indexer(att.indexer, x, qr, pos, cos, sin, name + ".indexer", ins, outs)
            else:
                comp_bias = self.neg_inf_where(self.visible(g.dim(entries, 0), pos, cfg.hca_rate))
            keys = g.op("Concat", keys, entries, axis=0)
            bias = g.op("Concat", bias, comp_bias, axis=1)

        # shared-KV attention with one sink logit per head (joins the softmax denominator only)
        logits = g.op("Mul", g.op("MatMul", q, g.op("Transpose", keys, perm=[1, 0])), g.f(Dh ** -0.5))
        logits = g.op("Add", logits, g.op("Unsqueeze", bias, g.const([1])))  # [T, H, S]
        sink = g.op("Expand", g.weight(name + ".attn_sink", att.attn_sink.float().reshape(1, H, 1)),
                    g.op("Concat", g.dim(x, 0), g.const([H, 1]), axis=0))
        probs = g.op("Softmax", g.op("Concat", logits, sink, axis=-1), axis=-1)
        o = g.op("MatMul", g.slice(probs, 0, -1, -1), keys)  # [T, H, Dh]
        o = self.rope(o, cos, sin, Dh, rank=3, inverse=True)
        o = self.grouped_lin(g.op("Reshape", o, g.const([0, cfg.o_groups, -1])), att.wo_a, name + ".wo_a.weight")
        return self.lin(g.op("Reshape", o, g.const([0, -1])), att.wo_b, name + ".wo_b.weight")

    # -- MoE ------------------------------------------------------------------------------------------------------
    def swiglu(self, x: str, ex, name: str, limit: float) -> str:
        g = self.g
        gate = g.op("Min", self.lin(x, ex.w1, name + ".w1.weight"), g.f(limit))
        up = g.op("Clip", self.lin(x, ex.w3, name + ".w3.weight"), g.f(-limit), g.f(limit))
        return self.lin(g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up), ex.w2, name + ".w2.weight")

    def _qmoe_format(self, moe: MoE) -> str | None:
        """The experts' int4 format when QMoE can run them on their packed bytes, else None."""
        fmts = {getattr(e, w).qweight.fmt for e in moe.experts for w in ("w1", "w2", "w3")}
        if len(fmts) != 1 or (fmt := fmts.pop()) not in INT4_FORMATS:
            return None
        block = get_format(fmt).block
        if self.cfg.hidden_size % block or self.cfg.moe_intermediate_size % block:
            return None
        return fmt

    def moe(self, moe: MoE, x: str, ids: str, name: str) -> str:
        g, cfg = self.g, self.cfg
        E, k, L = cfg.n_routed_experts, cfg.num_experts_per_tok, moe.limit
        gate = moe.gate
        scores = g.op("Sqrt", g.op("Softplus", g.op("MatMul", x, g.weight(name + ".gate.weight.T",
                                                                          gate.weight.float().T.contiguous()))))
        if gate.hashed:
            tid = gate.tid2eid
            if (tid.sort(-1).values.diff(dim=-1) == 0).any():
                raise ValueError(f"{name}.gate.tid2eid: a token id routes to the same expert twice; QMoE needs "
                                 f"{k} distinct experts per token")
            idx = g.op("Gather", g.weight(name + ".gate.tid2eid", tid.long()), ids, axis=0)  # [T, k]
        else:
            biased = g.op("Add", scores, g.weight(name + ".gate.bias", gate.bias.float()))
            vals, idx = g.op("TopK", biased, g.const([k]), axis=-1, largest=1, sorted=1, n_out=2)
            self.tie_flag(biased, vals, g.const([k]))
        w = g.op("GatherElements", scores, idx, axis=1)
        w = g.op("Mul", g.op("Div", w, g.op("Add", g.op("ReduceSum", w, g.const([-1]), keepdims=1), g.f(1e-20))),
                 g.f(cfg.routed_scaling_factor))
        zeros = g.op("ConstantOfShape", g.op("Shape", scores), value=helper.make_tensor("z", TensorProto.FLOAT, [1], [0.0]))
        weights = g.op("ScatterElements", zeros, idx, w, axis=1)  # [T, E] mixing weights, 0 off the route
        fmt = self._qmoe_format(moe)
        if fmt is not None:
            routed = self._qmoe(moe, x, zeros, idx, weights, fmt, name)
        else:
            routed = self._dense_moe(moe, x, weights, name)
        return g.op("Add", routed, self.swiglu(x, moe.shared_experts, name + ".shared_experts", L))

    def _qmoe(self, moe, x, zeros, idx, weights, fmt, name) -> str:
        g, cfg = self.g, self.cfg
        block, E = get_format(fmt).block, cfg.n_routed_experts
        self.formats[fmt] += 3 * E

        def stack(w: str, key: str):
            return torch.stack([getattr(e, w).qweight.tensors[key].reshape(getattr(e, w).qweight.shape[0], -1)
                                for e in moe.experts])  # [E, N, bytes or blocks]

        def interleave(a, b):  # gate row j -> 2j, up row j -> 2j+1: QMoE's interleaved SwiGLU layout
            return torch.stack([a, b], 2).reshape(a.shape[0], 2 * a.shape[1], -1).contiguous()

        keys = ["B", "scales"] + (["zero_points"] if fmt.endswith("asym") else [])
        fc1 = {kk: interleave(stack("w1", kk), stack("w3", kk)) for kk in keys}
        fc2 = {kk: stack("w2", kk).contiguous() for kk in keys}
        ones = g.op("ConstantOfShape", g.op("Shape", idx), value=helper.make_tensor("o", TensorProto.FLOAT, [1], [1.0]))
        select = g.op("ScatterElements", zeros, idx, ones, axis=1)  # [T, E] one-hot: QMoE's top-k picks exactly idx
        ins = [x, select,
               g.weight(name + ".experts.fc1.B", fc1["B"]), g.weight(name + ".experts.fc1.scales", fc1["scales"]), "",
               g.weight(name + ".experts.fc2.B", fc2["B"]), g.weight(name + ".experts.fc2.scales", fc2["scales"]), "",
               "", "", ""]
        if "zero_points" in fc1:
            ins += [g.weight(name + ".experts.fc1.zero_points", fc1["zero_points"]),
                    g.weight(name + ".experts.fc2.zero_points", fc2["zero_points"]), ""]
        else:
            ins += ["", "", ""]
        ins.append(weights)
        return g.op("QMoE", *ins, domain="com.microsoft", k=cfg.num_experts_per_tok, activation_type="swiglu",
                    swiglu_fusion=1, swiglu_limit=float(moe.limit), activation_alpha=1.0, activation_beta=0.0,
                    expert_weight_bits=4, block_size=block, normalize_routing_weights=0,
                    accuracy_level=self.accuracy_level)

    def _dense_moe(self, moe, x, weights, name) -> str:
        """Every expert on every token (standard ops), combined by the [T, E] weights (0 off the route)."""
        g, L = self.g, moe.limit

        def stacked(w: str) -> str:
            mats = []
            for e, ex in enumerate(moe.experts):
                lin = getattr(ex, w)
                qw = self._qweight(lin, f"{name}.experts.{e}.{w}.weight")
                if qw.fmt not in ("fp32", "bf16") and not self.dequantize_unsupported:
                    raise UnsupportedWeightFormat(
                        f"{name}.experts.{e}.{w}.weight: {qw.fmt} experts run as QMoE only when every expert "
                        f"shares the format and hidden_size ({self.cfg.hidden_size}) and moe_intermediate_size "
                        f"({self.cfg.moe_intermediate_size}) are multiples of its block; pass "
                        f"--dequantize-unsupported to store them as fp32")
                if qw.fmt in INT4_FORMATS:
                    qw = self._qweight_fp32(qw)
                self.formats[qw.fmt] += 1
                mats.append(self._dense(qw, name).float().T)
            return g.weight(f"{name}.experts.{w}.T", torch.stack(mats).contiguous())  # [E, K, N]

        xe = g.op("Unsqueeze", x, g.const([0]))  # [1, T, D]
        gate = g.op("Min", g.op("MatMul", xe, stacked("w1")), g.f(L))
        up = g.op("Clip", g.op("MatMul", xe, stacked("w3")), g.f(-L), g.f(L))
        y = g.op("MatMul", g.op("Mul", g.op("Mul", gate, g.op("Sigmoid", gate)), up), stacked("w2"))  # [E, T, D]
        wt = g.op("Unsqueeze", g.op("Transpose", weights, perm=[1, 0]), g.const([2]))  # [E, T, 1]
        return g.op("ReduceSum", g.op("Mul", y, wt), g.const([0]), keepdims=0)

    # -- the whole step -------------------------------------------------------------------------------------------
    def build(self, progress: bool = True) -> dict:
        g, cfg, model = self.g, self.cfg, self.model
        D, N, Dh = cfg.hidden_size, cfg.hc_mult, cfg.head_dim
        F = TensorProto.FLOAT
        # compressors take the RoPE table of their layer
        self.model_inv_freq = {}
        for blk in model.layers:
            for c in (getattr(blk.attn, "compressor", None), getattr(getattr(blk.attn, "indexer", None), "compressor", None)):
                if c is not None:
                    self.model_inv_freq[id(c)] = blk.attn.inv_freq
        g.io("ids", TensorProto.INT64, ["T"], True)
        g.io("start", TensorProto.INT64, [], True)
        g.io("logit_rows", TensorProto.INT64, ["R"], True)
        pos = g.op("Range", "start", g.op("Add", "start", g.scalar(g.dim("ids", 0))), g.const(1))
        x = g.op("Gather", g.weight("embed.weight", model.embed.weight.float()), "ids", axis=0)  # [T, D]
        streams = g.op("Expand", g.op("Unsqueeze", x, g.const([1])),
                       g.op("Concat", g.dim("ids", 0), g.const([N, D]), axis=0))  # [T, N, D]
        layout = []
        for i, blk in enumerate(tqdm(model.layers, desc="export-onnx", unit="layer", disable=not progress)):
            ins, outs, spec = {}, {}, []
            for part, fields in state_names(cfg, i).items():
                for fld in fields:
                    key = part if not fld else f"{part}.{fld}"
                    width = self._state_width(i, part, fld)
                    rows = (cfg.csa_rate if fld.startswith("overlap") else None)
                    ins[key] = f"l{i}.{key}"
                    g.io(ins[key], F, [rows or f"l{i}_{key}_n", width], True)
                    out_key = key + "_new" if fld == "entries" else key
                    outs[out_key] = f"l{i}.{out_key}" + ("" if fld == "entries" else ".out")
                    g.io(outs[out_key], F, [rows or f"l{i}_{out_key}_n", width], False)
                    spec.append({"key": key, "input": ins[key], "output": outs[out_key], "width": width})
            layout.append(spec)
            name = f"layers.{i}"
            xa, post, comb = self.hc_pre(streams, blk.hc_attn_fn, blk.hc_attn_base, blk.hc_attn_scale, f"{name}.hc_attn")
            xa = self.rms(xa, blk.attn_norm.weight, blk.attn_norm.eps, f"{name}.attn_norm.weight")
            streams = self.hc_post(self.attention(blk.attn, xa, pos, "start", f"{name}.attn", ins, outs), streams,
                                   post, comb)
            xf, post, comb = self.hc_pre(streams, blk.hc_ffn_fn, blk.hc_ffn_base, blk.hc_ffn_scale, f"{name}.hc_ffn")
            xf = self.rms(xf, blk.ffn_norm.weight, blk.ffn_norm.eps, f"{name}.ffn_norm.weight")
            streams = self.hc_post(self.moe(blk.ffn, xf, "ids", f"{name}.ffn"), streams, post, comb)
        rows = g.op("Gather", streams, "logit_rows", axis=0)  # [R, N, D]
        flat = g.op("Reshape", rows, g.const([0, -1]))
        mix = g.op("MatMul", self.rms(flat, None, cfg.rms_norm_eps), g.weight("hc_head_fn.T", model.hc_head_fn.T.contiguous()))
        pre = g.op("Add", g.op("Sigmoid", g.op("Add", g.op("Mul", mix, g.f(float(model.hc_head_scale[0]))),
                                                g.weight("hc_head_base", model.hc_head_base.float()))), g.f(cfg.hc_eps))
        xh = g.op("ReduceSum", g.op("Mul", g.op("Unsqueeze", pre, g.const([-1])), rows), g.const([1]), keepdims=0)
        xh = self.rms(xh, model.norm.weight, model.norm.eps, "norm.weight")
        g.op("Identity", self.lin(xh, model.head, "head.weight"), out="logits")
        g.io("logits", F, ["R", cfg.vocab_size], False)
        g.op("Max", *(self.ties or [g.f(0.0)]), g.f(0.0), out="selection_ties")  # > 0: a tie at some top-k boundary
        g.io("selection_ties", F, [], False)
        return layout

    def _state_width(self, i: int, part: str, fld: str) -> int:
        cfg = self.cfg
        if part == "window":
            return cfg.head_dim
        d = cfg.head_dim if part == "comp" else cfg.index_head_dim
        overlap = cfg.layer_kind(i) == "csa"
        return 2 * d if fld in ("kv", "gate") and overlap else d


# ---------------------------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------------------------
def export_model(model: Transformer, out: str | Path, opset: int = 21, accuracy_level: int = 0,
                 dequantize_unsupported: bool = False, progress: bool = True, check: bool = True) -> dict:
    """Write OUT/model.onnx (+ model.onnx.data) and OUT/onnx_manifest.json for `model`; returns the manifest.

    accuracy_level: MatMulNBits/QMoE's; 0 keeps fp32 activations (parity with the torch backend within 1e-3),
    4 lets the CPU EP quantize activations to int8 per block (faster, tolerance-bound, not parity-tested).
    """
    if opset < 21:
        raise ValueError(f"opset {opset}: the export needs opset >= 21")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    g = Graph(out / DATA)
    try:
        exp = StepExporter(model, g, accuracy_level, dequantize_unsupported)
        with torch.no_grad():
            layout = exp.build(progress)
    finally:
        g.close()
    graph = helper.make_graph(g.nodes, "flashport_step", g.inputs, g.outputs, g.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid("com.microsoft", 1)],
                              producer_name="flashport", ir_version=10)
    onnx.save_model(proto, str(out / GRAPH))
    if check:
        onnx.checker.check_model(str(out / GRAPH))
    manifest = {
        "format": "flashport-onnx", "version": EXPORT_VERSION, "graph": GRAPH, "data": DATA, "opset": opset,
        "accuracy_level": accuracy_level, "config": model.cfg.to_dict(), "weight_formats": dict(exp.formats),
        "nodes": len(g.nodes), "state": layout,
        "bytes": (out / GRAPH).stat().st_size + (out / DATA).stat().st_size,
        "export_seconds": round(time.perf_counter() - t0, 3),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    return manifest


def quantize_in_memory(model: Transformer, experts: str | None = "int4-g32", linears: str | None = None) -> Transformer:
    """Give the model's Linears packed weights (`packed = QuantWeight`) like a bundle's: `experts` for routed and
    shared experts, `linears` for every other projection (None: keep fp32). For tests and benchmarks that have
    no bundle on disk."""
    from .contract import QuantWeight

    for name, mod in model.named_modules():
        if not isinstance(mod, Linear):
            continue
        fmt = experts if (".experts." in name or ".shared_experts." in name) else linears
        if fmt:
            w = mod.weight.detach().float()
            mod.packed = QuantWeight(fmt, tuple(w.shape), get_format(fmt).pack(w, name=name + ".weight"))
            mod.handles = {}
    return model


def export_cli(bundle_or_checkpoint: str, out: str, opset: int = 21, accuracy_level: int = 0,
               dequantize_unsupported: bool = False, check: bool = True) -> str:
    """Export BUNDLE_OR_CHECKPOINT's decoder step to OUT (model.onnx, model.onnx.data, onnx_manifest.json).

    Put OUT at BUNDLE/onnx and `--backend onnxruntime` finds it; otherwise the backend exports on load.
    """
    from ..loader import open_model

    model = open_model(bundle_or_checkpoint, keep_packed=False).model  # the graph takes fp32 or its own formats
    m = export_model(model, out, opset=opset, accuracy_level=accuracy_level,
                     dequantize_unsupported=dequantize_unsupported, progress=True, check=check)
    fmts = ", ".join(f"{k} x{v}" for k, v in sorted(m["weight_formats"].items()))
    return (f"wrote {Path(out) / GRAPH} ({m['nodes']} nodes, opset {opset}, {m['bytes'] / 2**20:.1f} MiB with "
            f"external data) in {m['export_seconds']:.1f} s; weights: {fmts}")
