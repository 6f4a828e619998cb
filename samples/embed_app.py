"""The smallest program a vendor app writes to embed flashport: load, generate, stream.

    python samples/embed_app.py [CHECKPOINT_DIR]

Without an argument it makes a small random `flash-tiny` checkpoint in a temporary folder first.
"""

import sys
import tempfile

import flashport

path = sys.argv[1] if len(sys.argv) > 1 else flashport.make_checkpoint(tempfile.mkdtemp(), "flash-tiny")

engine = flashport.Engine.load(path)                      # release, transformers or bundle directory
out = engine.generate("The quick brown fox", max_new_tokens=16)   # greedy by default
print("ids:", out.token_ids)
print("text:", out.text)

for piece in engine.generate("Once upon a time", max_new_tokens=16, temperature=0.8, seed=0, stream=True):
    print(piece, end="", flush=True)
print()
