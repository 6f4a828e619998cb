"""`flashport bench ...`: benchmarks that print figures and ratios measured side by side in one run."""

from __future__ import annotations


class Bench:
    def decode(self, path: str = "", preset: str = "flash-mini", prompt_lens: str = "512,2048", decode_tokens: int = 32,
               threads: int = 0, peer: bool = True, seed: int = 0):
        """Prefill and decode tokens/s of flashport and of transformers' DeepseekV4ForCausalLM on the same
        weights (PATH, or a fresh PRESET checkpoint), with the ratio."""
        from flashport.bench.decode import run

        return run(path=path, preset=preset, prompt_lens=_ints(prompt_lens),
                   decode_tokens=decode_tokens, threads=threads, peer=peer, seed=seed)

    def decode_context(self, path: str = "", preset: str = "flash-small", contexts: str = "8192,32768,131072",
                       decode_tokens: int = 16, threads: int = 0, seed: int = 0):
        """Decode cost per token at several context lengths (sparse attention should keep it nearly flat)."""
        from flashport.bench.decode import run_contexts

        return run_contexts(path=path, preset=preset, contexts=_ints(contexts),
                            decode_tokens=decode_tokens, threads=threads, seed=seed)

    def kv(self, *args, **kwargs):
        """Disk KV: bytes written per strategy, time-to-first-token after a hit vs recompute, restore bandwidth."""
        return _run("flashport.bench.kv:run", args, kwargs)

    def ops(self, *args, **kwargs):
        """Per-op throughput and fraction of measured memory bandwidth: bench ops --backend B."""
        return _run("flashport.bench.ops:run", args, kwargs)

    def onnx(self, *args, **kwargs):
        """ONNX Runtime CPU EP against the torch backend: decode/prefill tok/s, export time and size."""
        return _run("flashport.bench.onnx:run", args, kwargs)

    def offload(self, *args, **kwargs):
        """Expert offload: tokens/s against the resident fraction of expert bytes."""
        return _run("flashport.bench.offload:run", args, kwargs)

    def serve(self, *args, **kwargs):
        """Server throughput against concurrency, Quick Instruction cost, tokens reused per turn."""
        return _run("flashport.bench.serve:run", args, kwargs)

    def export(self, *args, **kwargs):
        """Export throughput (MB/s of source read) and peak RSS."""
        return _run("flashport.bench.export:run", args, kwargs)


def _ints(v) -> list[int]:
    """A list of ints from `--x 512,2048` (fire hands over a tuple) or `--x 512`."""
    return [int(x) for x in v] if isinstance(v, (tuple, list)) else [int(x) for x in str(v).split(",") if x]


def _run(target, args, kwargs):
    from flashport.cli import _run as run

    return run(target, args, kwargs)
