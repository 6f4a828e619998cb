"""`flashport bench ...`: benchmarks that print figures and ratios measured side by side in one run.

Each subcommand checks its flags (cli_args) before it imports or builds anything, then calls the benchmark's
`run` in flashport.bench.*.
"""

from .cli_args import UsageError, at_least, csv_choices, existing_dir, ints, one_of, parent_dir


class Bench:
    """Benchmarks: `flashport bench SUBCOMMAND --help` lists each one's flags."""

    def decode(self, path: str = "", preset: str = "flash-mini", prompt_lens: str = "512,2048",
               decode_tokens: int = 32, threads: int = 0, peer: bool = True, seed: int = 0,
               backend_option: list[str] | None = None):
        """Prefill and decode tokens/s of flashport and of transformers' DeepseekV4ForCausalLM on the same weights,
        with the ratio.

        Args:
            path: a checkpoint directory (default: a fresh checkpoint of PRESET).
            preset: the preset of the fresh checkpoint.
            prompt_lens: prompt lengths in tokens, comma-separated.
            decode_tokens: decode steps timed (>= 1).
            threads: torch intra-op threads (0: torch's default).
            peer: also run transformers (the peer) on the same weights.
            seed: seed of the weights and the prompts.
            backend_option: KEY=VALUE for flashport's fast CPU backend, e.g. decode_activations=int8 or
                prefill_matmul=bf16 (opt-in, not exact: docs/performance.md); repeat the flag for several.
        """
        from flashport.backends.cpu_quant import DECODE_ACTIVATIONS, PREFILL_MATMULS
        from flashport.options import parse_backend_options

        lens = _common(path, preset, threads, seed, prompt_lens=prompt_lens, decode_tokens=decode_tokens)
        options = parse_backend_options(backend_option)
        known = {"prefill_matmul": PREFILL_MATMULS, "decode_activations": DECODE_ACTIVATIONS}
        for key, value in options.items():
            if key not in known:
                raise UsageError(f"--backend-option {key}: bench decode's backend takes "
                                 f"{' and '.join(known)}, not {key!r}")
            one_of(f"--backend-option {key}", value, known[key])
        from flashport.bench.decode import run

        return run(path=path, preset=preset, prompt_lens=lens, decode_tokens=decode_tokens, threads=threads,
                   peer=peer, seed=seed, backend_options=options)

    def decode_context(self, path: str = "", preset: str = "flash-small", contexts: str = "8192,32768,131072",
                       decode_tokens: int = 16, threads: int = 0, seed: int = 0, extend: bool = False,
                       index_numerics: str = ""):
        """Decode cost per token at several context lengths (sparse attention keeps it nearly flat).

        Args:
            path: a checkpoint directory (default: a fresh checkpoint of PRESET).
            preset: the preset of the fresh checkpoint.
            contexts: context lengths in tokens, comma-separated.
            decode_tokens: decode steps timed per context (>= 1).
            threads: torch intra-op threads (0: torch's default).
            seed: seed of the weights and the prompts.
            extend: prefill only the first context; reach the longer ones by repeating its compressed entries
                (decode's cost depends on their count, not their values: the cost at 1M of a model whose 1M
                prefill would take hours here).
            index_numerics: the lightning indexer's numerics: fp32 | release (default: $FLASHPORT_INDEX_NUMERICS,
                else fp32).
        """
        from flashport.options import INDEX_NUMERICS

        ctx = _common(path, preset, threads, seed, contexts=contexts, decode_tokens=decode_tokens)
        if index_numerics:
            one_of("--index-numerics", index_numerics, INDEX_NUMERICS)
        from flashport.bench.decode import run_contexts

        return run_contexts(path=path, preset=preset, contexts=ctx, decode_tokens=decode_tokens, threads=threads,
                            seed=seed, extend=extend, index_numerics=index_numerics)

    def memory(self, path: str = "", preset: str = "flash-mini", prompt_len: int = 16, decode_tokens: int = 8,
               prefill_chunk: int = 0, threads: int = 0, seed: int = 0):
        """Peak RSS of loading and generating against the checkpoint's bytes, the bytes the model and backend
        hold, and decode's weights read per token against the read bandwidth measured in the same run.

        Args:
            path: a checkpoint directory (default: a fresh checkpoint of PRESET).
            preset: the preset of the fresh checkpoint.
            prompt_len: prompt length in tokens (prefill).
            decode_tokens: decode steps timed (>= 1).
            prefill_chunk: tokens per prefill step (>= 1; 0: the engine's default, which fits the model's size).
            threads: torch intra-op threads (0: torch's default).
            seed: seed of the weights and the prompt.
        """
        _common(path, preset, threads, seed, prompt_len=prompt_len, decode_tokens=decode_tokens)
        at_least("--prefill-chunk", prefill_chunk, 0)
        from flashport.bench.memory import run

        return run(path=path, preset=preset, prompt_len=prompt_len, decode_tokens=decode_tokens,
                   prefill_chunk=prefill_chunk, threads=threads, seed=seed)

    def kv(self, path: str = "", preset: str = "flash-mini", sizes: str = "8192,32768",
           strategies: str = "full,periodic:4096,none", decode_tokens: int = 16, long_preset: str = "flash-tiny",
           long_sizes: str = "4096,16384", dir: str = "", threads: int = 0, seed: int = 0,
           restore_presets: str = "flash-tiny,v4-flash", restore_mb: int = 64, writer_tokens: int = 48):
        """Disk KV: bytes written per strategy, time-to-first-token after a hit vs recompute, restore bandwidth
        against the disk's per block size, decode with the disk writer busy against idle.

        Args:
            path: a checkpoint directory (default: a fresh checkpoint of PRESET).
            preset: the preset of the fresh checkpoint.
            sizes: prompt lengths in tokens, comma-separated.
            strategies: KV strategies, comma-separated: full | none | periodic:P.
            decode_tokens: decode steps after each prompt (>= 1).
            long_preset: the preset of the long-context rows.
            long_sizes: prompt lengths of the long-context rows, comma-separated.
            dir: working directory for the KV stores (default: a temporary one).
            threads: torch intra-op threads (0: torch's default).
            seed: seed of the weights and the prompts.
            restore_presets: presets of the restore-vs-disk rows, comma-separated (default: the block sizes of
                flash-tiny and of V4-Flash; "" for none).
            restore_mb: megabytes of entries read per restore row (>= 1).
            writer_tokens: decode steps per round of the writer busy / idle rows (>= 1).
        """
        from flashport.options import KVOptions

        _common(path, preset, threads, seed, sizes=sizes, long_sizes=long_sizes, decode_tokens=decode_tokens,
                restore_mb=restore_mb, writer_tokens=writer_tokens)
        _preset("--long-preset", long_preset)
        for p in (x for x in str(restore_presets).split(",") if x):
            _preset("--restore-presets", p)
        for s in strategies.split(","):
            KVOptions(strategy=s.strip())  # OptionError names a bad strategy
        from flashport.bench.kv import run

        return run(path=path, preset=preset, sizes=sizes, strategies=strategies, decode_tokens=decode_tokens,
                   long_preset=long_preset, long_sizes=long_sizes, dir=dir, threads=threads, seed=seed,
                   restore_presets=restore_presets, restore_mb=restore_mb, writer_tokens=writer_tokens)

    def long_context(self, preset: str = "flash-tiny", context: int = 32768, kv_dir: str = "",
                     strategy: str = "periodic:4096", decode_tokens: int = 8, threads: int = 0, seed: int = 0,
                     path: str = "", json: bool = False, plot: str = "", index_numerics: str = "release"):
        """One long prompt through the disk KV cache across a restart: prefill tok/s, peak RSS, KV bytes on disk,
        TTFT of a hit (fresh process, page cache dropped) and of a recompute, restore and disk read bytes/s,
        decode ms/token at 8K and at CONTEXT.

        Args:
            preset: the preset of the fresh checkpoint.
            context: prompt tokens (>= 2).
            kv_dir: the KV directory (default: a temporary one); it must not hold a KV store already.
            strategy: KV strategy: full | none | periodic:P.
            decode_tokens: decode steps timed at each context (>= 1).
            threads: torch intra-op threads (0: torch's default).
            seed: seed of the weights and the prompt.
            path: a checkpoint directory (default: a fresh checkpoint of PRESET).
            json: also print the figures as one JSON object on the last line.
            plot: also draw prefill tok/s and decode ms/token against the context into this .svg file.
            index_numerics: the lightning indexer's numerics: release (default: the release code's FP4, what makes
                a long prefill affordable) | fp32 (transformers' indexer).
        """
        from pathlib import Path

        from flashport.options import INDEX_NUMERICS, KVOptions

        _common(path, preset, threads, seed, decode_tokens=decode_tokens)
        at_least("--context", context, 2)
        KVOptions(strategy=strategy)  # OptionError names a bad strategy
        one_of("--index-numerics", index_numerics, INDEX_NUMERICS)
        if kv_dir:
            parent_dir("--kv-dir", kv_dir)
            if Path(kv_dir).exists() and not Path(kv_dir).is_dir():
                raise UsageError(f"--kv-dir: {kv_dir} is not a directory")
            if (Path(kv_dir) / "index.sqlite").exists():
                raise UsageError(f"--kv-dir: {kv_dir} holds a KV store already; the benchmark needs a cold one")
        if plot:
            parent_dir("--plot", plot)
            if not plot.endswith(".svg"):
                raise UsageError(f"--plot: {plot} must be an .svg file")
        from flashport.bench.long_context import run

        return run(preset=preset, context=context, kv_dir=kv_dir, strategy=strategy, decode_tokens=decode_tokens,
                   threads=threads, seed=seed, path=path, json_out=json, plot=plot, index_numerics=index_numerics)

    def ops(self, backend: str = "torch", shapes: str = "4096x2048,2048x4096,8192x16384", fmt: str = "int4-g32",
            threads: int = 0, moe: str = "4096x2048x6", ort: bool = True, repeat: int = 20, report: str = "",
            seed: int = 0, execution_provider: str | None = None, plugin_ep_library: str | None = None,
            backend_option: list[str] | None = None, prefill: str = "512x4096x2048"):
        """Per-op throughput and fraction of measured memory bandwidth of BACKEND.

        Args:
            backend: a registered backend name, or module:factory.
            shapes: linear shapes NxK, comma-separated.
            fmt: the weight format of the linears (int4-g32, int8, ...).
            threads: torch intra-op threads (0: torch's default).
            moe: the MoE case, hidden x intermediate x top-k.
            prefill: the prefill linear, rows x in x out ("" skips it).
            ort: also time ONNX Runtime's MatMulNBits.
            repeat: timed repetitions per case (>= 1).
            report: also write the rows as JSON to this file.
            seed: seed of the weights.
            execution_provider: ONNX Runtime execution provider (with --backend onnxruntime).
            plugin_ep_library: ONNX Runtime plugin EP library (with --backend onnxruntime).
            backend_option: KEY=VALUE handed to the backend's factory; repeat the flag for several.
        """
        from flashport.options import parse_backend_options
        from flashport.quant.formats import FORMATS

        at_least("--threads", threads, 0)
        at_least("--repeat", repeat, 1)
        one_of("--fmt", fmt, FORMATS)
        for flag, v, n in (("--shapes", shapes, 2), ("--moe", moe, 3), ("--prefill", prefill, 3)):
            for s in filter(None, v.split(",")):
                if len(ints(flag, s.replace("x", ","))) != n:
                    raise UsageError(f"{flag}: expected {'x'.join('N' * n)} shapes, got {s!r}")
        if report:
            parent_dir("--report", report)
        options = parse_backend_options(backend_option)
        for flag, v, key in (("--execution-provider", execution_provider, "ep"),
                             ("--plugin-ep-library", plugin_ep_library, "plugin_ep_library")):
            if v is not None:
                if backend != "onnxruntime":
                    raise UsageError(f"{flag} is an ONNX Runtime option: add --backend onnxruntime")
                options[key] = v
        from flashport.bench.ops import run

        return run(backend=backend, shapes=shapes, fmt=fmt, threads=threads, moe=moe, ort=ort, repeat=repeat,
                   report=report, seed=seed, backend_options=options, prefill=prefill)

    def onnx(self, preset: str = "flash-mini", experts: str = "int4-g32", linears: str | None = None,
             prompt_len: int = 256, decode_tokens: int = 32, repeats: int = 2, threads: int = 0, seed: int = 0,
             int8_activations: bool = False):
        """ONNX Runtime CPU EP against the torch backend: decode/prefill tokens/s, export time and size.

        Args:
            preset: the model preset (random weights).
            experts: weight format of the routed experts.
            linears: weight format of the other linears (default: unquantized).
            prompt_len: prompt tokens (>= 1).
            decode_tokens: decode steps timed (>= 1).
            repeats: timed repetitions (>= 1).
            threads: torch / ONNX Runtime intra-op threads (0: default).
            seed: seed of the weights and the prompt.
            int8_activations: also run accuracy level 4 (int8 activations).
        """
        from flashport.quant.formats import FORMATS

        _preset("--preset", preset)
        one_of("--experts", experts, FORMATS)
        if linears not in (None, "none"):
            one_of("--linears", linears, FORMATS)
        for flag, v in (("--prompt-len", prompt_len), ("--decode-tokens", decode_tokens), ("--repeats", repeats)):
            at_least(flag, v, 1)
        at_least("--threads", threads, 0)
        from flashport.bench.onnx import run

        return run(preset=preset, experts=experts, linears=linears, prompt_len=prompt_len,
                   decode_tokens=decode_tokens, repeats=repeats, threads=threads, seed=seed,
                   int8_activations=int8_activations)

    def offload(self, path: str = "", preset: str = "flash-mini", recipe: str = "int4-experts",
                fractions: str = "100,50,25,10", tier: str = "disk", prompt_tokens: int = 64, decode_tokens: int = 16,
                threads: int = 0, ep: int = 2, seed: int = 0):
        """Expert offload: tokens/s against the resident fraction of expert bytes; EP=N against one process.

        Args:
            path: a bundle (default: a fresh PRESET checkpoint exported with RECIPE).
            preset: the preset of the fresh checkpoint.
            recipe: the export recipe of the fresh bundle.
            fractions: resident percentages of the expert bytes, comma-separated (1-100).
            tier: where the other experts live: host | disk.
            prompt_tokens: prompt tokens (>= 2).
            decode_tokens: decode steps timed (>= 1).
            threads: torch intra-op threads (0: torch's default).
            ep: expert-parallel ranks of the EP row (0: skip it).
            seed: seed of the weights and the prompts.
        """
        pct = _common(path, preset, threads, seed, fractions=fractions, decode_tokens=decode_tokens)
        if max(pct) > 100:
            raise UsageError(f"--fractions are percentages (1-100), got {fractions!r}")
        one_of("--tier", tier, ("host", "disk"))
        at_least("--prompt-tokens", prompt_tokens, 2)
        at_least("--ep", ep, 0)
        from flashport.bench.offload import run

        return run(path=path, preset=preset, recipe=recipe, fractions=fractions, tier=tier,
                   prompt_tokens=prompt_tokens, decode_tokens=decode_tokens, threads=threads, ep=ep, seed=seed)

    def serve(self, path: str = "", preset: str = "flash-tiny", concurrency: str = "1,4,16,32", max_tokens: int = 16,
              turns: int = 10, quick_tokens: int = 8, threads: int = 0, seed: int = 0):
        """Server throughput against concurrency, Quick Instruction cost, tokens reused per turn.

        Args:
            path: a checkpoint directory (default: a fresh checkpoint of PRESET).
            preset: the preset of the fresh checkpoint.
            concurrency: concurrent clients per row, comma-separated.
            max_tokens: tokens per request (>= 1).
            turns: turns of the tool-calling conversation (>= 1).
            quick_tokens: tokens of the Quick Instruction (>= 1).
            threads: torch intra-op threads (0: torch's default).
            seed: seed of the weights.
        """
        _common(path, preset, threads, seed, concurrency=concurrency, max_tokens=max_tokens, turns=turns,
                quick_tokens=quick_tokens)
        from flashport.bench.serve import run

        return run(path=path, preset=preset, concurrency=concurrency, max_tokens=max_tokens, turns=turns,
                   quick_tokens=quick_tokens, threads=threads, seed=seed)

    def export(self, preset: str = "flash-mini", model: str | None = None, parts: str = "throughput,quality,plan",
               max_tokens: int = 1024, context: int = 131072, sequences: int = 4, threads: int = 1):
        """Export throughput (MB/s of source read), peak RSS, quality per recipe, plans.

        Args:
            preset: the preset of the fresh checkpoint (throughput).
            model: the checkpoint the quality rows export (default: the shipped trained model).
            parts: which parts, comma-separated: throughput | quality | plan.
            max_tokens: tokens the quality rows score (>= 2).
            context: KV target of the plan rows (>= 1).
            sequences: sequences of the plan rows (>= 1).
            threads: torch intra-op threads (0: torch's default; 1 suits shared machines).
        """
        _common("", preset, threads, 0)
        if model is not None:
            existing_dir("--model", model)
        csv_choices("--parts", parts, ("throughput", "quality", "plan"))
        at_least("--max-tokens", max_tokens, 2)
        at_least("--context", context, 1)
        at_least("--sequences", sequences, 1)
        from flashport.bench.export import run

        return run(preset=preset, model=model, parts=parts, max_tokens=max_tokens, context=context,
                   sequences=sequences, threads=threads)


def _preset(flag: str, preset: str) -> None:
    from flashport.config import PRESETS

    one_of(flag, preset, PRESETS)


def _common(path: str, preset: str, threads: int, seed: int, **checked) -> list[int]:
    """The checks every benchmark shares; returns the whole numbers of the first list flag in `checked`."""
    if path:
        existing_dir("PATH", path)
    _preset("--preset", preset)
    at_least("--threads", threads, 0)
    at_least("--seed", seed, 0)
    first = None
    for name, v in checked.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(v, str):
            got = ints(flag, v)
            first = got if first is None else first
        else:
            at_least(flag, v, 1)
    return first or []
