"""`flashport bench kv`: the disk KV tier against recompute, measured side by side in one run.

    flashport bench kv [--preset flash-mini] [--sizes 8192,32768] [--strategies full,periodic:4096,none]
                       [--decode-tokens 16] [--long-preset flash-tiny] [--long-sizes 4096,16384] [--dir D]
                       [--restore-presets flash-tiny,v4-flash] [--restore-mb 64] [--writer-tokens 48]

Per strategy and context size: bytes written per 1K tokens, time to first token after a hit served from disk
(page cache dropped, store reopened as after a restart) against a full recompute of the same prompt, and the
restore's read throughput as a fraction of the disk's sequential read bandwidth measured in the same run.
Per size: prefill and decode cost per token. Long context: prefill time, KV memory and disk of `long-preset` at
`long-sizes`, extrapolated linearly (compressed-entry work grows with the context; the sliding window does not)
to 1M tokens. Restore against disk (`store_restore`): the whole restore (hashes, plan, reads, checks, unpacking
into the state) per block size (flash-tiny's and V4-Flash's) against cold sequential reads of the same files. Writer (`writer_stall`): decode ms/token with the
disk writer busy against idle.
"""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch

from flashport.options import KVOptions


def drop_cache(root: Path) -> None:
    """Ask the kernel to forget the page cache of root, a file or every file under a directory (reads then come
    from the disk): fsync (dirty pages are not dropped), then posix_fadvise(DONTNEED)."""
    for p in [root] if root.is_file() else root.rglob("*"):
        if p.is_file():
            try:
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
            except OSError:
                pass


def disk_read_bandwidth(root: Path, size: int = 256 << 20) -> float:
    """Sequential read bandwidth of the disk under root (bytes/s), page cache dropped first."""
    path = root / "bench-read.bin"
    block = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    drop_cache(root)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(8 << 20):
            pass
    dt = time.perf_counter() - t0
    path.unlink()
    return size / dt


def _du(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def run(path: str = "", preset: str = "flash-mini", sizes="8192,32768", strategies="full,periodic:4096,none",
        decode_tokens: int = 16, long_preset: str = "flash-tiny", long_sizes="4096,16384", dir: str = "",
        threads: int = 0, seed: int = 0, restore_presets="flash-tiny,v4-flash", restore_mb: int = 64,
        writer_tokens: int = 48) -> str:
    from flashport.checkpoint import make_checkpoint
    from flashport.engine import Engine
    from flashport.kv import format_bytes, kv_layout

    if threads:
        torch.set_num_threads(threads)
    sizes = [int(x) for x in str(sizes).split(",") if x]
    long_sizes = [int(x) for x in str(long_sizes).split(",") if x]
    strategies = [s for s in str(strategies).split(",") if s]
    work = Path(dir or tempfile.mkdtemp(prefix="flashport-bench-kv-"))
    work.mkdir(parents=True, exist_ok=True)
    model = Path(path) if path else make_checkpoint(work / preset, preset, seed, "release")
    bw = disk_read_bandwidth(work)
    eng = Engine.load(model)
    B = eng.cfg.kv_block_tokens
    g = torch.Generator().manual_seed(seed)
    lines = [f"bench kv: {eng.cfg.name} (block {B} tokens, window {eng.cfg.sliding_window} x "
             f"{eng.cfg.num_hidden_layers} layers), {torch.get_num_threads()} threads; disk sequential read "
             f"{bw / 1e9:.2f} GB/s (page cache dropped)",
             f"{'context':>8} {'strategy':<15} {'KB written/1K tok':>17} {'TTFT recompute':>14} {'TTFT hit':>9} "
             f"{'ratio':>7} {'loaded':>7} {'recomp':>7} {'restore MB/s':>12} {'of disk':>7}"]
    costs = []
    for n in sizes:
        ids = torch.randint(2, eng.cfg.vocab_size - 1, (n + 16,), generator=g).tolist()
        for strat in strategies:
            root = work / f"kv-{n}-{strat.replace(':', '_')}"
            shutil.rmtree(root, ignore_errors=True)
            eng.enable_kv(KVOptions(root, strat))
            _, _, miss = eng.prefill_cached(ids[:n])
            eng.kv.flush()
            written = eng.kv.stats()["disk"]["bytes_written"]
            eng.close()
            drop_cache(root)
            eng.enable_kv(KVOptions(root, strat))  # a restart: fresh store, fresh memory tier
            _, _, hit = eng.prefill_cached(ids)
            eng.close()
            rate = hit.bytes_read / hit.restore_seconds if hit.restore_seconds else 0.0
            lines.append(f"{n:>8} {strat:<15} {written / n * 1000 / 1024:>17.1f} {miss.seconds:>13.2f}s "
                         f"{hit.seconds:>8.2f}s {miss.seconds / hit.seconds:>6.1f}x {hit.loaded_tokens:>7} "
                         f"{hit.recomputed_tokens:>7} {rate / 1e6:>12.0f} {rate / bw:>7.0%}")
        # prefill / decode cost per token at this size (no cache)
        state = eng.new_state()
        t0 = time.perf_counter()
        logits = eng.prefill(ids[:n], state, progress=False)
        t1 = time.perf_counter()
        for _ in range(decode_tokens):
            logits = eng.model.forward_batch([torch.tensor([int(logits.argmax())])], [state], all_logits=False)[0][0]
        t2 = time.perf_counter()
        costs.append((n, (t1 - t0) / n, (t2 - t1) / max(decode_tokens, 1)))
    if costs:
        lines += ["", f"{'context':>8} {'prefill ms/tok':>14} {'decode ms/tok':>13} {'decode vs first':>15}"]
    for n, p, d in costs:
        lines.append(f"{n:>8} {p * 1e3:>14.2f} {d * 1e3:>13.1f} {d / costs[0][2]:>14.2f}x")
    if restore_presets:  # the whole restore against the disk, per block size (flash-tiny's, V4-Flash's)
        lines += ["", f"restore (hashes, plan, reads, checks, unpacking into the state) against cold sequential reads "
                      f"of the same files, {restore_mb} MB of release-numerics KV per preset, page cache dropped, "
                      f"median of 3:",
                  store_restore(restore_presets, restore_mb << 20, str(work / "restore"))]
    if writer_tokens:
        lines += ["", writer_stall(long_preset, decode_tokens=writer_tokens, dir=str(work / "writer"), seed=seed)]

    if long_sizes:  # long context on a small preset, extrapolated to 1M
        lmodel = make_checkpoint(work / long_preset, long_preset, seed, "release")
        leng = Engine.load(lmodel)
        lay = kv_layout(leng.cfg)
        lines += ["", f"long context, {long_preset}: {'tokens':>8} {'prefill s':>9} {'tok/s':>7} {'decode ms/tok':>13} "
                      f"{'KV memory':>10} {'disk':>10} {'max RSS':>9}"]
        pts = []
        for n in long_sizes:
            root = work / f"long-{n}"
            shutil.rmtree(root, ignore_errors=True)
            leng.enable_kv(KVOptions(root, "periodic:4096"))
            ids = torch.randint(2, leng.cfg.vocab_size - 1, (n,), generator=g).tolist()
            t0 = time.perf_counter()
            state, logits, _ = leng.prefill_cached(ids)
            t1 = time.perf_counter()
            for _ in range(decode_tokens):
                logits = leng.model.forward_batch([torch.tensor([int(logits.argmax())])], [state],
                                                  all_logits=False)[0][0]
            t2 = time.perf_counter()
            leng.kv.flush()
            disk = _du(root)
            leng.close()
            mem = sum(t.numel() * 4 for t in state.tensors().values())
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            pts.append((n, t1 - t0, disk, mem))
            lines.append(f"{'':>27} {n:>8} {t1 - t0:>9.1f} {n / (t1 - t0):>7.0f} "
                         f"{(t2 - t1) / max(decode_tokens, 1) * 1e3:>13.1f} {format_bytes(mem):>10} {format_bytes(disk):>10} "
                         f"{format_bytes(rss):>9}")
        (n0, s0, _, _), (n1, s1, d1, _) = pts[0], pts[-1]
        per_tok = (s1 - s0) / (n1 - n0) if n1 > n0 else s1 / n1
        big = 1 << 20
        lines.append(f"extrapolated to {big} tokens: prefill ~{s1 + per_tok * (big - n1):.0f} s at the marginal "
                     f"{per_tok * 1e3:.2f} ms/token measured between {n0} and {n1}; KV memory "
                     f"{format_bytes(lay.kv_bytes(big))}; disk ~{format_bytes(d1 / n1 * big)}")
    if not dir:
        shutil.rmtree(work, ignore_errors=True)
    return "\n".join(lines)


def numerics(path: str = "samples/models/flash-small", context: int = 8192, dtypes="release,bf16",
             text: str = "", chunk: int = 1024) -> str:
    """Accuracy of KV numerics against fp32 KV: the same tokens prefilled with entries and indexer keys kept in
    each dtype (flashport.quant.kv_numerics); per dtype, the mean KL(fp32 || dtype) of the next-token
    distributions over every position and the top-1 agreement, overall and past `context // 2`.

    text: a UTF-8 file to take the tokens from (default: the model directory's heldout.txt, repeated if short).
    """
    from flashport.engine import Engine
    from flashport.model import SeqState

    eng = Engine.load(path, backend="torch")
    src = Path(text) if text else Path(path) / "heldout.txt"
    ids = eng.encode(src.read_text(encoding="utf-8"))
    distinct = len(ids)
    while len(ids) < context:
        ids += ids[1:]
    ids = torch.tensor(ids[:context])
    names = ["fp32"] + [d for d in str(dtypes).split(",") if d and d != "fp32"]
    states = {d: SeqState.empty(eng.cfg, d) for d in names}
    kl = {d: [] for d in names[1:]}
    agree = {d: [] for d in names[1:]}
    t0 = time.perf_counter()
    with torch.no_grad():
        for a in range(0, context, chunk):
            logp = {d: eng.model.forward_batch([ids[a:a + chunk]], [states[d]])[0].float().log_softmax(-1)
                    for d in names}
            ref = logp["fp32"]
            for d in names[1:]:
                kl[d].append((ref.exp() * (ref - logp[d])).sum(-1))
                agree[d].append(ref.argmax(-1) == logp[d].argmax(-1))
    rows = [f"KV numerics against fp32 KV: {Path(path).name}, {context} tokens ({distinct} distinct, from "
            f"{src.name}), {time.perf_counter() - t0:.0f} s",
            f"{'dtype':<8} {'B/tok':>6} {'mean KL':>10} {'top-1':>7} {'mean KL 2nd half':>17} {'top-1 2nd half':>15}"]
    from flashport.kv import kv_layout

    for d in names[1:]:
        k, g = torch.cat(kl[d]), torch.cat(agree[d]).float()
        h = context // 2
        rows.append(f"{d:<8} {kv_layout(eng.cfg, d).compressed_per_token:>6.0f} {k.mean():>10.2e} {g.mean():>7.4f} "
                    f"{k[h:].mean():>17.2e} {g[h:].mean():>15.4f}")
    rows.append(f"fp32 B/tok: {kv_layout(eng.cfg, 'fp32').compressed_per_token:.0f}")
    return "\n".join(rows)


def store_restore(presets: str = "flash-tiny,v4-flash", total: int = 64 << 20, dir: str = "", repeats: int = 3,
                  dtype: str = "release", seed: int = 0) -> str:
    """The whole restore against the disk, per model preset (block size: flash-tiny's 32-token blocks of about
    3.6 KB, V4-Flash's 128-token blocks of about 533 KB, release numerics): a sequence of about `total` bytes of
    packed KV (random entries in `dtype`, made as a prefill makes them) is stored through `KVManager.observe`, then
    restored by a fresh manager on the same directory, page cache dropped, as a restarted engine does: the
    prompt's block hashes, the restore plan (index lookups), `KVManager.restore` (the store's reads and checks,
    unpacking every block's entries into the sequence state); against plain sequential 8 MiB reads of the same
    segment files, also cold, in the same run. Median of `repeats` for each; "store" is the store's reads and
    checks alone (`DiskKVStore.read_batch` of the same blocks, cold, nothing unpacked). The restored entries are
    checked bit for bit against the stored ones."""
    import statistics

    from flashport.config import ModelConfig
    from flashport.kv import KVManager, RestorePlan, kv_layout
    from flashport.quant.kv_numerics import round_kv

    work = Path(dir or tempfile.mkdtemp(prefix="flashport-bench-restore-"))
    rows = [f"{'preset':<11} {'block B':>8} {'blocks':>6} {'MB':>6} {'restore MB/s':>12} {'store MB/s':>10} "
            f"{'disk MB/s':>9} {'ratio':>6}"]
    try:
        for preset in (p for p in str(presets).split(",") if p):
            cfg = ModelConfig.preset(preset)
            B, r = cfg.kv_block_tokens, cfg.qk_rope_head_dim
            blocks = max(1, total // kv_layout(cfg, dtype).block_bytes)
            n = blocks * B
            root = work / f"kv-{preset}"
            shutil.rmtree(root, ignore_errors=True)
            g = torch.Generator().manual_seed(seed)
            ids = torch.randint(2, cfg.vocab_size - 1, (n + 1,), generator=g).tolist()
            kv = KVManager(cfg, root, "bench", "none", disk_capacity=8 * total + (256 << 20), dtype=dtype)
            state = kv.new_state()
            for i, ls in enumerate(state.layers):
                for ps in (ls.comp, ls.index):
                    if ps is not None:
                        m = cfg.csa_rate if cfg.layer_kind(i) == "csa" else cfg.hca_rate
                        ps.entries = round_kv(torch.randn(n // m, ps.entries.shape[1], generator=g), dtype, r)
            tracker = kv.tracker(ids[:n])
            step = kv.run_blocks  # as a prefill puts them (`KVManager.observe(defer=True)`)
            for b in range(step, blocks + step, step):
                state.n_tokens = min(b, blocks) * B
                kv.observe(tracker, state)
                kv.flush()
            kv.close()
            times, store_rates, disk_rates, nbytes = [], [], [], 0
            for _ in range(repeats):
                kv = KVManager(cfg, root, "bench", "none", disk_capacity=8 * total + (256 << 20), dtype=dtype)
                drop_cache(root)
                t0 = time.perf_counter()
                tracker = kv.tracker(ids)
                plan = kv.plan(tracker, len(ids))  # the index lookups; a short sequence's plan is a miss (it
                # would recompute the windows from token 0), so the restore loads every block the plan found
                got, _, _ = kv.restore(tracker, RestorePlan("window", plan.hit_blocks, plan.hit_blocks, n, n))
                times.append(time.perf_counter() - t0)
                nbytes = kv.store.stats()["bytes_read"]
                kv.close()
                # the store's reads and checks alone: the same blocks, cold again, nothing unpacked
                kv = KVManager(cfg, root, "bench", "none", disk_capacity=8 * total + (256 << 20), dtype=dtype)
                drop_cache(root)
                t0 = time.perf_counter()
                assert kv.store.read_batch(tracker.hashes[:blocks]).found.all()
                store_rates.append(nbytes / (time.perf_counter() - t0))
                kv.close()
                assert plan.hit_blocks == blocks and all(
                    torch.equal(getattr(a, w).entries, getattr(b, w).entries)
                    for a, b in zip(got.layers, state.layers) for w in ("comp", "index") if getattr(a, w) is not None)
                segs = sorted((root / "segments").iterdir())
                drop_cache(root)
                t0 = time.perf_counter()
                read = 0
                for p in segs:
                    with open(p, "rb", buffering=0) as f:
                        while chunk := f.read(8 << 20):
                            read += len(chunk)
                disk_rates.append(read / (time.perf_counter() - t0))
            rate = nbytes / statistics.median(times)
            disk_rate = statistics.median(disk_rates)
            rows.append(f"{preset:<11} {kv_layout(cfg, dtype).block_bytes:>8} {blocks:>6} {nbytes / 1e6:>6.1f} "
                        f"{rate / 1e6:>12.0f} {statistics.median(store_rates) / 1e6:>10.0f} {disk_rate / 1e6:>9.0f} "
                        f"{rate / disk_rate:>6.2f}")
            del state
            shutil.rmtree(root, ignore_errors=True)
    finally:
        if not dir:
            shutil.rmtree(work, ignore_errors=True)
    return "\n".join(rows)


def writer_stall(preset: str = "flash-tiny", context: int = 2048, decode_tokens: int = 64, rounds: int = 3,
                 entry_kb: int = 512, backlog_mb: int = 256, dir: str = "", seed: int = 0) -> str:
    """Decode ms/token with the disk writer busy against idle, in the same process, rounds interleaved.

    A sequence of `context` tokens is prefilled through a cache with the `full` strategy (decode puts a block and
    a fixed-state record every block), then decoded greedily with `KVManager.observe` after every step, as
    `Engine.generate` does. Before each busy round the store's queue is given a backlog of `backlog_mb` MiB of
    `entry_kb` KiB entries (a V4-Flash block by default), so its writer thread serialises, checksums, appends and
    fsyncs through the whole round (the time it still needs after the round, to drain the queue, shows it never
    ran dry). Median
    ms/token of each mode. (Decode's puts meeting a full queue are dropped and counted, never waited on:
    tests/test_kv_runtime.py runs generate against a stuck writer.)"""
    import statistics

    from flashport.checkpoint import make_checkpoint
    from flashport.engine import Engine
    from flashport.kv import format_bytes, prefill_cached

    work = Path(dir or tempfile.mkdtemp(prefix="flashport-bench-writer-"))
    try:
        model = make_checkpoint(work / preset, preset, seed, "release")
        eng = Engine.load(model, kv=KVOptions(work / "kv", "full", capacity="2GiB"))
        kv, store = eng.kv, eng.kv.store
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(2, eng.cfg.vocab_size - 1, (context,), generator=g).tolist()
        big = {"x": torch.randint(0, 255, (entry_kb << 10,), dtype=torch.uint8, generator=g)}
        cap = store.stats()["queue_capacity"]
        times: dict[str, list] = {"idle": [], "busy": []}
        left, n_put = [], [0]

        def backlog(n: int) -> None:
            for _ in range(n):
                n_put[0] += 1
                if not store.put(f"backlog-{n_put[0]}", big):
                    break

        def decode(mode: str) -> None:
            nonlocal logits
            for _ in range(decode_tokens):
                t0 = time.perf_counter()
                tok = int(logits.argmax())
                logits = eng.model.forward_batch([torch.tensor([tok])], [state], all_logits=False)[0][0]
                tracker.extend([tok])
                kv.observe(tracker, state)
                times[mode].append(time.perf_counter() - t0)

        with torch.no_grad():
            state, logits, _, tracker = prefill_cached(eng.model, kv, ids, progress=False)
            kv.flush()
            for r in range(2 * rounds):
                if r % 2:
                    backlog(min(cap, (backlog_mb << 10) // entry_kb))
                    decode("busy")
                    t0 = time.perf_counter()
                    kv.flush()  # what the writer still had to do when the round ended
                    left.append(time.perf_counter() - t0)
                else:
                    decode("idle")
        disk = kv.stats()["disk"]
        eng.close()
    finally:
        if not dir:
            shutil.rmtree(work, ignore_errors=True)
    idle, busy = (statistics.median(times[m]) * 1e3 for m in ("idle", "busy"))
    return "\n".join([
        f"writer: {preset}, {context}-token context, strategy full, {rounds} x {decode_tokens} decode steps per mode "
        f"(interleaved), {torch.get_num_threads()} threads; busy: a backlog of {backlog_mb} MiB of {entry_kb} KiB "
        f"entries before each round",
        f"decode ms/token (median): writer idle {idle:.2f}, writer busy {busy:.2f} ({busy / idle:.2f}x); the writer "
        f"was still busy {', '.join(f'{s:.1f}' for s in left)} s after each busy round (queue of {cap} entries)",
        f"the store wrote {format_bytes(disk['bytes_written'])} in {disk['write_seconds']:.1f} s of writer time; puts "
        f"dropped (queue full, counted, never waited on): {disk['puts_dropped']}",
    ])
