"""Every way to build an engine composes: {torch, triton, onnxruntime, a plugin} x {offload off, host, disk} x
{KV off, disk dir} x {one process, --ep 2} x {generate, chat, serve}. Each combination either gives the greedy
tokens of the plain run (same backend, no offload, no KV, one process), writing and then hitting the KV directory
when KV is on, or is refused before any work with one line naming both options.

The SDK level (`flashport.load_engine`) runs the full backend x offload x KV product in process; the entrances
(`flashport generate|chat|serve`) run one composed combination per backend through their own flag parsing; the
expert-parallel ranks run under torchrun (2 gloo ranks) through `flashport generate|serve --ep 2`."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

import flashport
from flashport import KVOptions, OffloadOptions, OptionError, ParallelOptions, load_engine
from flashport.cli import main
from flashport.export.bundle import export

PROMPT = "the quick brown fox jumps over the lazy dog. " * 8  # several KV blocks of flash-tiny (32 tokens)
NEW = 4
BACKENDS = ["torch", "triton", "onnxruntime", "matrixplug"]
OFFLOAD = {"off": None, "host": "host", "disk": "disk"}
WHOLE_STEP = {"onnxruntime"}
# The Triton kernels run through the interpreter on CPU machines (about a minute per combination here): there it
# takes the diagonal of the product below (its ops are the only backend-specific part; offload and KV compose the
# same way for every per-op backend). FLASHPORT_MATRIX_FULL=1 (or a CUDA device) runs the whole product.
FULL = os.environ.get("FLASHPORT_MATRIX_FULL") == "1"
TRITON_CPU = {("off", "off"), ("host", "dir"), ("disk", "off")}


def _skip_slow_triton(backend, combo):
    import torch

    if backend == "triton" and not FULL and not torch.cuda.is_available() and combo not in TRITON_CPU:
        pytest.skip("Triton interpreter on the CPU: the diagonal only (FLASHPORT_MATRIX_FULL=1 runs all)")

PLUGIN = '''
from flashport.backends.contract import Capabilities
from flashport.backends.torch_backend import TorchBackend

class MatrixPlugin(TorchBackend):
    """An out-of-tree per-op backend: norms and RoPE natively, everything else falls back to the reference."""
    name = "matrixplug"
    priority = 0
    def capabilities(self):
        return Capabilities(ops={"rms_norm": True, "rope": True, "linear": {"fp32"}})
'''


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    """An installed out-of-tree plugin (dist-info with a `flashport.backends` entry point) on sys.path and in
    PYTHONPATH for subprocesses."""
    d = tmp_path_factory.mktemp("plugin")
    (d / "matrixplug.py").write_text(textwrap.dedent(PLUGIN))
    info = d / "matrixplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: matrixplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[flashport.backends]\nmatrixplug = matrixplug:MatrixPlugin\n")
    sys.path.insert(0, str(d))
    yield d
    sys.path.remove(str(d))
    sys.modules.pop("matrixplug", None)


@pytest.fixture(scope="module")
def bundle(tiny_release, tmp_path_factory, plugin_dir):
    """An int4-experts bundle (the disk tier reads its shards) with its ONNX export beside it (bundle/onnx)."""
    out = tmp_path_factory.mktemp("matrix") / "bundle"
    export(tiny_release, out, "int4-experts", progress=False)
    from flashport.backends.onnx_export import export_cli

    export_cli(str(out), str(out / "onnx"))
    return out


@pytest.fixture(scope="module")
def plain(bundle):
    """Greedy tokens of the plain run per backend: no offload, no KV, one process."""
    out = {}
    for b in BACKENDS:
        eng = load_engine(bundle, backend=b)
        out[b] = eng.generate(PROMPT, max_new_tokens=NEW).token_ids
        eng.close()
    return out


def _budget(bundle, tier) -> int:
    eng = load_engine(bundle, backend="torch", offload=OffloadOptions(1 << 40, tier=tier))
    needs = eng.offload.needs
    eng.close()
    return needs.fixed + needs.experts // 4  # a quarter of the experts fit: the cache evicts


def _kv_files(d) -> int:
    return sum(1 for p in d.rglob("*") if p.is_file())


def test_plain_runs_agree_across_per_op_backends(plain):
    assert plain["torch"] == plain["matrixplug"] == plain["triton"]


@pytest.mark.parametrize("kv", ["off", "dir"])
@pytest.mark.parametrize("offload", list(OFFLOAD))
@pytest.mark.parametrize("backend", BACKENDS)
def test_sdk_combination(bundle, plain, backend, offload, kv, tmp_path):
    _skip_slow_triton(backend, (offload, kv))
    kv_opts = KVOptions(tmp_path / "kv", "full") if kv == "dir" else None
    off_opts = OffloadOptions(_budget(bundle, OFFLOAD[offload]), tier=OFFLOAD[offload]) if offload != "off" else None
    if backend in WHOLE_STEP and off_opts is not None:
        with pytest.raises(OptionError) as e:
            load_engine(bundle, backend=backend, kv=kv_opts, offload=off_opts)
        msg = str(e.value)
        assert "max device memory" in msg and f"backend {backend}" in msg and "\n" not in msg
        assert not (tmp_path / "kv").exists()  # refused before any work
        return
    eng = load_engine(bundle, backend=backend, kv=kv_opts, offload=off_opts)
    assert eng.generate(PROMPT, max_new_tokens=NEW).token_ids == plain[backend]
    if off_opts is not None:
        eng.offload.drain()
        assert eng.offload.stats()["evictions"] > 0
    if kv_opts is not None:
        eng.kv.flush()
        assert _kv_files(tmp_path / "kv") > 0
        eng.kv.drop_memory()  # the second run is served from the disk tier
        again = eng.generate(PROMPT, max_new_tokens=NEW)
        assert again.token_ids == plain[backend]
        assert again.timings["kv"]["loaded_tokens"] > 0 or eng.kv.stats()["hits"] > 0
    eng.close()


def _engine_flags(bundle, backend, kv_dir):
    """One composed combination: KV on, and (per-op backends) host-tier offload with a quarter of the experts."""
    flags = ["--backend", backend, "--kv-dir", str(kv_dir)]
    if backend not in WHOLE_STEP:
        flags += ["--max-device-memory", str(_budget(bundle, "host")), "--offload-tier", "host"]
    return flags


@pytest.mark.parametrize("backend", BACKENDS)
def test_generate_entrance(bundle, plain, backend, tmp_path, capsys):
    _skip_slow_triton(backend, "generate")
    argv = ["generate", str(bundle), "--prompt", PROMPT, "--max-new-tokens", str(NEW), "--json",
            *_engine_flags(bundle, backend, tmp_path / "kv")]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == plain[backend]
    assert _kv_files(tmp_path / "kv") > 0
    assert main(argv) == 0  # a second process's worth of work hits the disk cache and gives the same tokens
    assert json.loads(capsys.readouterr().out)["token_ids"] == plain[backend]


@pytest.mark.parametrize("backend", BACKENDS)
def test_chat_entrance(bundle, backend, tmp_path, monkeypatch, capsys):
    _skip_slow_triton(backend, "chat")
    lines = iter(["hello there", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", str(bundle), "--max-new-tokens", "3", "--temperature", "0",
                 *_engine_flags(bundle, backend, tmp_path / "kv")]) == 0
    out = capsys.readouterr().out
    assert "generated" in out  # one reply with its statistics line
    assert _kv_files(tmp_path / "kv") > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_serve_entrance(bundle, plain, backend, tmp_path, monkeypatch):
    """`flashport serve` with the engine flags: the served engine answers with the plain run's tokens."""
    _skip_slow_triton(backend, "serve")
    from fastapi.testclient import TestClient

    import flashport.server as server

    seen = {}

    def run_server(engine, host, port, api_key, log_level="info", shutdown_timeout=30.0, **options):
        with TestClient(server.create_app(engine, api_key=api_key, **options)) as client:
            r = client.post("/v1/completions", json={"model": "bundle", "prompt": PROMPT, "max_tokens": NEW, "temperature": 0})
            seen["status"], seen["body"] = r.status_code, r.json()
            seen["expected"] = engine.decode(plain[backend])

    monkeypatch.setattr(server, "run_server", run_server)
    assert main(["serve", str(bundle), *_engine_flags(bundle, backend, tmp_path / "kv")]) == 0
    assert seen["status"] == 200, seen["body"]
    assert seen["body"]["usage"]["completion_tokens"] == NEW
    assert seen["body"]["choices"][0]["text"] == seen["expected"]
    assert _kv_files(tmp_path / "kv") > 0


@pytest.mark.parametrize("argv,both", [
    (["--backend", "onnxruntime", "--ep", "2"], ("ep", "backend onnxruntime")),
    (["--max-device-memory", "1GiB", "--ep", "2"], ("max device memory", "ep")),
    (["--backend", "onnxruntime", "--max-device-memory", "1GiB"], ("max device memory", "backend onnxruntime")),
    (["--deterministic", "--backend", "onnxruntime"], ("deterministic", "backend onnxruntime")),
    (["--backend", "torch", "--execution-provider", "CPUExecutionProvider"], ("--execution-provider", "--backend")),
    (["--kv-strategy", "full"], ("--kv-strategy", "--kv-dir")),
])
@pytest.mark.parametrize("command", ["generate", "serve"])
def test_refused_combinations_name_both_options(bundle, command, argv, both, capsys):
    t0 = time.perf_counter()
    extra = ["--prompt", PROMPT] if command == "generate" else []
    assert main([command, str(bundle), *extra, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flashport: error:") and "\n" not in err, err
    assert all(b in err for b in both), err
    assert time.perf_counter() - t0 < 20  # refused up front: no torchrun, no model load


def test_chat_refuses_ep(bundle, capsys):
    assert main(["chat", str(bundle), "--ep", "2"]) == 2
    err = capsys.readouterr().err
    assert "chat" in err and "--ep 2" in err and "serve" in err


def test_unknown_execution_provider_lists_the_available_ones(bundle, capsys):
    assert main(["generate", str(bundle), "--prompt", "x", "--execution-provider", "NoSuchExecutionProvider"]) == 2
    err = capsys.readouterr().err
    assert "NoSuchExecutionProvider" in err and "CPUExecutionProvider" in err


# -- expert parallelism: 2 gloo ranks under torchrun, started by the CLI itself ---------------------------------
def _run(argv, env_extra=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "flashport.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.parametrize("backend,kv", [("torch", False), ("torch", True), ("matrixplug", True)])
def test_ep_generate(bundle, plain, plugin_dir, backend, kv, tmp_path):
    flags = ["--kv-dir", str(tmp_path / "kv")] if kv else []
    argv = ["generate", str(bundle), "--prompt", PROMPT, "--max-new-tokens", str(NEW), "--json", "--ep", "2",
            "--timeout", "60", "--backend", backend, *flags]
    env = {"PYTHONPATH": os.pathsep.join([str(plugin_dir), os.environ.get("PYTHONPATH", "")])}
    for attempt in range(2 if kv else 1):  # with KV: the second run is served from the cache the first wrote
        r = _run(argv, env)
        assert r.returncode == 0, r.stderr[-3000:]
        assert json.loads(r.stdout)["token_ids"] == plain[backend]
        if kv:
            assert _kv_files(tmp_path / "kv") > 0


def test_ep_serve_keeps_the_api_key_off_every_command_line(bundle, tmp_path):
    """`flashport serve --ep 2 --api-key-file F`: the ranks serve, a request with the key answers, one without is
    401, and no process's command line (torchrun, the ranks) holds the key."""
    import socket

    import httpx

    secret = "sk-matrix-" + os.urandom(6).hex()
    key_file = tmp_path / "key"
    key_file.write_text(secret + "\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "flashport.cli", "serve", str(bundle), "--ep", "2", "--port",
                             str(port), "--api-key-file", str(key_file), "--backend", "torch", "--kv-dir",
                             str(tmp_path / "kv"), "--max-queue", "4", "--timeout", "60"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(1)
            assert proc.poll() is None, proc.stderr.read()[-3000:]
        leaked = []
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
                except OSError:
                    continue
                if secret in cmdline:
                    leaked.append(cmdline.replace("\0", " "))
        assert not leaked, leaked
        url = f"http://127.0.0.1:{port}/v1/completions"
        body = {"model": "bundle", "prompt": PROMPT, "max_tokens": 2, "temperature": 0}
        assert httpx.post(url, json=body, timeout=60).status_code == 401
        r = httpx.post(url, json=body, headers={"Authorization": f"Bearer {secret}"}, timeout=120)
        assert r.status_code == 200, r.text
        assert _kv_files(tmp_path / "kv") > 0  # --kv-dir reached rank 0's engine
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
    assert flashport.__version__
