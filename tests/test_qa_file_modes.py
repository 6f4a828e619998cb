"""Every safetensors file flashport writes goes through `flashport.checkpoint.save_tensors`, which makes its mode
follow the umask: safetensors' own save_file creates files 0600, so a streamed checkpoint shard was unreadable by a
service account (found on make-checkpoint's streaming writer). This scans the package for any other direct call."""

import ast
from pathlib import Path

import flashport

ROOT = Path(flashport.__file__).resolve().parent.parent  # the repository: sdk/, export/, quant/, backends/...
FOLDERS = ("sdk", "export", "quant", "backends", "kernels", "bench")


def test_only_save_tensors_calls_safetensors_save_file():
    offenders = []
    for folder in FOLDERS:
        for f in (ROOT / folder).rglob("*.py"):
            tree = ast.parse(f.read_text(), str(f))
            owner = {}
            for fn in ast.walk(tree):
                if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    for node in ast.walk(fn):
                        owner.setdefault(id(node), fn.name)
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                    if name == "save_file" and owner.get(id(node)) != "save_tensors":
                        offenders.append(f"{f.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"safetensors save_file called directly (files would be 0600): {offenders}"
