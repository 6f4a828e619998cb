"""The conformance kit: it passes the torch and Triton (interpreter) backends, and catches wrong, in-place and
crashing ops, end-to-end divergence, and a broken backend through the vendor-facing pytest plugin."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from flashport.backends import conformance as C
from flashport.backends import reference
from flashport.backends.contract import OPS, Capabilities
from flashport.backends.torch_backend import TorchBackend



def test_tolerance_table_covers_every_op_and_case():
    assert set(C.TOLERANCES) == set(OPS)
    assert {c.op for c in C.CASES} == set(OPS)
    labels = " ".join(c.label for c in C.CASES)
    for edge in ("T=1", "gets no token", "not a multiple of the group", "sees no key", "longest claimed context"):
        assert edge in labels


def test_ulp_distance():
    a = torch.tensor([1.0, 1.0, 0.0, -0.0, -1.0, float("inf")])
    b = torch.tensor([1.0, torch.nextafter(torch.tensor(1.0), torch.tensor(2.0)).item(), -0.0, 0.0,
                      torch.nextafter(torch.tensor(-1.0), torch.tensor(0.0)).item(), float("inf")])
    assert C.ulp_distance(a, b).tolist() == [0, 1, 0, 0, 1, 0]
    tiny = torch.tensor([1e-45])  # the smallest subnormal, one ulp from zero; +-tiny are 2 apart
    assert C.ulp_distance(tiny, -tiny).item() == 2


def test_torch_backend_passes_bit_exact():
    rep = C.run(TorchBackend(), formats=["int8"], e2e=False, progress=False)
    assert rep.passed, rep.summary()
    assert all(c.bit_exact for c in rep.cases)  # the torch backend IS the reference
    ops = {c.op for c in rep.cases}
    assert ops == set(OPS) and not rep.fallback_ops
    e2e = C.end_to_end(TorchBackend(), prompt_len=40, new_tokens=3)
    assert e2e["passed"] and e2e["greedy_equal"] and e2e["max_abs"] == 0
    data = rep.to_json()
    json.dumps(data)  # serializable
    assert data["per_op"]["linear(int8)"]["cases"] == 3 and data["tolerances"]["linear"]["rtol"] > 0


class WrongNorm(TorchBackend):
    """Claims everything; rms_norm forgets eps and scales by 1.001 (a plausible porting bug)."""

    name = "wrong-norm"

    @staticmethod
    def rms_norm(x, weight, eps):
        return reference.rms_norm(x, weight, 0.0) * 1.001


class InPlaceRope(TorchBackend):
    name = "inplace-rope"

    @staticmethod
    def rope(x, cos, sin, inverse=False):
        out = reference.rope(x, cos, sin, inverse)
        x.copy_(out)  # writes its input: a SeqState snapshot would change under the caller
        return out


class CrashOnEmptyExpert(TorchBackend):
    name = "crash-moe"

    @staticmethod
    def moe(x, weights, idx, experts, limit):
        if len(idx.unique()) < len(experts):  # assumes every expert has tokens
            raise IndexError("expert without tokens")
        return reference.moe(x, weights, idx, experts, limit)


@pytest.mark.parametrize("backend, op, why", [
    (WrongNorm(), "rms_norm", "max abs"),
    (InPlaceRope(), "rope", "in place"),
    (CrashOnEmptyExpert(), "moe", "IndexError"),
])
def test_broken_ops_fail(backend, op, why):
    rep = C.run(backend, e2e=False, ops=[op], formats=["fp32"], progress=False)
    assert not rep.passed
    failed = [c for c in rep.cases if not c.passed]
    assert failed and all(c.op == op for c in failed)
    assert why in rep.summary()


def test_end_to_end_catches_a_small_attention_error():
    class SinkIgnored(TorchBackend):  # the op looks almost right; only the model-level check sees it
        name = "sink-ignored"

        @staticmethod
        def attention(q, keys, bias, sink, scale):
            return reference.attention(q, keys, bias, sink * 0.999, scale)

    res = C.end_to_end(SinkIgnored(), prompt_len=40, new_tokens=2)
    assert not res["passed"] and res["max_abs"] > res["bound"]


def test_claims_respect_capabilities():
    class Partial(TorchBackend):
        def capabilities(self):
            return Capabilities(ops={"linear": {"int8", "not-a-format"}, "rms_norm": True, "rope": False})

    todo = C.claimed(Partial())
    assert todo == {"linear": ["int8"], "rms_norm": [None]}
    caps = Capabilities(max_context=1 << 20)
    assert C.effective_max_context(caps, 4096) == 4096
    assert C.effective_max_context(Capabilities(max_context=1000), 4096) == 1000


def test_cli_writes_report_and_exits_nonzero(tmp_path, capsys):
    out = tmp_path / "r.json"
    C.conformance_cli("torch", report=str(out), e2e=False, ops="rms_norm,rope")
    data = json.loads(out.read_text())
    assert data["passed"] and {c["op"] for c in data["cases"]} == {"rms_norm", "rope"}
    bad = tmp_path / "bad.json"
    with pytest.raises(SystemExit) as e:
        C.conformance_cli(f"{__name__}:WrongNorm", report=str(bad),
                          e2e=False, ops="rms_norm")
    assert e.value.code == 1
    assert not json.loads(bad.read_text())["passed"]
    with pytest.raises(ValueError, match="unknown op"):
        C.conformance_cli("torch", e2e=False, ops="matmul")


def test_triton_interpreter_passes():
    pytest.importorskip("triton")
    from flashport.backends.registry import create

    b = create("triton")  # conftest sets TRITON_INTERPRET=1
    rep = C.run(b, e2e=False, formats=["int4-g32-asym", "mxfp4"], max_context=4096, progress=False)
    assert rep.passed, rep.summary()
    native = {c.op for c in rep.cases}
    assert {"linear", "grouped_linear", "moe", "attention", "rms_norm", "rope", "compress_pool"} <= native
    assert any(c.op == "rope" and c.bit_exact for c in rep.cases)  # documented bit-exact


@pytest.mark.slow
def test_triton_interpreter_end_to_end():
    pytest.importorskip("triton")
    from flashport.backends.registry import create

    res = C.end_to_end(create("triton"), fmt="int4-g32", prompt_len=34, new_tokens=2)
    assert res["passed"] and res["greedy_equal"], res
    assert "linear(int4-g32)" not in res["fallback_ops"]


def test_pytest_plugin_in_a_vendor_repo(tmp_path):
    """The plugin as a vendor uses it: a conftest that hands in a backend, a test module importing the tests."""
    (tmp_path / "conftest.py").write_text(textwrap.dedent(f"""
        import pytest
        from flashport.backends import reference
        from flashport.backends.torch_backend import TorchBackend
        pytest_plugins = ["flashport.backends.pytest_plugin"]

        class Vendor(TorchBackend):
            name = "vendor"
            def capabilities(self):
                from flashport.backends.contract import Capabilities
                return Capabilities(ops={{"linear": {{"int8"}}, "rms_norm": True, "rope": True}})
            @staticmethod
            def rope(x, cos, sin, inverse=False):
                return reference.rope(x, cos, sin, not inverse)  # the sign of the rotation is wrong

        @pytest.fixture(scope="session")
        def flashport_backend():
            return Vendor()
    """))
    (tmp_path / "test_vendor.py").write_text(
        "from flashport.backends.pytest_plugin import test_flashport_op  # noqa: F401\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "linear or rope or rms",
                        str(tmp_path)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "3 failed" in out and "6 passed" in out, out  # rope's 3 cases fail; linear(int8) x3 + rms_norm x3 pass
    assert "test_flashport_op[rope-" in out


def test_unknown_format_or_nothing_to_check_is_refused(capsys):
    from flashport.cli import main

    assert main(["conformance", "torch", "--formats", "fp3"]) == 2  # the CLI refuses it before anything runs
    err = capsys.readouterr().err.strip()
    assert err.startswith("flashport: error: ") and "fp3" in err and len(err.splitlines()) == 1
    with pytest.raises(ValueError, match=r"unknown weight format\(s\) fp3"):  # and so does the kit's own entrance
        C.conformance_cli("torch", formats="fp3")

    class NormOnly(TorchBackend):
        def capabilities(self):
            return Capabilities(ops={"rms_norm": True})

    with pytest.raises(ValueError, match="nothing to check"):  # not "0 cases, PASSED"
        C.run(NormOnly(), e2e=False, ops=["linear"], progress=False)


def test_capabilities_raising_is_one_error_not_a_traceback():
    from flashport.backends import BackendError

    class Broken(TorchBackend):
        name = "broken-caps"

        def capabilities(self):
            raise OSError("no device node")

    with pytest.raises(BackendError, match=r"broken-caps.*capabilities\(\) raised OSError: no device node"):
        C.run(Broken(), progress=False)


def test_whole_step_backend_passes_end_to_end():
    """`flashport conformance onnxruntime`: per-op cases run inside its step graph; end to end with fp32 and with
    a format its graph takes for linears and experts alike."""
    pytest.importorskip("onnxruntime")
    from flashport.backends.registry import create

    rep = C.run(create("onnxruntime", threads=1), e2e_prompt=40, e2e_tokens=2, progress=False)
    assert rep.passed, rep.summary()
    assert rep.whole_step and not rep.cases and not rep.fallback_ops
    assert all(v["in_step_graph"] and v["passed"] for v in rep.to_json()["per_op"].values())
    assert [e["weights"] for e in rep.end_to_end] == ["fp32", "int4-g32"]
    assert all(e["greedy_equal"] for e in rep.end_to_end)
    assert "runs inside the whole-step graph" in rep.summary()
