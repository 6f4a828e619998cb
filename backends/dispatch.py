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
from .contract import FUSED, OPS, Backend, BackendError, QuantWeight
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
        self._fused_fns: dict[str, object] = {}  # fused sequence name -> the backend's method, or None

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

    def expert_view(self, experts, single: bool = False) -> "_ExpertHandles":
        """experts[e] -> (w1, w3, w2) handles; one view kept per model nn.ModuleList of experts (or per single
        Expert module with single=True, e.g. a MoE's shared expert, seen as a list of one); a per-call list or an
        offload container gets a fresh view."""
        cached = single or type(experts) is nn.ModuleList
        view = self._experts.get(experts) if cached else None
        if view is None:
            view = _ExpertHandles(self, experts, weak=cached, single=single)
            if cached:
                self._experts[experts] = view
        return view

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
        view = self.expert_view(experts)
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

    # -- fused sequences (contract.FUSED) -------------------------------------------------------------------------
    # Each returns the backend's one-call result, or None: no such method, the backend declines (returns None), an
    # op has degraded, or it raised (then it is degraded and never tried again). On None the model runs the ops
    # one by one, each through this dispatch as usual, so the reference path never changes.
    def _fused_fn(self, name: str):
        fn = self._fused_fns.get(name, False)
        if fn is False:
            ok = self.backend is not None and not self.caps.whole_step and name in FUSED
            fn = self._fused_fns[name] = getattr(self.backend, name, None) if ok else None
        return None if self.errors else fn  # after any degraded op, every sequence runs op by op

    def _fused(self, name: str, fn, *args):
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - as _call: the ops one by one still work
            self._fused_fns[name] = None
            self._degrade(name, None, e)
            return None

    def hc_pre_norm(self, streams, fn, base, scale, iters, eps, norm_eps, weight, weight_eps):
        f = self._fused_fn("hc_pre_norm")
        return f and self._fused("hc_pre_norm", f, streams, fn, base, scale, iters, eps, norm_eps, weight,
                                 weight_eps)

    def hc_post_pre_norm(self, out, streams, post, comb, fn, base, scale, iters, eps, norm_eps, weight, weight_eps):
        f = self._fused_fn("hc_post_pre_norm")
        return f and self._fused("hc_post_pre_norm", f, out, streams, post, comb, fn, base, scale, iters, eps,
                                 norm_eps, weight, weight_eps)

    def attn_project(self, x, wq_a, q_norm, wq_b, wkv, kv_norm, cos, sin, heads, eps):
        f = self._fused_fn("attn_project")
        return f and self._fused("attn_project", f, x, self.handle(wq_a), q_norm, self.handle(wq_b),
                                 self.handle(wkv), kv_norm, cos, sin, heads, eps)

    def attn_output(self, q, keys, sink, scale, cos, sin, wo_a, groups, wo_b):
        f = self._fused_fn("attn_output")
        return f and self._fused("attn_output", f, q, keys, sink, scale, cos, sin, self.handle(wo_a), groups,
                                 self.handle(wo_b))

    def compress_project(self, x, kv, gate, wkv, wgate):
        f = self._fused_fn("compress_project")
        return f and self._fused("compress_project", f, x, kv, gate, self.handle(wkv), self.handle(wgate))

    def gated_moe(self, x, token_ids, gate_w, tid2eid, bias, k, route_scale, experts, shared, limit):
        """Only for a model's own experts (an nn.ModuleList): an offload container runs op by op."""
        f = self._fused_fn("gated_moe")
        if not f or type(experts) is not nn.ModuleList:
            return None
        return self._fused("gated_moe", f, x, token_ids, gate_w, tid2eid, bias, k, route_scale,
                           self.expert_view(experts), self.expert_view(shared, single=True), limit)


class _ExpertHandles:
    """experts[e] -> (w1, w3, w2) handles, resolved only for the experts a step actually routes to."""

    def __init__(self, ops: Ops, experts, weak: bool = False, single: bool = False):
        self.ops = ops
        if single:  # a single Expert module (a shared expert): a list of one
            ref = weakref.ref(experts) if weak else (lambda: experts)
            self._experts = lambda: [ref()]
        else:  # weak: held by Ops._experts, whose key is `experts` itself (a strong reference would keep it alive)
            self._experts = weakref.ref(experts) if weak else (lambda: experts)
        self.cache: dict = {}  # what a backend derives from these handles (torch_fast: its C++ ExpertSet)
        # each expert's Linears, resolved on first use (an offloaded container materialises experts on access):
        # nn.Module attribute look-ups cost ~1 us each, 4 per routed expert per decode step. Ops keeps this view
        # for a model's nn.ModuleList, so replacing an expert's Linear after its first step is not seen.
        self._lins: list = [None] * len(self.experts)

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
