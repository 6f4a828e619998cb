"""`flashport bench long-context` end to end at a tiny context: the JSON figures, and a hit served from disk by
a restarted process."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from flashport.bench.long_context import KEYS


# each strategy's restore path at 1024 tokens (31 complete blocks of 32: the hit ends at 992, one block runs):
# full restores the record at the hit; periodic:480 the record at 960 and recomputes one block after it; none
# loads every block and rebuilds the windows from the last W*L = 32*6 = 192 tokens
PATHS = {"full": "checkpoint, loaded 992 tokens from disk, recomputed 0, new 32",
         "periodic:480": "checkpoint, loaded 960 tokens from disk, recomputed 32, new 32",
         "none": "window, loaded 992 tokens from disk, recomputed 192, new 32"}


@pytest.mark.parametrize("strategy", list(PATHS))
def test_long_context_bench_restarts_and_restores_with_each_strategy(tmp_path, strategy):
    kv = tmp_path / "kv"
    out = subprocess.run([sys.executable, "-m", "flashport.cli", "bench", "long-context", "--preset", "flash-tiny",
                          "--context", "1024", "--kv-dir", str(kv), "--strategy", strategy, "--decode-tokens", "2",
                          "--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    fig = json.loads(lines[-1])
    assert tuple(fig) == KEYS and all(isinstance(v, (int, float)) and v > 0 for v in fig.values())
    assert any(line.startswith(f"restart, page cache dropped: {PATHS[strategy]};") for line in lines), out.stdout
    # the segments plus the index and its WAL, measured before the restart (the WAL's size varies)
    segments = sum(p.stat().st_size for p in (kv / "segments").iterdir())
    assert segments < fig["kv_disk_bytes"] < segments + (4 << 20)
    assert fig["ttft_hit_s"] < fig["ttft_recompute_s"]
    for what in ("prefill:", "peak RSS", "KV on disk:", "restore:", "disk:", "decode:"):
        assert what in out.stdout, what
    # the progress bar on stderr, with the time left (tqdm: "[elapsed<remaining, rate]")
    assert re.search(r"prefill flash-tiny: .*\[\d\d:\d\d<\d\d:\d\d", out.stderr), out.stderr


def test_long_context_bench_refuses_a_kv_directory_in_use(tmp_path):
    (tmp_path / "index.sqlite").write_bytes(b"")
    out = subprocess.run([sys.executable, "-m", "flashport.cli", "bench", "long-context", "--context", "512",
                          "--kv-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"flashport: error: --kv-dir: {tmp_path} holds a KV store already; the benchmark needs a cold one"]
