"""`flashport bench ops`: every row measured and checked against the reference, cold weights, the prefill rows, the
int8-activation decode rows beside the default ones."""

from __future__ import annotations

import json

from flashport.bench import ops


def test_bench_ops_rows_cold_copies_and_prefill_paths(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ops, "read_bandwidth", lambda *a, **k: 20e9)  # no 512 MiB sum in a unit test
    monkeypatch.setattr(ops, "COLD_BYTES", 3 * 64 * 256 * 4)  # three copies of the 64x256 fp32 weight
    seen = []
    real_rotate = ops._rotate
    monkeypatch.setattr(ops, "_rotate", lambda fn, items: seen.append(len(items)) or real_rotate(fn, items))
    report = tmp_path / "ops.json"
    ops.run(shapes="64x256", fmt="int4-g32", moe="64x32x2", ort=False, repeat=1, report=str(report),
            prefill="16x256x64")
    rows = json.loads(report.read_text())["rows"]
    paths = {(r["op"], r["path"]) for r in rows}
    assert {("linear", "fp32 matmul"), ("linear", "torch int4-g32"), ("moe", "torch int4-g32"),
            ("prefill", "fp32 matmul"), ("prefill", "torch int4-g32"),
            ("prefill", "torch int4-g32 prefill_matmul=bf16"),
            ("linear", "torch int4-g32 decode_activations=int8"), ("moe", "torch int4-g32 decode_activations=int8")} <= paths
    assert seen[0] == 3 and seen[1] > 3  # the fp32 weight, then the packed int4 one (smaller: more copies)
    for r in rows:
        assert r["ms"] > 0 and (r["rel_err"] is None or r["rel_err"] < (5e-2 if "bf16" in r["path"] or "int8" in r["path"]
                                                                         else 1e-4))
        assert (r["gflop_s"] is not None) == (r["op"] == "prefill")
    out = capsys.readouterr().out
    assert "of bw" in out and "GFLOP/s" in out and "weights read cold" in out
