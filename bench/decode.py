"""Prefill/decode throughput: flashport against transformers' DeepseekV4ForCausalLM, same weights, same run.

    flashport bench decode [PATH] [--preset flash-mini] [--prompt-lens 512,2048] [--decode-tokens 32]

Three columns measured side by side: flashport on the plain torch reference ops ("ref", the math every backend
is checked against), flashport on the fast CPU ops (backends/torch_fast.py, "flashport"), and transformers; then
flashport / transformers and, for decode, the roofline fraction: the bytes of weights one decode token reads in
the fast path's layout (`decode_bytes_per_token`) times tokens/s, over the read bandwidth measured in the same run
(bench/ops.py's `read_bandwidth`). `peer=False` skips transformers (its cells print "-").
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch


def decode_bytes_per_token(model, ops) -> int:
    """Bytes of weights one decode token reads with `ops`: every Linear in its uploaded layout (`nbytes`, e.g. FP8 +
    scales; the fp32 tensor when it runs on the reference), routed experts counted num_experts_per_tok / n_routed
    per MoE layer (the average expert), every other parameter (norms, mHC mixes, router) as stored, one embedding
    row; the MTP block (not run by plain decode) is left out."""
    from flashport.model import Linear

    cfg, total = model.cfg, 0
    for name, mod in model.named_modules():
        if name.startswith("mtp"):
            continue
        share = cfg.num_experts_per_tok / cfg.n_routed_experts if ".experts." in name else 1.0
        for pname, p in mod.named_parameters(recurse=False):
            if isinstance(mod, Linear) and pname == "weight":
                h = ops.handle(mod)
                nbytes = h.nbytes if hasattr(h, "nbytes") else h.numel() * h.element_size()
            elif name == "embed":
                nbytes = p.shape[1] * p.element_size()  # one row
            else:
                nbytes = p.numel() * p.element_size()
            total += share * nbytes
    return int(total)


def _flashport(path: Path, ids: torch.Tensor, decode_tokens: int, fast: bool,
               backend_options: dict | None = None) -> tuple[float, float, int]:
    from flashport.backends.dispatch import REFERENCE, Ops
    from flashport.backends.torch_fast import FastTorchBackend
    from flashport.engine import Engine
    from flashport.model import Linear

    eng = Engine.load(path)
    ops = Ops(FastTorchBackend(**(backend_options or {}))) if fast else REFERENCE
    eng.model.set_ops(ops)
    for mod in eng.model.modules():  # upload every weight now: loading is not part of prefill
        if isinstance(mod, Linear):
            ops.handle(mod)
    nbytes = decode_bytes_per_token(eng.model, ops)
    eng.prefill([2] * 8, eng.new_state(), progress=False)  # warm-up: uploads weights, first-call allocations
    eng.prefill_chunk = len(ids)
    state = eng.new_state()
    t0 = time.perf_counter()
    logits = eng.prefill(ids.tolist(), state, progress=False)
    t1 = time.perf_counter()
    tok = int(logits.argmax())
    for _ in range(decode_tokens):
        logits = eng.model.forward_batch([torch.tensor([tok])], [state], all_logits=False)[0][0]
        tok = int(logits.argmax())
    t2 = time.perf_counter()
    return len(ids) / (t1 - t0), decode_tokens / (t2 - t1), nbytes


def _transformers(path: Path, ids: torch.Tensor, decode_tokens: int) -> tuple[float, float]:
    try:
        from transformers import DeepseekV4ForCausalLM, logging as hf_logging
    except ImportError:
        raise RuntimeError("the peer benchmark needs transformers>=5 (pip install 'flashport[test]')") from None
    hf_logging.set_verbosity_error()
    model = DeepseekV4ForCausalLM.from_pretrained(str(path), dtype=torch.float32).float().eval()
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(input_ids=ids[None], use_cache=True)
        t1 = time.perf_counter()
        cache, tok = out.cache, out.logits[0, -1].argmax()
        for _ in range(decode_tokens):
            out = model(input_ids=tok.view(1, 1), cache=cache, use_cache=True)
            cache, tok = out.cache, out.logits[0, -1].argmax()
        t2 = time.perf_counter()
    return len(ids) / (t1 - t0), decode_tokens / (t2 - t1)


def run(path: str = "", preset: str = "flash-mini", prompt_lens=(512, 2048), decode_tokens: int = 32,
        threads: int = 0, peer: bool = True, seed: int = 0, backend_options: dict | None = None) -> str:
    """One row per (prompt length, phase): tokens/s of the reference ops, flashport's fast ops and transformers,
    flashport / transformers, flashport / reference, and for decode the fraction of the memory roofline
    (bytes of weights per token x tokens/s / measured read bandwidth). Wall time, one run
    per cell (repeat the command for medians; docs/performance.md gives the load average with every figure).
    backend_options: keyword options of the fast CPU backend (FastTorchBackend: prefill_matmul, decode_activations)."""
    from flashport.bench import checkpoint_or_preset
    from flashport.bench.ops import read_bandwidth

    if threads:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    rows = []
    with checkpoint_or_preset(path, preset, seed) as path:
        for n in prompt_lens:
            ids = torch.randint(2, 4000, (n,), generator=g)
            *ref, ref_bytes = _flashport(path, ids, decode_tokens, fast=False)
            *fast, fast_bytes = _flashport(path, ids, decode_tokens, fast=True, backend_options=backend_options)
            hf = _transformers(path, ids, decode_tokens) if peer else None
            rows.append((n, ref, fast, hf))
    bw = read_bandwidth(256 << 20)
    opts = "".join(f", {k}={v}" for k, v in (backend_options or {}).items())
    lines = [f"bench decode: {path} ({torch.get_num_threads()} threads, {decode_tokens} decode steps{opts})",
             f"weights read per decode token: flashport {fast_bytes / 1e6:.1f} MB, reference {ref_bytes / 1e6:.1f} MB; "
             f"measured read bandwidth {bw / 1e9:.1f} GB/s: roofline {bw / fast_bytes:.0f} tok/s",
             f"{'prompt':>7} {'phase':<8} {'ref':>9} {'flashport':>10} {'transformers':>13} "
             f"{'fp/tf':>7} {'fp/ref':>7} {'roofline':>9}"]
    for n, ref, fast, hf in rows:
        for phase, name in ((0, "prefill"), (1, "decode")):
            tf = f"{hf[phase]:>13.1f}" if hf else f"{'-':>13}"
            ratio = f"{fast[phase] / hf[phase]:>6.2f}x" if hf else f"{'-':>7}"
            roof = f"{fast[phase] * fast_bytes / bw:>9.1%}" if phase else f"{'-':>9}"
            lines.append(f"{n:>7} {name:<8} {ref[phase]:>9.1f} {fast[phase]:>10.1f} {tf} {ratio} "
                         f"{fast[phase] / ref[phase]:>6.2f}x {roof}")
    # the last line, for scripts (../shared/tools/peer-llamacpp reads fields 1 and 2 between the bars)
    n, _, fast, _ = rows[-1]
    lines.append(f"flashport {n}-token prompt | prefill {fast[0]:.1f} tok/s | decode {fast[1]:.1f} tok/s")
    return "\n".join(lines)


def step_ms(path: str, threads: int = 1, prompt_len: int = 512, reps: int = 5, steps: int = 6,
            seed: int = 0) -> dict:
    """Milliseconds per decode step of the fast CPU ops, as docs/performance.md compares trees side by side: load
    the checkpoint at `path`, upload every weight, prefill `prompt_len` random ids (seed 0, in one chunk), run 3
    warm-up steps, then `reps` times `steps` greedy steps. Returns {"cpu_ms", "wall_ms"} (medians over the reps;
    cpu = this process's CPU time, which the other load of a shared machine disturbs far less than wall time),
    "tokens" (the greedy ids, to check two trees agree) and "load" (1-minute load average at the end)."""
    import os
    import statistics

    from flashport.backends.dispatch import Ops
    from flashport.backends.torch_fast import FastTorchBackend
    from flashport.engine import Engine
    from flashport.model import Linear

    torch.set_num_threads(threads)
    eng = Engine.load(path)
    ops = Ops(FastTorchBackend())
    eng.model.set_ops(ops)
    for mod in eng.model.modules():
        if isinstance(mod, Linear):
            ops.handle(mod)
    ids = torch.randint(2, 4000, (prompt_len,), generator=torch.Generator().manual_seed(seed)).tolist()
    eng.prefill_chunk, state = prompt_len, eng.new_state()
    cpu, wall, tokens = [], [], []
    with torch.no_grad():
        tok = int(eng.prefill(ids, state, progress=False).argmax())
        for rep in range(reps + 1):  # rep 0: the warm-up
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(steps if rep else 3):
                tok = int(eng.model.forward_batch([torch.tensor([tok])], [state], all_logits=False)[0][0].argmax())
                tokens.append(tok)
            if rep:
                cpu.append((time.process_time() - c0) / steps * 1e3)
                wall.append((time.perf_counter() - w0) / steps * 1e3)
    return {"cpu_ms": statistics.median(cpu), "wall_ms": statistics.median(wall), "tokens": tokens,
            "load": os.getloadavg()[0]}


@torch.no_grad()
def timed_decode(model, state, logits, tokens: int) -> tuple[list[float], list[float]]:
    """Greedy decode `tokens` steps on `state` (modified) from `logits` -> (wall ms, CPU ms) of each step; CPU is
    this process's CPU time, steadier than wall time on a shared machine."""
    wall, cpu = [], []
    for _ in range(tokens):
        w0, c0 = time.perf_counter(), time.process_time()
        logits = model.forward_batch([torch.tensor([int(logits.argmax())])], [state], all_logits=False)[0][0]
        wall.append((time.perf_counter() - w0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return wall, cpu


def steady_ms(steps: list[float]) -> float:
    """ms/token of decode steps after the first (a restored or extended state's first step builds its entry stores
    and the indexer's FP4 codes once; it is reported on its own): the median, steadier than the mean."""
    return statistics.median(steps[1:] or steps)


def extend_entries(state, cfg, n_tokens: int) -> None:
    """Make `state` (a real sequence of t tokens, t a multiple of the HCA rate) look n_tokens long to decode: every
    compressor's entries repeated to n_tokens // rate rows and the position set to n_tokens. The decode cost of a
    step depends on how many entries there are (the indexer's scan, HCA attention), not on their values, so this
    measures the cost at n_tokens without a prefill of n_tokens; the tokens it decodes mean nothing. Each copy
    after the first flips the signs of a random set of dims, so that copies do not tie in the indexer's top-k (a
    tie at the k-th place sends a query to the exact re-selection over its full row) and the values stay on the
    grid of the KV's numerics (FP8, BF16, FP4 are sign-symmetric)."""
    g = torch.Generator().manual_seed(0)
    for i, ls in enumerate(state.layers):
        rate = {"csa": cfg.csa_rate, "hca": cfg.hca_rate}.get(cfg.layer_kind(i))
        for ps in (ls.comp, ls.index):
            if ps is None or not rate or not ps.entries.shape[0]:
                continue
            rows, e = n_tokens // rate, ps.entries
            copies = -(-rows // e.shape[0])
            signs = torch.randint(0, 2, (copies, 1, e.shape[1]), generator=g).to(e.dtype) * 2 - 1
            signs[0] = 1
            ps.entries = (e[None] * signs).reshape(-1, e.shape[1])[:rows].contiguous()
            ps.store = None  # rebuilt from the new entries at the first step
    state.n_tokens = n_tokens


def run_contexts(path: str = "", preset: str = "flash-tiny", contexts=(8192, 32768, 131072), decode_tokens: int = 16,
                 threads: int = 0, seed: int = 0, extend: bool = False, index_numerics: str = "") -> str:
    """Decode cost per token against the context length: the sliding window and the top-k attention cost the
    same at every length; the indexer's scoring (a scan of every compressed entry) and the HCA layers' dense
    attention grow with it. Each row: a prefill of that many random tokens (not timed here), then `decode_tokens`
    greedy steps; ms/token is the median of the steps after the first, in wall and in this process's CPU time.
    extend: prefill only the first context and reach the longer ones with `extend_entries` (the cost at 1M
    tokens of a model whose 1M-token prefill would take hours here)."""
    from flashport.bench import checkpoint_or_preset
    from flashport.engine import Engine

    if threads:
        torch.set_num_threads(threads)
    contexts = [int(x) for x in (contexts.split(",") if isinstance(contexts, str) else contexts)]
    with checkpoint_or_preset(path, preset, seed) as ck:
        eng = Engine.load(ck, index_numerics=index_numerics or None)
        g = torch.Generator().manual_seed(seed)
        lines = [f"decode cost vs context: {eng.cfg.name}, {torch.get_num_threads()} threads, index numerics "
                 f"{eng.index_numerics}, {decode_tokens} decode steps"
                 + (f" (contexts past {contexts[0]}: its entries repeated, extend_entries)" if extend else ""),
                 f"{'context':>8} {'prefill s':>9} {'decode ms/tok':>13} {'vs first':>8} {'cpu ms/tok':>10} "
                 f"{'vs first':>8}   (medians of the steps after the first; cpu: this process's CPU time, "
                 f"steadier than wall time on a shared machine)"]
        first = first_cpu = base = None
        for n in contexts:
            if base is None or not extend:
                state = eng.new_state()
                t0 = time.perf_counter()
                logits = eng.prefill(torch.randint(2, eng.cfg.vocab_size - 1, (n,), generator=g).tolist(), state)
                prefill_s, base = time.perf_counter() - t0, (state, logits)
                st = state
            else:
                st, logits, prefill_s = base[0].clone(), base[1], float("nan")
                extend_entries(st, eng.cfg, n)
            wall, cpu = timed_decode(eng.model, st, logits, max(2, decode_tokens))
            per_tok, cpu_tok = steady_ms(wall), steady_ms(cpu)
            first, first_cpu = first or per_tok, first_cpu or cpu_tok
            lines.append(f"{n:>8} {prefill_s:>9.1f} {per_tok:>13.2f} {per_tok / first:>7.2f}x "
                         f"{cpu_tok:>10.2f} {cpu_tok / first_cpu:>7.2f}x")
    return "\n".join(lines)