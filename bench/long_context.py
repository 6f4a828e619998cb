"""`flashport bench long-context`: one long prompt through the disk KV cache, end to end, across a restart.

    flashport bench long-context --preset flash-tiny --context 32768 [--kv-dir D] [--strategy periodic:4096]
                                 [--decode-tokens 8] [--threads T] [--seed S] [--json] [--plot FILE.svg]
                                 [--index-numerics release|fp32]

1. Prefill: `context` random tokens through `Engine.prefill_cached` (a miss: the time of the whole prefill is the
   TTFT of a recompute), in steps of 8192 tokens so that prefill tok/s and decode ms/token are measured at every
   step (decode on a copy of the state); blocks and records go to the KV directory; a progress bar with ETA.
2. Restart: a fresh Python process (subprocess) opens the same KV directory with the page cache of its files
   dropped (posix_fadvise DONTNEED after fsync) and prefills the same prompt: a prefix hit served from disk (TTFT
   of the hit), then decodes (ms/token at `context`).
3. The disk: the segment files are dropped from the page cache again and read back with plain sequential reads,
   the disk read bandwidth on the same files in the same run, to compare the restore's bytes/s with.

`--plot FILE.svg` draws prefill tok/s and decode ms/token against the context (bench/plot.py: SVG, no dependency).

Restore bytes/s is the bytes the restore read from disk (records as stored) over the whole restore: index
lookups, reads, checks, gathering and unpacking the entries into the state (PrefillStats.restore_seconds).
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path

import torch

from flashport.bench.decode import steady_ms, timed_decode

STEP = 8192  # prefill step: the figures against context length are taken at every multiple of it
KEYS = ("prefill_tok_s", "peak_rss_bytes", "kv_disk_bytes", "ttft_hit_s", "ttft_recompute_s", "restore_bytes_per_s",
        "disk_read_bytes_per_s", "decode_ms_per_token_8k", "decode_ms_per_token_at_context")


def _rss_peak() -> int:
    """Peak resident set size of this process, bytes: VmHWM of /proc/self/status (per address space, so a fresh
    process does not inherit its parent's peak the way ru_maxrss may across fork + exec), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _disk_files(root: Path) -> list[Path]:
    return [p for p in sorted(root.rglob("*")) if p.is_file() and p.name != "LOCK"]


def read_files_cold(files: list[Path]) -> tuple[int, float]:
    """Plain sequential reads (8 MiB) of `files` after dropping them from the page cache -> (bytes, seconds)."""
    from flashport.bench.kv import drop_cache

    for f in files:
        drop_cache(f)
    n, t0 = 0, time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while chunk := fh.read(8 << 20):
                n += len(chunk)
    return n, time.perf_counter() - t0


def warm_up(engine) -> None:
    """One short prefill outside the cache, so that TTFTs compare steady-state processes (lazy initialisation and
    first-call costs of the backend are not a property of the cache)."""
    engine.prefill(list(range(3, 3 + 2 * engine.cfg.kv_block_tokens)), engine.new_state(), progress=False)


def child_main(spec_path: str) -> None:
    """The restarted process: a hit on the prompt from disk, then decode. Prints one JSON line."""
    from flashport.engine import Engine
    from flashport.options import KVOptions

    spec = json.loads(Path(spec_path).read_text())
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    ids = array("q")
    ids.frombytes(Path(spec["ids"]).read_bytes())
    eng = Engine.load(spec["model"], kv=KVOptions(spec["kv_dir"], spec["strategy"]),
                      index_numerics=spec["index_numerics"])
    warm_up(eng)
    state, logits, st = eng.prefill_cached(ids.tolist(), progress=False)
    disk = eng.kv.stats()["disk"]
    steps = timed_decode(eng.model, state, logits, max(2, spec["decode_tokens"]))[0]
    eng.close()
    print(json.dumps({"stats": st.as_dict(), "disk_bytes_read": disk["bytes_read"],
                      "disk_read_seconds": disk["read_seconds"], "decode_ms": steady_ms(steps),
                      "decode_first_ms": steps[0], "rss": _rss_peak()}))


def run(preset: str = "flash-tiny", context: int = 32768, kv_dir: str = "", strategy: str = "periodic:4096",
        decode_tokens: int = 8, threads: int = 0, seed: int = 0, path: str = "", json_out: bool = False,
        plot: str = "", index_numerics: str = "release") -> str:
    from tqdm import tqdm

    from flashport.bench.kv import drop_cache
    from flashport.checkpoint import make_checkpoint
    from flashport.engine import Engine
    from flashport.kv import format_bytes
    from flashport.options import KVOptions

    if threads:
        torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="flashport-bench-long-"))
    try:
        model = Path(path) if path else make_checkpoint(work / preset, preset, seed, "release")
        root = Path(kv_dir) if kv_dir else work / "kv"
        eng = Engine.load(model, kv=KVOptions(root, strategy), index_numerics=index_numerics)
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(2, eng.cfg.vocab_size - 1, (context,), generator=g).tolist()
        warm_up(eng)
        marks = sorted({*range(STEP, context, STEP), context})
        rows, prefill_s, done = [], 0.0, 0
        bar = tqdm(total=context, desc=f"prefill {preset}", unit="tok", unit_scale=True, file=sys.stderr)
        for m in marks:
            # a prefix hit on the blocks of the previous steps (memory tier), then the next STEP tokens
            state, logits, st = eng.prefill_cached(ids[:m], progress=False)
            if st.error or (done and st.hit_tokens == 0):
                raise RuntimeError(f"the cache did not serve the previous steps ({st.path}, {st.error})")
            prefill_s += st.seconds
            steps = timed_decode(eng.model, state.clone(), logits, max(2, decode_tokens))[0]
            rows.append((m, (m - done) / st.seconds, steady_ms(steps)))
            bar.update(m - done)
            done = m
            del state
        bar.close()
        eng.kv.flush()
        kv_disk = sum(p.stat().st_size for p in _disk_files(root))
        eng.close()
        rss_prefill = _rss_peak()

        # the restart: a fresh process, the KV files out of the page cache
        for p in _disk_files(root):
            drop_cache(p)
        (work / "ids.bin").write_bytes(array("q", ids).tobytes())
        spec = {"model": str(model), "kv_dir": str(root), "strategy": strategy, "ids": str(work / "ids.bin"),
                "decode_tokens": decode_tokens, "threads": threads, "index_numerics": index_numerics}
        (work / "spec.json").write_text(json.dumps(spec))
        code = "import sys; from flashport.bench.long_context import child_main; child_main(sys.argv[1])"
        out = subprocess.run([sys.executable, "-c", code, str(work / "spec.json")], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"the restarted process failed:\n{out.stderr.strip()}")
        child = json.loads(out.stdout.strip().splitlines()[-1])
        hit = child["stats"]
        disk_n, disk_s = read_files_cold(_disk_files(root))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    restore_rate = child["disk_bytes_read"] / hit["restore_seconds"] if hit["restore_seconds"] else 0.0
    store_rate = child["disk_bytes_read"] / child["disk_read_seconds"] if child["disk_read_seconds"] else 0.0
    disk_rate = disk_n / disk_s if disk_s else 0.0
    at8k = min(rows, key=lambda r: abs(r[0] - 8192))
    fig = {"prefill_tok_s": context / prefill_s, "peak_rss_bytes": max(rss_prefill, child["rss"]),
           "kv_disk_bytes": kv_disk, "ttft_hit_s": hit["seconds"], "ttft_recompute_s": prefill_s,
           "restore_bytes_per_s": restore_rate, "disk_read_bytes_per_s": disk_rate,
           "decode_ms_per_token_8k": at8k[2], "decode_ms_per_token_at_context": child["decode_ms"]}
    lines = [
        f"bench long-context: {preset}, {context} tokens, strategy {strategy}, index numerics {index_numerics}, "
        f"{torch.get_num_threads()} threads",
        f"{'context':>8} {'prefill tok/s':>13} {'decode ms/tok':>13}   (prefill tok/s of the step ending there; "
        f"decode: median of the steps after the first, on a copy of the state)",
        *(f"{m:>8} {tps:>13.1f} {d:>13.1f}" for m, tps, d in rows),
        f"prefill: {context / prefill_s:.1f} tok/s ({prefill_s:.1f} s, the TTFT of a recompute); peak RSS "
        f"{format_bytes(rss_prefill)} (prefill process), {format_bytes(child['rss'])} (restarted process)",
        f"KV on disk: {format_bytes(kv_disk)} ({kv_disk / context:.0f} B/token: blocks, records, index)",
        f"restart, page cache dropped: {hit['path']}, loaded {hit['loaded_tokens']} tokens from {hit['read_from']}, "
        f"recomputed {hit['recomputed_tokens']}, new {hit['new_tokens']}; TTFT {hit['seconds']:.3f} s against "
        f"{prefill_s:.1f} s recomputed ({hit['seconds'] / prefill_s:.4f})",
        f"restore: {format_bytes(child['disk_bytes_read'])} from disk in {hit['restore_seconds']:.4f} s, "
        f"{restore_rate / 1e6:.0f} MB/s (store reads and checks alone: {store_rate / 1e6:.0f} MB/s); disk: "
        f"{format_bytes(disk_n)} read cold in {disk_s:.4f} s, {disk_rate / 1e6:.0f} MB/s; restore / disk "
        f"{restore_rate / disk_rate if disk_rate else 0:.2f}",
        f"decode (median of the steps after the first): {at8k[2]:.1f} ms/token at {at8k[0]} tokens, "
        f"{child['decode_ms']:.1f} ms/token at {context} (restarted process; its first step "
        f"{child['decode_first_ms']:.0f} ms)",
    ]
    if plot:
        from flashport.bench.plot import line_panels

        Path(plot).write_text(line_panels(
            [m for m, _, _ in rows], [("prefill tok/s (the step ending there)", [t for _, t, _ in rows]),
                                      ("decode ms/token", [d for _, _, d in rows])],
            f"flashport bench long-context: {preset}, {strategy}, {torch.get_num_threads()} threads",
            "context (tokens)"), encoding="utf-8")
        lines.append(f"plot: {plot}")
    if json_out:
        lines.append(json.dumps(fig))
    return "\n".join(lines)
