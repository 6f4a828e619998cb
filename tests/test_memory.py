"""Memory of a loaded release checkpoint: each weight is held once (the model's packed tensors are views of the
memory-mapped files, and the fast CPU backend reads them in place: FP8, MXFP4 experts, bf16 head and embedding),
and the peak RSS of load + generate stays near the checkpoint's bytes (issue 13 item 7, at a reduced width)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from flashport.bench.memory import checkpoint_bytes, held_bytes
from flashport.engine import Engine


def tensor_bytes(path) -> int:
    """Bytes of every tensor in a checkpoint's safetensors files, read from their headers."""
    total = 0
    for f in path.glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            for name in h.keys():
                s = h.get_slice(name)
                total += torch.Size(s.get_shape()).numel() * torch.empty(0, dtype=_DTYPES[s.get_dtype()]).element_size()
    return total


_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F8_E4M3": torch.float8_e4m3fn,
           "F8_E8M0": torch.float8_e8m0fnu, "I8": torch.int8, "U8": torch.uint8, "I64": torch.int64,
           "I32": torch.int32}


def test_release_weights_are_held_once(tiny_release):
    """After load and a generation (every weight uploaded, every op run), the tensors the model and the backend keep
    add up to the checkpoint's tensor bytes (up to fp32 copies of the small scales and norms): no weight is kept
    twice, none widened (MXFP4 experts stay at 0.5 byte per weight, the bf16 embedding and head at 2)."""
    eng = Engine.load(tiny_release, backend="torch")
    eng.generate([5, 6, 7, 8, 9], max_new_tokens=3)
    model = eng.model
    stored = tensor_bytes(tiny_release)
    assert held_bytes(model) <= 1.1 * stored, (held_bytes(model), stored)
    assert model.embed.weight.dtype == torch.bfloat16  # as stored; rows become fp32 when gathered
    assert model.embed(torch.tensor([3])).dtype == torch.float32


def test_fp32_loading_still_widens_everything(tiny_release):
    """keep_packed=False (what whole-step backends and the ONNX exporter get) still gives fp32 tensors."""
    from flashport.loader import open_model

    model = open_model(tiny_release, keep_packed=False).model
    assert model.embed.weight.dtype == torch.float32 and model.head.packed is None


PEAK = """
import sys
from flashport.backends import cpu_quant
from flashport.bench.memory import process_memory, reset_peak
from flashport.engine import load_engine
cpu_quant.ext()
base = process_memory()["rss"]
assert reset_peak()
eng = load_engine(sys.argv[1])
out = eng.generate([5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], max_new_tokens=3)
print(process_memory()["peak"] - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_rss_of_load_and_generate_near_the_checkpoint(tmp_path):
    """A checkpoint whose bytes are mostly the bf16 embedding and head (a V4-sized vocabulary at a small width):
    loading and generating grows the process's peak RSS by at most 1.3x the checkpoint's bytes (a fp32 embedding,
    or an upload that copies the head, would each add about half of it)."""
    from flashport.checkpoint import make_checkpoint

    ck = make_checkpoint(tmp_path / "ck", "flash-tiny", override={"vocab_size": 524288})
    nbytes = checkpoint_bytes(ck)
    assert nbytes > 250e6
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest's: "auto" would import triton
    run = subprocess.run([sys.executable, "-c", PEAK, str(ck)], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    growth = int(run.stdout.split()[-1])
    assert growth <= 1.3 * nbytes, f"peak RSS grew {growth / 1e6:.0f} MB for a {nbytes / 1e6:.0f} MB checkpoint"
    assert json.loads((ck / "config.json").read_text())["vocab_size"] == 524288


def test_bench_memory_prints_peak_held_and_bandwidth(tiny_release):
    """`flashport bench memory PATH` prints the checkpoint's bytes, what model + backend hold (about 1x), the peak
    RSS per stage and its ratio, and decode's bytes per token against the bandwidth measured in the same run."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "flashport.cli", "bench", "memory", str(tiny_release),
                          "--prompt-len", "4", "--decode-tokens", "1"], capture_output=True, text=True, timeout=600,
                         env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    held = next(line for line in out.splitlines() if "held by model + backend" in line)
    assert float(held.rsplit("(", 1)[1].split("x")[0]) <= 1.1, held
    assert "prefill 4" in out and "decode 1" in out and "x the checkpoint" in out
    assert "weights read per decode token" in out and "of the measured read bandwidth" in out


def test_default_prefill_chunk_keeps_activations_a_small_share_of_the_weights(tiny_release):
    """Without --prefill-chunk, a chunk's fp32 activations stay within max(256 MiB, 15% of the weights): at
    V4-Flash's widths on a 3-layer checkpoint (3.2 GB) 1024 tokens would hold ~1.1 GB (peak RSS 1.41x the
    checkpoint, measured); small presets and the full V4-Flash keep 1024; an explicit chunk is honoured."""
    from flashport.config import ModelConfig
    from flashport.engine import Engine
    from flashport.model import PREFILL_CHUNK, default_prefill_chunk, stored_bytes, workspace_bytes

    shaped = ModelConfig.preset("v4-flash").override(
        {"num_hidden_layers": 3, "n_routed_experts": 16, "compress_ratios": [0, 4, 128], "num_nextn_predict_layers": 0})
    chunk = default_prefill_chunk(shaped, 3_224_000_000)
    assert chunk < PREFILL_CHUNK and workspace_bytes(shaped, chunk, 2 * chunk) <= 0.15 * 3_224_000_000
    assert workspace_bytes(shaped, PREFILL_CHUNK, 2 * PREFILL_CHUNK) > 0.15 * 3_224_000_000
    assert default_prefill_chunk(ModelConfig.preset("v4-flash"), 160 * 10**9) == PREFILL_CHUNK
    eng = Engine.load(tiny_release, backend="torch")
    assert eng.prefill_chunk == PREFILL_CHUNK and stored_bytes(eng.model) >= tensor_bytes(tiny_release)
    assert Engine.load(tiny_release, backend="torch", prefill_chunk=64).prefill_chunk == 64
