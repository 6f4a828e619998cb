"""Per-op dispatch: the model calls `Ops`; each op goes to the chosen backend when it supports the op (and the
weight's format), else to the torch reference. A fallback is logged once per (op, format).

An op that raises on the backend at run time is contained: that call and every later call of the op (in that
weight format) run on the reference instead, the error is logged once, and the op is listed in `Ops.degraded`
(what the server's /health reports) and in the degraded-backend marks `flashport backends` shows."""

from __future__ import annotations

import logging
import weakref

from torch import nn

from . import reference
from .contract import OPS, Backend, BackendError, QuantWeight
from .registry import mark_degraded

log = logging.getLogger("flashport.backends")


class Ops:
    def __init__(self, backend: Backend | None = None):
        self.backend = backend
        self.caps = backend.capabilities() if backend is not None else None
        self.fallbacks: dict[tuple[str, str | None], str] = {}
        self.errors: dict[tuple[str, str | None], str] = {}  # (op, format) -> the error that degraded it
        self._route: dict[tuple[str, str | None], bool] = {}
        # a model's ModuleList of experts -> its handle view; weak, so the global REFERENCE keeps no model alive
        self._experts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @property
    def degraded(self) -> list[str]:
        """Ops that raised on the backend at run time and now run on the torch reference (empty: healthy)."""
        return sorted({op for op, _ in self.errors})

    def native(self, op: str, fmt: str | None = None) -> bool:
        """True when `op` (with weights in `fmt`) runs on the backend, False when it falls back."""
        key = (op, fmt)
        if key not in self._route:
            if self.caps is not None and self.caps.whole_step:
                raise BackendError(f"backend {self.backend.name!r} runs whole decoder steps, not single ops: bind "
                                   f"the model with backend.bind_model(model, path) (Engine.load does)")
            ok = (self.backend is not None and self.caps.supports(op, fmt if OPS[op] else None)
                  and self.backend.implements(op))
            self._route[key] = ok
            if not ok and self.backend is not None:
                why = "weight format " + fmt if fmt and self.caps.supports(op) else "op"
                self.fallbacks[key] = why
                log.info("backend %s lacks %s %s: falling back to the torch reference", self.backend.name, op,
                         f"({why})" if fmt else "")
        return self._route[key]

    # -- weights ---------------------------------------------------------------------------------------------
    def handle(self, lin, op: str | None = None):
        """The backend's copy of a Linear's weight (for `op`, default the Linear's own), uploaded on first use;
        or the fp32 tensor when that op falls back to the reference."""
        qw: QuantWeight = lin.qweight
        native = self._route.get((op or lin.op, qw.fmt))  # the decided route, without a call (~200 per step)
        if native is None:
            native = self.native(op or lin.op, qw.fmt)
        if native:
            key = id(self.backend)
            if lin.handles.get(key) is None:
                lin.handles[key] = self.backend.upload(qw)
            return lin.handles[key]
        if qw.fmt == "fp32":  # the live parameter itself (training reads gradients through it)
            return qw.tensors["weight"]
        if lin.handles.get("ref") is None:
            lin.handles["ref"] = qw.dequantize()
        return lin.handles["ref"]

    def _call(self, op, fmt, *args, rebuild=None):
        """Run op on the backend when it is native there, else on the reference. When the backend raises, the op
        is degraded and this call reruns on the reference with `rebuild()`'s arguments (reference weights in
        place of the backend's handles)."""
        native = self._route.get((op, fmt))  # the cached route first: this runs ~200 times per decode step
        if native is None:
            native = self.native(op, fmt)
        if not native:
            return getattr(reference, op)(*args)
        try:
            return getattr(self.backend, op)(*args)
        except Exception as e:  # noqa: BLE001 - one failing kernel must not stop generation
            self._degrade(op, fmt, e)
            return getattr(reference, op)(*(rebuild() if rebuild else args))

    def _degrade(self, op: str, fmt: str | None, e: Exception) -> None:
        key = (op, fmt)
        self._route[key] = False
        self.fallbacks[key] = "raised at run time"
        self.errors[key] = f"{e.__class__.__name__}: {e}"
        log.warning("backend %s: %s%s raised %s: %s; it runs on the torch reference from now on (backend marked "
                    "degraded)", self.backend.name, op, f" ({fmt})" if fmt else "", e.__class__.__name__, e)
        mark_degraded(self.backend, op, self.errors[key])

    def linear(self, x, lin):
        return self._call("linear", lin.qweight.fmt, x, self.handle(lin), rebuild=lambda: (x, self.handle(lin)))

    def grouped_linear(self, x, lin):
        return self._call("grouped_linear", lin.qweight.fmt, x, self.handle(lin),
                          rebuild=lambda: (x, self.handle(lin)))

    def moe(self, x, weights, idx, experts, limit):
        cached = type(experts) is nn.ModuleList  # a model's experts (not a per-call list, not an offload cache)
        view = self._experts.get(experts) if cached else None
        if view is None:
            view = _ExpertHandles(self, experts, weak=cached)
            if cached:
                self._experts[experts] = view
        return self._call("moe", view.linears(0)[0].qweight.fmt, x, weights, idx, view, limit)

    # -- weightless ops ----------------------------------------------------------------------------------------
    def attention(self, q, keys, bias, sink, scale):
        return self._call("attention", None, q, keys, bias, sink, scale)

    def rms_norm(self, x, weight, eps):
        return self._call("rms_norm", None, x, weight, eps)

    def rope(self, x, cos, sin, inverse=False):
        return self._call("rope", None, x, cos, sin, inverse)

    def compress_pool(self, kv, gate):
        return self._call("compress_pool", None, kv, gate)

    def indexer_topk(self, q, keys, weights, visible, k):
        return self._call("indexer_topk", None, q, keys, weights, visible, k)

    def hc_pre(self, streams, fn, base, scale, iters, eps, norm_eps):
        return self._call("hc_pre", None, streams, fn, base, scale, iters, eps, norm_eps)

    def hc_post(self, out, streams, post, comb):
        return self._call("hc_post", None, out, streams, post, comb)

    def hc_head(self, streams, fn, base, scale, eps, norm_eps):
        return self._call("hc_head", None, streams, fn, base, scale, eps, norm_eps)


class _ExpertHandles:
    """experts[e] -> (w1, w3, w2) handles, resolved only for the experts a step actually routes to."""

    def __init__(self, ops: Ops, experts, weak: bool = False):
        self.ops = ops
        # weak: held by Ops._experts, whose key is `experts` itself (a strong reference would keep it alive)
        self._experts = weakref.ref(experts) if weak else (lambda: experts)
        # each expert's Linears, resolved on first use (an offloaded container materialises experts on access):
        # nn.Module attribute look-ups cost ~1 us each, 4 per routed expert per decode step. Ops keeps this view
        # for a model's nn.ModuleList, so replacing an expert's Linear after its first step is not seen.
        self._lins: list = [None] * len(experts)

    @property
    def experts(self):
        return self._experts()

    def __len__(self):
        return len(self.experts)

    def linears(self, e: int):
        lins = self._lins[e]
        if lins is None:
            ex = self.experts[e]
            lins = self._lins[e] = (ex.w1, ex.w3, ex.w2)
        return lins

    def __getitem__(self, e: int):
        handle = self.ops.handle
        w1, w3, w2 = self.linears(e)
        return handle(w1, "moe"), handle(w3, "moe"), handle(w2, "moe")


REFERENCE = Ops(None)
