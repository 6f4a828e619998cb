"""The built-in "triton" backend: the contract ops on the Triton kernels of flashport.kernels.

    TritonBackend(device=None)   # "cuda[:i]" (default when CUDA is there), or "cpu" with TRITON_INTERPRET=1

Native ops, each on the public wrapper of its kernel module (the kernel modules document their own exactness;
the conformance kit checks every claim: `flashport conformance triton`):

  linear          int4-g32/64/128[-asym] (MatMulNBits layout), int8, mxfp4: quant_gemm's dequantize-GEMM.
                  TOLERANCE-BOUND (fp32 accumulation in another order; dequantization itself is bit-exact).
  grouped_linear  same formats: one grouped launch with the G output groups as G "experts" (no weight copy).
  moe             same formats: tokens sorted by expert (moe.moe_sort), w1/w3 and w2 as grouped GEMMs over
                  the sorted rows (quant_gemm.grouped_qgemm), clamped SwiGLU between; the combine is a weighted
                  sum over each token's k slots (no atomics: deterministic on CUDA). TOLERANCE-BOUND. Unlike
                  kernels.moe.moe_ffn it pads activations for MXFP4 weights whose K is not a multiple of 32.
  rms_norm        norm_rope.rmsnorm. TOLERANCE-BOUND (another reduction order).
  rope            norm_rope.rope_interleaved. BIT-EXACT (no FMA contraction).
  compress_pool   compress.compress_pool (zero positional bias: the model adds it to the gate). TOLERANCE-BOUND.
  attention       attention.sparse_attn_decode, one index list per query (the visible keys, in key order), so
                  it serves prefill chunks too. TOLERANCE-BOUND (online softmax). A bias with finite values other
                  than 0 (not produced by the model) is computed by the reference instead.

Everything else (and fp32/bf16/fp8/w8a8 weights) falls back per op to the torch reference, logged once.

On the CPU the kernels run in Triton's interpreter: correct but slow (for CI and conformance, never "auto").
The interpreter is chosen when triton.jit decorates the kernels, so TRITON_INTERPRET=1 must be set before
flashport.kernels is first imported.

Expert stacking: the grouped GEMM wants the experts' weights stacked [E, ...]. Dispatch uploads each expert's
weight separately (once); the first MoE call of a layer stacks them into one device buffer, cached for the
layer (keyed by the uploaded handles). That holds the experts twice in device memory; a bundle loader that hands
pre-stacked experts would avoid it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import kernels as kn
from ..backends import reference
from ..backends.contract import OPS, Backend, BackendError, Capabilities, DeviceInfo, QuantWeight
from ..quant.formats import INT4_FORMATS, get_format
from . import _common
from . import quant_gemm as qg

KERNEL_FORMATS = frozenset(INT4_FORMATS + ("int8", "mxfp4"))  # the formats quant_gemm's kernels run

# -- weightless ops: the contract's signatures on the kernels' public wrappers --------------------------------
def rms_norm(x, weight, eps):
    return kn.rmsnorm(x, weight, eps)


def rope(x, cos, sin, inverse=False):
    return kn.rope_interleaved(x, cos, sin, 2 * cos.shape[-1], inverse)


def compress_pool(kv, gate):
    """The model adds the positional bias to the gate before the op: the kernel's own bias is zero."""
    return kn.compress_pool(kv, gate, kv.new_zeros(kv.shape[1:]))


def attention(q, keys, bias, sink, scale):
    """Each query attends to the keys whose bias is 0 (the contract's bias is 0 visible / -inf hidden): the
    decode kernel takes per-query key index lists, -1 padded; each query is one "batch" row."""
    visible = torch.isfinite(bias)  # [T, S]
    if (bias[visible] != 0).any():  # a general additive bias is not what the kernel computes
        return reference.attention(q, keys, bias, sink, scale)
    s = keys.shape[0]
    n = max(int(visible.sum(-1).max()), 1) if q.shape[0] else 1
    pos = torch.where(visible, torch.arange(s, device=q.device), s)  # hidden keys sort last
    idx = pos.sort(-1).values[:, :n]  # [T, n] visible key indices in key order
    idx = torch.where(idx == s, -1, idx).to(torch.int32)
    return kn.sparse_attn_decode(q, keys, idx, sink.float(), scale)


WEIGHTLESS_OPS = {"rms_norm": rms_norm, "rope": rope, "compress_pool": compress_pool, "attention": attention}


@dataclass
class TritonWeight:
    """An uploaded weight: quant_gemm's container on the device plus the logical shape."""

    q: qg.QuantWeight
    n: int
    k: int

    @property
    def k_stored(self) -> int:
        return self.q.K


def _to_kernel_layout(w: QuantWeight, dev: torch.device) -> qg.QuantWeight:
    t = {k: v.to(dev) for k, v in w.tensors.items() if k != "shape"}
    if w.fmt in KERNEL_FORMATS:
        fmt = get_format(w.fmt)
        if fmt.kind == "int4":
            return qg.QuantWeight("int4", t["B"].contiguous(), t["scales"].float().contiguous(),
                                  t["zero_points"].contiguous() if "zero_points" in t else None, fmt.group)
        if fmt.kind == "int8":
            return qg.QuantWeight("int8", t["weight"].contiguous(), t["scale"].float().contiguous())
        if fmt.kind == "mxfp4":
            return qg.QuantWeight("mxfp4", t["weight"].contiguous(), t["scale"].contiguous(), block_size=fmt.group)
    raise BackendError(f"triton backend: no kernel for weight format {w.fmt!r}")


def _pad_k(x: torch.Tensor, w: TritonWeight) -> torch.Tensor:
    """MXFP4 stores K rounded up to 32 (zeros) and its kernel reads whole blocks: pad x to match. int4 kernels
    mask the padded tail themselves."""
    if w.q.fmt == "mxfp4" and x.shape[-1] != w.k_stored:
        return F.pad(x, (0, w.k_stored - x.shape[-1]))
    return x


def _stack(ws: list[TritonWeight]) -> TritonWeight:
    first = ws[0].q
    cat = lambda name: None if getattr(first, name) is None else torch.stack([getattr(w.q, name) for w in ws])  # noqa: E731
    return TritonWeight(qg.QuantWeight(first.fmt, cat("qweight"), cat("scales"), cat("zero_points"),
                                       first.block_size), ws[0].n, ws[0].k)


def _as_groups(w: TritonWeight, groups: int) -> TritonWeight:
    """View a [G*R, K] weight as G stacked [R, K] weights (row-major storage: no copy)."""
    q = w.q
    view = lambda t: None if t is None else t.view(groups, t.shape[0] // groups, *t.shape[1:])  # noqa: E731
    return TritonWeight(qg.QuantWeight(q.fmt, view(q.qweight), view(q.scales), view(q.zero_points), q.block_size),
                        w.n // groups, w.k)


class TritonBackend(Backend):
    name = "triton"

    def __init__(self, device: str | None = None, precision: str = "ieee"):
        if not _common.HAS_TRITON:
            raise BackendError("triton is not installed (pip install 'flashport[triton]')")
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dev.type == "cpu" and not _common.interpreting():
            raise BackendError("the triton backend on the CPU needs TRITON_INTERPRET=1 (set before flashport "
                               "is imported)")
        if dev.type not in ("cpu", "cuda"):
            raise BackendError(f"the triton backend runs on cuda (or the CPU interpreter), not {dev.type!r}")
        self.torch_device, self.precision = dev, precision
        self._stacks: dict[tuple, tuple] = {}

    def devices(self) -> list[DeviceInfo]:
        if self.torch_device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.torch_device)
            return [DeviceInfo(str(self.torch_device), "gpu", total, free)]
        return [DeviceInfo("cpu (triton interpreter)", "cpu")]

    def capabilities(self) -> Capabilities:
        ops: dict = {op: set(KERNEL_FORMATS) for op in ("linear", "grouped_linear", "moe")}
        ops.update({op: True for op in WEIGHTLESS_OPS})
        return Capabilities(ops=ops, max_context=None, deterministic=False)

    def upload(self, w: QuantWeight) -> TritonWeight:
        return TritonWeight(_to_kernel_layout(w, self.torch_device), *w.shape)

    # -- weight ops ------------------------------------------------------------------------------------------
    def _gemm(self, x: torch.Tensor, offsets: torch.Tensor, w: TritonWeight) -> torch.Tensor:
        return qg.grouped_qgemm(_pad_k(x.float(), w), offsets, w.q, precision=self.precision,
                                dense=len(offsets) == 2)

    def linear(self, x: torch.Tensor, w: TritonWeight) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # [T, K]
        offsets = torch.tensor([0, x2.shape[0]], dtype=torch.int32, device=x.device)
        return self._gemm(x2, offsets, _as_groups(w, 1)).reshape(*x.shape[:-1], w.n)

    def grouped_linear(self, x: torch.Tensor, w: TritonWeight) -> torch.Tensor:
        t, g, i = x.shape  # x [T, G, I] -> rows grouped by group: [G*T, I]
        rows = x.transpose(0, 1).reshape(g * t, i)
        offsets = torch.arange(0, g * t + 1, t, dtype=torch.int32, device=x.device)
        out = self._gemm(rows, offsets, _as_groups(w, g))  # [G*T, R]
        return out.view(g, t, -1).transpose(0, 1).contiguous()

    def _stacked(self, experts) -> tuple[TritonWeight, TritonWeight, TritonWeight]:
        handles = [experts[e] for e in range(len(experts))]  # (w1, w3, w2) per expert, uploaded once by dispatch
        key = tuple(id(h) for trio in handles for h in trio)
        hit = self._stacks.get(key)
        if hit is None:  # keep the handles alive with the stack, so their ids cannot be reused
            hit = self._stacks[key] = (handles, tuple(_stack([h[j] for h in handles]) for j in range(3)))
        return hit[1]

    def moe(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, experts, limit: float) -> torch.Tensor:
        w1, w3, w2 = self._stacked(experts)
        t, k = idx.shape
        token, offsets, order = kn.moe_sort(idx, len(experts), return_order=True)  # rows grouped by expert
        xs = x[token]  # [T*k, D]
        act = kn.swiglu_clamped(self._gemm(xs, offsets, w1), self._gemm(xs, offsets, w3), limit)
        y = torch.empty(t * k, x.shape[1], dtype=torch.float32, device=x.device)
        y[order] = self._gemm(act, offsets, w2)  # back to (token, slot) order
        return (y.view(t, k, -1) * weights.float()[..., None]).sum(1)  # [T, D]


for _op, _fn in WEIGHTLESS_OPS.items():
    setattr(TritonBackend, _op, staticmethod(_fn))
assert set(WEIGHTLESS_OPS) <= set(OPS)
