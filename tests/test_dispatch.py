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


class FailsAfter(LinearOnly):
    """Its linear works once, then raises (a device lost mid-run)."""

    name = "fails-after"

    def __init__(self):
        self.calls = 0

    def linear(self, x, handle):
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("device lost")
        return super().linear(x, handle)


def test_an_op_that_raises_falls_back_with_reference_weights_and_is_marked_degraded(tmp_path, monkeypatch, caplog):
    from flashport.backends.registry import degraded_marks

    monkeypatch.setenv("FLASHPORT_CACHE", str(tmp_path))
    ops = Ops(FailsAfter())
    x, lin = torch.randn(3, 16), int8_linear(8, 16, 0)
    want = x @ lin.packed.dequantize().T
    assert torch.allclose(ops.linear(x, lin), want) and ops.degraded == []
    with caplog.at_level("WARNING", logger="flashport.backends"):
        for _ in range(3):  # the backend's handle is opaque: the fallback must take the reference's weights
            assert torch.allclose(ops.linear(x, lin), want)
    assert ops.backend.calls == 2  # raised once, then never called again for linear(int8)
    assert ops.degraded == ["linear"] and "device lost" in ops.errors[("linear", "int8")]
    assert len([r for r in caplog.records if "device lost" in r.getMessage()]) == 1
    assert "device lost" in degraded_marks("fails-after")["linear"]["error"]


def test_whole_step_backends_are_bound_never_dispatched():
    import pytest

    from flashport.backends import BackendError

    class Graph(LinearOnly):
        name = "graph"

        def capabilities(self):
            return Capabilities(ops={"linear": {"int8"}}, whole_step=True)

    with pytest.raises(BackendError, match="whole decoder steps"):
        Ops(Graph()).linear(torch.randn(1, 16), int8_linear(8, 16, 0))
    with pytest.raises(BackendError, match="runs single ops"):
        LinearOnly().bind_model(None, None)  # the contract's default: a per-op backend has no whole-step form


def test_listing_and_preflight_say_what_runs_where(tiny_release, tmp_path):
    """onnxruntime: whole steps, formats its graph lacks named; a release checkpoint's stored formats (fp8,
    mxfp4) shown beside what they run as; a bundle explained from its manifest; a bad path refused."""
    import pytest

    from flashport.backends.explain import explain_model, list_backends
    from flashport.export.bundle import export

    listing = list_backends()
    onnx = listing[listing.index("\nonnxruntime"):].split("\n")[1:5]
    assert "runs whole decoder steps" in onnx[1] and "native ops" not in "\n".join(onnx)
    assert any(line.strip().startswith("moe weights:") and "refused at load" in line and "mxfp4" in line
               for line in listing.splitlines())
    text = explain_model(str(tiny_release), "torch")
    assert "fp8-e4m3-block128" in text and "mxfp4" in text and "release checkpoint" in text
    text = explain_model(str(tiny_release), "onnxruntime")
    assert "whole decoder steps" in text and "in the step graph" in text
    bundle = tmp_path / "bundle"
    export(tiny_release, bundle, recipe="int4-experts", progress=False)
    text = explain_model(str(bundle), "torch")
    assert "(bundle)" in text and "int4-g" in text
    with pytest.raises(FileNotFoundError, match="neither a bundle"):
        explain_model(str(tmp_path), "torch")
