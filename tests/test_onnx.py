"""The ONNX Runtime path: export (checker, MatMulNBits/QMoE on the packed bytes, external data), the backend's
errors (unavailable EP, plugin library, corrupt file, stale export, unsupported format), and the runtime features
(generation, streaming, several sequences) through it. Parity figures live in test_onnx_parity.py."""

import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from flashport.backends import BackendError
from flashport.backends.dispatch import Ops
from flashport.backends.onnx_backend import OnnxModelError, OnnxRuntimeBackend
from flashport.backends.onnx_export import (
    DATA, GRAPH, MANIFEST, UnsupportedWeightFormat, export_cli, export_model, quantize_in_memory,
)
from flashport.backends.torch_backend import TorchBackend
from flashport.checkpoint import init_weights
from flashport.config import ModelConfig
from flashport.engine import Engine
from flashport.model import SeqState, Transformer
from flashport.tokenizer import Tokenizer


def tiny(experts="int4-g32", linears=None, seed=0):
    cfg = ModelConfig.preset("flash-tiny")
    m = Transformer(cfg)
    m.load_state_dict(init_weights(cfg, seed))
    return quantize_in_memory(m, experts, linears).set_ops(Ops(TorchBackend()))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """flash-tiny with int4-g32 experts and int4-g64-asym linears (both MatMulNBits variants), exported."""
    model = tiny("int4-g32", "int4-g64-asym")
    out = tmp_path_factory.mktemp("onnx-tiny")
    manifest = export_model(model, out, progress=False)
    return model, out, manifest


@pytest.fixture(scope="module")
def onnx_model(exported):
    model, out, _ = exported
    return OnnxRuntimeBackend(threads=1).bind_model(model, out)


def test_export_passes_checker_with_external_data(exported):
    _, out, manifest = exported
    onnx.checker.check_model(str(out / GRAPH))
    proto = onnx.load(str(out / GRAPH), load_external_data=False)
    assert (out / DATA).stat().st_size > 0.9 * manifest["bytes"]  # the weights are outside the graph file
    assert {o.domain: o.version for o in proto.opset_import}[""] >= 21
    contrib = {n.op_type for n in proto.graph.node if n.domain == "com.microsoft"}
    assert contrib == {"MatMulNBits", "QMoE"}
    cfg = ModelConfig.preset("flash-tiny")
    assert sum(n.op_type == "QMoE" for n in proto.graph.node) == cfg.num_hidden_layers
    assert not any(n.op_type == "MatMul" and "wq_a" in "".join(n.input) for n in proto.graph.node)
    assert manifest["weight_formats"]["int4-g32"] == cfg.num_hidden_layers * (3 * cfg.n_routed_experts + 3)


def test_qmoe_runs_the_packed_bytes_unchanged(exported):
    """fc1 = w1 (gate) and w3 (up) rows interleaved, byte for byte; fc2 = w2: no requantization."""
    model, out, _ = exported
    proto = onnx.load(str(out / GRAPH))
    inits = {t.name: t for t in proto.graph.initializer}
    e, layer = 5, 4
    ex = model.layers[layer].ffn.experts[e]
    fc1 = numpy_helper.to_array(inits[f"layers.{layer}.ffn.experts.fc1.B"])[e]  # [2I, K/2]
    I = ex.w1.qweight.shape[0]
    np.testing.assert_array_equal(fc1[0::2], ex.w1.qweight.tensors["B"].reshape(I, -1).numpy())
    np.testing.assert_array_equal(fc1[1::2], ex.w3.qweight.tensors["B"].reshape(I, -1).numpy())
    fc2s = numpy_helper.to_array(inits[f"layers.{layer}.ffn.experts.fc2.scales"])[e]
    np.testing.assert_array_equal(fc2s, ex.w2.qweight.tensors["scales"].numpy())
    wq = model.layers[0].attn.wq_a.qweight.tensors
    np.testing.assert_array_equal(numpy_helper.to_array(inits["layers.0.attn.wq_a.weight.B"]), wq["B"].numpy())


def test_forward_batch_runs_sequences_independently(onnx_model, exported):
    model = exported[0]
    a, b = torch.arange(2, 40), torch.arange(100, 113)
    sa, sb = SeqState.empty(model.cfg), SeqState.empty(model.cfg)
    la, lb = onnx_model.forward_batch([a, b], [sa, sb], all_logits=False)
    assert la.shape == (1, model.cfg.vocab_size) and (sa.n_tokens, sb.n_tokens) == (38, 13)
    with torch.no_grad():
        ref = model(b)[-1]
    assert (lb[0] - ref).abs().max() < 1e-3


def test_generation_and_streaming_through_engine(onnx_model, exported):
    tok = Tokenizer.default()
    ours, ref = Engine(onnx_model, tok), Engine(exported[0], tok)
    prompt = "Once upon a time, in a small village by the sea,"
    g1, g2 = ours.generate(prompt, max_new_tokens=12), ref.generate(prompt, max_new_tokens=12)
    assert g1.token_ids == g2.token_ids and len(g1.token_ids) > 0
    assert "".join(ours.generate(prompt, max_new_tokens=12, stream=True)) == g1.text
    s1 = ours.generate(prompt, max_new_tokens=8, temperature=0.8, top_p=0.9, seed=3)
    s2 = ours.generate(prompt, max_new_tokens=8, temperature=0.8, top_p=0.9, seed=3)
    assert s1.token_ids == s2.token_ids


def test_unavailable_ep_lists_the_available_ones():
    with pytest.raises(BackendError, match="NoSuchExecutionProvider.*available: .*CPUExecutionProvider"):
        OnnxRuntimeBackend(ep="NoSuchExecutionProvider")
    from flashport.backends import create

    with pytest.raises(BackendError, match="CPUExecutionProvider"):
        create("onnxruntime", ep="NoSuchExecutionProvider")


def test_plugin_ep_library_errors(tmp_path):
    with pytest.raises(BackendError, match="does not exist"):
        OnnxRuntimeBackend(ep="FakeEP", plugin_ep_library=str(tmp_path / "libnothere.so"))
    bogus = tmp_path / "libbogus.so"
    bogus.write_bytes(b"not a shared library")
    with pytest.raises(BackendError, match="could not register plugin EP library"):
        OnnxRuntimeBackend(ep="FakeEP", plugin_ep_library=str(bogus))


def test_corrupt_or_truncated_onnx_gives_a_clear_error(exported, tmp_path):
    model, out, _ = exported
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    (bad / GRAPH).write_bytes((bad / GRAPH).read_bytes()[:200])  # truncated graph
    with pytest.raises(OnnxModelError, match="cannot load this model"):
        OnnxRuntimeBackend().bind_model(model, bad)
    shutil.copy(out / GRAPH, bad / GRAPH)
    (bad / DATA).unlink()  # weights missing
    with pytest.raises(OnnxModelError, match=str(GRAPH)):
        OnnxRuntimeBackend().bind_model(model, bad)
    (bad / MANIFEST).write_text("{not json")
    with pytest.raises(OnnxModelError, match="unreadable"):
        OnnxRuntimeBackend().bind_model(model, bad)


def test_export_of_another_model_is_refused(exported):
    _, out, _ = exported
    cfg = ModelConfig(**{**ModelConfig.preset("flash-tiny").__dict__, "sliding_window": 16})
    with pytest.raises(OnnxModelError, match="another model config"):
        OnnxRuntimeBackend(onnx_dir=str(out)).bind_model(Transformer(cfg))


def pack_one(model, name, fmt):
    from flashport.backends.contract import QuantWeight
    from flashport.quant.formats import get_format

    lin = model.get_submodule(name)
    lin.packed = QuantWeight(fmt, tuple(lin.weight.shape), get_format(fmt).pack(lin.weight.detach()))
    return model


@pytest.mark.parametrize("fmt", ["fp8-e4m3-block128", "mxfp4"])
def test_formats_matmulnbits_cannot_express(fmt, tmp_path):
    model = pack_one(tiny("int4-g32"), "layers.0.attn.wq_a", fmt)
    with pytest.raises(UnsupportedWeightFormat, match=f"layers.0.attn.wq_a.weight: weight format '{fmt}'"):
        export_model(model, tmp_path / "x", progress=False)


def test_dequantize_unsupported_runs_as_fp32(tmp_path):
    model = pack_one(tiny(None), "layers.0.attn.wq_a", "fp8-e4m3-block128")  # release-like precision
    for e in range(2):
        pack_one(model, f"layers.3.ffn.experts.{e}.w1", "mxfp4")
    m = export_model(model, tmp_path / "x", progress=False, dequantize_unsupported=True)
    assert set(m["weight_formats"]) == {"fp32"}
    om = OnnxRuntimeBackend(threads=1).bind_model(model, tmp_path / "x")
    ids = torch.randint(2, 8000, (70,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (om(ids) - model(ids)).abs().max() < 1e-3


def test_unbound_backend_says_how_to_use_it():
    model = tiny().set_ops(Ops(OnnxRuntimeBackend()))
    with pytest.raises(BackendError, match="whole decoder steps"):
        model(torch.tensor([1, 2, 3]))


def test_export_cli_on_a_checkpoint_then_run_it(tiny_release, tmp_path):
    msg = export_cli(str(tiny_release), str(tmp_path / "onnx"))
    assert "model.onnx" in msg and "nodes" in msg
    from flashport.checkpoint import CheckpointReader

    reader = CheckpointReader(tiny_release)
    model = Transformer(reader.cfg)
    model.load_state_dict(reader.load_state_dict())
    om = OnnxRuntimeBackend(onnx_dir=str(tmp_path / "onnx"), threads=1).bind_model(model)
    ids = torch.randint(2, 8000, (40,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (om(ids) - model(ids)).abs().max() < 1e-3


def test_engine_load_with_onnxruntime_backend(tiny_release):
    ours, ref = Engine.load(tiny_release, backend="onnxruntime"), Engine.load(tiny_release, backend="torch")
    assert ours.generate("Hello there", max_new_tokens=10).token_ids == \
        ref.generate("Hello there", max_new_tokens=10).token_ids


def test_disk_kv_restore_through_onnx(onnx_model, exported, tmp_path):
    """A prefix-cache hit (restore + window rebuild with the loaded entries) gives the tokens of a cold run."""
    eng = Engine(onnx_model, Tokenizer.default())
    eng.enable_kv(tmp_path / "kv")
    ids = list(range(2, 300))
    cold = eng.generate(ids, max_new_tokens=8).token_ids
    warm = eng.generate(ids, max_new_tokens=8).token_ids
    assert eng.kv.stats()["hits"] == 1
    assert warm == cold == Engine(exported[0], Tokenizer.default()).generate(ids, max_new_tokens=8).token_ids
    eng.close()


def test_int4_experts_qmoe_cannot_run_are_refused(tmp_path):
    """int4-g128 experts: moe_intermediate_size 64 is not a multiple of the block, so no QMoE form."""
    model = tiny("int4-g128")
    with pytest.raises(UnsupportedWeightFormat, match="multiples of its block"):
        export_model(model, tmp_path / "x", progress=False)


def test_per_channel_linears_run_on_their_codes(tmp_path):
    """The default bundle recipe's fp8-e4m3-channel (and int8) linears: the stored codes, scaled in the graph."""
    model = tiny("int4-g32", "fp8-e4m3-channel")
    pack_one(model, "layers.2.attn.wq_b", "int8")
    m = export_model(model, tmp_path / "x", progress=False)
    assert {"fp8-e4m3-channel", "int8", "int4-g32"} <= set(m["weight_formats"]) and "fp32" not in m["weight_formats"]
    om = OnnxRuntimeBackend(threads=1).bind_model(model, tmp_path / "x")
    ids = torch.randint(2, 8000, (70,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (om(ids) - model(ids)).abs().max() < 1e-3
