"""The conformance kit: checks a backend against the torch reference, op by op, then end to end.

    flashport conformance BACKEND [--device D] [--report FILE.json] [--e2e/--noe2e] [--max-context N]

For every op the backend claims (Capabilities) and implements, and for every weight format it claims for the
weight ops, the kit runs a fixed list of cases (`CASES`) that includes the edge cases backends get wrong: a single
decode token, an expert with no tokens, K not a multiple of the quantization group, a query that sees no key
(only the sink), empty compressor slots (gate -inf), and the longest context the backend claims
(`Capabilities.max_context`, capped by `max_context` to keep a CPU run short). Each result is compared with the
reference run on the same inputs (weights dequantized by flashport.quant, the ground truth):

- bit_exact: torch.equal with the reference;
- max_abs and max_ulp (fp32 units in the last place, over all elements);
- passed: max_abs <= atol + rtol * max|reference|, with (atol, rtol) declared per op in `TOLERANCES` below
  (a per-format override for formats whose own semantics round further, e.g. w8a8). indexer_topk returns a
  selection: it passes when every entry it selects differently from the reference scores within the op's
  tolerance of the k-th best score (a near-tie), and the count of selected entries per query is the same.
- It also fails a backend that modifies its inputs in place (the model relies on tensors being replaced, never
  written: SeqState snapshots are shallow copies), returns the wrong shape or dtype, or raises.

Then the end-to-end check on `flash-tiny` (a fresh deterministic checkpoint, or --model PATH): full-sequence
logits through the backend (with fallback for what it lacks) against the reference within `E2E_TOLERANCE`, and
greedy tokens equal. It runs with fp32 weights and again with every linear packed in one quantized format the
backend claims (int8, else int4-g32, else mxfp4), so quantized kernels are exercised in the whole model.

A whole-step backend (`Capabilities.whole_step`, contract 1.1) runs no single op: its per-op cases are reported as
running inside the whole-step graph, and the end-to-end checks run the model it binds (`Backend.bind_model`),
quantized in the first format its graph takes for every projection (linears and experts).

A JSON report (--report) holds every case; the exit status is non-zero when anything failed. A full run (no
--ops / --formats restriction, end to end included) of a registered backend also writes its conformance record
(`registry.write_record`): `backend="auto"` picks an out-of-tree plugin only with a passing one. The same cases run
as pytest tests in a vendor's repository through `flashport.backends.pytest_plugin`.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from . import reference
from .contract import OPS, WEIGHT_FORMATS, API_VERSION, Backend, BackendError, Capabilities, QuantWeight

# -- declared tolerances ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tolerance:
    """A result passes when max|out - ref| <= atol + rtol * max|ref| (over the whole output)."""

    atol: float
    rtol: float


TOLERANCES: dict[str, Tolerance] = {
    # matmul-like ops: fp32 accumulation in another order than torch's matmul (K up to a few thousand)
    "linear": Tolerance(1e-6, 1e-4),
    "grouped_linear": Tolerance(1e-6, 1e-4),
    "moe": Tolerance(1e-6, 1e-4),             # two chained GEMMs plus SwiGLU per expert
    "attention": Tolerance(1e-6, 1e-4),       # softmax (exp) over up to ~4k keys, then a weighted sum
    "indexer_topk": Tolerance(1e-6, 1e-4),    # on the scores: a near-tie may pick another entry (see above)
    # elementwise or short reductions: a few roundings at most
    "rms_norm": Tolerance(1e-6, 1e-5),
    "rope": Tolerance(1e-6, 1e-5),
    "compress_pool": Tolerance(1e-6, 1e-5),
    "hc_pre": Tolerance(1e-6, 1e-4),          # 20 Sinkhorn iterations amplify reassociation differences
    "hc_post": Tolerance(1e-6, 1e-5),
    "hc_head": Tolerance(1e-6, 1e-5),
}
# formats whose defined arithmetic rounds more than "dequantize, then fp32 matmul" (the reference)
FORMAT_TOLERANCES: dict[str, Tolerance] = {
    "w8a8": Tolerance(1e-4, 3e-2),            # activations quantized to int8 per token
}
E2E_TOLERANCE = Tolerance(1e-5, 1e-4)       # logits of flash-tiny, relative to max|logit|
assert TOLERANCES.keys() == OPS.keys()

IN_GRAPH = "runs inside the whole-step graph (checked end to end)"
DEFAULT_MAX_CONTEXT = 16384  # cap on the long-context case (the CPU reference must run it in seconds)
E2E_QUANT_FORMATS = ("int8", "int4-g32", "mxfp4")  # first one the backend claims for linear or moe


def tolerance(op: str, fmt: str | None = None) -> Tolerance:
    return FORMAT_TOLERANCES.get(fmt, TOLERANCES[op]) if fmt else TOLERANCES[op]


# -- cases -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One input set for one op. `build(gen, fmt, max_context)` returns the reference-side arguments, with
    weights as QuantWeight (the kit dequantizes them for the reference and uploads them for the backend)."""

    op: str
    label: str
    build: Callable[[torch.Generator, str | None, int], tuple]
    long: bool = False  # sized by the context the backend claims

    @property
    def id(self) -> str:
        return f"{self.op}[{self.label}]"


def _randn(gen, *shape, scale=1.0):
    return torch.randn(*shape, generator=gen) * scale


def _weight(gen, fmt: str, n: int, k: int) -> QuantWeight:
    w = _randn(gen, n, k, scale=k ** -0.5)
    if fmt == "fp32":
        return QuantWeight("fp32", (n, k), {"weight": w})
    from ..quant.formats import get_format

    return QuantWeight(fmt, (n, k), get_format(fmt).pack(w))


def _linear(t, n, k):
    return lambda g, fmt, _: (_randn(g, t, k), _weight(g, fmt, n, k))


def _grouped(t, groups, r, i):
    return lambda g, fmt, _: (_randn(g, t, groups, i), _weight(g, fmt, groups * r, i))


def _moe(t, d, inter, n_experts, k, skip_expert):
    """Routing over n_experts where expert `skip_expert` gets no token (its weights must not matter)."""

    def build(g, fmt, _):
        x = _randn(g, t, d)
        pool = torch.tensor([e for e in range(n_experts) if e != skip_expert])
        idx = torch.stack([pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(t)])  # [T, k]
        weights = torch.rand(t, k, generator=g) + 0.1
        weights = 1.5 * weights / weights.sum(-1, keepdim=True)
        experts = [(_weight(g, fmt, inter, d), _weight(g, fmt, inter, d), _weight(g, fmt, d, inter))
                   for _ in range(n_experts)]
        return x * 4, weights, idx, experts, 10.0  # x * 4: some SwiGLU values reach the clamp

    return build


def _attention(t, heads, dh, window, n_comp, topk, hidden_row=False):
    """Causal sliding window over `window + t` raw keys, then n_comp compressed entries of which each query sees
    a random top-k subset (CSA-like). hidden_row: the first query sees no key at all (only its sink)."""

    def build(g, fmt, max_ctx):
        n = n_comp if n_comp >= 0 else max_ctx // 4  # the long case: CSA keeps one entry per 4 tokens
        s_raw = window + t
        q, keys = _randn(g, t, heads, dh), _randn(g, s_raw + n, dh)
        pos = window + torch.arange(t)
        dist = pos[:, None] - torch.arange(s_raw)[None, :]
        bias = torch.zeros(t, s_raw + n)
        bias[:, :s_raw].masked_fill_((dist < 0) | (dist >= window), -math.inf)
        if n:
            scores = torch.rand(t, n, generator=g)
            chosen = torch.zeros(t, n, dtype=torch.bool).scatter_(1, scores.topk(min(topk, n), -1).indices, True)
            bias[:, s_raw:].masked_fill_(~chosen, -math.inf)
        if hidden_row:
            bias[0] = -math.inf
        return q, keys, bias, _randn(g, heads), dh ** -0.5

    return build


def _rms(shape, with_weight):
    return lambda g, fmt, _: (_randn(g, *shape, scale=3.0), _randn(g, shape[-1]) if with_weight else None, 1e-6)


def _rope(shape, rope_dim, inverse):
    def build(g, fmt, _):
        pos = (torch.arange(shape[0], dtype=torch.float32) + 1) * 977.0  # large angles: sin/cos must be accurate
        inv = 10000.0 ** (-torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim)
        ang = pos[:, None] * inv[None, :]
        return _randn(g, *shape), ang.cos(), ang.sin(), inverse

    return build


def _pool(windows, slots, c, empty_first):
    def build(g, fmt, _):
        kv, gate = _randn(g, windows, slots, c), _randn(g, windows, slots, c, scale=2.0)
        if empty_first:  # CSA's first window: the overlap slots of the (absent) previous window are empty
            gate[0, : slots // 2] = -math.inf
        return kv, gate

    return build


def _indexer(t, heads, dim, n, k):
    def build(g, fmt, max_ctx):
        m = n if n >= 0 else max_ctx // 4
        q, keys, w = _randn(g, t, heads, dim), _randn(g, m, dim), _randn(g, t, heads)
        visible = torch.arange(m)[None, :] < (torch.arange(m - t, m) + 1)[:, None]  # causal over entries
        return q, keys, w, visible, k

    return build


def _hc_pre(t, n, d, iters):
    return lambda g, fmt, _: (_randn(g, t, n, d), _randn(g, (2 + n) * n, n * d, scale=0.1), _randn(g, (2 + n) * n),
                              torch.rand(3, generator=g) + 0.5, iters, 1e-6, 1e-6)


def _hc_post(t, n, d):
    def build(g, fmt, _):
        comb = reference.sinkhorn(torch.rand(t, n, n, generator=g) + 0.1, 20, 1e-6)
        return _randn(g, t, d), _randn(g, t, n, d), torch.rand(t, n, generator=g) * 2, comb

    return build


def _hc_head(t, n, d):
    return lambda g, fmt, _: (_randn(g, t, n, d), _randn(g, n, n * d, scale=0.1), _randn(g, n),
                              torch.rand(1, generator=g) + 0.5, 1e-6, 1e-6)


CASES: list[Case] = [
    Case("linear", "decode T=1 N=256 K=512", _linear(1, 256, 512)),
    Case("linear", "prefill T=37 N=96 K=256", _linear(37, 96, 256)),
    Case("linear", "K=200 not a multiple of the group", _linear(5, 64, 200)),
    Case("grouped_linear", "decode T=1 G=2 R=64 I=256", _grouped(1, 2, 64, 256)),
    Case("grouped_linear", "T=9 G=4 R=32 I=80", _grouped(9, 4, 32, 80)),
    Case("moe", "decode T=1 k=2 of 4 experts", _moe(1, 256, 128, 4, 2, skip_expert=1)),
    Case("moe", "T=13 k=3, expert 2 of 6 gets no token, K=200/96", _moe(13, 200, 96, 6, 3, skip_expert=2)),
    Case("attention", "decode T=1 H=16 Dh=512, window 128 + 64 of 300 entries", _attention(1, 16, 512, 128, 300, 64)),
    Case("attention", "prefill T=24 H=4 Dh=64, window 16, one query sees no key", _attention(24, 4, 64, 16, 40, 8, True)),
    Case("attention", "decode at the longest claimed context, top-512", _attention(1, 8, 512, 128, -1, 512), long=True),
    Case("rms_norm", "decode [1, 4096] with weight", _rms((1, 4096), True)),
    Case("rms_norm", "per head [7, 4, 64] no weight", _rms((7, 4, 64), False)),
    Case("rms_norm", "[5, 200] odd width", _rms((5, 200), True)),
    Case("rope", "decode [1, 16, 512] rope 64", _rope((1, 16, 512), 64, False)),
    Case("rope", "inverse [9, 4, 64] rope 16", _rope((9, 4, 64), 16, True)),
    Case("rope", "keys [11, 64] rope 16", _rope((11, 64), 16, False)),
    Case("compress_pool", "CSA first windows [3, 8, 64], empty overlap slots", _pool(3, 8, 64, True)),
    Case("compress_pool", "HCA [2, 128, 96]", _pool(2, 128, 96, False)),
    Case("indexer_topk", "T=6 Hi=8 Di=32, n=40 k=16", _indexer(6, 8, 32, 40, 16)),
    Case("indexer_topk", "n < k", _indexer(3, 4, 32, 5, 16)),
    Case("indexer_topk", "decode at the longest claimed context, Hi=64 Di=128 k=512", _indexer(1, 64, 128, -1, 512),
         long=True),
    Case("hc_pre", "T=1 N=4 D=256, 20 Sinkhorn iterations", _hc_pre(1, 4, 256, 20)),
    Case("hc_pre", "T=9 N=4 D=96", _hc_pre(9, 4, 96, 20)),
    Case("hc_post", "T=1 N=4 D=256", _hc_post(1, 4, 256)),
    Case("hc_post", "T=9 N=4 D=96", _hc_post(9, 4, 96)),
    Case("hc_head", "T=1 N=4 D=256", _hc_head(1, 4, 256)),
    Case("hc_head", "T=9 N=4 D=96", _hc_head(9, 4, 96)),
]
assert {c.op for c in CASES} == set(OPS)


# -- comparing ---------------------------------------------------------------------------------------------------
def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in fp32 units in the last place (0 for equal values, incl. +-0 and equal infs)."""
    ia, ib = (t.float().contiguous().view(torch.int32).long() for t in (a, b))
    oa, ob = (torch.where(i < 0, -(i & 0x7FFFFFFF), i) for i in (ia, ib))  # monotone integer order of floats
    return (oa - ob).abs()


@dataclass
class CaseResult:
    op: str
    case: str
    fmt: str | None
    passed: bool
    bit_exact: bool = False
    max_abs: float | None = None
    max_ulp: int | None = None
    bound: float | None = None
    seconds: float = 0.0
    error: str = ""

    @property
    def id(self) -> str:
        return f"{self.op}[{self.case}]" + (f"({self.fmt})" if self.fmt else "")


def _map(obj, fn):
    """Apply fn to every tensor / QuantWeight in a nest of tuples and lists (None and scalars pass through)."""
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map(o, fn) for o in obj)
    if isinstance(obj, (torch.Tensor, QuantWeight)):
        return fn(obj)
    return obj


def _tensors(obj) -> list[torch.Tensor]:
    out = []
    _map(obj, lambda t: out.append(t) if isinstance(t, torch.Tensor) else None)
    return out


def _compare(op: str, fmt: str | None, out, ref, args) -> dict:
    tol = tolerance(op, fmt)
    outs, refs = (list(x) if isinstance(x, tuple) else [x] for x in (out, ref))
    if len(outs) != len(refs):
        return {"passed": False, "error": f"returned {len(outs)} tensors, the reference {len(refs)}"}
    for o, r in zip(outs, refs):
        if not isinstance(o, torch.Tensor):
            return {"passed": False, "error": f"returned {type(o).__name__}, expected a tensor"}
        if tuple(o.shape) != tuple(r.shape) or o.dtype != r.dtype:
            return {"passed": False, "error": f"returned {o.dtype} {tuple(o.shape)}, expected {r.dtype} "
                                              f"{tuple(r.shape)}"}
    outs = [o.detach().cpu() for o in outs]
    if op == "indexer_topk":
        return _compare_topk(outs[0], refs[0], args, tol)
    bit_exact = all(torch.equal(o, r) for o, r in zip(outs, refs))
    max_abs = max_ulp = mag = 0.0
    for o, r in zip(outs, refs):
        if o.numel() == 0:
            continue
        if not torch.equal(o.isnan(), r.isnan()) or not torch.equal(o.isinf() & (o > 0), r.isinf() & (r > 0)):
            return {"passed": False, "error": "NaN/Inf where the reference has none (or the reverse)"}
        fin = torch.isfinite(r)
        d = (o[fin].double() - r[fin].double()).abs()
        max_abs = max(max_abs, float(d.max()) if d.numel() else 0.0)
        max_ulp = max(max_ulp, int(ulp_distance(o[fin], r[fin]).max()) if d.numel() else 0)
        mag = max(mag, float(r[fin].abs().max()) if d.numel() else 0.0)
    bound = tol.atol + tol.rtol * mag
    return {"passed": bit_exact or max_abs <= bound, "bit_exact": bit_exact, "max_abs": max_abs,
            "max_ulp": max_ulp, "bound": bound}


def _compare_topk(out: torch.Tensor, ref: torch.Tensor, args, tol: Tolerance) -> dict:
    """Different picks are allowed only among entries whose score lies within tolerance of the k-th best."""
    q, keys, weights, visible, k = args
    bit_exact = torch.equal(out, ref)
    if not torch.equal(out.sum(-1), ref.sum(-1)):
        return {"passed": False, "bit_exact": False, "error": "selects another number of entries per query"}
    if (out & ~visible).any():
        return {"passed": False, "bit_exact": False, "error": "selects entries the query cannot see"}
    scores = (torch.relu(torch.einsum("thd,nd->thn", q.double(), keys.double())) * q.shape[-1] ** -0.5
              * weights.double()[..., None]).sum(1).masked_fill(~visible, -math.inf)  # [T, n]
    max_gap, bound = 0.0, 0.0
    for t in (out != ref).any(-1).nonzero().flatten().tolist():
        row = scores[t][visible[t]]
        kth = row.sort(descending=True).values[min(k, len(row)) - 1]
        gap = float((scores[t][out[t] != ref[t]] - kth).abs().max())
        max_gap = max(max_gap, gap)
        bound = max(bound, tol.atol + tol.rtol * float(row.abs().max()))
    return {"passed": bit_exact or max_gap <= bound, "bit_exact": bit_exact, "max_abs": max_gap,
            "max_ulp": None, "bound": bound}


def run_case(backend: Backend, case: Case, fmt: str | None, max_context: int, seed: int = 0) -> CaseResult:
    """Build the case's inputs (deterministic in seed), run the reference and the backend, compare."""
    gen = torch.Generator().manual_seed(seed)
    args = case.build(gen, fmt, max_context)
    dev = backend.torch_device
    ref_args = _map(args, lambda t: t.dequantize() if isinstance(t, QuantWeight) else t)
    ref = getattr(reference, case.op)(*ref_args)
    res = CaseResult(case.op, case.label, fmt, False)
    try:
        dev_args = _map(args, lambda t: backend.upload(t) if isinstance(t, QuantWeight) else t.to(dev))
        before = [t.clone() for t in _tensors(dev_args)]
        t0 = time.perf_counter()
        out = getattr(backend, case.op)(*dev_args)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        res.seconds = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - a crash is a failed case, reported with its reason
        res.error = f"raised {e.__class__.__name__}: {e}"
        return res
    if not all(torch.equal(a, b) for a, b in zip(before, _tensors(dev_args))):
        res.error = "modified an input tensor in place"
        return res
    for k, v in _compare(case.op, fmt, out, ref, args).items():
        setattr(res, k, v)
    return res


# -- which ops and formats a backend claims ------------------------------------------------------------------------
def capabilities(backend: Backend) -> Capabilities:
    """backend.capabilities(), or BackendError naming the backend when it raises (a failure, not a traceback)."""
    try:
        return backend.capabilities()
    except Exception as e:  # noqa: BLE001
        raise BackendError(f"backend {backend.name!r}: capabilities() raised {e.__class__.__name__}: {e}") from e


def claimed(backend: Backend, caps: Capabilities | None = None) -> dict[str, list[str | None]]:
    """op -> the weight formats to test ([None] for weightless ops), for every op the backend claims AND
    implements (what dispatch routes to it)."""
    caps = caps or capabilities(backend)
    out = {}
    if caps.whole_step:  # no single op runs on a whole-step backend: see Report.whole_step
        return out
    for op, weighted in OPS.items():
        if not (caps.supports(op) and backend.implements(op)):
            continue
        if weighted:
            v = caps.ops.get(op)
            fmts = list(WEIGHT_FORMATS) if v is True else [f for f in WEIGHT_FORMATS if f in v]
            if fmts:
                out[op] = fmts
        else:
            out[op] = [None]
    return out


def effective_max_context(caps: Capabilities, cap: int = DEFAULT_MAX_CONTEXT) -> int:
    return min(caps.max_context or cap, cap)


# -- end to end ----------------------------------------------------------------------------------------------------
def _packed_linears(model, fmt: str) -> dict[str, QuantWeight]:
    """Every projection of the model packed in `fmt` (as an export bundle would), by module name."""
    from ..model import Linear
    from ..quant.formats import get_format

    return {name: QuantWeight(fmt, tuple(m.weight.shape), get_format(fmt).pack(m.weight.data))
            for name, m in model.named_modules() if isinstance(m, Linear)}


@torch.no_grad()
def _greedy(model, ids: list[int], new_tokens: int) -> tuple[torch.Tensor, list[int]]:
    """Logits of every prompt position [T, V] (one prefill), then greedy decoding one token at a time."""
    from ..model import SeqState

    state = SeqState.empty(model.cfg)
    logits = model.forward_batch([torch.tensor(ids)], [state])[0].float()
    tokens = [int(logits[-1].argmax())]
    while len(tokens) < new_tokens:
        step = model.forward_batch([torch.tensor(tokens[-1:])], [state], all_logits=False)[0][0]
        tokens.append(int(step.argmax()))
    return logits, tokens


def end_to_end(backend: Backend, model_path: str | None = None, fmt: str = "fp32", prompt_len: int = 72,
               new_tokens: int = 6, seed: int = 0) -> dict:
    """flash-tiny through the backend against the reference: logits over a prompt long enough to fill CSA and
    HCA windows and slide the window, then greedy tokens."""
    from ..checkpoint import CheckpointReader, make_checkpoint
    from ..model import Transformer
    from .dispatch import REFERENCE, Ops

    whole_step = capabilities(backend).whole_step
    with tempfile.TemporaryDirectory() as tmp:
        path = model_path or make_checkpoint(tmp, "flash-tiny", seed=0, fmt="release")
        reader = CheckpointReader(path)
        sd = reader.load_state_dict()
    cfg = reader.cfg
    ids = torch.randint(3, cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(seed)).tolist()
    models, packed = {}, None
    for who, ops in (("reference", REFERENCE), ("backend", Ops(backend))):
        model = Transformer(cfg)
        model.load_state_dict(sd)
        if fmt != "fp32":  # both models share the same packed weights (each Linear keeps its own handles)
            packed = packed or _packed_linears(model, fmt)
            for name, m in model.named_modules():
                if name in packed:
                    m.packed = packed[name]
        models[who] = model.set_ops(ops).eval()
        if who == "backend" and whole_step:  # the backend runs the whole step: give it the model to bind
            models[who] = backend.bind_model(models[who], None)
    t0 = time.perf_counter()
    out, gen = {}, {}
    for who, model in models.items():
        out[who], gen[who] = _greedy(model, ids, new_tokens)
    seconds = time.perf_counter() - t0
    ref, got = out["reference"], out["backend"]
    max_abs = float((got.double() - ref.double()).abs().max())
    bound = E2E_TOLERANCE.atol + E2E_TOLERANCE.rtol * float(ref.abs().max())
    same_tokens = gen["reference"] == gen["backend"]
    fallbacks = [] if whole_step else sorted(f"{op}({f})" if f else op for op, f in models["backend"].ops.fallbacks)
    return {"model": str(model_path or "flash-tiny (fresh, seed 0)"), "weights": fmt, "prompt_tokens": prompt_len,
            "passed": bool(max_abs <= bound and same_tokens), "max_abs": max_abs, "bound": bound,
            "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
            "greedy_equal": same_tokens, "reference_tokens": gen["reference"], "backend_tokens": gen["backend"],
            "fallback_ops": fallbacks, "seconds": round(seconds, 2)}


def e2e_formats(backend: Backend, caps: Capabilities) -> list[str]:
    fmts = ["fp32"]
    if caps.whole_step:  # every projection, experts included, is packed in the format: the graph must take both
        return fmts + [f for f in E2E_QUANT_FORMATS if caps.supports("linear", f) and caps.supports("moe", f)][:1]
    for f in E2E_QUANT_FORMATS:
        if (caps.supports("linear", f) or caps.supports("moe", f)) and (backend.implements("linear")
                                                                        or backend.implements("moe")):
            return fmts + [f]
    return fmts


# -- the whole kit -------------------------------------------------------------------------------------------------
@dataclass
class Report:
    backend: str
    device: str
    api_version: tuple
    cases: list[CaseResult] = field(default_factory=list)
    fallback_ops: list[str] = field(default_factory=list)
    end_to_end: list[dict] = field(default_factory=list)
    max_context_tested: int = 0
    whole_step: bool = False  # the backend runs whole decoder steps: its ops are checked end to end only

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.cases) and all(e["passed"] for e in self.end_to_end)

    def per_op(self) -> dict[str, dict]:
        if self.whole_step:
            return {op: {"cases": 0, "passed": True, "in_step_graph": True, "note": IN_GRAPH} for op in OPS}
        ops: dict[str, dict] = {}
        for c in self.cases:
            key = f"{c.op}({c.fmt})" if c.fmt else c.op
            s = ops.setdefault(key, {"cases": 0, "passed": True, "bit_exact": True, "max_abs": 0.0, "max_ulp": 0})
            s["cases"] += 1
            s["passed"] &= c.passed
            s["bit_exact"] &= c.bit_exact
            s["max_abs"] = max(s["max_abs"], c.max_abs or 0.0)
            s["max_ulp"] = max(s["max_ulp"] or 0, c.max_ulp or 0)
        return ops

    def to_json(self) -> dict:
        return {"backend": self.backend, "device": self.device, "api_version": list(self.api_version),
                "passed": self.passed, "whole_step": self.whole_step, "host": platform.platform(), "torch": torch.__version__,
                "tolerances": {op: asdict(t) for op, t in TOLERANCES.items()},
                "format_tolerances": {f: asdict(t) for f, t in FORMAT_TOLERANCES.items()},
                "e2e_tolerance": asdict(E2E_TOLERANCE), "max_context_tested": self.max_context_tested,
                "per_op": self.per_op(), "fallback_ops": self.fallback_ops,
                "cases": [asdict(c) | {"id": c.id} for c in self.cases], "end_to_end": self.end_to_end}

    def summary(self) -> str:
        per_op = self.per_op()
        w = max([36, *map(len, per_op)])  # the first column fits the longest op (format) name
        lines = [f"conformance of backend {self.backend!r} on {self.device} (contract {API_VERSION[0]}."
                 f"{API_VERSION[1]}, longest context tested {self.max_context_tested})",
                 f"{'op (format)':<{w}} {'cases':>5}  {'bit-exact':<9} {'max abs err':>12} {'max ulp':>10}  result"]
        if self.whole_step:
            lines[1:] = [f"per-op cases: none run one by one: every op {IN_GRAPH}"]
        for key, s in ({} if self.whole_step else per_op).items():
            lines.append(f"{key:<{w}} {s['cases']:>5}  {'yes' if s['bit_exact'] else 'no':<9} {s['max_abs']:>12.3g} "
                         f"{s['max_ulp']:>10}  {'pass' if s['passed'] else 'FAIL'}")
        for c in self.cases:
            if not c.passed:
                detail = c.error or f"max abs {c.max_abs:.3g} > bound {c.bound:.3g}"
                lines.append(f"  FAIL {c.id}: {detail}")
        if self.fallback_ops:
            lines.append(f"falls back to the torch reference: {', '.join(self.fallback_ops)}")
        for e in self.end_to_end:
            lines.append(f"end to end ({e['model']}, {e['weights']} weights): logits max abs {e['max_abs']:.3g} "
                         f"(bound {e['bound']:.3g}), greedy tokens {'equal' if e['greedy_equal'] else 'DIFFER'}"
                         f", {e['seconds']} s  {'pass' if e['passed'] else 'FAIL'}" + (f": {e['error']}" if e.get('error')
                                                                                   else ""))
        lines.append("PASSED" if self.passed else "FAILED")
        return "\n".join(lines)


def run(backend: Backend, *, e2e: bool = True, max_context: int = DEFAULT_MAX_CONTEXT, model: str | None = None,
        ops: list[str] | None = None, formats: list[str] | None = None, e2e_prompt: int = 72, e2e_tokens: int = 6,
        progress: bool = True) -> Report:
    """Run every case of every op/format the backend claims, then the end-to-end checks. ops / formats restrict
    the run to some of them (a quick check while developing; a conformance claim runs everything)."""
    from tqdm import tqdm

    caps = capabilities(backend)
    unknown = [f for f in formats or [] if f not in WEIGHT_FORMATS]
    if unknown:
        raise ValueError(f"unknown weight format(s) {', '.join(unknown)}; the formats: {', '.join(WEIGHT_FORMATS)}")
    devs = backend.devices()
    report = Report(backend.name, devs[0].name if devs else str(backend.torch_device), tuple(backend.api_version),
                    max_context_tested=effective_max_context(caps, max_context), whole_step=caps.whole_step)
    todo = claimed(backend, caps)
    report.fallback_ops = [] if caps.whole_step else [op for op in OPS if op not in todo]
    work = [(c, f) for c in CASES if c.op in todo and (ops is None or c.op in ops) for f in todo[c.op]
            if f is None or formats is None or f in formats]
    e2e_fmts = [f for f in e2e_formats(backend, caps) if formats is None or f == "fp32" or f in formats] if e2e else []
    if not work and not e2e_fmts:
        raise ValueError(f"nothing to check: backend {backend.name!r} claims none of the selected ops / formats "
                         f"(it claims: {', '.join(f'{op}({f})' if f else op for op, fs in todo.items() for f in fs) or 'none'})")
    for case, fmt in tqdm(work, desc=f"conformance {backend.name}", unit="case", disable=not progress or not work):
        report.cases.append(run_case(backend, case, fmt, report.max_context_tested))
    if e2e:
        for fmt in e2e_fmts:
            try:
                report.end_to_end.append(end_to_end(backend, model, fmt, e2e_prompt, e2e_tokens))
            except Exception as e:  # noqa: BLE001 - a crash inside the model is a failure to report, not to hide
                report.end_to_end.append({"model": str(model or "flash-tiny"), "weights": fmt, "passed": False,
                                          "error": f"raised {e.__class__.__name__}: {e}", "max_abs": float("nan"),
                                          "bound": float("nan"), "greedy_equal": False, "seconds": 0})
    return report


def conformance_cli(backend: str, device: str | None = None, report: str | None = None, e2e: bool = True,
                    max_context: int = DEFAULT_MAX_CONTEXT, model: str | None = None, ops: str | None = None,
                    formats: str | None = None, **options: Any):
    """Run the conformance kit on BACKEND (a registered name, or module:factory), print a per-op summary,
    write the full JSON report to --report, and exit non-zero on any failure.

    --device D: passed to the backend's factory. --max-context N caps the long-context case (default 16384).
    --model PATH: the end-to-end check's checkpoint (default: a fresh flash-tiny). --ops a,b / --formats f,g:
    only these ops / weight formats (for development; a conformance claim runs everything).
    Other --key value options go to the backend's factory."""
    from .registry import create, load_factory, write_record

    if device:
        options["device"] = device
    only, fmts = (([x.strip() for x in v.split(",")] if isinstance(v, str) else list(v)) if v else None
                  for v in (ops, formats))
    unknown = [o for o in only or [] if o not in OPS]  # refused before any backend starts
    if unknown:
        raise ValueError(f"unknown op(s) {', '.join(unknown)}; the contract's ops: {', '.join(OPS)}")
    unknown = [f for f in fmts or [] if f not in WEIGHT_FORMATS]
    if unknown:
        raise ValueError(f"unknown weight format(s) {', '.join(unknown)}; the formats: {', '.join(WEIGHT_FORMATS)}")
    b = load_factory(backend)(**options) if ":" in backend else create(backend, **options)
    rep = run(b, e2e=e2e, max_context=max_context, model=model, ops=only, formats=fmts)
    print(rep.summary())
    data = rep.to_json()
    if report:
        with open(report, "w") as f:
            json.dump(data, f, indent=2)
        print(f"report written to {report}")
    if ":" not in backend:  # a registered backend: keep the outcome for backend="auto"
        if only is None and fmts is None and e2e:
            path = write_record(backend, rep.passed, data)
            if path is not None:
                print(f"conformance record written to {path}")
        else:
            print("partial run (--ops / --formats / --noe2e): no conformance record written")
    if not rep.passed:
        sys.exit(1)
