"""Per-op dispatch: the backend gets the ops and formats it claims, the torch reference the rest."""

import torch

from flashport.backends import Backend, Capabilities, DeviceInfo, Ops, QuantWeight
from flashport.backends import reference
from flashport.model import Expert, Linear
from flashport.quant.formats import get_format


class LinearOnly(Backend):
    """Claims int8 for linear only; its handles are opaque objects the reference could not use."""

    name = "linear-only"

    def devices(self):
        return [DeviceInfo("fake:0", "npu")]

    def capabilities(self):
        return Capabilities(ops={"linear": {"int8"}})

    def upload(self, w):
        return ("opaque", w.dequantize())

    def linear(self, x, handle):
        tag, w = handle
        assert tag == "opaque"
        return x @ w.T


def int8_linear(out_f, in_f, seed):
    lin = Linear(out_f, in_f)
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))
    lin.packed = QuantWeight("int8", (out_f, in_f), get_format("int8").pack(w))
    return lin


def test_linear_native_moe_falls_back_with_dequantized_weights():
    ops = Ops(LinearOnly())
    x = torch.randn(5, 16)
    lin = int8_linear(8, 16, 0)
    assert torch.allclose(ops.linear(x, lin), x @ lin.packed.dequantize().T)
    experts = []
    for e in range(3):
        ex = Expert(16, 8)
        ex.w1, ex.w2, ex.w3 = int8_linear(8, 16, e), int8_linear(16, 8, 10 + e), int8_linear(8, 16, 20 + e)
        experts.append(ex)
    idx = torch.tensor([[0, 2], [1, 2], [0, 1], [2, 0], [1, 0]])
    w = torch.rand(5, 2)
    out = ops.moe(x, w, idx, experts, 10.0)  # the reference MoE, with fp32 weights, not the backend's handles
    ref = reference.moe(x, w, idx, [tuple(l.packed.dequantize() for l in (ex.w1, ex.w3, ex.w2)) for ex in experts],
                        10.0)
    assert torch.equal(out, ref)
    assert ops.native("linear", "int8") and not ops.native("moe", "int8")
    assert ("moe", "int8") in ops.fallbacks
