"""`flashport bench ...`: benchmarks that print figures and ratios measured side by side in one run."""

from __future__ import annotations


class Bench:
    def decode(self, path: str = "", preset: str = "flash-mini", prompt_lens: str = "512,2048", decode_tokens: int = 32,
               threads: int = 0, peer: bool = True, seed: int = 0):
        """Prefill and decode tokens/s of flashport and of transformers' DeepseekV4ForCausalLM on the same
        weights (PATH, or a fresh PRESET checkpoint), with the ratio."""
        from flashport.bench.decode import run

        return run(path=path, preset=preset, prompt_lens=[int(x) for x in str(prompt_lens).split(",") if x],
                   decode_tokens=decode_tokens, threads=threads, peer=peer, seed=seed)
