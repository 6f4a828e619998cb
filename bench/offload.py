"""`flashport bench offload`: expert offload and expert parallelism, measured side by side in one run.

    flashport bench offload [--path BUNDLE] [--preset flash-mini] [--fractions 100,50,25,10] [--tier disk]

Rows: the fully resident engine, then the offloaded engine with the given share of all routed-expert bytes as
its device budget for experts (half pinned hottest first when routing statistics exist, the rest LRU cache).
Figures per row: decode tokens/s, the ratio to resident, the cache hit rate (prefetched experts count as hits),
and expert bytes read from the cold tier per generated token. With ep=2, the same generation under
`flashport generate --ep N` (torchrun) against one process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def _budget(path, fraction: float) -> int:
    """Device bytes that leave `fraction` of all routed-expert bytes for experts (after the non-expert weights,
    KV and workspace: flashport.offload.DeviceNeeds)."""
    from flashport import OffloadOptions, load_engine

    eng = load_engine(path, backend="torch", offload=OffloadOptions(1 << 40, tier="disk"))
    needs = eng.offload.needs
    eng.close()
    return needs.fixed + int(fraction * needs.experts)


def run(path: str = "", preset: str = "flash-mini", recipe: str = "int4-experts", fractions: str = "100,50,25,10",
        tier: str = "disk", prompt_tokens: int = 64, decode_tokens: int = 16, threads: int = 0, ep: int = 2,
        seed: int = 0) -> str:
    """Decode tokens/s vs resident fraction of expert bytes, hit rate, bytes read per token; EP=N vs 1 process."""
    from flashport import OffloadOptions, load_engine
    from flashport.checkpoint import make_checkpoint
    from flashport.export.bundle import export
    from flashport.model import Linear

    if threads:
        torch.set_num_threads(threads)
    tmp = tempfile.TemporaryDirectory(prefix="flashport-bench-offload-")
    if not path:
        src = make_checkpoint(Path(tmp.name) / "ckpt", preset, seed=seed, fmt="release")
        path = str(Path(tmp.name) / "bundle")
        export(src, path, recipe, progress=True)
    resident = load_engine(path, backend="torch")
    text = " ".join(f"word{i}" for i in range(prompt_tokens))
    ids = resident.encode(text)[:prompt_tokens]
    text = resident.tokenizer.decode(ids[1:])
    ids = resident.encode(text)

    other = [0] + [int(x) for x in torch.randint(2, 8000, (prompt_tokens - 1,),
                                                 generator=torch.Generator().manual_seed(seed + 1))]

    def measure(engine):
        engine.generate(other, max_new_tokens=decode_tokens)  # warm-up on another prompt: uploads, cache fill
        if getattr(engine, "offload", None) is not None:
            engine.offload.drain()
            before = engine.offload.stats()
        g = engine.generate(ids, max_new_tokens=decode_tokens)
        row = {"tokens": g.token_ids, "decode_tok_s": g.decode_tok_s, "prefill_tok_s": g.prefill_tok_s}
        if getattr(engine, "offload", None) is not None:
            engine.offload.drain()
            after = engine.offload.stats()
            d = {k: after[k] - before[k] for k in ("hits", "prefetch_waits", "misses", "bytes_read_host",
                                                     "bytes_read_disk")}
            asked = d["hits"] + d["prefetch_waits"] + d["misses"]
            row["hit_rate"] = (d["hits"] + d["prefetch_waits"]) / max(asked, 1)
            row["bytes_per_token"] = (d["bytes_read_host"] + d["bytes_read_disk"]) / (len(ids) + len(g.token_ids))
            engine.offload.close()
        return row

    cfg = resident.cfg
    for mod in resident.model.modules():  # every weight uploaded up front, as the pinned experts are
        if isinstance(mod, Linear):
            resident.model.ops.handle(mod)
    base = measure(resident)
    rows = [f"expert offload, {cfg.name} ({recipe}), prompt {prompt_tokens} + {decode_tokens} new tokens, "
            f"tier {tier}, {torch.get_num_threads()} threads",
            f"{'expert bytes resident':>22} {'decode tok/s':>13} {'vs resident':>12} {'hit rate':>9} "
            f"{'bytes read/token':>17} {'same tokens':>12}",
            f"{'100% (no offload)':>22} {base['decode_tok_s']:>13.2f} {1.0:>12.2f} {'-':>9} {'-':>17} {'-':>12}"]
    for f in [float(x) for x in str(fractions).split(",") if x]:
        eng = load_engine(path, backend="torch", offload=OffloadOptions(_budget(path, f / 100), tier=tier))
        r = measure(eng)
        rows.append(f"{f:>21.0f}% {r['decode_tok_s']:>13.2f} {r['decode_tok_s'] / base['decode_tok_s']:>12.2f} "
                    f"{r['hit_rate']:>9.3f} {r['bytes_per_token'] / 2**10:>13.1f} KiB "
                    f"{str(r['tokens'] == base['tokens']):>12}")
    if ep > 1:
        cmd = [sys.executable, "-m", "flashport.cli", "generate", path, f"--prompt={text}", "--backend=torch",
               f"--max-new-tokens={decode_tokens}", f"--ep={ep}", "--json"]
        threads_each = max(1, torch.get_num_threads() // ep)
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads_each)})
        if r.returncode != 0:
            rows.append(f"EP={ep}: failed: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
        else:
            e = json.loads(r.stdout[r.stdout.index("{"):])
            rows.append(f"EP={ep} ({threads_each} thread(s) per rank, gloo): decode {e['decode_tok_s']:.2f} tok/s vs one "
                        f"process {base['decode_tok_s']:.2f} ({e['decode_tok_s'] / base['decode_tok_s']:.2f}x); "
                        f"same tokens: {e['token_ids'] == base['tokens']}")
    tmp.cleanup()
    return "\n".join(rows)
