"""flashport.bench: benchmarks behind `flashport bench ...` (figures and ratios measured side by side)."""

import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def checkpoint_or_preset(path: str, preset: str, seed: int = 0):
    """PATH itself, or a fresh release-format checkpoint of PRESET in a temporary folder, removed afterwards."""
    if path:
        yield Path(path)
        return
    from flashport.checkpoint import make_checkpoint

    with tempfile.TemporaryDirectory(prefix="flashport-bench-") as tmp:
        yield make_checkpoint(tmp, preset, seed, "release")
