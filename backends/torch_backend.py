"""The built-in torch backend: CPU and any torch device (cuda; `npu` and other PrivateUse1 devices when their torch
extension is installed). Every op is the reference math run on the device; quantized weights are dequantized
once at upload into the compute dtype, so decode runs at the device's dense-matmul speed.

Deterministic mode (`deterministic=True`) makes every op *batch-invariant*: a row's result depends only on that
row's inputs, never on how many other rows share the call nor on how many masked keys there are. That is what a
bit-identical KV restore needs (docs/kv-runtime.md): a sequence continued from a disk hit runs its rows in other
company (a recompute chunk that starts elsewhere, loaded compressed entries beyond the causal limit, other
sequences in a batch) than the uninterrupted run did. Floating-point results depend on that company:

- BLAS picks its kernel and blocking from the matrix shape (MKL computes a 1-row product with another reduction
  order than a 2-row one, and a 1024-row one with yet another);
- torch's CPU elementwise loops run the last `numel % (2 * vector width)` elements through the scalar function,
  whose exp/sin/rsqrt round differently from the vectorised one, so an element's bits depend on its offset;
- a softmax over padded keys reduces over more (zero) terms, in another blocking.

So the deterministic ops run the reference op once per row with a shape that does not depend on the batch
(`linear`, `rms_norm`, `rope`, `hc_*`, `moe` per token, `compress_pool` per window), and `attention` /
`indexer_topk` gather each query's visible keys in their canonical order (window keys by position, then
compressed entries by index) and reduce over exactly those. Each row then makes the same library calls with the
same shapes whatever the batch, hence the same bits; tests/test_kv_runtime.py checks this with torch.equal.
It costs per-row call overhead (fine for the small presets, not a production fast path).

Not covered here (outside the op contract): the router's `x @ gate.weight.T` and the RoPE cos/sin tables, which
model.py computes per chunk. The engine therefore also splits prefills at absolute multiples of
`kv_block_tokens` in deterministic mode, so the same positions always meet those two in the same chunk shape.

Bit-exactness: the default ops are the reference itself (bit-exact with it); the deterministic ops equal the
reference within fp32 reassociation (same math, other reduction grouping), and are bit-exact with themselves
across batch compositions.
"""

from __future__ import annotations

import torch

from . import reference
from .contract import OPS, WEIGHT_FORMATS, Backend, BackendError, Capabilities, DeviceInfo, QuantWeight


def device_memory(dev: torch.device) -> tuple[int, int]:
    if dev.type == "cuda":
        free, total = torch.cuda.mem_get_info(dev)
        return total, free
    try:
        import os

        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        avail = os.sysconf("SC_AVPHYS_PAGES")
        return pages * size, avail * size
    except (ValueError, OSError, AttributeError):
        return 0, 0


# -- deterministic (batch-invariant) ops -----------------------------------------------------------------------
def _row(a: torch.Tensor, t: int) -> torch.Tensor:
    """Row t as a [1, ...] tensor in a fresh buffer: MKL's results may depend on the operand's alignment, and a
    view into a batch is aligned by its offset."""
    return a[t:t + 1].clone()


def _per_row(fn, n_row_args: int):
    """Run `fn` once per row of its first `n_row_args` arguments (all [T, ...]) and concatenate the results."""

    def op(*args):
        rows, rest = args[:n_row_args], args[n_row_args:]
        n = rows[0].shape[0]
        if n == 0:
            return fn(*args)
        outs = [fn(*(_row(a, t) for a in rows), *rest) for t in range(n)]
        if isinstance(outs[0], tuple):
            return tuple(torch.cat(parts) for parts in zip(*outs))
        return torch.cat(outs)

    op.__doc__ = f"Batch-invariant {fn.__name__}: the reference op applied row by row."
    return op


def _det_rms_norm(x, weight, eps):
    return _per_row(reference.rms_norm, 1)(x, weight, eps)


def _det_rope(x, cos, sin, inverse=False):
    return _per_row(reference.rope, 3)(x, cos, sin, inverse)


def _det_attention(q, keys, bias, sink, scale):
    """Per query: the keys with a finite bias, in key order (the model lays keys out as window by position, then
    compressed entries by index), and a softmax over exactly those plus the sink."""
    out = q.new_empty(q.shape)
    finite = torch.isfinite(bias)
    for t in range(q.shape[0]):
        idx = finite[t].nonzero().squeeze(1)
        out[t] = reference.attention(_row(q, t), keys.index_select(0, idx), bias[t:t + 1, idx], sink, scale)[0]
    return out


def _det_indexer_topk(q, keys, weights, visible, k):
    """Per query: score only the visible compressed entries (in index order) and keep the top-k of those."""
    chosen = torch.zeros_like(visible)
    for t in range(q.shape[0]):
        idx = visible[t].nonzero().squeeze(1)
        if len(idx):
            sel = reference.indexer_topk(_row(q, t), keys.index_select(0, idx), _row(weights, t),
                                         torch.ones(1, len(idx), dtype=torch.bool), k)[0]
            chosen[t, idx[sel]] = True
    return chosen


DETERMINISTIC_OPS = {
    "linear": _per_row(reference.linear, 1),
    "grouped_linear": _per_row(reference.grouped_linear, 1),
    "moe": _per_row(reference.moe, 3),              # one token at a time: its experts in ascending id order
    "attention": _det_attention,
    "rms_norm": _det_rms_norm,
    "rope": _det_rope,
    "compress_pool": _per_row(reference.compress_pool, 2),  # one window at a time
    "indexer_topk": _det_indexer_topk,
    "hc_pre": _per_row(reference.hc_pre, 1),
    "hc_post": _per_row(reference.hc_post, 4),
    "hc_head": _per_row(reference.hc_head, 1),
}
assert DETERMINISTIC_OPS.keys() == OPS.keys()


def check_device(device: torch.device) -> None:
    """Refuse, when the backend is created (before any weight is read), a device this torch cannot use: a type
    without its extension, none of that type present (e.g. cuda:0 on a CPU-only build), or an index past the
    count. Raises BackendError naming the device and what is there."""
    kind = device.type
    if kind == "cpu":
        return
    mod = getattr(torch, kind, None)
    if mod is None:
        raise BackendError(f"torch has no device type {kind!r} (is its extension installed?)")
    available, count = getattr(mod, "is_available", None), getattr(mod, "device_count", None)
    if available is not None and not available():
        built = "" if kind != "cuda" or torch.backends.cuda.is_built() else " (this torch is built without CUDA)"
        raise BackendError(f"device {device}: no {kind} device is available to torch {torch.__version__}{built}; "
                           "use --device cpu or another backend")
    if count is not None and device.index is not None and device.index >= count():
        raise BackendError(f"device {device}: torch sees {count()} {kind} device(s) ({kind}:0..{kind}:{count() - 1})")


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, device: str = "cpu", deterministic: bool = False):
        self.torch_device = torch.device(device)
        check_device(self.torch_device)
        self.deterministic = deterministic
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            for op, fn in DETERMINISTIC_OPS.items():  # instance attributes shadow the default (reference) ops
                setattr(self, op, fn)

    def devices(self) -> list[DeviceInfo]:
        total, free = device_memory(self.torch_device)
        kind = "cpu" if self.torch_device.type == "cpu" else ("gpu" if self.torch_device.type == "cuda" else "npu")
        return [DeviceInfo(str(self.torch_device), kind, total, free)]

    def capabilities(self) -> Capabilities:
        ops = {op: (set(WEIGHT_FORMATS) if weighted else True) for op, weighted in OPS.items()}
        return Capabilities(ops=ops, deterministic=self.deterministic)

    def upload(self, w: QuantWeight):
        return w.dequantize().to(self.torch_device)


# every op is the reference's own function: same math, on whatever device the tensors live
for _op in OPS:
    setattr(TorchBackend, _op, staticmethod(getattr(reference, _op)))
