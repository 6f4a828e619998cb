"""`flashport` command line.

Every command is a method of `Cli` (and `flashport bench ...` a method of `bench_cli.Bench`) with explicit, typed
parameters and a docstring whose Args section says what each flag means: `flashport CMD --help` (rendered by
python-fire) lists them with their types and defaults. `main` reads argv against the target's signature before
anything runs: an unknown flag (with the closest name), a value of the wrong type, a missing argument, then the
command's own range/file/directory checks each give one line `flashport: error: ...` and exit code 2, before any
model is loaded. No traceback reaches the user (`--debug` shows one).
"""

import difflib
import json as jsonlib
import logging
import os
import re
import sys
from pathlib import Path

from .bench_cli import Bench
from .cli_args import (UsageError, at_least, csv_choices, empty_out_dir, existing_dir, one_of, parent_dir,
                       parse_args, text_file)


# Flags shared by generate, chat and serve (one meaning everywhere; see engine_options).
ENGINE_ARGS = """backend: auto | torch | triton | onnxruntime | a plugin's name.
            execution_provider: ONNX Runtime execution provider by name (with --backend onnxruntime), e.g.
                CPUExecutionProvider; an unknown one is refused with the list of available ones.
            plugin_ep_library: path of an ONNX Runtime plugin EP shared library to register (with --backend
                onnxruntime; the provider is named by --execution-provider).
            backend_option: KEY=VALUE handed to the backend's factory; repeat the flag for several.
            device: the backend's device, e.g. cpu, cuda:0, npu:1 (default: the backend's first).
            deterministic: bit-identical results across restores and batch compositions (torch backend).
            kv_dir: directory of the durable prefix (KV) cache; reused across runs and processes.
            kv_strategy: what the KV cache stores of the sliding windows: full | none | periodic:P (P tokens;
                default periodic:4096).
            kv_dtype: numerics of the stored KV entries (with --kv-dir): release (FP8 + BF16 RoPE dims) | bf16 | fp32.
            max_device_memory: keep the hottest experts within this device budget (e.g. 8GiB, 512MiB) and
                offload the rest to --offload-tier.
            offload_tier: where offloaded experts live: host (memory, default) | disk (the bundle's shards).
            ep: expert parallelism over this many ranks (torchrun; 1: one process).
            pg_backend: process-group backend with --ep: gloo (default) | nccl | hccl | ...
            timeout: seconds a collective waits for a peer with --ep (default 30).
            public_key: a signer's public key FILE: the bundle must carry a valid signature by it (flashport export
                --sign), and every file's sha256 is checked (default: $FLASHPORT_PUBLIC_KEY).
            index_numerics: the lightning indexer's numerics: fp32 (transformers' indexer) | release (the release
                code's Hadamard-rotated FP4, scored exactly; the long-context path) (default:
                $FLASHPORT_INDEX_NUMERICS, else fp32)."""


# what `generate --json` reports of the KV cache (flashport.kv's PrefillStats): where the prompt came from
KV_JSON_FIELDS = ("path", "hit_tokens", "loaded_tokens", "recomputed_tokens", "new_tokens", "read_from")


def _engine_doc(fn):
    fn.__doc__ = fn.__doc__.replace("{engine_args}", ENGINE_ARGS)
    return fn


class Cli:
    """flashport: run DeepSeek-V4-Flash-class MoE models on edge boxes and non-NVIDIA accelerators.

    `flashport COMMAND --help` lists a command's flags; `flashport --version`; `--debug` shows tracebacks."""

    bench = Bench()

    @_engine_doc
    def generate(self, path: str, prompt: str = "", max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, json: bool = False, stream: bool = True,
                 backend: str = "auto", execution_provider: str | None = None, plugin_ep_library: str | None = None,
                 backend_option: list[str] | None = None, device: str | None = None, deterministic: bool = False,
                 kv_dir: str | None = None, kv_strategy: str | None = None, kv_dtype: str | None = None,
                 max_device_memory: str | None = None, offload_tier: str | None = None, ep: int = 1,
                 pg_backend: str | None = None, timeout: float | None = None, public_key: str | None = None,
                 index_numerics: str | None = None):
        """Generate text from PATH (a checkpoint or bundle directory) after PROMPT.

        Args:
            path: a release-format or transformers-format checkpoint directory, or a bundle (flashport export).
            prompt: the text to continue (required).
            max_new_tokens: tokens to generate at most (>= 1).
            temperature: sampling temperature (0: greedy).
            top_p: nucleus sampling mass in (0, 1].
            seed: sampling seed (same seed, same tokens).
            json: print one JSON object (token ids, text, finish reason, tokens/s; with --kv-dir also what the
                KV cache reused) instead of the text.
            stream: print the text as it is generated.
            {engine_args}
        """
        _check_sampling(max_new_tokens, temperature, top_p, seed)
        if not prompt:
            raise UsageError("generate needs a prompt: flashport generate PATH --prompt TEXT")
        from .engine import run_command
        from .options import flags_of

        opts = engine_options(path, backend, execution_provider, plugin_ep_library, backend_option, device,
                              deterministic, kv_dir, kv_strategy, kv_dtype, max_device_memory, offload_tier, ep,
                              pg_backend, timeout, public_key, index_numerics)
        needs_tokenizer(path, "generate")
        command = ["generate", path, *flags_of(Cli.generate, locals())]  # what each rank runs under --ep
        sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)

        def run(engine):
            if json or not stream:
                out = engine.generate(prompt, **sampling)
                if json:
                    kv = out.timings.get("kv") if kv_dir is not None else None
                    print(_dump({"token_ids": out.token_ids, "text": out.text, "prompt_tokens": out.prompt_tokens,
                                 "finish_reason": out.finish_reason, "prefill_tok_s": round(out.prefill_tok_s, 2),
                                 "decode_tok_s": round(out.decode_tok_s, 2),
                                 **({"kv": {k: kv[k] for k in KV_JSON_FIELDS if k in kv}} if kv else {})}),
                          flush=True)
                else:
                    print(out.text, flush=True)
                return
            for piece in engine.generate(prompt, stream=True, **sampling):
                print(piece, end="", flush=True)
            print(flush=True)

        run_command(path, opts, run, command)

    @_engine_doc
    def chat(self, path: str, mode: str = "chat", system: str = "", max_new_tokens: int = 512,
             temperature: float = 0.7, top_p: float = 0.95, seed: int | None = None,
             backend: str = "auto", execution_provider: str | None = None, plugin_ep_library: str | None = None,
             backend_option: list[str] | None = None, device: str | None = None, deterministic: bool = False,
             kv_dir: str | None = None, kv_strategy: str | None = None, kv_dtype: str | None = None,
             max_device_memory: str | None = None, offload_tier: str | None = None, ep: int = 1,
             pg_backend: str | None = None, timeout: float | None = None, public_key: str | None = None,
             index_numerics: str | None = None):
        """Chat with PATH in the terminal (line editing and history; Ctrl-C stops a reply; /help for commands).

        Args:
            path: a checkpoint or bundle directory.
            mode: chat | thinking | thinking-high | thinking-max.
            system: a system prompt.
            max_new_tokens: tokens per reply at most (>= 1).
            temperature: sampling temperature (0: greedy).
            top_p: nucleus sampling mass in (0, 1].
            seed: sampling seed.
            {engine_args}
        """
        from .chat import MODES
        from .chat_cli import chat
        from .engine import run_command

        one_of("--mode", mode, MODES)
        _check_sampling(max_new_tokens, temperature, top_p, seed)
        if ep > 1:
            raise UsageError(f"chat is one interactive process: run `flashport serve PATH --ep {ep}` and chat "
                             "through a client")
        opts = engine_options(path, backend, execution_provider, plugin_ep_library, backend_option, device,
                              deterministic, kv_dir, kv_strategy, kv_dtype, max_device_memory, offload_tier, ep,
                              pg_backend, timeout, public_key, index_numerics)
        needs_tokenizer(path, "chat")
        print(f"flashport: loading {path} ...", file=sys.stderr, flush=True)
        sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        run_command(path, opts, lambda engine: chat(engine, mode, system, sampling), ["chat", path])

    @_engine_doc
    def serve(self, path: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
              api_key_file: str | None = None, max_queue: int = 64, max_batch: int = 32, max_body: int = 0,
              max_context: int = 0,
              max_tokens: int = 256, model_name: str = "", prefix_pool: int = 16, log_level: str = "info",
              shutdown_timeout: float = 30.0,
              backend: str = "auto", execution_provider: str | None = None, plugin_ep_library: str | None = None,
              backend_option: list[str] | None = None, device: str | None = None, deterministic: bool = False,
              kv_dir: str | None = None, kv_strategy: str | None = None, kv_dtype: str | None = None,
              max_device_memory: str | None = None, offload_tier: str | None = None, ep: int = 1,
              pg_backend: str | None = None, timeout: float | None = None, public_key: str | None = None,
              index_numerics: str | None = None):
        """Serve PATH with an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models).

        Args:
            path: a checkpoint or bundle directory.
            host: address to listen on (127.0.0.1: this machine only).
            port: TCP port (0-65535).
            api_key: required as `Authorization: Bearer KEY` on /v1/* (default: the first line of
                --api-key-file, else $FLASHPORT_API_KEY, else none; a command line is visible to every user of the
                machine: prefer the file or the variable).
            api_key_file: a file whose first line is the API key.
            max_queue: waiting requests before 429 (>= 1).
            max_batch: sequences decoded together (>= 1).
            max_body: request bytes before 413 (0: 16 per context token, at least 1 MiB).
            max_context: prompt + completion token limit (0: what half the available memory holds as KV).
            max_tokens: completion length of a request that does not say (>= 1).
            model_name: the model id clients send (default: the directory's name).
            prefix_pool: recent conversations kept for KV reuse across requests (0: off).
            log_level: critical | error | warning | info | debug | trace.
            shutdown_timeout: seconds to finish running requests on Ctrl-C.
            {engine_args}
        """
        at_least("--port", port, 0)
        if port > 65535:
            raise UsageError(f"--port must be at most 65535, not {port}")
        for flag, v, lo in (("--max-queue", max_queue, 1), ("--max-batch", max_batch, 1), ("--max-body", max_body, 0),
                            ("--max-context", max_context, 0), ("--max-tokens", max_tokens, 1),
                            ("--prefix-pool", prefix_pool, 0), ("--shutdown-timeout", shutdown_timeout, 0)):
            at_least(flag, v, lo)
        one_of("--log-level", log_level, ("critical", "error", "warning", "info", "debug", "trace"))
        if api_key_file is not None and not Path(api_key_file).is_file():
            raise UsageError(f"--api-key-file: {api_key_file} does not exist")
        opts = engine_options(path, backend, execution_provider, plugin_ep_library, backend_option, device,
                              deterministic, kv_dir, kv_strategy, kv_dtype, max_device_memory, offload_tier, ep,
                              pg_backend, timeout, public_key, index_numerics)
        needs_tokenizer(path, "serve")  # the OpenAI API returns text, so a server needs the tokenizer
        _needs_module("uvicorn", "serve")
        from .options import flags_of
        from .server import serve_cli

        command = ["serve", path, *flags_of(Cli.serve, locals(), skip=("api_key", "api_key_file"))]
        serve_cli(path, opts, command, host=host, port=port, api_key=api_key, api_key_file=api_key_file,
                  max_queue=max_queue, max_batch=max_batch, max_body=max_body, max_context=max_context,
                  max_tokens=max_tokens, model_name=model_name, prefix_pool=prefix_pool, log_level=log_level,
                  shutdown_timeout=shutdown_timeout)

    def make_checkpoint(self, preset: str = "flash-tiny", out: str | None = None, seed: int = 0,
                        format: str = "release", force: bool = False, override: str | None = None):
        """Write a deterministic random checkpoint of PRESET to OUT.

        Args:
            preset: a model preset (flashport config PRESET shows it): v4-flash | flash-tiny | flash-small |
                flash-mini.
            out: the directory to create (required; must be empty unless --force).
            seed: random seed of the weights (>= 0).
            format: release (the DeepSeek release layout) | hf (transformers' layout).
            force: write into OUT even if it is not empty.
            override: a JSON object of config.json fields, read with transformers' meaning, e.g.
                '{"num_hidden_layers": 3, "n_routed_experts": 16}' (the real V4-Flash shapes at a reduced depth).
        """
        from .checkpoint import make_checkpoint
        from .config import ModelConfig

        if not out:
            raise UsageError("make-checkpoint needs --out DIR")
        at_least("--seed", seed, 0)
        one_of("--format", format, ("release", "hf"))
        cfg = ModelConfig.preset(preset)  # an unknown preset or override is refused before the directory is made
        if override is not None:
            cfg.override(override, "--override")
        empty_out_dir("--out", out, force)
        path = make_checkpoint(out, preset, seed, format, override=override)
        return f"wrote {format} checkpoint of {preset} (seed {seed}) to {path}"

    def config(self, preset_or_path: str = "v4-flash", json: bool = False):
        """Show a preset's or a checkpoint's config with its parameter counts (total and active per token).

        Args:
            preset_or_path: a preset name (v4-flash, flash-tiny, ...) or a checkpoint / bundle directory.
            json: print the whole config and the counts as JSON (for machines).
        """
        from .config import ModelConfig
        from .model import param_count

        p = Path(preset_or_path)
        cfg = ModelConfig.from_file(p / "config.json" if p.is_dir() else p) if p.exists() else \
            ModelConfig.preset(preset_or_path)
        counts = param_count(cfg)
        active = active_params(cfg, counts)
        if json:
            return _dump({"params": counts, "active_params": active, "kv_block_tokens": cfg.kv_block_tokens,
                          **cfg.to_dict()})
        return config_table(cfg, counts, active)

    def export(self, src: str, out: str, recipe: str = "int4-experts", devices: str = "cpu=32GiB",
               calib: str | None = None, calib_tokens: int = 512, mode: str = "auto", context: int = 4096,
               sequences: int = 1, kv_dtype: str = "fp32", resume: bool = True, force: bool = False,
               sign: str | None = None):
        """Requantize checkpoint SRC with RECIPE and partition its experts over DEVICES into bundle directory OUT.

        Args:
            src: the checkpoint directory (release or transformers format).
            out: the bundle directory to write (empty, a previous export of the same to resume, or --force).
            recipe: release | int4-experts | int8 | w8a8-npu | mixed-edge, or a .json/.toml recipe file.
            devices: NAME=SIZE list for the placement, e.g. npu:0=64GiB,npu:1=64GiB,cpu=256GiB,disk.
            calib: a text file for calibration (routing statistics; GPTQ when the recipe asks for it).
            calib_tokens: tokens of the calibration text to use (>= 1).
            mode: placement mode: ep | edge | auto.
            context: tokens of KV the placement reserves per sequence (>= 1).
            sequences: sequences the placement reserves KV for (>= 1).
            kv_dtype: KV numerics the placement assumes: fp32 | bf16 | fp8.
            resume: skip shards a previous run of the same export wrote and that still verify.
            force: write into OUT even if it holds other files.
            sign: an ed25519 private key FILE (PEM; flashport keygen): sign the bundle (docs/export.md).
        """
        from .export.bundle import JOURNAL, MANIFEST
        from .export.planner import KV_VALUE_BYTES

        existing_dir("SRC", src)
        if Path(out).resolve() == Path(src).resolve():
            raise UsageError(f"OUT {out} is the source checkpoint: write the bundle to another directory")
        for flag, v in (("--calib-tokens", calib_tokens), ("--context", context), ("--sequences", sequences)):
            at_least(flag, v, 1)
        one_of("--mode", mode, ("ep", "edge", "auto"))
        one_of("--kv-dtype", kv_dtype, KV_VALUE_BYTES)
        if calib is not None:
            text_file("--calib", calib)
        if not (resume and any((Path(out) / f).exists() for f in (JOURNAL, MANIFEST))):
            empty_out_dir("OUT", out, force)
        from .export.bundle import export_cli

        if sign is not None and not Path(sign).is_file():
            raise UsageError(f"--sign: {sign} is not a key file (the key is given as a file, never as a value)")
        return export_cli(src, out, recipe, devices, calib, calib_tokens, mode, context, sequences, kv_dtype, resume,
                          sign or "")

    def plan(self, model: str = "v4-flash", devices: str = "npu:0=64GiB,npu:1=64GiB,cpu=256GiB,disk",
             recipe: str = "int4-experts", stats: str | None = None, context: int = 65536, sequences: int = 1,
             mode: str = "auto", kv_dtype: str = "fp32", redundant: int | None = None, chunk: int = 1024,
             json_out: str | None = None):
        """Place every routed expert of MODEL on DEVICES for a memory budget and print the table (no weights needed).

        Args:
            model: a preset (v4-flash, ...), a checkpoint or a bundle.
            devices: NAME=SIZE list, e.g. npu:0=64GiB,npu:1=64GiB,cpu=256GiB,disk (disk: no budget).
            recipe: a named recipe (release | int4-experts | int8 | w8a8-npu | mixed-edge) or a JSON/TOML file.
            stats: routing_stats.json, or a bundle holding one (default: the bundle's, else uniform routing).
            context: KV target tokens per sequence (>= 1).
            sequences: KV target sequences (>= 1).
            mode: ep | edge | auto (ep with two or more accelerators when it fits, else edge).
            kv_dtype: fp32 | bf16 | fp8.
            redundant: replica slots per rank per layer in ep mode (default 1, as memory allows; >= 0).
            chunk: prefill chunk tokens the workspace is sized for (>= 1).
            json_out: also write the plan as JSON to this file.
        """
        from .export.planner import KV_VALUE_BYTES

        for flag, v in (("--context", context), ("--sequences", sequences), ("--chunk", chunk)):
            at_least(flag, v, 1)
        if redundant is not None:
            at_least("--redundant", redundant, 0)
        one_of("--mode", mode, ("ep", "edge", "auto"))
        one_of("--kv-dtype", kv_dtype, KV_VALUE_BYTES)
        if stats is not None and not Path(stats).exists():
            raise UsageError(f"--stats: {stats} does not exist")
        if json_out is not None:
            parent_dir("--json-out", json_out)
        from .export.planner import plan_cli

        return plan_cli(model, devices, recipe, stats, context, sequences, mode, kv_dtype, redundant, chunk,
                        json_out)

    def inspect(self, path: str, verify: bool = False):
        """Summarise PATH: a bundle (model, source, recipe, bytes per format and per partition, placement) or a
        checkpoint directory.

        Args:
            path: a bundle directory (flashport export) or a checkpoint directory.
            verify: a bundle: also check every file's sha256; a checkpoint: read and check every tensor (finite
                scales and values, index tables in range, dtypes and shapes against config.json). Fails on the
                first problem, naming the tensor and file.
        """
        existing_dir("PATH", path)
        from .export.bundle import inspect_cli

        return inspect_cli(path, verify)

    def verify(self, bundle: str, public_key: str):
        """Check BUNDLE's ed25519 signature and every file's sha256 against the signer's public key.

        Args:
            bundle: a signed bundle directory (flashport export --sign).
            public_key: the signer's public key FILE (PEM or OpenSSH), never the key itself.
        """
        existing_dir("BUNDLE", bundle)
        if not Path(public_key).is_file():
            raise UsageError(f"--public-key: {public_key} is not a key file")
        from .signing import verify_cli

        return verify_cli(bundle, public_key)

    def keygen(self, out: str):
        """Make an ed25519 key pair for signing bundles: OUT (private, mode 0600) and OUT.pub (public).

        Args:
            out: the private key file to create (never overwritten).
        """
        parent_dir("--out", out)
        from .signing import keygen_cli

        return keygen_cli(out)

    def eval(self, path: str, text: str, reference: str | None = None, max_tokens: int = 1024,
             json: bool = False):
        """Perplexity of PATH on TEXT; with --reference also the mean KL divergence and top-1 agreement.

        Args:
            path: the checkpoint or bundle to score.
            text: a text file (or the text itself).
            reference: a checkpoint or bundle to compare next-token distributions against, on the same tokens.
            max_tokens: tokens of the text to score at most (>= 2).
            json: print the figures as JSON.
        """
        existing_dir("PATH", path)
        if reference is not None:
            existing_dir("--reference", reference)
        at_least("--max-tokens", max_tokens, 2)
        text_file("--text", text)
        needs_tokenizer(path, "eval")  # the text is tokenized with PATH's tokenizer
        from .export.evaluate import eval_cli

        return eval_cli(path, text, reference, max_tokens, json)

    def export_onnx(self, bundle_or_checkpoint: str, out: str, opset: int = 21, accuracy_level: int = 0,
                    dequantize_unsupported: bool = False, check: bool = True, force: bool = False):
        """Export a bundle's (or checkpoint's) decoder step to ONNX in OUT (model.onnx + external data).

        Put OUT at BUNDLE/onnx and `--backend onnxruntime` finds it; otherwise the backend exports on load.

        Args:
            bundle_or_checkpoint: the bundle or checkpoint directory.
            out: the directory to write (must be empty unless --force).
            opset: ONNX opset (>= 17).
            accuracy_level: MatMulNBits accuracy level 0-4 (4: int8 activations, fastest on CPU).
            dequantize_unsupported: store weight formats ONNX Runtime has no kernel for as fp32 instead of failing.
            check: run onnx.checker on the result.
            force: write into OUT even if it is not empty.
        """
        existing_dir("BUNDLE_OR_CHECKPOINT", bundle_or_checkpoint)
        at_least("--opset", opset, 17)
        one_of("--accuracy-level", accuracy_level, (0, 1, 2, 3, 4))
        empty_out_dir("OUT", out, force)
        _needs_module("onnx", "export-onnx")
        from .backends.onnx_export import export_cli

        return export_cli(bundle_or_checkpoint, out, opset, accuracy_level, dequantize_unsupported, check)

    def conformance(self, backend: str, device: str | None = None, report: str | None = None, e2e: bool = True,
                    max_context: int = 16384, model: str | None = None, ops: str | None = None,
                    formats: str | None = None, backend_option: list[str] | None = None):
        """Run the conformance kit on BACKEND, print a per-op summary; exit code 1 on any failure.

        Args:
            backend: a registered backend name, or module:factory.
            device: passed to the backend's factory.
            report: write the full JSON report to this file.
            e2e: also run the end-to-end checks (a model's logits and greedy tokens against the reference).
            max_context: cap on the long-context case (>= 1).
            model: the end-to-end check's checkpoint (default: a fresh flash-tiny).
            ops: only these ops, comma-separated (for development; a conformance claim runs everything).
            formats: only these weight formats, comma-separated (fp32, bf16, int4-g32, ...).
            backend_option: KEY=VALUE handed to the backend's factory; repeat the flag for several.
        """
        from .backends.contract import OPS
        from .options import parse_backend_options
        from .quant.formats import FORMATS

        at_least("--max-context", max_context, 1)
        only_ops = csv_choices("--ops", ops, OPS)
        only_formats = csv_choices("--formats", formats, ["fp32", *FORMATS])
        if report is not None:
            parent_dir("--report", report)
        if model is not None:
            existing_dir("--model", model)
        options = parse_backend_options(backend_option)
        from .backends.conformance import conformance_cli

        return conformance_cli(backend, device=device, report=report, e2e=e2e, max_context=max_context, model=model,
                               ops=only_ops, formats=only_formats, **options)

    def kv(self, preset_or_path: str = "v4-flash", context: int = 1048576, sequences: int = 1,
           memory_gb: float | None = None):
        """KV memory accounting: bytes per token and whether CONTEXT tokens x SEQUENCES fit.

        Args:
            preset_or_path: a preset name, a checkpoint directory, or "all" (every preset side by side).
            context: tokens per sequence (>= 1).
            sequences: sequences (>= 1).
            memory_gb: the memory to plan for, GiB (default: this machine's available memory).
        """
        at_least("--context", context, 1)
        at_least("--sequences", sequences, 1)
        if memory_gb is not None and not memory_gb > 0:
            raise UsageError(f"--memory-gb must be > 0, not {memory_gb}")
        from .kv import kv_cli

        return kv_cli(preset_or_path, context, sequences, memory_gb)

    def backends(self, explain: str = "", backend: str = "auto"):
        """List the backends with their availability, devices and capabilities.

        Args:
            explain: a checkpoint or bundle: which of its ops run natively on BACKEND and which fall back to the
                torch reference (before any run).
            backend: the backend --explain reports on.
        """
        from .backends.explain import explain_model, list_backends

        return explain_model(explain, backend) if explain else list_backends()


# -------------------------------------------------------------------------------------------------------------
# Engine options: one helper builds them for generate, chat and serve; one call loads the engine
# -------------------------------------------------------------------------------------------------------------
def engine_options(path: str, backend: str = "auto", execution_provider: str | None = None,
                   plugin_ep_library: str | None = None, backend_option: list[str] | None = None,
                   device: str | None = None, deterministic: bool = False, kv_dir: str | None = None,
                   kv_strategy: str | None = None, kv_dtype: str | None = None, max_device_memory: str | None = None,
                   offload_tier: str | None = None, ep: int = 1, pg_backend: str | None = None,
                   timeout: float | None = None, public_key: str | None = None, index_numerics: str | None = None):
    """The EngineOptions of the engine flags of generate, chat and serve (flashport.options.engine_options, which
    serve_cli uses too), after the checks only the command line needs: PATH exists, the KV directory is not held
    by another process, and flags that only mean something beside another (--pg-backend without --ep) are
    refused rather than ignored. Raises UsageError / OptionError naming the flag."""
    from . import options

    existing_dir("PATH", path)
    at_least("--ep", ep, 1)
    if ep == 1 and (pg_backend is not None or timeout is not None):
        raise UsageError(f"{'--pg-backend' if pg_backend is not None else '--timeout'} applies with --ep N (N >= 2)")
    if kv_dir is None and kv_dtype is not None:
        raise UsageError("--kv-dtype applies with --kv-dir DIR")
    if index_numerics is not None:
        one_of("--index-numerics", index_numerics, options.INDEX_NUMERICS)
    if plugin_ep_library is not None and execution_provider is None:
        raise UsageError("--plugin-ep-library needs --execution-provider NAME (the name the plugin registers)")
    if public_key is not None and not Path(public_key).is_file():
        raise UsageError(f"--public-key: {public_key} is not a key file")
    given = {k: v for k, v in dict(
        backend=backend, execution_provider=execution_provider, plugin_ep_library=plugin_ep_library,
        backend_option=backend_option, device=device, deterministic=deterministic, kv_dir=kv_dir,
        kv_strategy=kv_strategy, kv_dtype=kv_dtype, max_device_memory=max_device_memory, offload_tier=offload_tier,
        ep=ep, pg_backend=pg_backend, timeout=timeout, public_key=public_key,
        index_numerics=index_numerics).items() if v is not None}
    return options.engine_options(**given)


def needs_tokenizer(path: str, command: str) -> None:
    """Refuse, before any weight is read, a text command on a model directory without tokenizer.json (such a
    model takes token ids only: `flashport.Engine.load(path).generate([ids])`). Raises UsageError."""
    from .loader import TOKENIZER_FILE, has_tokenizer

    if not has_tokenizer(path):
        raise UsageError(f"{path} has no {TOKENIZER_FILE}, so `flashport {command}` cannot take text (put the "
                         f"model's {TOKENIZER_FILE} beside its weights; token ids work through the SDK: "
                         "flashport.Engine.load(PATH).generate([ids]))")


def _check_sampling(max_new_tokens: int, temperature: float, top_p: float, seed: int | None) -> None:
    at_least("--max-new-tokens", max_new_tokens, 1)
    at_least("--temperature", temperature, 0)
    if not 0 < top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], not {top_p}")
    if seed is not None:
        at_least("--seed", seed, 0)


def _needs_module(module: str, command: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        extra = {"uvicorn": "serve", "onnx": "onnx"}.get(module, "test")
        raise UsageError(f"{command} needs the package {module!r}: pip install 'flashport[{extra}]'")


# -------------------------------------------------------------------------------------------------------------
# config: a table with B/M units and the parameters active per token
# -------------------------------------------------------------------------------------------------------------
def active_params(cfg, counts: dict[str, int]) -> int:
    """Parameters one token runs through: everything but the routed experts (embedding and head included), plus
    top-k of the routed experts per MoE layer; the MTP block apart, as in `param_count`."""
    routed = counts.get("routed_experts", 0)
    return counts["total"] - routed + routed * cfg.num_experts_per_tok // max(cfg.n_routed_experts, 1)


def human_count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def config_table(cfg, counts: dict[str, int], active: int) -> str:
    rows = [f"{cfg.name}: {human_count(counts['total'])} parameters, {human_count(active)} active per token "
            f"({cfg.num_experts_per_tok} of {cfg.n_routed_experts} routed experts)", ""]
    for k in ("embed_head", "routed_experts", "other", "mtp"):
        if k in counts:
            rows.append(f"  {k.replace('_', ' '):<16} {human_count(counts[k]):>9}")
    rows.append("")
    d = cfg.to_dict()
    width = max(map(len, d))
    rows += [f"  {k:<{width}}  {v}" for k, v in d.items()]
    rows.append(f"  {'kv_block_tokens':<{width}}  {cfg.kv_block_tokens}")
    return "\n".join(rows)


def _dump(obj) -> str:
    return jsonlib.dumps(obj, indent=2, default=str)


def commands(obj) -> dict[str, object]:
    """{"make-checkpoint": bound method, ...} of a command object (Cli, Bench); groups (bench) included."""
    out = {}
    for name in dir(type(obj)):
        if not name.startswith("_"):
            out[name.replace("_", "-")] = getattr(obj, name)
    return out


FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:_[a-z0-9]+)+")
COMMAND_LINE = re.compile(r"^( +)([a-z][a-z0-9]*(?:_[a-z0-9]+)+)$", re.M)


def hyphenate(help_text: str) -> str:
    """fire's help with the spellings users type: `--max-new-tokens`, `export-onnx` (fire prints Python's names;
    both spellings are accepted, cli_args turns hyphens into underscores)."""
    help_text = FLAG.sub(lambda m: m.group(0).replace("_", "-"), help_text)
    return COMMAND_LINE.sub(lambda m: m.group(1) + m.group(2).replace("_", "-"), help_text)


def _help(words: list[str]) -> int:
    """python-fire's help for `flashport WORDS`: commands and groups, or a command's flags with their types,
    defaults and meanings (from the signature and the docstring's Args section)."""
    import contextlib
    import io

    import fire

    buf = io.StringIO()  # fire writes help to stderr (or to a pager on a terminal); help belongs on stdout
    code = 0
    with contextlib.redirect_stderr(buf):
        try:
            fire.Fire(Cli(), command=[*words, "--help"], name="flashport")
        except fire.core.FireExit as e:
            code = e.code or 0
    text = "".join(line for line in buf.getvalue().splitlines(keepends=True)
                   if not line.startswith("INFO: Showing help"))
    sys.stdout.write(hyphenate(text).lstrip("\n"))
    return code


def _resolve(argv: list[str]):
    """(target, words, rest) for argv: a command (or a bench subcommand), or a group to show help for."""
    target, words, rest = Cli(), [], list(argv)
    while rest and not rest[0].startswith("-"):
        cmds = commands(target)
        word = rest[0].replace("_", "-")
        prog = " ".join(["flashport", *words])
        if word not in cmds:
            close = difflib.get_close_matches(word, list(cmds), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise UsageError(f"unknown command {rest[0]!r}{hint} ({prog} --help lists the commands)")
        target, words, rest = cmds[word], [*words, word], rest[1:]
        if callable(target):
            break
    return target, words, rest


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flashport")
    except PackageNotFoundError:
        from . import __version__

        return __version__


def _one_line(msg) -> str:
    return " ".join(str(msg).split()) or "(no message)"


def main(argv: list[str] | None = None) -> int:
    """Run `flashport ARGV`; returns the exit code (0 ok, 1 failed, 2 bad input, 130 interrupted)."""
    from .backends import BackendError
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .distributed import EPError
    from .engine import RequestError
    from .options import OptionError
    from .tokenizer import TokenizerFileError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv[: argv.index("--") if "--" in argv else len(argv)]
    if debug:
        argv.remove("--debug")
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    user_errors = (UsageError, OptionError, BackendError, CheckpointError, ConfigError, EPError, RequestError,
                   TokenizerFileError, FileNotFoundError, NotADirectoryError, ValueError, KeyError)
    try:
        if argv[:1] in (["--version"], ["-V"]):
            print(f"flashport {_version()}")
            return 0
        target, words, rest = _resolve(argv)
        prog = " ".join(["flashport", *words])
        wants_help = any(a in ("--help", "-h") for a in rest[: rest.index("--") if "--" in rest else len(rest)])
        if not callable(target) or wants_help:
            if rest and not wants_help:
                raise UsageError(f"unknown flag {rest[0]}; {prog} --help lists the commands")
            return _help(words)
        kwargs = parse_args(target, rest, prog)
        result = target(**kwargs)
        if result is not None and not isinstance(result, int):
            print(result if isinstance(result, str) else _dump(result), flush=True)
        return result if isinstance(result, int) and not isinstance(result, bool) else 0
    except BrokenPipeError:
        # the reader went away (`flashport config | head`): stop quietly; point stdout at devnull so the
        # interpreter's final flush does not fail again (the recipe of the Python docs, "Note on SIGPIPE")
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout without a file descriptor (captured)
            pass
        return 1
    except KeyboardInterrupt:
        print("flashport: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # a command's own exit code (conformance: 1 on a failed case)
        return e.code if isinstance(e.code, int) else 1
    except ModuleNotFoundError as e:
        if debug:
            raise
        what = (f"this command is not available in this build ({e.name} missing)" if (e.name or "").startswith(
            "flashport") else f"this command needs the package {e.name!r}: pip install 'flashport[test]'")
        print(f"flashport: error: {what}", file=sys.stderr)
        return 2
    except user_errors as e:
        if debug:
            import traceback

            traceback.print_exc()
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"flashport: error: {_one_line(msg)}", file=sys.stderr)
        return 2
    except (OSError, MemoryError, RuntimeError, Exception) as e:  # noqa: BLE001 - one line, never a traceback
        if debug:
            import traceback

            traceback.print_exc()
        kind = "" if isinstance(e, OSError) else f"{type(e).__name__}: "
        hint = "" if debug else " (--debug shows the traceback)"
        print(f"flashport: error: {kind}{_one_line(e)}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
