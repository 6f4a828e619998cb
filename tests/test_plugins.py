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
    assert any(op == "moe" for op, _ in eng.model.ops.fallbacks)  # what it lacks fell back, logged once
    assert ("linear", "mxfp4") in eng.model.ops.fallbacks  # the release's packed weights: not in its claim


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
    with pytest.raises(BackendError, match="libvendor_rt"):
        create("broken")
    assert create("auto").name == "torch"  # no plugin without a conformance record is considered, none imported
    assert "fake_broken" not in sys.modules and "fake_wrong" not in sys.modules


def test_plugin_with_a_wrong_op_fails_conformance(fake_dist, tmp_path):
    from flashport.backends.conformance import conformance_cli

    report = tmp_path / "wrong.json"
    with pytest.raises(SystemExit) as e:
        conformance_cli("wrong", report=str(report), e2e=False)
    assert e.value.code == 1
    assert "fake_broken" not in sys.modules  # the kit imported the backend it checks, no other plugin
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
    env = dict(os.environ, PYTHONPATH=str(target), OMP_NUM_THREADS="1", FLASHPORT_CACHE=str(tmp_path / "cache"))
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
    assert (tmp_path / "cache" / "conformance" / "opencl-flashport_opencl-0.1.0.json").exists()  # auto may pick it


# -- plugins that fail in each way: none of them takes flashport (or another backend) down --------------------------
HOSTILE = {
    "hostile_exit.py": '''
        import sys
        sys.exit(3)
    ''',
    "hostile_crash.py": '''
        import ctypes
        ctypes.string_at(0)  # a segfault at import, as a broken native extension does
    ''',
    "hostile_abort.py": '''
        import os
        os.abort()
    ''',
    "hostile_caps.py": '''
        from flashport.backends.torch_backend import TorchBackend

        class CapsRaise(TorchBackend):
            name = "badcaps"
            priority = 100
            def capabilities(self):
                raise RuntimeError("driver query failed")
    ''',
    "hostile_off.py": '''
        from flashport.backends.contract import Capabilities
        from flashport.backends.torch_backend import TorchBackend

        class OnePercentOff(TorchBackend):
            name = "off"
            priority = 100
            def capabilities(self):
                return Capabilities(ops={"rms_norm": True})
            @staticmethod
            def rms_norm(x, weight, eps):
                return TorchBackend.rms_norm(x, weight, eps) * 1.01
    ''',
    "hostile_fine.py": '''
        from flashport.backends.contract import Capabilities
        from flashport.backends.torch_backend import TorchBackend

        class Fine(TorchBackend):
            name = "fine"
            priority = 90
            def capabilities(self):
                return Capabilities(ops={"rms_norm": True})
    ''',
    "hostile_flaky.py": '''
        from flashport.backends.contract import Capabilities
        from flashport.backends.torch_backend import TorchBackend

        class Flaky(TorchBackend):
            """Exact until its 20th rms_norm, then raises on every call (a leak, a driver reset...)."""
            name = "flaky"
            def __init__(self, **kw):
                super().__init__(**kw)
                self.calls = 0
            def capabilities(self):
                return Capabilities(ops={"rms_norm": True, "linear": {"fp32"}})
            def rms_norm(self, x, weight, eps):
                self.calls += 1
                if self.calls > 20:
                    raise RuntimeError("device lost")
                return TorchBackend.rms_norm(x, weight, eps)
    ''',
}


def _install_dist(root: Path, name: str, version: str, plugins: dict[str, str], eps: dict[str, str]) -> None:
    for fname, src in plugins.items():
        (root / fname).write_text(textwrap.dedent(src))
    info = root / f"{name.replace('-', '_')}-{version}.dist-info"
    shutil.rmtree(info, ignore_errors=True)
    for old in root.glob(f"{name.replace('-', '_')}-*.dist-info"):
        shutil.rmtree(old)
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = "\n".join(f"{k} = {v}" for k, v in eps.items())
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{lines}\n")


@pytest.fixture
def hostile(tmp_path, monkeypatch):
    """An installed distribution 'hostile-plugins' and an empty flashport cache ($FLASHPORT_CACHE)."""
    site = tmp_path / "site"
    site.mkdir()
    _install_dist(site, "hostile-plugins", "1.0", HOSTILE, {
        "exiter": "hostile_exit:Backend", "crasher": "hostile_crash:Backend", "aborter": "hostile_abort:Backend",
        "badcaps": "hostile_caps:CapsRaise", "off": "hostile_off:OnePercentOff", "fine": "hostile_fine:Fine",
        "flaky": "hostile_flaky:Flaky"})
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("FLASHPORT_CACHE", str(tmp_path / "cache"))
    yield site
    for mod in [m for m in sys.modules if m.startswith("hostile_")]:
        sys.modules.pop(mod, None)


def _flashport(site: Path, *args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "flashport.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_plugins_that_exit_or_crash_at_import_do_not_take_flashport_down(hostile, tiny_release):
    # naming a backend imports only that one: the built-ins work beside plugins that kill their importer
    r = _flashport(hostile, "generate", str(tiny_release), "--prompt", "hi", "--max-new-tokens", "2", "--backend",
                   "torch", "--json")
    assert r.returncode == 0, r.stderr
    code = "from flashport.backends import create; print(create('auto').name)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(hostile)))
    assert r.returncode == 0 and r.stdout.strip() == "torch", r.stderr
    # the listing probes each plugin in a subprocess and says what each one did
    r = _flashport(hostile, "backends")
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line for line in r.stdout.splitlines() if line and not line.startswith(" ")}
    assert "ok" in rows["torch"] and "ok" in rows["fine"]
    assert "broken" in rows["exiter"] and "sys.exit(3)" in rows["exiter"]
    assert "broken" in rows["crasher"] and "SIGSEGV" in rows["crasher"] and "at import" in rows["crasher"]
    assert "broken" in rows["aborter"] and "SIGABRT" in rows["aborter"]
    assert "broken" in rows["badcaps"] and "capabilities() raised" in rows["badcaps"]
    # named in this process, a plugin's sys.exit becomes one error
    with pytest.raises(BackendError, match=r"exiter.*sys\.exit\(3\)"):
        create("exiter")


def test_plugin_whose_capabilities_raise_is_refused_and_skipped_once(hostile, tiny_release):
    from flashport.backends.registry import write_record
    from flashport.engine import Engine

    with pytest.raises(BackendError, match=r"badcaps.*capabilities\(\) raised RuntimeError: driver query failed"):
        create("badcaps")
    write_record("badcaps", True, {})  # even with a (stale) passing record, auto skips it with one warning
    with pytest.warns(RuntimeWarning) as record:
        eng = Engine.load(tiny_release, backend="auto")
    assert eng.model.ops.backend.name == "torch"
    assert [str(w.message) for w in record if "badcaps" in str(w.message)] == [
        next(str(w.message) for w in record if "badcaps" in str(w.message))]
    assert "capabilities() raised" in str(record[0].message)
    r = _flashport(hostile, "conformance", "badcaps")  # the kit: one line, no traceback
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "capabilities() raised" in r.stderr


def test_auto_picks_a_plugin_only_with_a_passing_conformance_record(hostile):
    from flashport.backends.conformance import conformance_cli
    from flashport.backends.registry import conformance_record

    assert create("auto").name == "torch"  # 'off' (priority 100) and 'fine' (90) have no record yet
    assert "hostile_off" not in sys.modules
    with pytest.raises(SystemExit) as e:  # RMSNorm 1% off: fails the kit, and the failure is recorded
        conformance_cli("off")
    assert e.value.code == 1
    ok, why = conformance_record("off")
    assert not ok and "failed conformance" in why
    conformance_cli("fine")
    assert create("auto").name == "fine"
    # a new plugin version (or another flashport) invalidates the record
    _install_dist(hostile, "hostile-plugins", "1.1", {}, {"off": "hostile_off:OnePercentOff",
                                                          "fine": "hostile_fine:Fine"})
    assert not conformance_record("fine")[0]  # records are per (flashport version, plugin version)
    assert create("auto").name == "torch"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the listing's warnings about the other hostile plugins
def test_op_that_raises_at_run_time_falls_back_and_marks_the_backend_degraded(hostile, tiny_release, caplog):
    from flashport.backends.dispatch import REFERENCE
    from flashport.backends.explain import list_backends
    from flashport.engine import Engine

    eng = Engine.load(tiny_release, backend="flaky")
    ref = Engine.load(tiny_release, backend="torch")
    ref.model.set_ops(REFERENCE)
    ids = [0, 5, 9, 200, 31, 7] * 4
    with caplog.at_level("WARNING", logger="flashport.backends"):
        a = eng.generate(ids, max_new_tokens=6)  # rms_norm raises from its 21st call on: mid-prefill
        b = eng.generate(ids, max_new_tokens=6)
    assert eng.model.ops.backend.calls > 20
    expect = ref.generate(ids, max_new_tokens=6)
    assert a.token_ids == b.token_ids == expect.token_ids  # the reference took over, exactly
    assert eng.model.ops.degraded == ["rms_norm"]
    assert len([r for r in caplog.records if "raised" in r.getMessage()]) == 1  # logged once
    assert ref.model.ops.degraded == []
    listing = list_backends()
    row = next(line for line in listing.splitlines() if line.startswith("flaky"))
    assert "degraded" in row and "device lost" in listing
