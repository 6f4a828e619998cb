"""Time the int4 MoE grouped GEMM at V4-Flash expert shapes on a CUDA GPU.

    python -m flashport.kernels.bench_gpu            (or: python kernels/bench_gpu.py)
    options: --batches 1,2,4,8,16,32,64 --formats int4,mxfp4 --precisions ieee,tf32

Shapes: hidden 4096, expert width 2048, 256 routed experts, top-6. Per decode step the
gate+up GEMM (w13: N = 2*2048, K = 4096, gate and up stacked) and the down GEMM
(w2: N = 4096, K = 2048) run over the tokens sorted by expert. Bytes counted = packed
weights (+ scales, + zero points) of the experts actually routed to, read once each.
The HBM reference bandwidth is measured in the same run with a large torch copy
(read + write bytes). The L2 is flushed before every timed call. A correctness check
against the plain-torch reference runs first. Not a test; not for the interpreter.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch


def _timeit(fn, reps=20, warmup=3, flush_bytes=512 << 20):
    flush = torch.empty(flush_bytes // 4, dtype=torch.float32, device="cuda")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        flush.zero_()                      # evict the L2 (H200: 60 MB)
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
    times.sort()
    return times[len(times) // 2]


def hbm_bandwidth(gib=4):
    n = (gib << 30) // 4
    src = torch.empty(n, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    t = _timeit(lambda: dst.copy_(src), reps=10, flush_bytes=1 << 20)
    del src, dst
    return 2 * n * 4 / t


def make_weights(fmt, E, N, K, block=32, dev="cuda"):
    from flashport.kernels.quant_gemm import QuantWeight
    g = torch.Generator(device=dev).manual_seed(0)
    if fmt == "int4":
        q = torch.randint(0, 256, (E, N, K // block, block // 2), dtype=torch.uint8, device=dev, generator=g)
        s = torch.rand(E, N, K // block, device=dev, generator=g) * 0.02
        return QuantWeight("int4", q, s, None, block)
    if fmt == "mxfp4":
        p = torch.randint(-128, 128, (E, N, K // 2), dtype=torch.int8, device=dev, generator=g)
        s = torch.randint(118, 128, (E, N, K // 32), dtype=torch.uint8, device=dev, generator=g)
        return QuantWeight("mxfp4", p, s, block_size=32)
    raise ValueError(fmt)


def expert_bytes(w):
    b = w.qweight[0].numel() * w.qweight.element_size()
    for t in (w.scales, w.zero_points):
        if t is not None:
            b += t[0].numel() * t.element_size()
    return b


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,2,4,8,16,32,64")
    ap.add_argument("--formats", default="int4,mxfp4")
    ap.add_argument("--precisions", default="ieee,tf32")
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--topk", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=2048)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_gpu: needs a CUDA GPU")
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("bench_gpu: unset TRITON_INTERPRET (this times real GPU kernels)")
    from flashport.kernels.moe import moe_grouped_gemm, moe_grouped_gemm_ref, moe_sort
    from flashport.kernels.quant_gemm import tile_map
    import triton

    E, k, H, I = args.experts, args.topk, args.hidden, args.inter
    props = torch.cuda.get_device_properties(0)
    print(f"# {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, "
          f"triton {triton.__version__}")
    bw = hbm_bandwidth()
    print(f"# HBM copy bandwidth (torch copy_, read+write): {bw / 1e9:.0f} GB/s")
    print(f"# shapes: E={E} top-{k} hidden={H} expert width={I}; w13 N={2 * I} K={H}, w2 N={H} K={I}")
    hdr = f"{'fmt':6} {'prec':5} {'T':>3} {'experts':>7} {'gemm':4} {'us':>8} {'GB/s':>7} {'ratio':>6}"
    for fmt in args.formats.split(","):
        w13, w2 = make_weights(fmt, E, 2 * I, H), make_weights(fmt, E, H, I)
        # correctness on the GPU first (small batch, reference over the routed experts)
        ids = torch.randint(0, E, (3, k), device="cuda")
        tok, offs = moe_sort(ids, E)
        xs = torch.randn(tok.numel(), H, device="cuda")
        for prec, tol in (("ieee", 1e-5), ("tf32", 3e-3)):
            out = moe_grouped_gemm(xs, offs, w13, precision=prec)
            ref = moe_grouped_gemm_ref(xs, offs, w13)
            err = ((out - ref).abs().max() / ref.abs().max()).item()
            print(f"# check {fmt} {prec}: max |out-ref| / max|ref| = {err:.2e} "
                  f"({'ok' if err < tol else 'TOO LARGE'})")
        print(hdr)
        for prec in args.precisions.split(","):
            for T in (int(b) for b in args.batches.split(",")):
                ids = torch.stack([torch.randperm(E, device="cuda")[:k] for _ in range(T)])
                tok, offs = moe_sort(ids, E)
                n_active = int((offs[1:] > offs[:-1]).sum())
                tiles = tile_map(offs, tok.numel())
                xs = torch.randn(tok.numel(), H, device="cuda", dtype=torch.bfloat16)
                hs = torch.randn(tok.numel(), I, device="cuda", dtype=torch.bfloat16)
                for name, w, x in (("w13", w13, xs), ("w2", w2, hs)):
                    t = _timeit(lambda: moe_grouped_gemm(x, offs, w, precision=prec, tiles=tiles))
                    gbs = n_active * expert_bytes(w) / t
                    print(f"{fmt:6} {prec:5} {T:3d} {n_active:7d} {name:4} {t * 1e6:8.1f} "
                          f"{gbs / 1e9:7.0f} {gbs / bw:6.2f}", flush=True)
        del w13, w2
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
