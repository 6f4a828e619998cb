"""`flashport` command line (python-fire). Errors the user can fix print one line, not a traceback."""

from __future__ import annotations

import json
import logging
import sys

import fire


class Cli:
    """flashport: run DeepSeek-V4-Flash-class MoE models on edge boxes and non-NVIDIA accelerators."""

    def generate(self, path: str, prompt: str = "", max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, backend: str = "auto", json: bool = False,
                 stream: bool = True, kv_dir: str = "", ep: int = 0, pg_backend: str = "gloo",
                 timeout: float = 30.0, max_device_memory: str = "", offload_tier: str = "host"):
        """Generate text from PATH (a checkpoint or bundle directory).

        kv_dir: disk prefix cache; ep N: expert parallelism over N ranks (torchrun, process group pg_backend,
        collective timeout seconds); max_device_memory: keep hot experts within this budget (e.g. 8GiB) and
        offload the rest to offload_tier (host | disk)."""
        from .engine import Engine

        if ep > 1:
            from .distributed import launch

            return launch(path, ep, "generate", prompt=prompt, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_p=top_p, seed=seed, backend=backend,
                          pg_backend=pg_backend, timeout=timeout)
        if max_device_memory:
            from .offload import load_engine

            engine = load_engine(path, max_device_memory=max_device_memory, tier=offload_tier, backend=backend)
        else:
            engine = Engine.load(path, backend=backend, **({"kv_dir": kv_dir} if kv_dir else {}))
        if json or not stream:
            out = engine.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                  seed=seed)
            if json:
                return _dump({"token_ids": out.token_ids, "text": out.text, "prompt_tokens": out.prompt_tokens,
                              "finish_reason": out.finish_reason, "prefill_tok_s": round(out.prefill_tok_s, 2),
                              "decode_tok_s": round(out.decode_tok_s, 2)})
            print(out.text)
            return None
        for piece in engine.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                     seed=seed, stream=True):
            print(piece, end="", flush=True)
        print()
        return None

    def make_checkpoint(self, preset: str = "flash-tiny", out: str = "", seed: int = 0, format: str = "release",
                        override: str = ""):
        """Write a deterministic random checkpoint of PRESET to OUT (format: release | hf); override: a JSON object
        of config.json fields, e.g. '{"num_hidden_layers": 3, "n_routed_experts": 16}'."""
        from .checkpoint import make_checkpoint

        if not out:
            raise ValueError("--out DIR is required")
        path = make_checkpoint(out, preset, seed, format, override=override or None)
        print(f"wrote {format} checkpoint of {preset} (seed {seed}) to {path}")

    def config(self, preset_or_path: str = "v4-flash"):
        """Show a preset's or a checkpoint's config with its parameter counts."""
        from pathlib import Path

        from .config import ModelConfig

        cfg = ModelConfig.from_file(preset_or_path) if Path(preset_or_path).exists() else \
            ModelConfig.preset(preset_or_path)
        return _dump({"params": cfg.param_count(), "kv_block_tokens": cfg.kv_block_tokens, **cfg.to_dict()})

    # Commands implemented in their own modules (each module owns its flags; see `flashport CMD --help`).
    def export(self, *args, **kwargs):
        """Requantize and partition a checkpoint into a deployment bundle: export SRC OUT --recipe R --devices SPEC."""
        return _run("flashport.export.bundle:export_cli", args, kwargs)

    def plan(self, *args, **kwargs):
        """Place every routed expert on a device or tier for a memory budget: plan --model v4-flash --devices ..."""
        return _run("flashport.export.planner:plan_cli", args, kwargs)

    def inspect(self, *args, **kwargs):
        """Summarise a bundle or checkpoint: inspect PATH [--verify] (a checkpoint: every tensor read and checked)."""
        return _run("flashport.export.bundle:inspect_cli", args, kwargs)

    def eval(self, *args, **kwargs):
        """Perplexity, and KL / top-1 agreement against a reference: eval PATH --text FILE [--reference PATH]."""
        return _run("flashport.export.evaluate:eval_cli", args, kwargs)

    def export_onnx(self, *args, **kwargs):
        """Export a bundle (or checkpoint) to ONNX graphs: export-onnx BUNDLE OUT."""
        return _run("flashport.backends.onnx_export:export_cli", args, kwargs)

    def conformance(self, *args, **kwargs):
        """Run the conformance kit on a backend: conformance BACKEND [--device D] [--report FILE.json]."""
        return _run("flashport.backends.conformance:conformance_cli", args, kwargs)

    def serve(self, *args, **kwargs):
        """OpenAI-compatible server: serve PATH [--host 127.0.0.1] [--port 8000] [--api-key K]."""
        return _run("flashport.server:serve_cli", args, kwargs)

    def chat(self, *args, **kwargs):
        """Interactive terminal chat: chat PATH."""
        return _run("flashport.chat_cli:chat_cli", args, kwargs)

    def kv(self, *args, **kwargs):
        """KV memory accounting: kv PRESET_OR_PATH [--context N] [--sequences S]."""
        return _run("flashport.kv:kv_cli", args, kwargs)

    def backends(self, explain: str = "", backend: str = "auto"):
        """List the backends with their availability, devices and capabilities. With --explain PATH: which ops
        of that model run natively on BACKEND and which fall back to the torch reference (before any run)."""
        from .backends.explain import explain_model, list_backends

        return explain_model(explain, backend) if explain else list_backends()

    @property
    def bench(self):
        """Benchmarks: `flashport bench decode PATH`."""
        from .bench_cli import Bench

        return Bench()


def _run(target: str, args, kwargs):
    import importlib

    mod, _, fn = target.partition(":")
    try:
        module = importlib.import_module(mod)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("flashport"):
            raise ValueError(f"this command is not available in this build ({e.name} missing)") from None
        raise ValueError(f"this command needs the package {e.name!r}: pip install 'flashport[test]'") from None
    # fire turns `--sizes 2048,8192` into a tuple; list-valued flags of these commands take "a,b" strings
    def flat(v):
        return ",".join(map(str, v)) if isinstance(v, tuple) else v

    return getattr(module, fn)(*map(flat, args), **{k: flat(v) for k, v in kwargs.items()})


def _dump(obj) -> str:
    return json.dumps(obj, indent=2, default=str)


def main(argv: list[str] | None = None) -> int:
    from .backends import BackendError
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .engine import RequestError
    from .tokenizer import TokenizerFileError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        fire.Fire(Cli, command=argv, name="flashport")
    except (BackendError, CheckpointError, ConfigError, RequestError, TokenizerFileError, FileNotFoundError, ValueError,
            KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"flashport: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
