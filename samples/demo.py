"""`make demo`: generate text from the embedded default model and show prefill/decode timing."""

import sys
import time
from pathlib import Path

import flashport

ROOT = Path(__file__).resolve().parent.parent
model_dir = ROOT / "runs" / "demo-flash-tiny"
if not (model_dir / "config.json").exists():
    print(f"making the demo checkpoint (flash-tiny, release format: FP8 + MXFP4) in {model_dir}")
    flashport.make_checkpoint(model_dir, "flash-tiny", seed=0)

engine = flashport.Engine.load(model_dir)
prompt = sys.argv[1] if len(sys.argv) > 1 else "def fibonacci(n):"
print(f"model: {model_dir.name}  ({engine.cfg.param_count()['total'] / 1e6:.1f}M parameters)")
print(f"prompt: {prompt!r}\n---")
t = time.perf_counter()
out = engine.generate(prompt, max_new_tokens=48, temperature=0.0)
print(out.text)
print("---")
print(f"prefill: {out.prompt_tokens} tokens in {out.prefill_seconds * 1e3:.1f} ms ({out.prefill_tok_s:.0f} tok/s)")
print(f"decode:  {len(out.token_ids)} tokens in {out.decode_seconds * 1e3:.1f} ms ({out.decode_tok_s:.0f} tok/s)")
