"""The KV runtime (flashport.kv): bit-identical restore for every strategy, prefix reuse across restarts,
fallback to recompute on store errors, namespaces, accounting. Sizes stay small (flash-tiny, a few hundred
tokens): deterministic mode runs ~150 tok/s on a loaded 2-core machine."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from flashport.backends import reference
from flashport.backends.torch_backend import DETERMINISTIC_OPS
from flashport.config import ModelConfig
from flashport.engine import Engine
from flashport.kv import (KV_FORMAT, KVManager, Strategy, check_fits, chunk_spans, kv_cli, kv_layout, demo_prefix_hit,
                          model_identity, release_entry_bytes)
from flashport.model import SeqState
from flashport.options import KVOptions


@pytest.fixture(scope="module")
def det(tiny_release):
    return Engine.load(tiny_release, deterministic=True)


@pytest.fixture(scope="module")
def prompts(det):
    """A first prompt of 12 blocks + 5 tokens, and a second one sharing 11 blocks + 9 tokens (a mid-block hit,
    long enough for the `none` strategy: its window rebuild needs W*L = 192 tokens of flash-tiny)."""
    B, V = det.cfg.kv_block_tokens, det.cfg.vocab_size
    g = torch.Generator().manual_seed(1)
    first = torch.randint(2, V, (12 * B + 5,), generator=g).tolist()
    second = first[:11 * B + 9] + torch.randint(2, V, (20,), generator=g).tolist()
    return first, second


@pytest.fixture(scope="module")
def uninterrupted(det, prompts):
    """The second prompt prefilled from scratch (its state), plus two greedy decode steps: the bits a restore
    must match, in the numerics of the `written` cache (fp32)."""
    state = SeqState.empty(det.cfg, "fp32")
    logits = [det.prefill(prompts[1], state)]
    prefilled = state.clone()
    for _ in range(2):
        logits.append(det.model.forward_batch([torch.tensor([int(logits[-1].argmax())])], [state],
                                              all_logits=False)[0][0])
    return prefilled, logits


@pytest.fixture(scope="module")
def written(det, prompts, tmp_path_factory):
    """A cache directory after the first prompt ran with `full` (blocks + a record at every block boundary; a
    strategy only reads what it would have written itself: periodic:96 the records at multiples of 96, none
    no records)."""
    root = tmp_path_factory.mktemp("kv-written")
    det.enable_kv(KVOptions(root, "full", dtype="fp32", fsync=False))
    _, _, miss = det.prefill_cached(prompts[0])
    assert miss.path == "miss" and miss.loaded_tokens == 0
    assert det.kv.stats()["records_written"] == 12
    det.close()
    return root


def _decode(engine, state, logits, steps=2):
    out = [logits]
    for _ in range(steps):
        out.append(engine.model.forward_batch([torch.tensor([int(out[-1].argmax())])], [state],
                                              all_logits=False)[0][0])
    return out


# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy,path,loaded,recomputed", [
    ("full", "checkpoint", 11 * 32, 0),
    ("periodic:96", "checkpoint", 9 * 32, 2 * 32),   # latest record at 288 <= hit 352
    ("none", "window", 11 * 32, 6 * 32),              # windows rebuilt from 352 - 32*6
])
def test_restore_is_bit_identical(det, prompts, uninterrupted, written, strategy, path, loaded, recomputed):
    """A hit that ends mid-block, served from disk by a freshly opened store (a restart), continues with the same
    state and logits, bit for bit, prefill and decode, as the uninterrupted run."""
    det.enable_kv(KVOptions(written, strategy, dtype="fp32", fsync=False))
    state, logits, hit = det.prefill_cached(prompts[1])
    assert (hit.path, hit.loaded_tokens, hit.recomputed_tokens) == (path, loaded, recomputed)
    assert hit.new_tokens == len(prompts[1]) - 11 * 32 and hit.read_from == "disk" and hit.bytes_read > 0
    ref_state, ref_logits = uninterrupted
    ref, got = ref_state.tensors(), state.tensors()
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    for a, b in zip(_decode(det, state, logits), ref_logits):
        assert torch.equal(a, b)
    stats = det.kv.stats()
    assert stats["hits"] == 1 and stats["tokens"]["loaded"] == loaded
    assert stats["bytes_read"]["disk"] == hit.bytes_read
    det.close()


@pytest.mark.parametrize("dtype", ["release", "bf16", "fp32"])
@pytest.mark.parametrize("strategy", ["full", "none"])
def test_restore_is_bit_identical_per_kv_dtype(det, prompts, tmp_path, dtype, strategy):
    """In each KV numerics the stored bytes are the bytes the model used: a restart's hit (mid-block; the `none`
    strategy replays the windows over the loaded entries) continues bit for bit like the uninterrupted run made
    in the same numerics."""
    ns = model_identity(det.model, "det")
    det.kv = KVManager(det.cfg, tmp_path, ns, strategy, dtype=dtype, fsync=False)
    det.prefill_cached(prompts[0])
    det.kv.flush()
    # the prompt's 12 blocks (prefilled a block at a time) lie in one extent; the hit below ends inside it
    where = {(e.seg, e.offset) for e in (det.kv.store._index[(det.kv.namespace, h)]
                                         for h in det.kv.tracker(prompts[0]).hashes)}
    assert len(where) == 1
    det.close()
    det.kv = KVManager(det.cfg, tmp_path, ns, strategy, dtype=dtype, fsync=False)  # a restart: disk only
    state, logits, hit = det.prefill_cached(prompts[1])
    assert hit.loaded_tokens > 0 and hit.read_from == "disk" and hit.error == ""
    assert hit.hit_tokens == 11 * det.cfg.kv_block_tokens  # blocks 0..10 of the 12 of one extent
    ref_state = SeqState.empty(det.cfg, dtype)
    ref_logits = det.prefill(prompts[1], ref_state)
    ref, got = ref_state.clone().tensors(), state.tensors()
    ref_logits = _decode(det, ref_state, ref_logits)
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    for a, b in zip(_decode(det, state, logits), ref_logits):
        assert torch.equal(a, b)
    stats = det.kv.stats()
    assert stats["dtype"] == dtype and stats["bytes_per_token"] == kv_layout(det.cfg, dtype).compressed_per_token
    det.close()


def test_caches_of_different_kv_dtypes_never_mix(det, prompts, tmp_path):
    """The numerics are part of the namespace (and of every block's key and meta): a cache written in one dtype is
    a miss in another, on the same directory, and both live side by side."""
    ns = model_identity(det.model, "det")
    spaces = {}
    for dtype in ("release", "bf16", "fp32"):
        det.kv = KVManager(det.cfg, tmp_path, ns, "full", dtype=dtype, fsync=False)
        _, _, st = det.prefill_cached(prompts[0])
        assert st.path == "miss" and st.hit_tokens == 0, dtype  # nothing of the other dtypes is visible
        spaces[dtype] = det.kv.namespace
        det.close()
    assert len(set(spaces.values())) == 3 and all(v.endswith("-" + k) for k, v in spaces.items())
    for dtype in ("release", "fp32"):
        det.kv = KVManager(det.cfg, tmp_path, ns, "full", dtype=dtype, fsync=False)
        _, _, st = det.prefill_cached(prompts[1])
        assert st.loaded_tokens == 11 * det.cfg.kv_block_tokens and st.error == ""
        det.close()
    # a sequence made in other numerics is never stored in this cache (its bytes would not be the ones it used)
    det.kv = KVManager(det.cfg, None, ns, "full", dtype="release")
    tracker, state = det.kv.tracker(prompts[0]), SeqState.empty(det.cfg, "fp32")
    det.prefill(prompts[0], state)
    det.kv.observe(tracker, state)
    assert det.kv.stats()["blocks_written"] == 0
    det.kv = None


def test_entry_with_wrong_shape_is_evicted_not_recomputed_forever(tiny_release, tmp_path):
    """A block that passes its CRC but does not fit the model (a writer bug, a hand-edited store) is evicted on the
    first request that meets it; the recompute stores a good block and the next request hits."""
    eng = Engine.load(tiny_release, kv=KVOptions(tmp_path, "none"))
    B = eng.cfg.kv_block_tokens
    ids = list(range(9, 9 + 8 * B + 3))
    eng.prefill_cached(ids)
    kv = eng.kv
    kv.flush()
    key = kv.tracker(ids).hashes[2]
    assert kv.store.discard(key)
    got = kv._get(key)  # still in the memory tier
    assert got is not None
    good = got[0]
    bad = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:], dtype=v.dtype) for k, v in good.items()}
    meta = {"v": KV_FORMAT, "kind": "block", "block": 2, "tokens": 3 * B, "dtype": kv.dtype}
    assert kv.store.put(key, bad, meta, sync=True)  # a valid file with a wrong shape
    kv.drop_memory()
    _, _, st = eng.prefill_cached(ids)
    assert "does not match" in st.error and st.loaded_tokens == 0
    assert kv.store.stats()["discarded"] == 2  # the test's own discard, then the bad block
    kv.flush()
    kv.drop_memory()
    _, _, st = eng.prefill_cached(ids)
    assert st.error == "" and st.loaded_tokens == 8 * B  # the recompute stored the block again
    eng.close()


def test_a_full_write_queue_drops_and_counts_instead_of_blocking(tiny_release, tmp_path, monkeypatch):
    """The background writer stuck (a slow disk): prefill and decode go on, the puts that do not fit the bounded
    queue are dropped and counted, and nothing waits for the disk."""
    import queue
    import threading

    eng = Engine.load(tiny_release, kv=KVOptions(tmp_path, "full"))
    kv, B = eng.kv, eng.cfg.kv_block_tokens
    gate, started = threading.Event(), threading.Event()
    real = kv.store._append

    def stuck(*a):
        started.set()
        assert gate.wait(60)
        real(*a)

    monkeypatch.setattr(kv.store, "_append", stuck)
    monkeypatch.setattr(kv.store, "_q", queue.Queue(maxsize=2))
    try:
        assert kv.store.put(b"first", {"x": torch.ones(1)})  # the writer takes it from the small queue, then sticks
        assert started.wait(30)
        t0 = time.perf_counter()
        out = eng.generate(list(range(5, 5 + 6 * B + 3)), max_new_tokens=2 * B)  # prefill + decode, 8+ blocks
        assert started.is_set() and not gate.is_set()  # everything above ran while the writer was stuck
        st = kv.stats()
        assert st["puts_dropped"] >= 8 and st["disk"]["puts_dropped"] == st["puts_dropped"]
        assert st["disk"]["queue_depth"] <= 2 and len(out.token_ids) == 2 * B
        assert time.perf_counter() - t0 < 55
    finally:
        gate.set()
    assert kv.flush(30)
    eng.close()


def test_cli_refuses_a_kv_directory_in_use(tiny_release, tmp_path):
    """A second process on the same KV directory is told so once, at start, in one line."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from flashport.kv import DiskKVStore; "
         f"s = DiskKVStore({str(tmp_path)!r}, 1 << 20, 'ns', fsync=False); print('ready', flush=True); "
         "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"ready"
        run = subprocess.run([sys.executable, "-m", "flashport.cli", "generate", str(tiny_release), "Hi",
                              "--max-new-tokens", "2", "--kv-dir", str(tmp_path)], capture_output=True, text=True,
                             timeout=300)
    finally:
        holder.stdin.close()
        holder.wait(30)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        f"flashport: error: KV directory {tmp_path} is in use by another process (pid {holder.pid})"]


def test_fast_mode_restore_matches_within_tolerance(tiny_release, tmp_path):
    """Default (fast) ops with 1024-token chunks: a restore is exact up to fp32 reassociation."""
    eng = Engine.load(tiny_release, kv=KVOptions(tmp_path, "none"))
    B, V = eng.cfg.kv_block_tokens, eng.cfg.vocab_size
    ids = torch.randint(2, V, (14 * B,), generator=torch.Generator().manual_seed(2)).tolist()
    eng.prefill_cached(ids[:12 * B + 3])
    ref = eng.prefill(ids, eng.new_state())
    _, logits, st = eng.prefill_cached(ids)
    assert st.path == "window" and st.loaded_tokens == 12 * B
    assert (logits - ref).abs().max() < 1e-4
    eng.close()


def test_store_errors_fall_back_to_recompute(tiny_release, tmp_path, monkeypatch):
    eng = Engine.load(tiny_release, kv=KVOptions(tmp_path, "full"))
    B = eng.cfg.kv_block_tokens
    ids = list(range(9, 9 + 6 * B + 3))
    ref = eng.prefill(ids, eng.new_state())
    eng.prefill_cached(ids[:-2])
    kv = eng.kv
    kv.flush()
    kv.drop_memory()
    monkeypatch.setattr(kv.store, "get", lambda key: (_ for _ in ()).throw(OSError(5, "EIO")))
    monkeypatch.setattr(kv.store, "read_batch", lambda keys: (_ for _ in ()).throw(OSError(5, "EIO")))
    _, logits, st = eng.prefill_cached(ids)
    assert st.path == "miss" and "no longer cached" in st.error and (logits - ref).abs().max() < 1e-4
    monkeypatch.undo()
    # bytes that rot on disk: the store drops the entries on read, the request recomputes
    for victim in (tmp_path / "segments").glob("*.seg"):
        raw = bytearray(victim.read_bytes())
        raw[-3] ^= 0xFF
        raw[len(raw) // 2] ^= 0xFF
        victim.write_bytes(bytes(raw))
    kv.drop_memory()
    _, logits, st = eng.prefill_cached(ids)
    assert st.path == "miss" and (logits - ref).abs().max() < 1e-4
    assert kv.stats()["restore_errors"] >= 2 and kv.stats()["disk"]["corrupt_dropped"] >= 1
    eng.close()


def test_other_weights_never_hit(tiny_release, alt_release, tmp_path):
    """The namespace names the weights: another model on the same directory sees no blocks."""
    a = Engine.load(tiny_release, kv=KVOptions(tmp_path, "full"))
    ids = list(range(2, 2 + 6 * a.cfg.kv_block_tokens))
    a.prefill_cached(ids)
    ns_a = a.kv.namespace
    a.close()
    b = Engine.load(alt_release, kv=KVOptions(tmp_path, "full"))
    assert b.kv.namespace != ns_a
    _, _, st = b.prefill_cached(ids)
    assert st.path == "miss" and st.hit_tokens == 0
    b.close()


def test_generate_reuses_prefix_and_reply(tiny_release, tmp_path):
    """generate() goes through the cache; blocks completed while decoding are stored for the next turn; the
    demo helper prints the tokens loaded and recomputed."""
    eng = Engine.load(tiny_release, kv=KVOptions(tmp_path, "full"))
    B = eng.cfg.kv_block_tokens
    ids = list(range(5, 5 + 3 * B + 4))
    out = eng.generate(ids, max_new_tokens=2 * B)
    assert out.timings["kv"]["path"] == "miss"
    turn2 = ids + out.token_ids + [7, 8, 9]
    _, _, st = eng.prefill_cached(turn2)
    assert st.loaded_tokens == (len(ids) + len(out.token_ids) - 1) // B * B > 3 * B  # the reply's blocks too
    text = demo_prefix_hit(eng, doc_blocks=4)
    assert "request 2" in text and "loaded 128" in text and "disk" in text
    eng.close()


def test_sigkill_during_writes_serves_only_exact_blocks(tiny_release, tmp_path):
    """Kill a process while it stores blocks and records (fsync on); after each kill every hit restores the
    right KV (same logits as a recompute) or is a miss: never an error, never a wrong block."""
    script = (
        "import sys, torch\n"
        "from flashport.engine import Engine\n"
        "from flashport.options import KVOptions\n"
        "e = Engine.load(sys.argv[1], kv=KVOptions(sys.argv[2], 'full'))\n"
        "print('ready', flush=True)\n"
        "for s in range(100000):\n"
        "    g = torch.Generator().manual_seed(s % 5)\n"
        "    e.prefill_cached(torch.randint(2, 8000, (8 * 32 + 3,), generator=g).tolist())\n"
        "    e.kv.drop_memory()\n"
    )
    eng = Engine.load(tiny_release)
    B = eng.cfg.kv_block_tokens
    hits = 0
    for kill in range(2):
        proc = subprocess.Popen([sys.executable, "-c", script, str(tiny_release), str(tmp_path)],
                                stdout=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(0.5 + 0.5 * kill)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        eng.enable_kv(KVOptions(tmp_path, "full", fsync=False))
        for s in range(5):
            ids = torch.randint(2, 8000, (8 * B + 3,), generator=torch.Generator().manual_seed(s)).tolist() + [11]
            _, logits, st = eng.prefill_cached(ids)
            assert st.error == ""
            # the fast ops are tolerance-bound and a restore runs other chunks than a recompute (~1e-4 on these
            # O(5) logits); a wrong block moves them by O(1)
            assert (logits - eng.prefill(ids, eng.new_state())).abs().max() < 1e-3
            hits += st.loaded_tokens > 0
        eng.close()
    assert hits > 0


# ---------------------------------------------------------------------------------------------------------------
def test_deterministic_ops_are_batch_invariant():
    """Each row's result is the same alone or in a batch; attention ignores how many masked keys there are."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(9, 128, generator=g), torch.randn(40, 128, generator=g)
    lin = DETERMINISTIC_OPS["linear"]
    full = lin(x, w)
    assert all(torch.equal(full[i:i + 1], lin(x[i:i + 1], w)) for i in range(9))
    assert torch.equal(lin(x[2:7], w), full[2:7])
    assert (full - reference.linear(x, w)).abs().max() < 1e-4
    q, keys, sink = torch.randn(5, 4, 64, generator=g), torch.randn(30, 64, generator=g), torch.randn(4, generator=g)
    bias = torch.zeros(5, 30)
    bias[:, 20:] = float("-inf")  # ten masked keys
    att = DETERMINISTIC_OPS["attention"]
    a = att(q, keys, bias, sink, 0.125)
    assert torch.equal(a, att(q, keys[:20], bias[:, :20], sink, 0.125))
    assert torch.equal(a[3:4], att(q[3:4], keys[:20], bias[3:4, :20], sink, 0.125))
    assert (a - reference.attention(q, keys, bias, sink, 0.125)).abs().max() < 1e-5
    qi, ki, wi = torch.randn(6, 8, 32, generator=g), torch.randn(25, 32, generator=g), torch.randn(6, 8, generator=g)
    vis = torch.arange(25)[None, :] < torch.tensor([3, 8, 12, 16, 20, 25])[:, None]
    top = DETERMINISTIC_OPS["indexer_topk"]
    assert torch.equal(top(qi, ki, wi, vis, 5)[:5, :20], top(qi[:5], ki[:20], wi[:5], vis[:5, :20], 5))
    assert torch.equal(top(qi, ki, wi, vis, 5), reference.indexer_topk(qi, ki, wi, vis, 5))


def test_chunk_spans_cut_at_absolute_positions():
    assert chunk_spans(0, 100, 1024, 32, deterministic=True) == [(0, 32), (32, 64), (64, 96), (96, 100)]
    assert chunk_spans(40, 100, 1024, 32, deterministic=True) == [(40, 64), (64, 96), (96, 100)]
    assert chunk_spans(40, 3000, 1024, 32) == [(40, 1024), (1024, 2048), (2048, 3000)]
    assert chunk_spans(0, 200, 1024, 32, period=64) == [(0, 64), (64, 128), (128, 192), (192, 200)]


def test_strategy_parse():
    assert str(Strategy.parse("periodic:4096", 128)) == "periodic:4096"
    assert Strategy.parse("full", 128).period == 128 and Strategy.parse("none", 128).period == 0
    for bad in ("periodic:100", "periodic:x", "sometimes"):
        with pytest.raises(ValueError, match="strategy"):
            Strategy.parse(bad, 128)


def test_accounting_matches_the_design_numbers():
    v4 = ModelConfig.preset("v4-flash")
    lay = kv_layout(v4)
    # 21 CSA layers (m=4: 512-dim entries + 128-dim indexer keys), 20 HCA layers (m=128), fp32
    assert lay.compressed_per_token == pytest.approx(4 * (21 / 4 * (512 + 128) + 20 / 128 * 512))
    assert release_entry_bytes(v4) == 448 + 7 + 2 * 64  # FP8 + a UE8M0 scale per 64 + BF16 RoPE: "about 584"
    assert 3000 < lay.entries_per_token * 583 < 3300  # "about 3 KB per token"
    assert lay.entries_per_token == pytest.approx(21 / 4 + 20 / 128)
    assert 7.5 < 43 / lay.entries_per_token < 8.5  # SWA entries per token are ~8x the compressed ones
    with pytest.raises(MemoryError, match="1048576 tokens"):
        check_fits(v4, 1 << 20, available=1 << 30)
    out = kv_cli("all", context=1 << 20, memory_gb=64)
    assert "v4-flash" in out and "flash-tiny" in out and "NO" in out and "KV numerics release" in out
    # bytes per token in the numerics in use: release 583 B per 512-dim entry, 193 B per 128-dim indexer key
    rel = kv_layout(v4, "release")
    assert rel.compressed_per_token == pytest.approx(21 / 4 * (583 + 193) + 20 / 128 * 583)
    assert f" {rel.compressed_per_token:.0f} " in out and f" {lay.compressed_per_token:.0f} " in out
    assert f" {kv_layout(v4, 'bf16').compressed_per_token:.0f} " in kv_cli("v4-flash", dtype="bf16")
    with pytest.raises(ValueError, match="kv dtype"):
        kv_cli("v4-flash", dtype="fp8")


def test_memory_tier_budget_and_memory_only_cache(tiny_release):
    eng = Engine.load(tiny_release)
    kv = eng.kv = KVManager(eng.cfg, None, "mem-only", "full", memory_capacity=20_000)
    B = eng.cfg.kv_block_tokens
    ids = list(range(3, 3 + 10 * B))
    eng.prefill_cached(ids)
    tier = kv.stats()["tiers"][0]
    assert tier["used_bytes"] <= 20_000 and tier["evictions"] > 0
    _, _, st = eng.prefill_cached(ids)  # early blocks were evicted: at most a partial hit, never an error
    assert st.error == "" and st.loaded_tokens < 10 * B


@pytest.mark.parametrize("dim,rope", [(64, 16), (32, 16), (512, 64), (200, 64)])
def test_unpack_into_rows_matches_the_dequantization(dim, rope):
    """`unpack_kv` (table lookups on the CPU) writing into rows of a larger tensor (a restore unpacks each run of
    blocks into its rows of the sequence's entries) gives the release dequantization bit for bit: e4m3 value times
    2 ** (e - 127) per block of 64, partial last blocks included, BF16 RoPE dims widened; bf16 and fp32 alike.
    Rows outside the slice are untouched."""
    from flashport.quant.kv_numerics import FP8_BLOCK, pack_kv, unpack_kv

    g = torch.Generator().manual_seed(dim)
    x = torch.randn(300, dim, generator=g) * torch.logspace(-6, 6, 300)[:, None]
    x[7] = 0
    p = pack_kv(x, "release", rope)
    nope = dim - rope
    vals = torch.nn.functional.pad(p["q"].float(), (0, -nope % FP8_BLOCK)).unflatten(1, (-1, FP8_BLOCK))
    scale = torch.ldexp(torch.ones(p["e"].shape), p["e"].to(torch.int32) - 127)
    ref = torch.cat([(vals * scale[..., None]).flatten(1)[:, :nope], p["rope"].float()], 1)
    for dtype, parts, want in (("release", p, ref), ("bf16", pack_kv(x, "bf16", rope), x.bfloat16().float()),
                               ("fp32", pack_kv(x, "fp32", rope), x)):
        big = torch.full((310, dim), 7.0)
        unpack_kv(parts, dtype, rope, out=big[4:304])
        assert torch.equal(big[4:304].view(torch.int32), want.view(torch.int32)), dtype
        assert (big[:4] == 7).all() and (big[304:] == 7).all()
        with pytest.raises(ValueError):
            unpack_kv(parts, dtype, rope, out=big[:10])
