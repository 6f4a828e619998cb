"""One loader for every format, and what a model directory without its tokenizer means: token ids work, text is
one clear error (no stand-in tokenizer silently producing ids the model was never trained on)."""

import shutil

import pytest
import torch

from flashport import load_engine
from flashport.checkpoint import CheckpointError
from flashport.cli import main
from flashport.engine import RequestError
from flashport.loader import open_model
from flashport.options import OptionError, engine_options, flags_of


def test_token_ids_work_without_a_tokenizer(no_tokenizer, tiny_release):
    ref = load_engine(tiny_release, backend="torch")
    eng = load_engine(no_tokenizer, backend="torch")
    assert eng.tokenizer is None
    ids = [0, 17, 400, 23, 9]
    assert torch.equal(eng.logits(ids), ref.logits(ids))
    out = eng.generate(ids, max_new_tokens=4)
    assert out.token_ids == ref.generate(ids, max_new_tokens=4).token_ids and out.text == ""


def test_text_without_a_tokenizer_is_one_clear_error(no_tokenizer, capsys):
    eng = load_engine(no_tokenizer, backend="torch")
    with pytest.raises(RequestError, match="no tokenizer.json"):
        eng.generate("hello", max_new_tokens=2)
    with pytest.raises(RequestError, match="no tokenizer.json"):
        eng.generate([0, 5], max_new_tokens=2, stream=True)
    assert main(["generate", str(no_tokenizer), "--prompt", "hello"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flashport: error:") and "tokenizer.json" in err and "\n" not in err


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tiny_release, tmp_path):
    import json

    d = tmp_path / "ck"
    shutil.copytree(tiny_release, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["vocab_size"] = 1000  # the shipped tokenizer has 8192 ids
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="8192 ids.*only 1000"):
        open_model(d)


def test_open_model_detects_the_format(tiny_release, tiny_hf, tmp_path):
    assert open_model(tiny_release).kind == "release"
    assert open_model(tiny_hf).kind == "hf"
    with pytest.raises(FileNotFoundError):
        open_model(tmp_path / "missing")


def test_keep_expert_leaves_placeholders(tiny_release):
    loaded = open_model(tiny_release, keep_expert=lambda prefix, e: e == 0)
    moe = loaded.model.layers[0].ffn
    assert moe.experts[0].w1.packed.tensors  # read, and kept in the release's MXFP4 bytes
    assert moe.experts[1].w1.weight.numel() == 0 and moe.experts[1].w1.packed.tensors == {}


def test_release_weights_stay_packed_and_dequantize_exactly(tiny_release):
    """A release checkpoint's FP8 / MXFP4 Linears keep their stored bytes (no fp32 copy), which dequantize to
    exactly the fp32 weights of the unpacked path; a whole-step backend gets the fp32 path."""
    packed, dense = open_model(tiny_release).model, open_model(tiny_release, keep_packed=False).model
    for name in ("layers.0.attn.wq_a", "layers.3.ffn.experts.0.w1", "layers.2.ffn.shared_experts.w2"):
        lin, ref = packed.get_submodule(name), dense.get_submodule(name)
        assert lin.packed is not None and lin.weight.numel() == 0 and ref.packed is None
        assert lin.packed.fmt in ("fp8-e4m3-block128-ue8m0", "fp8-e4m3-block128", "mxfp4")
        assert torch.equal(lin.packed.dequantize(), ref.weight)


def test_engine_options_from_flags():
    o = engine_options(backend="auto", execution_provider="CPUExecutionProvider", backend_option=["threads=2"],
                       kv_dir="kv", kv_strategy="full", max_device_memory="1GiB", ep=1)
    assert o.backend == "onnxruntime" and o.backend_options == {"ep": "CPUExecutionProvider", "threads": "2"}
    assert o.kv.strategy == "full" and o.offload.max_device_memory == 1 << 30 and o.parallel is None
    for bad in (dict(kv_strategy="full"), dict(offload_tier="disk"), dict(backend_option=["novalue"]),
                dict(ep="cpu"), dict(backend="torch", execution_provider="CUDAExecutionProvider"),
                dict(kv_dir="kv", kv_strategy="sometimes"), dict(max_device_memory="lots")):
        with pytest.raises(OptionError):
            engine_options(**bad)


def test_flags_of_repeats_a_call():
    def cmd(path, a: int = 1, b: str = "", c: bool = True, d: tuple = (), secret: str = ""):
        pass

    assert flags_of(cmd, {"path": "p", "a": 2, "b": "", "c": False, "d": ("x=1", "y=2"), "secret": "s"},
                    skip=("secret",)) == ["--a=2", "--noc", "--d=x=1", "--d=y=2"]
