"""`flashport bench long-context` end to end at a tiny context: the JSON figures, and a hit served from disk by
a restarted process."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from xml.etree import ElementTree

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
    plot = tmp_path / "long.svg"
    out = subprocess.run([sys.executable, "-m", "flashport.cli", "bench", "long-context", "--preset", "flash-tiny",
                          "--context", "1024", "--kv-dir", str(kv), "--strategy", strategy, "--decode-tokens", "2",
                          "--plot", str(plot), "--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    fig = json.loads(lines[-1])
    assert tuple(fig) == KEYS and all(isinstance(v, (int, float)) and v > 0 for v in fig.values())
    assert any(line.startswith(f"restart, page cache dropped: {PATHS[strategy]};") for line in lines), out.stdout
    # the segments plus the index and its WAL, measured before the restart (the WAL's size varies)
    segments = sum(p.stat().st_size for p in (kv / "segments").iterdir())
    assert segments < fig["kv_disk_bytes"] < segments + (4 << 20)
    for what in ("prefill:", "peak RSS", "KV on disk:", "restore:", "disk:", "decode:"):
        assert what in out.stdout, what
    # the progress bar on stderr, with the time left (tqdm: "[elapsed<remaining, rate]")
    assert re.search(r"prefill flash-tiny: .*\[\d\d:\d\d<\d\d:\d\d", out.stderr), out.stderr
    # the plot: one panel per figure, a point per prefill step (one step at 1024 tokens)
    svg = ElementTree.parse(plot).getroot()
    lines_drawn = svg.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(lines_drawn) == 2 and all(len(p.get("points").split()) == 1 for p in lines_drawn)


def test_long_context_bench_refuses_a_kv_directory_in_use(tmp_path):
    (tmp_path / "index.sqlite").write_bytes(b"")
    out = subprocess.run([sys.executable, "-m", "flashport.cli", "bench", "long-context", "--context", "512",
                          "--kv-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"flashport: error: --kv-dir: {tmp_path} holds a KV store already; the benchmark needs a cold one"]


def test_line_panels_draws_each_figure_against_the_context():
    from flashport.bench.plot import line_panels

    svg = ElementTree.fromstring(line_panels([8192, 16384, 32768], [("prefill tok/s", [900.0, 500.0, 250.0]),
                                                                    ("decode ms/token", [10.0, 12.0, 11.0])],
                                             "t", "context (tokens)"))
    ns = "{http://www.w3.org/2000/svg}"
    pts = [[tuple(map(float, xy.split(","))) for xy in p.get("points").split()] for p in svg.iter(ns + "polyline")]
    assert [len(p) for p in pts] == [3, 3]
    assert pts[0][0][1] < pts[0][1][1] < pts[0][2][1]  # tok/s falls: the line goes down the panel (y grows)
    assert pts[0][0][0] < pts[0][1][0] < pts[0][2][0] and pts[0][2][0] - pts[0][1][0] > pts[0][1][0] - pts[0][0][0]
    labels = {t.text for t in svg.iter(ns + "text")}
    assert {"prefill tok/s", "decode ms/token", "context (tokens)", "8K", "16K", "32K"} <= labels, labels


def test_long_context_bench_refuses_a_plot_that_is_not_svg(tmp_path):
    out = subprocess.run([sys.executable, "-m", "flashport.cli", "bench", "long-context", "--context", "512",
                          "--plot", str(tmp_path / "p.png")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"flashport: error: --plot: {tmp_path / 'p.png'} must be an .svg file"]


def test_decode_context_extend_reaches_long_contexts_without_their_prefill(tiny_release):
    """`bench decode-context --extend`: the state of a real prefill made to look n tokens long (every compressor's
    entries repeated to n // rate rows, sign-flipped copies on the same value grid, position n), then decoded."""
    import torch

    from flashport.bench.decode import extend_entries, run_contexts
    from flashport.engine import Engine

    eng = Engine.load(tiny_release, index_numerics="release")
    state = eng.new_state()
    eng.prefill(list(range(3, 3 + 512)), state, progress=False)
    before = {i: ls.comp.entries.clone() for i, ls in enumerate(state.layers) if ls.comp is not None}
    extend_entries(state, eng.cfg, 8192)
    assert state.n_tokens == 8192
    for i, ls in enumerate(state.layers):
        rate = {"csa": eng.cfg.csa_rate, "hca": eng.cfg.hca_rate}.get(eng.cfg.layer_kind(i))
        if rate:
            e = ls.comp.entries
            assert e.shape[0] == 8192 // rate and torch.equal(e[:len(before[i])], before[i])
            n = len(before[i])
            assert torch.equal(e[n:2 * n].abs(), before[i].abs()) and not torch.equal(e[n:2 * n], before[i])
    logits = eng.model.forward_batch([torch.tensor([5])], [state], all_logits=False)[0][0]
    assert torch.isfinite(logits).all() and state.n_tokens == 8193
    out = run_contexts(path=str(tiny_release), contexts="512,4096", decode_tokens=2, extend=True,
                       index_numerics="release")
    rows = [line.split() for line in out.splitlines()[2:]]
    assert [r[0] for r in rows] == ["512", "4096"] and rows[1][1] == "nan" and rows[0][3] == "1.00x"
