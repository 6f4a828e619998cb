"""The conformance kit as pytest tests, for a backend vendor's own repository (and CI).

In the vendor's `conftest.py`:

    pytest_plugins = ["flashport.backends.pytest_plugin"]

    @pytest.fixture(scope="session")
    def flashport_backend():          # optional: without it, --flashport-backend NAME picks a registered one
        return MyBackend(device="mychip:0")

and in a test module:

    from flashport.backends.pytest_plugin import test_flashport_end_to_end, test_flashport_op  # noqa: F401

Each (op, case, weight format) of `conformance.CASES` becomes one test, `test_flashport_op[linear-decode...-int8]`;
ops and formats the backend does not claim are skipped (they fall back to the torch reference at run time).
The end-to-end test runs flash-tiny with fp32 weights and with the first quantized format the backend claims.
Options: --flashport-backend NAME (default torch), --flashport-device D, --flashport-max-context N.
Tolerances are the kit's (`conformance.TOLERANCES`): a vendor cannot loosen them from its own repository.
"""

from __future__ import annotations

import pytest

from .conformance import (CASES, DEFAULT_MAX_CONTEXT, IN_GRAPH, capabilities, claimed, e2e_formats,
                          effective_max_context, end_to_end, run_case)
from .contract import OPS, WEIGHT_FORMATS


def pytest_addoption(parser):
    group = parser.getgroup("flashport", "flashport backend conformance")
    group.addoption("--flashport-backend", default="torch", help="registered backend name (or module:factory)")
    group.addoption("--flashport-device", default=None, help="device passed to the backend's factory")
    group.addoption("--flashport-max-context", type=int, default=DEFAULT_MAX_CONTEXT,
                    help="cap on the long-context cases (default %(default)s)")


@pytest.fixture(scope="session")
def flashport_backend(request):
    """The backend under test; override this fixture to hand in an instance."""
    from .registry import create, load_factory

    name, device = request.config.getoption("--flashport-backend"), request.config.getoption("--flashport-device")
    options = {"device": device} if device else {}
    return load_factory(name)(**options) if ":" in name else create(name, **options)


@pytest.fixture(scope="session")
def flashport_claims(flashport_backend):
    return claimed(flashport_backend)


@pytest.fixture(scope="session")
def flashport_max_context(request, flashport_backend):
    return effective_max_context(capabilities(flashport_backend), request.config.getoption("--flashport-max-context"))


def _case_params():
    for case in CASES:
        for fmt in (WEIGHT_FORMATS if OPS[case.op] else (None,)):
            label = case.label.replace(" ", "_")
            yield pytest.param((case, fmt), id=f"{case.op}-{label}" + (f"-{fmt}" if fmt else ""))


def pytest_generate_tests(metafunc):
    if "flashport_case" in metafunc.fixturenames:
        metafunc.parametrize("flashport_case", list(_case_params()))
    if "flashport_e2e_weights" in metafunc.fixturenames:
        metafunc.parametrize("flashport_e2e_weights", ["fp32", "quantized"])


def test_flashport_op(flashport_backend, flashport_claims, flashport_max_context, flashport_case):
    """One op on one case (and weight format) against the torch reference, within the declared tolerance."""
    case, fmt = flashport_case
    if capabilities(flashport_backend).whole_step:
        pytest.skip(f"{flashport_backend.name}: {case.op} {IN_GRAPH}")
    if fmt not in flashport_claims.get(case.op, ()):
        pytest.skip(f"{flashport_backend.name} does not claim {case.op}" + (f" for {fmt}" if fmt else "")
                    + ": it falls back to the torch reference")
    res = run_case(flashport_backend, case, fmt, flashport_max_context)
    assert res.passed, res.error or f"{res.id}: max abs error {res.max_abs:.3g} > bound {res.bound:.3g}"


def test_flashport_end_to_end(flashport_backend, flashport_e2e_weights):
    """flash-tiny through the backend (with fallback): logits within tolerance of the reference, greedy tokens
    equal."""
    fmts = e2e_formats(flashport_backend, capabilities(flashport_backend))
    if flashport_e2e_weights == "quantized" and len(fmts) < 2:
        pytest.skip("the backend claims none of the quantized formats the end-to-end check uses")
    res = end_to_end(flashport_backend, fmt=fmts[0] if flashport_e2e_weights == "fp32" else fmts[1])
    assert res["greedy_equal"], f"greedy tokens differ: {res['backend_tokens']} vs {res['reference_tokens']}"
    assert res["passed"], f"logits max abs error {res['max_abs']:.3g} > bound {res['bound']:.3g}"
