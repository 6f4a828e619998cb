"""The onnxruntime backend: runs whole decoder steps as one exported ONNX graph on any execution provider.

    backend = OnnxRuntimeBackend(ep="CPUExecutionProvider")                 # or CUDAExecutionProvider, ...
    backend = OnnxRuntimeBackend(ep="MyNpuExecutionProvider", plugin_ep_library="/opt/npu/libnpu_ep.so")
    onnx_model = backend.bind_model(model, path)                            # what Engine.load does
    logits = onnx_model.forward_batch([ids], [state])                       # same API as Transformer

Unlike the per-op backends this one replaces the decoder step: `bind_model` returns an `OnnxModel` with the
`Transformer` interface (`cfg`, `forward_batch`, `forward`, `eval`), backed by ONE `InferenceSession` created once
(see docs/onnx.md for why one whole-step graph rather than per-op or per-layer sessions). The per-sequence
`SeqState` stays flashport's: it goes in as graph inputs and comes back as outputs (only the new compressed
entries for the append-only part), so the disk tier and prefix reuse work unchanged.

Inputs are bound with ORT's I/O binding straight from the state's torch tensors (no copy on the CPU EP); the
outputs are the fixed-size parts plus this chunk's new entries, so a decode step never copies the cache.

Numerics: fp32 activations (accuracy_level=0) keep logits within 1e-3 max-abs of the torch backend on the same
weights (tests/test_onnx_parity.py); not bit-exact (ORT's kernels sum in another order).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from .contract import OPS, Backend, BackendError, Capabilities, DeviceInfo

log = logging.getLogger("flashport.backends")


class OnnxModelError(BackendError):
    """An exported ONNX model that cannot be used (corrupt, missing data file, or exported for another model)."""


def _ort():
    import onnxruntime

    return onnxruntime


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, device: str | None = None, ep: str = "CPUExecutionProvider", ep_options: dict | None = None,
                 plugin_ep_library: str | None = None, onnx_dir: str | None = None, threads: int = 0,
                 accuracy_level: int = 0, optimization: str = "all"):
        """ep: execution provider by name; ep_options: its provider options; plugin_ep_library: path of a plugin
        EP shared library to register first (ONNX Runtime >= 1.22), registered under the name `ep`;
        onnx_dir: an `export-onnx` output to run (default: MODEL/onnx, else exported on load);
        threads: intra-op threads (0: ORT's default); accuracy_level: used when exporting on load."""
        ort = _ort()
        self.ep, self.ep_options = ep, dict(ep_options or {})
        self.onnx_dir = Path(onnx_dir) if onnx_dir else None
        self.threads, self.accuracy_level, self.optimization = threads, accuracy_level, optimization
        self.ep_devices = None
        if ep == "CPUExecutionProvider" and device and device.partition(":")[0] != "cpu":
            # the CPU EP would silently run a model meant for `device` on the CPU
            raise BackendError(f"device {device}: execution provider CPUExecutionProvider runs on the CPU; choose "
                               "the device's execution provider (--execution-provider NAME) or --device cpu")
        if device and ":" in device and "device_id" not in self.ep_options and ep != "CPUExecutionProvider":
            self.ep_options["device_id"] = device.rpartition(":")[2]
        self.device = device or ("cpu" if ep == "CPUExecutionProvider" else ep)
        if plugin_ep_library:
            lib = Path(plugin_ep_library)
            if not lib.is_file():
                raise BackendError(f"plugin EP library {lib} does not exist")
            if not hasattr(ort, "register_execution_provider_library"):
                raise BackendError(f"onnxruntime {ort.__version__} cannot load plugin EP libraries (needs >= 1.22)")
            try:
                ort.register_execution_provider_library(ep, str(lib))
            except Exception as e:  # noqa: BLE001 - ORT raises its own types
                raise BackendError(f"could not register plugin EP library {lib} as {ep!r}: {e}") from e
            self.ep_devices = [d for d in ort.get_ep_devices() if d.ep_name == ep]
            if not self.ep_devices:
                names = sorted({d.ep_name for d in ort.get_ep_devices()})
                raise BackendError(f"plugin library {lib} registered no device for EP {ep!r}; EP devices: "
                                   f"{', '.join(names)}")
        elif ep not in ort.get_available_providers():
            raise BackendError(f"execution provider {ep!r} is not available in onnxruntime {ort.__version__}; "
                               f"available: {', '.join(ort.get_available_providers())} (a plugin EP needs "
                               f"plugin_ep_library=PATH)")

    # -- contract ----------------------------------------------------------------------------------------------
    def devices(self) -> list[DeviceInfo]:
        if self.ep == "CPUExecutionProvider":
            from .torch_backend import device_memory

            total, free = device_memory(torch.device("cpu"))
            return [DeviceInfo("cpu", "cpu", total, free)]
        return [DeviceInfo(self.device, "gpu" if "CUDA" in self.ep or "ROCM" in self.ep else "npu")]

    def capabilities(self) -> Capabilities:
        """Whole decoder steps (contract 1.1): every op runs inside the exported step graph, none one by one.

        Weight formats the graph runs on the stored weights: linears in NATIVE_FORMATS (int4 as MatMulNBits on
        the packed bytes; int8 / w8a8 / fp8-e4m3-channel as Cast * scale + MatMul; fp32 / bf16 as MatMul);
        routed experts in int4 as one QMoE per layer (when hidden_size and moe_intermediate_size are multiples of
        the format's block) or fp32 / bf16 densely. Anything else (fp8 128x128 blocks, mxfp4, int8 experts) is
        refused by bind_model (`flashport export-onnx --dequantize-unsupported` stores it as fp32). Not
        deterministic in the contract's sense: ORT picks kernels by shape."""
        from ..quant.formats import INT4_FORMATS
        from .onnx_export import NATIVE_FORMATS

        ops = {op: (set(NATIVE_FORMATS) if weighted else True) for op, weighted in OPS.items()}
        ops["moe"] = set(INT4_FORMATS) | {"fp32", "bf16"}
        return Capabilities(ops=ops, deterministic=False, whole_step=True)

    def describe(self) -> str:
        """Where the step graph runs, for `flashport backends`."""
        note = "" if self.ep == "CPUExecutionProvider" else " (nodes it cannot run go to ORT's CPUExecutionProvider)"
        return f"one ONNX Runtime graph per decoder step on {self.ep}{note}"

    # -- sessions ----------------------------------------------------------------------------------------------
    def session_options(self):
        ort = _ort()
        so = ort.SessionOptions()
        if self.threads:
            so.intra_op_num_threads = self.threads
        so.graph_optimization_level = {
            "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[self.optimization]
        if self.ep_devices:
            so.add_provider_for_devices(self.ep_devices, self.ep_options)
        return so

    def session(self, graph: Path):
        """An InferenceSession on the chosen EP (CPU EP behind it for nodes the EP leaves); clear errors."""
        ort = _ort()
        graph = Path(graph)
        if not graph.is_file():
            raise OnnxModelError(f"{graph}: no such ONNX file")
        providers = None
        if not self.ep_devices:
            providers = [(self.ep, self.ep_options)] + ([] if self.ep == "CPUExecutionProvider"
                                                        else ["CPUExecutionProvider"])
        try:
            return ort.InferenceSession(str(graph), sess_options=self.session_options(), providers=providers)
        except Exception as e:  # noqa: BLE001 - ORT's errors (InvalidProtobuf, Fail, ...) carry the reason
            raise OnnxModelError(f"{graph}: onnxruntime cannot load this model (corrupt or truncated file, or a "
                                 f"missing {graph.name}.data?): {str(e).splitlines()[0][:400]}") from e

    def bind_model(self, model, source: str | Path | None = None) -> "OnnxModel":
        """The whole-step replacement of `model` (a Transformer): finds its ONNX export (onnx_dir, SOURCE/onnx, or
        SOURCE itself when it is an export) or exports it now into a temporary directory. Raises
        UnsupportedWeightFormat (a ValueError naming the weight) for a format the graph has no form for."""
        from .onnx_export import MANIFEST, export_model

        cands = [self.onnx_dir] if self.onnx_dir else []
        if source is not None:
            cands += [Path(source) / "onnx", Path(source)]
        found = next((d for d in cands if d is not None and (d / MANIFEST).exists()), None)
        tmp = None
        if found is None:
            if self.onnx_dir:
                raise OnnxModelError(f"{self.onnx_dir}: no {MANIFEST} (run flashport export-onnx first)")
            tmp = tempfile.TemporaryDirectory(prefix="flashport-onnx-")
            if source is None:
                log.info("exporting the model's decoder step to ONNX in %s", tmp.name)
            else:
                log.warning("no ONNX export next to %s: exporting now into %s (run `flashport export-onnx %s "
                            "%s/onnx` once to skip this)", source, tmp.name, source, source)
            export_model(model, tmp.name, accuracy_level=self.accuracy_level, progress=True)
            found = Path(tmp.name)
        return OnnxModel(self, found, model, keep=tmp)


class OnnxModel:
    """A Transformer look-alike whose decoder step is one ONNX Runtime session.

    `source` is the Transformer it was exported from: attributes this class lacks (state_dict, named_modules,
    layers... used e.g. to name the model's KV namespace) are read from it. It is kept, so its weights stay in
    host memory next to the session's copy."""

    def __init__(self, backend: OnnxRuntimeBackend, export_dir: Path, source, keep=None):
        from .dispatch import Ops
        from .onnx_export import EXPORT_VERSION, MANIFEST

        cfg = source.cfg
        self.source, self.ops = source, Ops(backend)
        self.backend, self.dir, self.cfg, self._keep = backend, Path(export_dir), cfg, keep
        try:
            self.manifest = json.loads((self.dir / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise OnnxModelError(f"{self.dir / MANIFEST}: unreadable ({e})") from None
        if self.manifest.get("format") != "flashport-onnx" or self.manifest.get("version") != EXPORT_VERSION:
            raise OnnxModelError(f"{self.dir}: not a flashport ONNX export of version {EXPORT_VERSION}")
        if self.manifest.get("config") != json.loads(json.dumps(cfg.to_dict(), default=str)):
            raise OnnxModelError(f"{self.dir}: exported for another model config; re-run flashport export-onnx")
        self.sess = backend.session(self.dir / self.manifest["graph"])
        self.input_names = {i.name for i in self.sess.get_inputs()}
        self._overlap_init: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    # -- the Transformer interface ---------------------------------------------------------------------------------
    def __getattr__(self, name: str):
        if name == "source":  # not set yet (during __init__)
            raise AttributeError(name)
        return getattr(self.source, name)

    def eval(self) -> "OnnxModel":
        return self

    def __call__(self, ids, state=None):
        return self.forward(ids, state)

    def forward(self, ids: torch.Tensor, state=None) -> torch.Tensor:
        from ..model import SeqState

        return self.forward_batch([ids], [state if state is not None else SeqState.empty(self.cfg)])[0]

    def forward_batch(self, chunks: list[torch.Tensor], states: list, all_logits: bool = True) -> list[torch.Tensor]:
        """Same contract as Transformer.forward_batch. Sequences run one graph call each (attention is per
        sequence anyway; the MoE is not batched across sequences here)."""
        return [self.step(ids, st, all_logits) for ids, st in zip(chunks, states)]

    # -- one step ----------------------------------------------------------------------------------------------
    def step(self, ids: torch.Tensor, st, all_logits: bool = True) -> torch.Tensor:
        ids = ids.to(torch.int64).contiguous()
        T = ids.numel()
        rows = torch.arange(T, dtype=torch.int64) if all_logits else torch.tensor([T - 1], dtype=torch.int64)
        binding = self.sess.io_binding()
        keep = []  # tensors must outlive the run: the binding holds raw pointers
        self._bind(binding, "ids", ids, keep)
        self._bind(binding, "start", torch.tensor(st.n_tokens, dtype=torch.int64), keep)
        self._bind(binding, "logit_rows", rows, keep)
        for i, spec in enumerate(self.manifest["state"]):
            ls = st.layers[i]
            for f in spec:
                self._bind(binding, f["input"], self._state_in(i, ls, f["key"]), keep)
        names = [o.name for o in self.sess.get_outputs()]
        for n in names:
            binding.bind_output(n, "cpu")
        self.sess.run_with_iobinding(binding)
        outs = dict(zip(names, (torch.from_numpy(v.numpy()) for v in binding.get_outputs())))
        if float(outs["selection_ties"]) > 0:  # ONNX TopK broke a tie unlike the reference: redo the step there
            return self._reference_step(ids, st, all_logits)
        # PoolState.replay (a prefix-cache window rebuild, flashport.kv): the loaded entries already hold this
        # span's windows. The graph's new entries sit past every query's causal limit (index >= loaded count),
        # so attention is unchanged; they are only not appended.
        frozen = any(ps is not None and ps.replay for ls in st.layers for ps in (ls.comp, ls.index))
        for i, spec in enumerate(self.manifest["state"]):
            ls = st.layers[i]
            for f in spec:
                self._state_out(ls, f["key"], outs[f["output"]], frozen)
        st.n_tokens += T
        return outs["logits"]

    def _reference_step(self, ids: torch.Tensor, st, all_logits: bool) -> torch.Tensor:
        """The step on the source model with the torch reference ops (rare: only when a top-k selection had an
        exact tie at its boundary, whose outcome ONNX TopK cannot reproduce; see reference.topk_indices). The
        state is flashport's SeqState either way, so the next step continues on the graph."""
        if isinstance(getattr(self.source.ops, "backend", None), OnnxRuntimeBackend):  # its per-op calls cannot run
            from .dispatch import Ops
            from .torch_backend import TorchBackend

            self.source.set_ops(Ops(TorchBackend()))
        return self.source.forward_batch([ids], [st], all_logits)[0]

    @staticmethod
    def _bind(binding, name: str, t: torch.Tensor, keep: list):
        t = t.contiguous()
        keep.append(t)
        if t.numel() == 0:  # no buffer to point at
            binding.bind_cpu_input(name, t.numpy())
            return
        binding.bind_input(name, "cpu", 0, np.float32 if t.dtype == torch.float32 else np.int64, tuple(t.shape),
                           t.data_ptr())

    def _state_in(self, i: int, ls, key: str) -> torch.Tensor:
        if key == "window":
            return ls.window.float()
        part, _, fld = key.partition(".")
        ps = getattr(ls, part)
        v = getattr(ps, fld)
        if v is None:  # CSA overlap before the first full window: what Compressor substitutes for None
            m, d = self.cfg.csa_rate, ps.entries.shape[1]
            if (m, d) not in self._overlap_init:
                self._overlap_init[(m, d)] = (torch.zeros(m, d), torch.full((m, d), -float("inf")))
            return self._overlap_init[(m, d)][fld == "overlap_gate"]
        return v.float()

    @staticmethod
    def _state_out(ls, key: str, v: torch.Tensor, frozen: bool = False):
        if key == "window":
            ls.window = v
            return
        part, _, fld = key.partition(".")
        ps = getattr(ls, part)
        if fld == "entries":  # append-only: the graph returns this chunk's new entries
            if v.shape[0] and not frozen:
                ps.entries = torch.cat([ps.entries, v])
        elif fld.startswith("overlap"):
            # None until the first full window (then the graph's output is the stored zeros / -inf unchanged)
            setattr(ps, fld, v if ps.entries.shape[0] else None)
        else:
            setattr(ps, fld, v)
