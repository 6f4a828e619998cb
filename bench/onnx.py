"""ONNX Runtime (CPU EP) against the torch backend on the same quantized model, same run.

    flashport bench onnx [--preset flash-mini] [--experts int4-g32] [--linears none] [--prompt-len 256]
                         [--decode-tokens 32] [--repeats 2] [--threads 0] [--int8-activations]

Builds PRESET with deterministic random weights, packs the routed and shared experts (and optionally every other
linear) like a bundle does, exports the decoder step to ONNX (time, size on disk), then measures prefill and
decode tokens/s of both backends on the same prompt. The backends alternate for `repeats` rounds and the best
round of each counts (the machines are shared). Greedy tokens of both are compared and reported.
With --int8-activations a second export with accuracy_level=4 (int8 activations in MatMulNBits/QMoE: the fast
CPU path, tolerance-bound, not parity-tested) is measured too.
"""

from __future__ import annotations

import tempfile
import time

import torch


def _measure(model, ids: torch.Tensor, decode_tokens: int) -> tuple[float, float, list[int]]:
    """(prefill tok/s, decode tok/s, greedy tokens) of `model` (a Transformer or an OnnxModel)."""
    from flashport.model import SeqState

    with torch.no_grad():
        state = SeqState.empty(model.cfg)
        t0 = time.perf_counter()
        logits = model.forward_batch([ids], [state], all_logits=False)[0][0]
        t1 = time.perf_counter()
        toks = [int(logits.argmax())]
        for _ in range(decode_tokens):
            logits = model.forward_batch([torch.tensor([toks[-1]])], [state], all_logits=False)[0][0]
            toks.append(int(logits.argmax()))
        t2 = time.perf_counter()
    return len(ids) / (t1 - t0), decode_tokens / (t2 - t1), toks


def run(preset: str = "flash-mini", experts: str = "int4-g32", linears: str | None = None, prompt_len: int = 256,
        decode_tokens: int = 32, repeats: int = 2, threads: int = 0, seed: int = 0,
        int8_activations: bool = False) -> str:
    from flashport.backends.dispatch import Ops
    from flashport.backends.onnx_backend import OnnxRuntimeBackend
    from flashport.backends.onnx_export import export_model, quantize_in_memory
    from flashport.backends.registry import create
    from flashport.checkpoint import init_weights
    from flashport.config import ModelConfig
    from flashport.model import Transformer

    if threads:
        torch.set_num_threads(threads)
    cfg = ModelConfig.preset(preset)
    model = Transformer(cfg)
    model.load_state_dict(init_weights(cfg, seed))
    quantize_in_memory(model, experts, None if linears in (None, "none") else linears)
    model.set_ops(Ops(create("torch")))  # the built-in torch backend, with its fast CPU kernels
    ids = torch.randint(2, cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(seed))

    levels = [0, 4] if int8_activations else [0]
    tmp = tempfile.TemporaryDirectory(prefix="flashport-bench-onnx-")
    runners, exports = {"torch": model}, {}
    for level in levels:
        out = f"{tmp.name}/level{level}"
        t0 = time.perf_counter()
        manifest = export_model(model, out, accuracy_level=level, progress=False)
        exports[level] = (time.perf_counter() - t0, manifest["bytes"], manifest["nodes"])
        t0 = time.perf_counter()
        backend = OnnxRuntimeBackend(threads=threads or torch.get_num_threads())
        runners[f"onnxruntime L{level}"] = backend.bind_model(model, out)
        exports[level] += (time.perf_counter() - t0,)

    best: dict[str, list] = {name: [0.0, 0.0, None] for name in runners}
    for _ in range(repeats):
        for name, m in runners.items():
            p, d, toks = _measure(m, ids, decode_tokens)
            b = best[name]
            b[0], b[1], b[2] = max(b[0], p), max(b[1], d), toks
    tmp.cleanup()

    ref = best["torch"]
    lines = [f"bench onnx: {preset}, experts {experts}, other linears {linears or 'fp32'}, prompt {prompt_len}, "
             f"{decode_tokens} decode steps, {torch.get_num_threads()} threads, best of {repeats}",
             f"{'backend':<18} {'prefill tok/s':>14} {'ratio':>7} {'decode tok/s':>13} {'ratio':>7}  greedy = torch"]
    for name, (p, d, toks) in best.items():
        lines.append(f"{name:<18} {p:>14.1f} {p / ref[0]:>6.2f}x {d:>13.1f} {d / ref[1]:>6.2f}x  "
                     f"{'yes' if toks == ref[2] else 'NO'}")
    for level, (secs, nbytes, nodes, sess) in exports.items():
        lines.append(f"export L{level}: {secs:.1f} s, {nbytes / 2**20:.1f} MiB on disk (graph + external data), "
                     f"{nodes} nodes; session creation {sess:.1f} s")
    return "\n".join(lines)
