"""Memory of a model loaded to generate, against its checkpoint; and decode against the memory roofline, one run.

    flashport bench memory [PATH] [--preset flash-mini] [--prompt-len 16] [--decode-tokens 8] [--prefill-chunk 1024]

What `flashport generate` does, in this process, stage by stage: load the engine (`load_engine`: read the
checkpoint, upload every weight into the backend's layout), prefill a prompt, decode greedily. After each stage it
prints the resident set (VmRSS) and its peak since the previous stage (VmHWM, reset between stages through
/proc/self/clear_refs), and the peak over the checkpoint's bytes (the sum of its safetensors files). Then:

- held: the bytes of every tensor storage the model and its backend's weight handles keep, each storage once
  (`held_bytes`): a weight uploaded as a copy beside the model's packed one counts twice;
- weights read per decode token in the uploaded layout (bench/decode.py's `decode_bytes_per_token`), decode
  ms/token, their quotient (achieved bytes/s) and its fraction of the read bandwidth measured at the end of the
  same run (bench/ops.py's `read_bandwidth`, a large torch sum: measured last, so that its buffer does not count
  in the peaks above).

A release checkpoint's weights are views of its memory-mapped files (flashport.loader): the pages they occupy count
in VmRSS as file-backed pages (the kernel may drop and re-read them, unlike copies). Linux only (/proc).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

STATUS = Path("/proc/self/status")


def process_memory() -> dict[str, int]:
    """{"rss": bytes resident now, "peak": the peak since the start or the last `reset_peak`} (Linux; {} elsewhere)."""
    try:
        fields = dict(line.split(":", 1) for line in STATUS.read_text().splitlines() if ":" in line)
    except OSError:
        return {}
    kb = lambda key: int(fields[key].split()[0]) * 1024  # noqa: E731 - "123 kB"
    return {"rss": kb("VmRSS"), "peak": kb("VmHWM")}


def reset_peak() -> bool:
    """Reset this process's VmHWM to its current VmRSS (Linux >= 4.0: /proc/self/clear_refs "5"); False if not."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def checkpoint_bytes(path: str | Path) -> int:
    """Bytes of a checkpoint directory's safetensors files (headers included)."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def held_bytes(model) -> int:
    """Bytes of the tensor storages a model keeps: parameters, buffers, every Linear's packed tensors and every
    tensor attribute of its backends' uploaded weights (`Linear.handles`), each storage counted once (by address).
    A backend that keeps a copy of a weight beside the model's packed one shows here as the copy's bytes."""
    from flashport.model import Linear, stored_bytes

    handles = [t for mod in model.modules() if isinstance(mod, Linear) for h in mod.handles.values()
               for t in (vars(h).values() if hasattr(h, "__dict__") else (h,))]
    return stored_bytes(model, handles)


def run(path: str = "", preset: str = "flash-mini", prompt_len: int = 16, decode_tokens: int = 8,
        prefill_chunk: int = 0, threads: int = 0, seed: int = 0) -> str:
    """The table described in the module docstring, as text. prefill_chunk: tokens per prefill step (the engine's
    `prefill_chunk`; the prefill's activations and per-call dequantized weights grow with it); 0: the engine's
    default (`model.default_prefill_chunk`)."""
    from flashport.bench import checkpoint_or_preset
    from flashport.bench.decode import decode_bytes_per_token
    from flashport.bench.ops import read_bandwidth
    from flashport.engine import load_engine

    if threads:
        torch.set_num_threads(threads)
    rows = []

    def stage(name: str, seconds: float | None = None) -> None:
        rows.append((name, process_memory(), seconds))
        reset_peak()

    with checkpoint_or_preset(path, preset, seed) as ck:
        ck_bytes = checkpoint_bytes(ck)
        stage("start")
        t0 = time.perf_counter()
        eng = load_engine(ck, prefill_chunk=prefill_chunk or None)
        stage("load", time.perf_counter() - t0)
        held = held_bytes(eng.model)
        per_token = decode_bytes_per_token(eng.model, eng.model.ops)
        ids = torch.randint(2, min(eng.cfg.vocab_size, 4000), (prompt_len,),
                            generator=torch.Generator().manual_seed(seed)).tolist()
        state = eng.new_state()
        t0 = time.perf_counter()
        logits = eng.prefill(ids, state, progress=False)
        stage(f"prefill {prompt_len}", time.perf_counter() - t0)
        tok = int(logits.argmax())
        t0 = time.perf_counter()
        for _ in range(decode_tokens):
            tok = int(eng.model.forward_batch([torch.tensor([tok])], [state], all_logits=False)[0][0].argmax())
        decode_s = (time.perf_counter() - t0) / decode_tokens
        stage(f"decode {decode_tokens}", decode_s * decode_tokens)
        peak = max(m.get("peak", 0) for _, m, _ in rows)
        name, chunk = eng.cfg.name, eng.prefill_chunk
        del eng, state, logits
    bw = read_bandwidth(512 << 20)
    gb = lambda b: f"{b / 1e9:.3f} GB"  # noqa: E731
    lines = [f"bench memory: {ck} ({name}), {torch.get_num_threads()} threads, prefill chunk {chunk}, "
             "load average "
             + " ".join(f"{v:.2f}" for v in os.getloadavg()),
             f"checkpoint {gb(ck_bytes)}; held by model + backend after load {gb(held)} ({held / ck_bytes:.3f}x)",
             f"{'stage':<12} {'seconds':>8} {'VmRSS':>10} {'peak':>10} {'peak/ckpt':>9}"]
    for stage_name, m, s in rows:
        sec = f"{s:>8.1f}" if s is not None else f"{'-':>8}"
        lines.append(f"{stage_name:<12} {sec} {m.get('rss', 0) / 1e9:>7.3f} GB {m.get('peak', 0) / 1e9:>7.3f} GB "
                     f"{m.get('peak', 0) / ck_bytes:>8.3f}x")
    lines += [f"peak RSS {gb(peak)} = {peak / ck_bytes:.3f}x the checkpoint",
              f"weights read per decode token {per_token / 1e6:.1f} MB; decode {decode_s * 1e3:.1f} ms/token; "
              f"{per_token / decode_s / 1e9:.2f} GB/s = {per_token / decode_s / bw:.1%} of the measured read "
              f"bandwidth {bw / 1e9:.1f} GB/s"]
    return "\n".join(lines)
