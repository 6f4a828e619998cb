"""A --device the backend cannot use is refused when the backend is created, before any weight is read, naming
the device: the torch backend failed at the first weight upload with torch's bare `AssertionError: Torch not
compiled with CUDA enabled`, and the onnxruntime backend's CPU execution provider silently ran a `--device cuda:0`
model on the CPU."""

import pytest
import torch

from flashport.backends import BackendError
from flashport.backends.torch_backend import TorchBackend, check_device
from flashport.cli import main


def _unusable_cuda() -> str:
    return "cuda:0" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"


def test_torch_backend_refuses_a_device_torch_cannot_use():
    dev = _unusable_cuda()
    with pytest.raises(BackendError, match=dev):
        TorchBackend(dev)
    check_device(torch.device("cpu"))
    TorchBackend("cpu")


def test_onnxruntime_cpu_provider_refuses_another_device():
    pytest.importorskip("onnxruntime")
    from flashport.backends.onnx_backend import OnnxRuntimeBackend

    with pytest.raises(BackendError, match="CPUExecutionProvider runs on the CPU"):
        OnnxRuntimeBackend(device="cuda:0")
    assert OnnxRuntimeBackend(device="cpu").devices()[0].name == "cpu"


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_cli_refuses_before_loading(tiny_release, backend, capsys, monkeypatch):
    import flashport.engine

    def no_load(*a, **k):
        raise AssertionError("the weights were read before the refusal")

    monkeypatch.setattr(flashport.engine, "open_model", no_load)
    dev = _unusable_cuda()
    rc = main(["generate", str(tiny_release), "--prompt", "hi", "--backend", backend, "--device", dev])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("flashport: error: ") and "\n" not in err and dev in err, (rc, err)
