"""Prefill/decode throughput: flashport against transformers' DeepseekV4ForCausalLM, same weights, same run.

    flashport bench decode [PATH] [--preset flash-mini] [--prompt-lens 512,2048] [--decode-tokens 32]

Three columns measured side by side: flashport on the plain torch reference ops ("ref", the math every backend
is checked against), flashport on the fast CPU ops (backends/torch_fast.py, "fast"), and transformers ("hf").
"""

from __future__ import annotations

import time
from pathlib import Path

import torch


def _flashport(path: Path, ids: torch.Tensor, decode_tokens: int, fast: bool) -> tuple[float, float]:
    from flashport.backends.dispatch import REFERENCE, Ops
    from flashport.backends.torch_fast import FastTorchBackend
    from flashport.engine import Engine
    from flashport.model import Linear

    eng = Engine.load(path)
    ops = Ops(FastTorchBackend()) if fast else REFERENCE
    eng.model.set_ops(ops)
    for mod in eng.model.modules():  # upload every weight now: loading is not part of prefill
        if isinstance(mod, Linear):
            ops.handle(mod)
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
    return len(ids) / (t1 - t0), decode_tokens / (t2 - t1)


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
        threads: int = 0, peer: bool = True, seed: int = 0) -> str:
    from flashport.bench import checkpoint_or_preset

    if threads:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    rows = []
    with checkpoint_or_preset(path, preset, seed) as path:
        for n in prompt_lens:
            ids = torch.randint(2, 4000, (n,), generator=g)
            ref = _flashport(path, ids, decode_tokens, fast=False)
            fast = _flashport(path, ids, decode_tokens, fast=True)
            hf = _transformers(path, ids, decode_tokens) if peer else (float("nan"),) * 2
            rows.append((n, ref, fast, hf))
    head = f"{'ref':>8} {'fast':>8} {'hf':>8} {'fast/hf':>8} {'fast/ref':>8}"
    lines = [f"bench decode: {path} ({torch.get_num_threads()} threads, {decode_tokens} decode steps)",
             f"{'prompt':>7} | {'prefill tok/s':^44} | {'decode tok/s':^44}",
             f"{'':>7} | {head} | {head}"]
    for n, *cols in rows:
        cells = []
        for phase in (0, 1):
            r, f, h = (c[phase] for c in cols)
            cells.append(f"{r:>8.1f} {f:>8.1f} {h:>8.1f} {f / h:>7.2f}x {f / r:>7.2f}x")
        lines.append(f"{n:>7} | {cells[0]} | {cells[1]}")
    return "\n".join(lines)


def run_contexts(path: str = "", preset: str = "flash-tiny", contexts=(8192, 32768, 131072), decode_tokens: int = 16,
                 threads: int = 0, seed: int = 0) -> str:
    """Decode cost per token against the context length, fast CPU ops: the sliding window and the top-k
    attention cost the same at every length; the indexer's scoring (one matmul over every compressed entry)
    and the HCA layers' dense attention grow with it. Prefill (not timed) runs the fast ops too."""
    from flashport.backends.dispatch import Ops
    from flashport.backends.torch_fast import FastTorchBackend
    from flashport.bench import checkpoint_or_preset
    from flashport.engine import Engine

    if threads:
        torch.set_num_threads(threads)
    contexts = [int(x) for x in (contexts.split(",") if isinstance(contexts, str) else contexts)]
    with checkpoint_or_preset(path, preset, seed) as ck:
        eng = Engine.load(ck)
        eng.model.set_ops(Ops(FastTorchBackend()))
        g = torch.Generator().manual_seed(seed)
        lines = [f"decode cost vs context: {eng.cfg.name}, fast ops, {torch.get_num_threads()} threads, "
                 f"{decode_tokens} decode steps",
                 f"{'context':>8} {'prefill s':>9} {'decode ms/tok':>13} {'vs first':>8}"]
        first = None
        for n in contexts:
            state = eng.new_state()
            t0 = time.perf_counter()
            logits = eng.prefill(torch.randint(2, eng.cfg.vocab_size - 1, (n,), generator=g).tolist(), state)
            t1 = time.perf_counter()
            tok = int(logits.argmax())
            for _ in range(decode_tokens):
                tok = int(eng.model.forward_batch([torch.tensor([tok])], [state], all_logits=False)[0][0].argmax())
            per_tok = (time.perf_counter() - t1) / decode_tokens
            first = first or per_tok
            lines.append(f"{n:>8} {t1 - t0:>9.1f} {per_tok * 1e3:>13.2f} {per_tok / first:>7.2f}x")
    return "\n".join(lines)
