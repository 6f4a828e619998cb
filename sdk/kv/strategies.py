"""What a deployment stores of the sliding windows (DeepSeek-V4 report 3.5, DESIGN.md section 3).

    full         a fixed-state record at every block boundary: a hit restores exactly where the cache ends;
    periodic:P   a record every P tokens: a hit restores the latest record at or before the cached length;
    none         no records: a hit loads the compressed entries up to block boundary B and recomputes the
                 tokens from B - W*L (rounded down to a block) to B with the loaded entries served to attention
                 (PoolState.replay), which rebuilds every layer's window exactly (layer l's window depends on
                 tokens at most (l+1)*W back) without re-appending compressed entries.

The planner (flashport.kv.manager) also uses the `none` recompute for `periodic` whenever it is cheaper than going
back to the last record (W*L < distance to it), and both fall back to a miss when nothing is usable.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Strategy:
    kind: str        # "full" | "periodic" | "none"
    period: int = 0  # tokens between fixed-state records (0: none stored)

    @classmethod
    def parse(cls, spec: str, block: int) -> "Strategy":
        """"full" | "periodic:P" (P a positive multiple of `block` tokens) | "none". Raises ValueError."""
        s = str(spec).strip().lower()
        if s == "full":
            return cls("full", block)
        if s == "none":
            return cls("none", 0)
        if s.startswith("periodic:"):
            try:
                p = int(s.split(":", 1)[1])
            except ValueError:
                p = -1
            if p <= 0 or p % block:
                raise ValueError(f"KV strategy {spec!r}: the period must be a positive multiple of the KV block "
                                 f"({block} tokens for this model)")
            return cls("periodic", p)
        raise ValueError(f"unknown KV strategy {spec!r}: use full, periodic:P (P a multiple of {block}) or none")

    def checkpoint_at(self, n_tokens: int) -> bool:
        return self.period > 0 and n_tokens > 0 and n_tokens % self.period == 0

    def __str__(self) -> str:
        return f"periodic:{self.period}" if self.kind == "periodic" else self.kind
