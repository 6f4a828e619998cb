"""The backend contract, version 1.1: what a backend (built in or an out-of-tree plugin) provides.

Modelled on ggml-backend and ONNX Runtime's plugin execution providers: a small fixed set of operations plus a
capability query, so the runtime can plan before it runs (`flashport backends --explain`). A backend implements
any subset of OPS; everything else falls back, per op and per weight format, to the torch reference
(`flashport.backends.reference`), with one log line the first time.

Writing a backend (see docs/plugin-authoring.md):

    class MyBackend(Backend):
        name = "mychip"
        def devices(self): return [DeviceInfo("mychip:0", "npu", total_memory=64 << 30)]
        def capabilities(self): return Capabilities(ops={"linear": {"int8", "fp32"}, "rms_norm": True})
        def upload(self, w: QuantWeight): ...          # weights into the device's own layout, once
        def linear(self, x, handle): ...               # same semantics as reference.linear
        def rms_norm(self, x, weight, eps): ...

Every op has the signature and semantics of the function of the same name in `reference.py` (weights arrive
as whatever `upload` returned). Tensors in and out are torch tensors on `self.torch_device`.

Whole-step backends (contract 1.1): a backend that runs whole decoder steps (one graph per step, e.g. ONNX
Runtime) sets `Capabilities.whole_step = True` and implements `bind_model(model, source)`, which returns an
object with the `Transformer` interface (`cfg`, `forward_batch`, `forward`, `eval`). Its `ops` then say what its
step graph runs on the stored weights; there is no per-op fallback inside a step: an (op, format) pair the graph
lacks is refused by `bind_model` with a clear error. Per-op dispatch never calls a whole-step backend's ops.

1.1 added `Capabilities.whole_step` and `Backend.bind_model`; a 1.0 plugin is unaffected (both default off).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..quant import formats as quant_formats

API_VERSION = (1, 1)  # (major, minor): a backend built for major M works with every flashport of major M

# Operation name -> whether it takes quantized weights (then capabilities name the formats it accepts)
OPS: dict[str, bool] = {
    "linear": True,          # x [T, K] @ W[N, K].T
    "grouped_linear": True,  # V4's grouped output projection (block-diagonal)
    "moe": True,             # routed-expert step: tokens + routing -> combined output, grouped by expert
    "attention": False,      # compressed/sparse shared-KV attention with sinks, prefill and decode
    "rms_norm": False,
    "rope": False,           # partial interleaved RoPE (and its inverse)
    "compress_pool": False,  # the compressor's gated softmax pooling
    "indexer_topk": False,   # lightning-indexer scoring + top-k
    "hc_pre": False,         # mHC mixes (incl. Sinkhorn) before a sub-block
    "hc_post": False,        # mHC mix after a sub-block
    "hc_head": False,        # final stream collapse
}

# Optional fused sequences: a backend method of this name runs the named ops in one call, with the same arguments
# the sequence takes (weights as `upload` returned them), or returns None when it cannot (a weight or tensor not in
# its layout); `Ops` (dispatch.py) then returns None and the model runs the ops one by one. A fused sequence must
# give what the ops one by one give on that backend (bit-identical there is the norm). Not part of the capability
# query: a backend without them is unaffected.
FUSED: dict[str, str] = {
    "hc_pre_norm": "hc_pre, then rms_norm of its x (the sub-block's input norm)",
    "hc_post_pre_norm": "hc_post of a sub-block's output, then hc_pre_norm for the next sub-block",
    "attn_project": "the attention's projections: wq_a, rms_norm, wq_b, per-head rms_norm, rope; wkv, rms_norm, rope",
    "attn_output": "decode attention (every key visible), inverse rope, grouped wo_a, wo_b",
    "gated_moe": "the MoE router (model.Gate), the routed experts and the shared expert, summed",
    "compress_project": "a compressor's two projections, each appended to its buffered rows: (cat([kv, linear(x, "
                        "wkv)]), cat([gate, linear(x, wgate)]))",
}

# the weight formats (flashport.quant.formats is their one definition; re-exported here for plugin authors)
WEIGHT_FORMATS = quant_formats.WEIGHT_FORMATS


class BackendError(RuntimeError):
    """A backend that cannot be used (not installed, failed to initialise, wrong API version)."""


@dataclass
class DeviceInfo:
    name: str                    # "cpu", "cuda:0", "npu:1", "opencl:0"
    kind: str                    # "cpu", "gpu", "npu", ...
    total_memory: int = 0        # bytes (0: unknown)
    free_memory: int = 0


@dataclass
class Capabilities:
    """What a backend runs natively. ops: op name -> True, or the set of weight formats for weight ops."""

    ops: dict[str, Any] = field(default_factory=dict)
    max_context: int | None = None   # longest context the attention op was validated for (None: no limit)
    deterministic: bool = False      # results independent of batch composition and thread count
    whole_step: bool = False         # runs whole decoder steps through Backend.bind_model (contract 1.1)

    def supports(self, op: str, fmt: str | None = None) -> bool:
        v = self.ops.get(op, False)
        if isinstance(v, bool):
            return v
        return fmt is None or fmt in v


@dataclass
class QuantWeight:
    """A weight as stored in a bundle: a format name (flashport.quant) and its packed tensors."""

    fmt: str
    shape: tuple[int, int]           # logical (N, K)
    tensors: dict[str, torch.Tensor]

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K]: the format's reference dequantization (flashport.quant.formats.dequantize)."""
        return quant_formats.dequantize(self.fmt, self.tensors).reshape(self.shape)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class Backend:
    """Base class of every backend. Override what you support; leave the rest to the fallback."""

    name: str = "base"
    api_version: tuple[int, int] = API_VERSION
    torch_device: torch.device = torch.device("cpu")

    def devices(self) -> list[DeviceInfo]:
        raise NotImplementedError

    def capabilities(self) -> Capabilities:
        raise NotImplementedError

    def upload(self, w: QuantWeight) -> Any:
        """Put a weight into this backend's own layout (called once per weight, before running)."""
        return w

    def implements(self, op: str) -> bool:
        return callable(getattr(type(self), op, None))

    def describe(self) -> str:
        """One line on where this backend runs, for `flashport backends` (optional)."""
        return ""

    def bind_model(self, model, source: Path | None):
        """The whole-step form of `model` (a Transformer; `source` its checkpoint or bundle directory, or None):
        an object with the Transformer interface that runs each decoder step on this backend. Only backends whose
        capabilities() say `whole_step` implement it; the runtime calls it only for them.

        Raises BackendError when the model cannot run this way (e.g. a weight format the step graph lacks)."""
        raise BackendError(f"backend {self.name!r} runs single ops, not whole decoder steps (capabilities()."
                           f"whole_step is False): it has no bind_model")
