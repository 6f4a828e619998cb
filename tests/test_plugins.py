"""Out-of-tree backends through the `flashport.backends` entry points: a fake installed distribution (a
dist-info with entry_points.txt on sys.path) holding a working plugin, one that fails at import, one built for
another contract major version, and one with a wrong op; then the real sample plugin (samples/opencl_plugin),
pip-installed into a temporary target, through the CLI."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from flashport.backends import BackendError
from flashport.backends.registry import ENTRY_POINT_GROUP, create, discover

ROOT = Path(__file__).resolve().parents[1]

PLUGINS = {
    "fake_good.py": '''
        from flashport.backends.contract import Capabilities
        from flashport.backends.torch_backend import TorchBackend

        class GoodBackend(TorchBackend):
            name = "good"
            priority = 1
            def capabilities(self):
                return Capabilities(ops={"rms_norm": True, "rope": True, "linear": {"fp32"}})
    ''',
    "fake_broken.py": '''
        raise ImportError("libvendor_rt.so.3: cannot open shared object file")
    ''',
    "fake_future.py": '''
        from flashport.backends.torch_backend import TorchBackend

        class FutureBackend(TorchBackend):
            api_version = (2, 0)
    ''',
    "fake_wrong.py": '''
        from flashport.backends import reference
        from flashport.backends.contract import Capabilities
        from flashport.backends.torch_backend import TorchBackend

        class WrongBackend(TorchBackend):
            name = "wrong"
            priority = 1
            def capabilities(self):
                return Capabilities(ops={"rms_norm": True})
            @staticmethod
            def rms_norm(x, weight, eps):  # the mean over D - 1: plausible, and wrong
                return x * (x.square().sum(-1, keepdim=True) / (x.shape[-1] - 1) + eps).rsqrt() * weight
    ''',
}
ENTRY_POINTS = f"""
[{ENTRY_POINT_GROUP}]
good = fake_good:GoodBackend
broken = fake_broken:BrokenBackend
future = fake_future:FutureBackend
wrong = fake_wrong:WrongBackend
"""


@pytest.fixture
def fake_dist(tmp_path, monkeypatch):
    """An installed distribution 'vendor-plugins' (dist-info on sys.path) with four entry points."""
    for name, src in PLUGINS.items():
        (tmp_path / name).write_text(textwrap.dedent(src))
    info = tmp_path / "vendor_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vendor-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for mod in ("fake_good", "fake_broken", "fake_future", "fake_wrong"):
        sys.modules.pop(mod, None)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # from the broken and future plugins: checked below
def test_working_plugin_is_found_and_runs_a_model(fake_dist, tiny_release):
    from flashport.backends.dispatch import REFERENCE
    from flashport.backends.explain import list_backends
    from flashport.engine import Engine

    found = discover()
    listing = list_backends()
    assert found["good"].available and found["good"].source == "vendor-plugins"
    assert "good" in listing and "rms_norm" in listing
    assert found["torch"].available
    eng = Engine.load(tiny_release, backend="good")
    assert eng.model.ops.backend.name == "good"
    ids = [0, 5, 9, 200, 31, 7] * 6
    ref = Engine.load(tiny_release, backend="good")
    ref.model.set_ops(REFERENCE)
    assert torch.equal(eng.logits(ids), ref.logits(ids))  # a subclass of the reference-backed torch backend
    assert ("moe", "fp32") in eng.model.ops.fallbacks  # what it lacks fell back, logged once


def test_plugin_failing_at_import_warns_and_the_rest_works(fake_dist):
    with pytest.warns(RuntimeWarning) as record:
        found = discover()
    messages = [str(w.message) for w in record]
    broken = [m for m in messages if "'broken'" in m]
    assert len(broken) == 1 and "vendor-plugins" in broken[0] and "libvendor_rt.so.3" in broken[0]
    future = [m for m in messages if "'future'" in m]
    assert len(future) == 1 and "(2, 0)" in future[0]
    assert not found["broken"].available and not found["future"].available
    assert found["good"].available and found["torch"].available
    with pytest.warns(RuntimeWarning):
        with pytest.raises(BackendError, match="libvendor_rt"):
            create("broken")
    with pytest.warns(RuntimeWarning):
        assert create("auto").name == "torch"  # the plugins' low priority and the broken one do not matter


def test_plugin_with_a_wrong_op_fails_conformance(fake_dist, tmp_path):
    from flashport.backends.conformance import conformance_cli

    report = tmp_path / "wrong.json"
    with pytest.warns(RuntimeWarning), pytest.raises(SystemExit) as e:
        conformance_cli("wrong", report=str(report), e2e=False)
    assert e.value.code == 1
    data = json.loads(report.read_text())
    assert not data["passed"] and data["per_op"]["rms_norm"]["passed"] is False
    assert "linear" in data["fallback_ops"]


def _has_opencl() -> bool:
    """pyopencl and a device whose driver compiles a kernel: PyPI's PoCL (LLVM 14) lists AMD Zen 4/5 CPUs but
    cannot compile for them ("unknown target CPU 'generic'"); the Makefile installs the distribution's PoCL."""
    if importlib.util.find_spec("pyopencl") is None:
        return False
    try:
        import pyopencl as cl

        for dev in (d for p in cl.get_platforms() for d in p.get_devices()):
            try:
                cl.Program(cl.Context([dev]), "__kernel void k(__global float *a) { a[0] = 1.0f; }").build()
                return True
            except cl.Error:
                continue
        return False
    except Exception:  # noqa: BLE001 - no ICD, no platform
        return False


@pytest.mark.skipif(not _has_opencl(), reason="needs pyopencl and an OpenCL driver that compiles for this "
                                               "CPU (pip install pyopencl pocl-binary-distribution, or on a CPU "
                                               "newer than its LLVM: apt install pocl-opencl-icd)")
def test_opencl_sample_plugin_installs_and_passes_conformance(tmp_path):
    """`pip install samples/opencl_plugin`, then `flashport backends` and `flashport conformance opencl`."""
    target, src = tmp_path / "site", tmp_path / "src"
    shutil.copytree(ROOT / "samples" / "opencl_plugin", src, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                          "--target", str(target), str(src)],  # a copy: the build leaves build/ and egg-info
                         capture_output=True, text=True, timeout=300)
    assert pip.returncode == 0, pip.stderr
    assert (target / "flashport_opencl" / "kernels.cl").exists()
    env = dict(os.environ, PYTHONPATH=str(target), OMP_NUM_THREADS="1")
    cli = [sys.executable, "-m", "flashport.cli"]
    listing = subprocess.run(cli + ["backends"], capture_output=True, text=True, env=env, timeout=300)
    assert "opencl" in listing.stdout and "flashport-opencl" in listing.stdout, listing.stdout + listing.stderr
    report = tmp_path / "opencl.json"
    run = subprocess.run(cli + ["conformance", "opencl", "--report", str(report)], capture_output=True, text=True,
                         env=env, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    data = json.loads(report.read_text())
    assert data["passed"]
    assert {"linear(int8)", "moe(int8)", "rms_norm", "rope"} == set(data["per_op"])
    assert data["per_op"]["rope"]["bit_exact"]  # FP_CONTRACT OFF: the same roundings as the reference
    assert [e["weights"] for e in data["end_to_end"]] == ["fp32", "int8"]
