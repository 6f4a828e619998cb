"""The exported decoder step declares the shapes ONNX Runtime infers: loading it logs no shape-merge warning (a
user saw `Error merging shape info for output 'selection_ties'` on every `--backend onnxruntime` run). The cause was
the class, not the output: every 0-d constant was stored as a [1] initializer."""

import numpy as np
import pytest

from flashport.backends.dispatch import Ops
from flashport.backends.onnx_export import DATA, GRAPH, Graph, export_model
from flashport.backends.torch_backend import TorchBackend
from flashport.checkpoint import init_weights
from flashport.config import ModelConfig
from flashport.model import Transformer

ort = pytest.importorskip("onnxruntime")


def test_scalar_constants_stay_scalars(tmp_path):
    g = Graph(tmp_path / DATA)
    try:
        names = {"f": g.f(0.0), "i": g.const(3), "v": g.const([3]), "m": g.weight("m", np.zeros((2, 3), np.float32))}
        dims = {t.name: list(t.dims) for t in g.inits}
    finally:
        g.close()
    assert dims[names["f"]] == [] and dims[names["i"]] == []
    assert dims[names["v"]] == [1] and dims[names["m"]] == [2, 3]


def test_ort_loads_the_step_without_shape_warnings(tmp_path, capfd):
    cfg = ModelConfig.preset("flash-tiny")
    model = Transformer(cfg)
    model.load_state_dict(init_weights(cfg, 0))
    model.set_ops(Ops(TorchBackend()))
    export_model(model, tmp_path, progress=False)
    capfd.readouterr()
    opts = ort.SessionOptions()
    opts.log_severity_level = 1  # warnings and above, as a user's run shows them
    ort.InferenceSession(str(tmp_path / GRAPH), opts, providers=["CPUExecutionProvider"])
    err = capfd.readouterr().err
    assert "MergeShapeInfo" not in err and "Error merging shape info" not in err, err
