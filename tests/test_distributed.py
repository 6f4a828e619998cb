"""Expert parallelism with 2 gloo ranks on the CPU: same greedy tokens as one process, logits within the documented
tolerance, replicated experts used, and a rank killed mid-request makes the driver fail with a clear error fast.

Ranks run as subprocesses (each a fresh interpreter): one pair through the library (`load_engine(...,
parallel=ParallelOptions(2))`) with fault injection, one pair through `flashport generate --ep 2` (the real entry
point: it starts torchrun)."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from flashport.engine import Engine
from flashport.export.bundle import export

PROMPT = "once upon a time there was"
TOL = 1e-4  # max |logit diff| / max |logit|: only the order of the per-row expert sums differs


@pytest.fixture(scope="module")
def ep_bundle(tiny_release, tmp_path_factory):
    out = tmp_path_factory.mktemp("ep") / "bundle"
    m = export(tiny_release, out, "release", devices="npu:0=1GiB,npu:1=1GiB", progress=False)
    assert m["placement"]["mode"] == "ep"
    return out


@pytest.fixture(scope="module")
def single(ep_bundle):
    torch.set_num_threads(1)
    eng = Engine.load(ep_bundle, backend="torch")
    ids = eng.encode(PROMPT)
    return ids, eng.logits(ids), eng.generate(ids, max_new_tokens=6).token_ids


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WORKER = textwrap.dedent("""
    import json, os, sys, time, torch
    from safetensors.torch import save_file
    torch.set_num_threads(1)
    from flashport import ParallelOptions, load_engine
    from flashport.distributed import EPError
    bundle, out, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    engine = load_engine(bundle, backend="torch", parallel=ParallelOptions(2, "gloo", 20.0))
    runner = engine.ep_runner
    ep = runner.ep
    if ep.rank == 1:
        served = {"n": 0}
        moe = runner.moes[3]
        orig = moe.serve
        def serve(*a):  # dies in the middle of the third request (after the first two complete)
            served["n"] += 1
            if served["n"] == 1 + 6 + 2:  # logits: 1 step; generate 6 tokens: 1 prefill + 5 decode steps
                os._exit(7)
            return orig(*a)
        moe.serve = serve
        runner.follow()
    else:
        logits = engine.logits(ids)
        tokens = engine.generate(ids, max_new_tokens=6).token_ids
        rows = [m.rows_served for m in runner.moes]
        t0 = time.perf_counter()
        try:
            engine.generate(ids, max_new_tokens=6)
            err = None
        except EPError as e:
            err = str(e)
        dt = time.perf_counter() - t0
        try:
            engine.logits(ids)
            again = None
        except EPError as e:
            again = str(e)
        save_file({"logits": logits.contiguous()}, out + ".safetensors")
        json.dump({"tokens": tokens, "rows": rows, "error": err, "seconds": dt, "again": again}, open(out, "w"))
    ep.close()
""")


def test_two_ranks_match_single_process_and_survive_a_dead_rank(ep_bundle, single, tmp_path):
    ids, ref_logits, ref_tokens = single
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "result.json"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(ep_bundle), str(out), json.dumps(ids)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    try:
        rc0 = procs[0].wait(timeout=240)
        err0 = procs[0].stderr.read()
        rc1 = procs[1].wait(timeout=30)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert rc0 == 0, err0[-3000:]
    assert rc1 == 7  # the injected death
    res = json.loads(out.read_text())
    logits = load_file(str(out) + ".safetensors")["logits"]
    assert res["tokens"] == ref_tokens
    rel = ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item()
    assert rel < TOL, rel
    assert sum(res["rows"]) > 0
    # the dead rank: a clear error naming the failed collective, well within the timeout, and the group stays
    # failed (no hang) for the next request
    assert res["error"] and "peer rank died or hung" in res["error"] and "MoE" in res["error"], res["error"]
    assert res["seconds"] < 20
    assert res["again"] and "broken" in res["again"]


def test_cli_ep_entry_point(ep_bundle, single):
    """`flashport generate --ep 2` starts torchrun itself; rank 0 prints the JSON once (no stray return value)."""
    _, _, ref_tokens = single
    cmd = [sys.executable, "-m", "flashport.cli", "generate", str(ep_bundle), f"--prompt={PROMPT}",
           "--max-new-tokens=6", "--backend=torch", "--json", "--timeout=20", "--ep", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)  # exactly one JSON document on stdout
    assert res["token_ids"] == ref_tokens
