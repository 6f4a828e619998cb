"""Prefill through the cache: restore the longest cached prefix, run the rest in chunks, store the new blocks.

Bit-identical restore needs a deterministic engine (torch backend, deterministic=True): batch-invariant ops
and prefill chunks cut at absolute multiples of the block (`chunk_spans`). Continuing from a hit then gives the
same logits bit for bit as the uninterrupted run, for every strategy and KV numerics, hits mid-block included.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
from tqdm import tqdm

from ..model import SeqState
from .manager import KVManager, PrefillStats, RestorePlan, SeqTracker


def chunk_spans(start: int, end: int, chunk: int, block: int, deterministic: bool = False,
                period: int = 0) -> list[tuple[int, int]]:
    """Prefill chunks [a, b) covering [start, end), cut at absolute positions: multiples of `chunk` (of `block` in
    deterministic mode, so a position always meets the same chunk shape, whatever the restore point) and of
    `period` (where the strategy takes a fixed-state record)."""
    step = block if deterministic else max(1, chunk)
    cuts = {end, *range((start // step + 1) * step, end, step)}
    if period:
        cuts.update(range((start // period + 1) * period, end, period))
    spans, a = [], start
    for c in sorted(cuts):
        spans.append((a, c))
        a = c
    return spans


@contextmanager
def replaying(state: SeqState):
    """While active, every compressor state of `state` (attention and indexer) is in replay (PoolState.replay):
    the tokens re-run have their compressed entries in the state already (the `none` strategy's window rebuild)."""
    pools = [ps for ls in state.layers for ps in (ls.comp, ls.index) if ps is not None]
    for ps in pools:
        ps.replay = True
    try:
        yield
    finally:
        for ps in pools:
            ps.replay = False


@torch.no_grad()
def prefill_cached(model, kv: KVManager | None, ids: list[int], chunk: int = 1024, deterministic: bool = False,
                   progress: bool | None = None) -> tuple[SeqState, torch.Tensor, PrefillStats, SeqTracker | None]:
    """Prefill `ids` from the longest cached prefix: restore it, run the rest, store the new blocks.

    Returns (state, logits of the last position [V], stats, tracker for continuing the sequence). Any cache
    error falls back to a full recompute.
    """
    t0 = time.perf_counter()
    n, cfg = len(ids), model.cfg
    stats = PrefillStats(n)
    tracker = kv.tracker(ids) if kv is not None else None
    plan, state = RestorePlan.miss(), None
    if kv is not None:
        try:
            plan = kv.plan(tracker, n)
            if plan.path != "miss":
                state, stats.bytes_read, stats.read_from = kv.restore(tracker, plan)
        except Exception as e:  # noqa: BLE001 - the cache may fail; the request must not
            kv.report_error("restore", e)
            stats.error = f"{type(e).__name__}: {e}"
            plan, state = RestorePlan.miss(), None
    if state is None:
        state = kv.new_state() if kv is not None else SeqState.empty(cfg)
    stats.restore_seconds = time.perf_counter() - t0
    stats.path, stats.hit_tokens = plan.path, plan.hit_tokens
    stats.loaded_tokens = plan.hit_tokens if plan.path == "window" else plan.start
    stats.recomputed_tokens = plan.hit_tokens - plan.start if plan.path != "miss" else 0
    stats.new_tokens = n - (plan.hit_tokens if plan.path != "miss" else 0)
    if plan.path == "miss":
        stats.recomputed_tokens, stats.new_tokens = 0, n

    show = progress if progress is not None else n - plan.start > 4 * max(chunk, cfg.kv_block_tokens)
    bar = tqdm(total=n - plan.start, desc="prefill", unit="tok", disable=not show)
    period = kv.strategy.period if kv is not None else 0
    logits = None

    def run(a: int, b: int, store: bool):
        nonlocal logits
        for lo, hi in chunk_spans(a, b, chunk, cfg.kv_block_tokens, deterministic, period if store else 0):
            logits = model.forward_batch([torch.tensor(ids[lo:hi])], [state], all_logits=False)[0][0]
            if store and kv is not None:  # blocks in runs of about RUN_BYTES (one disk extent each)
                kv.observe(tracker, state, defer=hi < b)
            bar.update(hi - lo)

    if plan.path == "window":  # rebuild the windows over [start, hit) with the loaded entries, then continue
        with replaying(state):
            run(plan.start, plan.hit_tokens, store=False)
    if tracker is not None:
        tracker.stored_blocks = plan.load_blocks
    if plan.path == "window":
        kv.observe(tracker, state)  # exact again: a record here if the strategy takes one
    run(state.n_tokens, n, store=True)
    bar.close()
    stats.seconds = time.perf_counter() - t0
    if kv is not None:
        kv.record_request(stats)
    return state, logits, stats, tracker