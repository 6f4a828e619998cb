"""`flashport bench long-context` end to end at a tiny context: the JSON figures, and a hit served from disk by
a restarted process."""

from __future__ import annotations

import json
import subprocess
import sys

from flashport.bench.long_context import KEYS


def test_long_context_bench_reports_a_disk_hit_in_a_fresh_process(tmp_path):
    kv = tmp_path / "kv"
    out = subprocess.run([sys.executable, "-m", "flashport.cli", "bench", "long-context", "--preset", "flash-tiny",
                          "--context", "512", "--kv-dir", str(kv), "--strategy", "full", "--decode-tokens", "2",
                          "--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    fig = json.loads(lines[-1])
    assert tuple(fig) == KEYS and all(isinstance(v, (int, float)) and v > 0 for v in fig.values())
    # `full` keeps a record at every block: the restart restores 15 blocks from disk and runs the last one
    assert any(line.startswith("restart, page cache dropped: checkpoint, loaded 480 tokens from disk, recomputed 0,"
                               " new 32") for line in lines), out.stdout
    # the segments plus the index and its WAL, measured before the restart (the WAL's size varies)
    segments = sum(p.stat().st_size for p in (kv / "segments").iterdir())
    assert segments < fig["kv_disk_bytes"] < segments + (4 << 20)
    assert fig["restore_bytes_per_s"] > 0 and fig["disk_read_bytes_per_s"] > 0
    assert "prefill" in out.stderr  # the progress bar


def test_long_context_bench_refuses_a_kv_directory_in_use(tmp_path):
    (tmp_path / "index.sqlite").write_bytes(b"")
    out = subprocess.run([sys.executable, "-m", "flashport.cli", "bench", "long-context", "--context", "512",
                          "--kv-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"flashport: error: --kv-dir: {tmp_path} holds a KV store already; the benchmark needs a cold one"]
