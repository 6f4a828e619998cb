"""`make demo`: generate text from the embedded default model with prefill/decode timing, then show a second
request whose shared prefix is served from the disk KV cache."""

import sys
import tempfile
import time
from pathlib import Path

import flashport
from flashport.model import param_count
from flashport.kv import demo_prefix_hit

ROOT = Path(__file__).resolve().parent.parent
shipped = ROOT / "samples" / "models" / "flash-small"  # trained by samples/train_tiny.py (release format)
if (shipped / "config.json").exists():
    model_dir = shipped
else:
    model_dir = ROOT / "runs" / "demo-flash-tiny"
    if not (model_dir / "config.json").exists():
        print(f"making a random flash-tiny checkpoint (release format: FP8 + MXFP4) in {model_dir}")
        flashport.make_checkpoint(model_dir, "flash-tiny", seed=0)

kv_dir = Path(tempfile.mkdtemp(prefix="flashport-demo-kv-"))  # a local KV directory, fresh for each demo
engine = flashport.Engine.load(model_dir, kv=flashport.KVOptions(kv_dir, "periodic:256"))
prompt = sys.argv[1] if len(sys.argv) > 1 else "If the"  # the model learnt stdlib docstrings
print(f"model: {model_dir.relative_to(ROOT)}  ({param_count(engine.cfg)['total'] / 1e6:.1f}M parameters, "
      f"backend {engine.model.ops.backend.name})")
print(f"prompt: {prompt!r}\n---")
out = engine.generate(prompt, max_new_tokens=48, temperature=0.0)
print(prompt + out.text)
print("---")
print(f"prefill: {out.prompt_tokens} tokens in {out.prefill_seconds * 1e3:.1f} ms ({out.prefill_tok_s:.0f} tok/s)")
print(f"decode:  {len(out.token_ids)} tokens in {out.decode_seconds * 1e3:.1f} ms ({out.decode_tok_s:.0f} tok/s)")
print("\n--- disk KV cache: two requests sharing a prefix ---")
print(demo_prefix_hit(engine))
engine.close()
