"""DeepSeek-V4-Flash reference model in PyTorch, readable in one file.

Shapes in comments: T tokens of one chunk, D hidden, H query heads, Dh head dim, S keys, E experts, k active
experts, N = hc_mult residual streams, m a compression rate, n compressed entries.

Parameter names are the release checkpoint's own (`layers.3.attn.wq_a.weight`, ...), so `state_dict()` keys and
the release's safetensors keys are the same. All math is fp32; weights come in dequantized (checkpoint.py).

Every operation goes through `self.ops` (flashport.backends): the torch reference by default, or a backend's
kernels with per-op fallback (`Transformer.set_ops`). The model never calls a backend directly. A few sequences of
ops are first offered to the backend as one fused call (`ops.attn_project`, `ops.gated_moe`, ...: contract.FUSED);
they return None when the backend has no such call (the reference never has), and the ops then run one by one.

A forward pass takes one chunk of a sequence plus that sequence's `SeqState` and updates the state in place, so
a prompt prefilled in one shot, in chunks of any size, or token by token reaches the same state and logits.
`forward_batch` runs several sequences at once (continuous batching): every projection and the MoE run on all
rows together, attention runs per sequence.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backends.contract import QuantWeight
from .backends.dispatch import REFERENCE, Ops
from .backends.indexer_fp4 import Fp4Keys
from .backends.indexer_fp4 import rotate_quantize
from .backends.indexer_fp4 import select as fp4_select
from .backends.reference import topk_indices
from .config import ModelConfig
from .options import index_numerics_default
from .quant.index_numerics import fp4_quantize, fp4_round, hadamard
from .quant.kv_numerics import round_kv


# ---------------------------------------------------------------------------------------------------------------
# RoPE tables
# ---------------------------------------------------------------------------------------------------------------
def rope_inv_freq(cfg: ModelConfig, compressed: bool) -> Tensor:
    """Inverse frequencies for the rope dims: plain theta on sliding-only layers, YaRN on compressed ones. Computed
    on the CPU, returned on the default device (a model built on the meta device gets a meta tensor: arange on the
    meta device would import torch's Python decompositions, ~180 MB resident, for a few numbers)."""
    dim = cfg.qk_rope_head_dim
    base = cfg.compress_rope_theta if compressed else cfg.rope_theta
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    ys = cfg.rope_scaling or {}
    if not compressed or ys.get("type", ys.get("rope_type")) != "yarn":
        return inv.to(torch.get_default_device())
    factor, orig = ys["factor"], ys["original_max_position_embeddings"]
    beta_fast, beta_slow = ys.get("beta_fast") or 32, ys.get("beta_slow") or 1

    def corr_dim(rot):  # the dim whose wavelength makes `rot` turns over the original context
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

    lo, hi = max(math.floor(corr_dim(beta_fast)), 0), min(math.ceil(corr_dim(beta_slow)), dim - 1)
    hi = hi + 0.001 if lo == hi else hi
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - lo) / (hi - lo)).clamp(0, 1)
    # V4 keeps cos/sin unscaled (no YaRN mscale on the attention logits)
    return ((inv / factor) * ramp + inv * (1 - ramp)).to(torch.get_default_device())


def rope_cos_sin(inv_freq: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
    freqs = pos.to(torch.float32)[:, None] * inv_freq[None]  # [T, r/2]
    return freqs.cos(), freqs.sin()


class RopeTable:
    """cos/sin of positions for one inv_freq, computed a page of PAGE positions at a time and shared by every layer
    with the same frequencies: a chunk at positions p0..p0+T-1 is a slice of one or two pages, a decode step does no
    trigonometry. A page is always computed whole from the same positions, so a position's value is the same whatever
    the chunking, the order of calls or the context reached. Memory stays flat with the context: at most MAX_PAGES
    pages are kept (least recently used dropped; a dropped page is recomputed, identically, when needed again),
    where one table of every position would reach 512 MiB at 2M positions of V4-Flash's 64 RoPE dims, and rebuilding
    it when a restored 1M-token sequence passes 2**20 positions cost one decode step 330 ms."""

    PAGE = 1 << 14  # positions per page: 2 MiB each of cos and sin at V4-Flash's 32 frequencies
    MAX_PAGES = 16
    _shared: dict[tuple, "RopeTable"] = {}

    def __init__(self, inv_freq: Tensor):
        self.inv_freq = inv_freq
        self.pages: OrderedDict[int, tuple[Tensor, Tensor]] = OrderedDict()  # page index -> (cos, sin) [PAGE, r/2]
        self.lock = threading.Lock()

    @classmethod
    def of(cls, inv_freq: Tensor) -> "RopeTable":
        key = (str(inv_freq.device), inv_freq.detach().cpu().numpy().tobytes())
        if key not in cls._shared:
            cls._shared[key] = RopeTable(inv_freq.detach().clone())
        return cls._shared[key]

    def page(self, i: int) -> tuple[Tensor, Tensor]:
        """(cos, sin) [PAGE, r/2] of positions i*PAGE .. (i+1)*PAGE - 1."""
        with self.lock:
            got = self.pages.get(i)
            if got is None:
                got = rope_cos_sin(self.inv_freq, torch.arange(i * self.PAGE, (i + 1) * self.PAGE,
                                                               device=self.inv_freq.device))
                self.pages[i] = got
                while len(self.pages) > self.MAX_PAGES:
                    self.pages.popitem(last=False)
            self.pages.move_to_end(i)
            return got

    def __call__(self, start: int, stop: int, step: int = 1) -> tuple[Tensor, Tensor]:
        """cos, sin [len(range(start, stop, step)), r/2] of those positions (views of a page when they lie in one)."""
        P = self.PAGE
        if stop <= start:
            empty = self.inv_freq.new_empty(0, len(self.inv_freq))
            return empty, empty
        first, last = start // P, (stop - 1) // P
        if first == last:
            cos, sin = self.page(first)
            a, b = start - first * P, stop - first * P
            return (cos[a:b], sin[a:b]) if step == 1 else (cos[a:b:step].contiguous(), sin[a:b:step].contiguous())
        pos = torch.arange(start, stop, step, device=self.inv_freq.device)
        cos = self.inv_freq.new_empty(len(pos), len(self.inv_freq))
        sin = torch.empty_like(cos)
        for i in range(first, last + 1):  # the positions that lie in page i
            sel = (pos >= i * P) & (pos < (i + 1) * P)
            if sel.any():
                c, s = self.page(i)
                cos[sel], sin[sel] = c[pos[sel] - i * P], s[pos[sel] - i * P]
        return cos, sin


# ---------------------------------------------------------------------------------------------------------------
# Decoding state
# ---------------------------------------------------------------------------------------------------------------
class EntryStore:
    """Preallocated rows behind a PoolState's `entries` (append-only): capacity grows by half (geometric, so
    appending stays amortised O(w); 1.5x rather than 2x keeps a long sequence's entries, the bulk of its memory,
    at most 1.5x their size), `entries` is a view of the filled rows, so appending w entries costs O(w), not a
    copy of all n (torch.cat per chunk did).

    Only the PoolState that made the store appends in place (`owner`); a copy of that PoolState (a session
    snapshot, `SeqState.clone`) shares the view but not the right to write past it, so it starts its own store on
    its first append, and rows another state can see are never written. `fp4`: the CSA indexer's keys in release
    numerics also keep their FP4 codes (flashport.backends.indexer_fp4.Fp4Keys, the scoring kernel's layout).

    `head` rows before the entries are scratch for `with_front`: a decode step's keys [window | every entry] are
    one view of the buffer after writing the window there, not a copy of all n entries (an HCA layer at 1M tokens
    of flash-tiny: 8 MB per layer per token). No state can see those rows, so writing them is always safe."""

    def __init__(self, owner: "PoolState", rows: Tensor, fp4: bool, head: int = 0):
        n, d = rows.shape
        self.owner, self.n, self.head = weakref.ref(owner), n, head
        self.buf = rows.new_empty(head + n + max(n // 4, 256), d)  # a restored 1M-token state: 1.25x, not 2x
        self.buf[head:head + n] = rows
        self.fp4 = Fp4Keys(d, self.buf.shape[0] - head, rows.device) if fp4 else None
        if fp4 and n:
            self.fp4.append(*fp4_quantize(rows))

    @property
    def rows(self) -> Tensor:
        """The filled rows [n, d] (the owner's `entries`)."""
        return self.buf[self.head:self.head + self.n]

    def valid_for(self, ps: "PoolState") -> bool:
        """True when `ps` owns this store and its entries are still the store's view (not reassigned)."""
        e = ps.entries
        return self.owner() is ps and e.shape[0] == self.n and (self.n == 0 or e.data_ptr() == self.rows.data_ptr())

    def copy_for(self, owner: "PoolState") -> "EntryStore":
        """An independent store for `owner`, a copy of this store's state (`SeqState.clone`): rows and FP4 codes
        copied once, so the copy appends in O(w) from its first step (rebuilt lazily, they cost a copied state's
        first decode steps ~15 ms each at 64K tokens of flash-tiny)."""
        new = EntryStore.__new__(EntryStore)
        new.owner, new.n, new.head, new.buf = weakref.ref(owner), self.n, self.head, self.buf.clone()
        new.fp4 = self.fp4.clone() if self.fp4 is not None else None
        return new

    def append(self, new: Tensor) -> Tensor:
        w, h = new.shape[0], self.head
        if h + self.n + w > self.buf.shape[0]:
            cap = self.buf.shape[0] - h
            buf = self.buf.new_empty(h + max(cap + cap // 2, self.n + w), self.buf.shape[1])
            buf[h:h + self.n] = self.rows
            self.buf = buf
        self.buf[h + self.n:h + self.n + w] = new
        if self.fp4 is not None:
            self.fp4.append(*fp4_quantize(new))
        self.n += w
        return self.rows

    def with_front(self, front: Tensor) -> Tensor:
        """[front | rows] as one view [f + n, d] (f <= head): front is copied into the scratch rows, the entries
        are not copied."""
        f = front.shape[0]
        self.buf[self.head - f:self.head] = front
        return self.buf[self.head - f:self.head + self.n]


@dataclass
class PoolState:
    """One compressor's state. After t tokens with rate m:

    kv, gate        [t % m, C]   projections of the tokens after the last full window (C = 2*dim with overlap)
    overlap_kv/gate [m, dim]     CSA only: the Ca half of the last full window (gate incl. positional bias);
                                 it feeds the next window's entry. None before the first full window.
    entries         [t // m, dim] compressed entries, append-only; block b holds rows b*epb .. (b+1)*epb - 1
                                  with epb = kv_block_tokens // m. A view of `store`'s preallocated rows (`append`);
                                  assigning another tensor (a KV restore) is fine: the next append copies it once.
    numerics        what the entries are rounded to as they are made (flashport.quant.kv_numerics: "fp32",
                    "bf16" or "release", FP8 e4m3 + BF16 RoPE dims); entries stay float32 tensors
    official        the CSA indexer's pool only: the release's indexer numerics (`official_numerics`, `Indexer`):
                    its keys are Hadamard-rotated and FP4-rounded before the KV rounding
    replay          True while the sequence re-runs tokens whose entries `entries` already holds (a prefix-cache
                    window rebuild, flashport.kv): the compressor advances kv/gate/overlap and appends nothing.
                    Each query's causal limit hides the entries past its position, so attention is unchanged.
    """

    kv: Tensor
    gate: Tensor
    entries: Tensor
    overlap_kv: Tensor | None = None
    overlap_gate: Tensor | None = None
    numerics: str = "fp32"
    replay: bool = False
    official: bool = False
    store: EntryStore | None = field(default=None, repr=False, compare=False)

    def _store(self, fp4: bool, head: int = 0) -> EntryStore:
        st = self.store
        valid = st is not None and st.valid_for(self)
        if not valid or (fp4 and st.fp4 is None) or st.head < head:
            # a valid store re-made (for FP4 codes or more scratch) keeps what it had of both
            self.store = EntryStore(self, self.entries, fp4 or (valid and st.fp4 is not None),
                                    max(head, st.head if valid else 0))
            self.entries = self.store.rows  # the same values, now the store's view
        return self.store

    def append(self, new: Tensor, fp4: bool = False) -> None:
        """Append rows [w, dim] to `entries` in place (amortised O(w)); fp4: keep their FP4 codes too."""
        self.entries = self._store(fp4).append(new)

    def after(self, front: Tensor, reserve: int) -> Tensor:
        """torch.cat([front, entries]) [f + n, dim] without copying the entries: front (f <= reserve rows) goes
        into scratch rows kept before them (EntryStore.with_front). The first call after a restore or a copy
        moves the entries into a store once."""
        if front.shape[0] > reserve:
            raise ValueError(f"{front.shape[0]} front rows, {reserve} reserved")
        return self._store(False, reserve).with_front(front)

    def fp4_keys(self) -> Fp4Keys:
        """The FP4 codes of every entry (built once from `entries` after a restore or a copy, then appended)."""
        return self._store(True).fp4


@dataclass
class LayerState:
    """Per-layer state of one sequence: the raw sliding window plus the compressors' state.

    window [min(t, W), Dh]  the last W raw K=V entries (after kv_norm and RoPE), oldest first
    comp                    CSA/HCA layers: the attention compressor (entries [t // m, Dh])
    index                   CSA layers: the lightning indexer's own compressor (entries [t // m, index_head_dim])
    """

    window: Tensor
    comp: PoolState | None = None
    index: PoolState | None = None

    @staticmethod
    def empty(cfg: ModelConfig, layer: int, numerics: str = "fp32", official_index: bool = False) -> "LayerState":
        def pool(c: int, dim: int, official: bool = False) -> PoolState:
            return PoolState(torch.zeros(0, c), torch.zeros(0, c), torch.zeros(0, dim), numerics=numerics,
                             official=official)

        kind, dh = cfg.layer_kind(layer), cfg.head_dim
        st = LayerState(window=torch.zeros(0, dh))
        if kind == "hca":
            st.comp = pool(dh, dh)
        if kind == "csa":
            st.comp, st.index = pool(2 * dh, dh), pool(2 * cfg.index_head_dim, cfg.index_head_dim, official_index)
        return st


def official_index_default() -> bool:
    """Whether new sequences use the release's indexer numerics (`Indexer`) when nobody chose: the environment
    variable FLASHPORT_INDEX_NUMERICS=release (an engine's `index_numerics` option overrides it); unset or fp32:
    transformers' fp32 indexer. Raises OptionError (a ValueError) on another value."""
    return index_numerics_default() == "release"


@dataclass
class SeqState:
    """Everything needed to continue one sequence: fixed-size parts plus the append-only compressed entries."""

    n_tokens: int
    layers: list[LayerState]

    @staticmethod
    def empty(cfg: ModelConfig, numerics: str = "fp32", official_index: bool | None = None) -> "SeqState":
        """A new sequence whose compressed entries and indexer keys are kept in `numerics` (PoolState), scored by
        the indexer in the release's numerics when `official_index` (default: `official_index_default()`)."""
        official = official_index_default() if official_index is None else bool(official_index)
        return SeqState(0, [LayerState.empty(cfg, i, numerics, official) for i in range(cfg.num_hidden_layers)])

    def tensors(self) -> dict[str, Tensor]:
        """Flat `layer.part.field` -> tensor view of the whole state (for saving, hashing, comparing)."""
        out = {}
        for i, st in enumerate(self.layers):
            out[f"{i}.window"] = st.window
            for part in ("comp", "index"):
                ps = getattr(st, part)
                for k, v in (vars(ps).items() if ps is not None else ()):
                    if isinstance(v, Tensor):
                        out[f"{i}.{part}.{k}"] = v
        return out

    def clone(self) -> "SeqState":
        def cp(ps):
            if ps is None:
                return None
            new = PoolState(**{k: v.clone() if isinstance(v, Tensor) and k != "entries" else v
                               for k, v in vars(ps).items() if k != "store"})
            if ps.store is not None and ps.store.valid_for(ps):  # the copy gets its own store at once
                new.store = ps.store.copy_for(new)
                new.entries = new.store.rows
            else:
                new.entries = ps.entries.clone()
            return new

        return SeqState(self.n_tokens, [LayerState(st.window.clone(), cp(st.comp), cp(st.index)) for st in self.layers])


# ---------------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------------
def attention_bias(seen: list[Tensor]) -> Tensor:
    """The attention bias [T, sum S_i] (fp32: 0 where seen, -inf where hidden) of bool masks [T, S_i] for
    consecutive parts of the keys, written into one allocation: a cat of per-part biases would copy the largest
    tensor of a long chunk once more (an HCA layer's [1024, 33K] at 1M tokens: 135 MB)."""
    out = torch.empty(seen[0].shape[0], sum(m.shape[1] for m in seen))
    zero, hidden = torch.zeros(()), torch.full((), -math.inf)
    c = 0
    for m in seen:
        torch.where(m, zero, hidden, out=out[:, c:c + m.shape[1]])
        c += m.shape[1]
    return out


def _param(*shape, fill: float = 0.0) -> nn.Parameter:
    return nn.Parameter(torch.full(shape, fill), requires_grad=False)


class Module(nn.Module):
    ops: Ops = REFERENCE  # replaced on every module by Transformer.set_ops


class Linear(Module):
    """A projection. `weight` is fp32 (release checkpoints, training); a bundle sets `packed` instead."""

    op = "linear"

    def __init__(self, out_features: int, in_features: int):
        super().__init__()
        self.weight = _param(out_features, in_features)
        self.packed: QuantWeight | None = None
        self.handles: dict = {}  # per backend: the uploaded weight

    @property
    def qweight(self) -> QuantWeight:
        if self.packed is None:  # fp32: a view of the live parameter (built once; tensors are updated in place)
            self.packed = QuantWeight("fp32", tuple(self.weight.shape), {"weight": self.weight})
        return self.packed

    def forward(self, x: Tensor) -> Tensor:
        return self.ops.linear(x, self)


class GroupedLinear(Linear):
    """V4's grouped output projection: group g of the input [T, G, I] meets rows g*R.. of the weight [G*R, I]."""

    op = "grouped_linear"

    def forward(self, x: Tensor) -> Tensor:
        return self.ops.grouped_linear(x, self)


class Embedding(nn.Embedding):
    """The token embedding: ids [T] -> fp32 rows [T, D]. The table may stay in its stored dtype (a release keeps it in
    bf16: 1 GB at V4-Flash's vocabulary, 2 GB in fp32); only the gathered rows are converted (exactly)."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:  # on the meta device (loaders) there is nothing to draw, and normal_ there
            super().reset_parameters()  # imports torch's Python decompositions: ~180 MB of resident memory

    def forward(self, ids: Tensor) -> Tensor:
        return super().forward(ids).float()


class RMSNorm(Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, _param(dim, fill=1.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)


class Compressor(Module):
    """Gated-softmax pooling of every m tokens into one entry, with a learned per-slot positional bias (`ape`).

    overlap=True is CSA's two-series scheme: each token projects to 2*dim channels; Ca = [:dim] feeds the NEXT
    window's entry and Cb = [dim:] the current one, so entry w pools 2m slots (width 2m, stride m). Before the
    first window the Ca slots are empty (gate -inf, weight 0).

    rotate=True is the indexer's compressor (the release's `Compressor(..., rotate=True)`): in release numerics
    its entries are Hadamard-rotated and FP4-rounded (flashport.quant.index_numerics) before the KV rounding.
    """

    def __init__(self, cfg: ModelConfig, rate: int, dim: int, overlap: bool, rotate: bool = False):
        super().__init__()
        self.rate, self.dim, self.overlap, self.rotate = rate, dim, overlap, rotate
        c = 2 * dim if overlap else dim
        self.wkv, self.wgate = Linear(c, cfg.hidden_size), Linear(c, cfg.hidden_size)
        self.ape = _param(rate, c)
        self.norm = RMSNorm(dim, cfg.rms_norm_eps)

    def forward(self, x: Tensor, ps: PoolState, rope: RopeTable) -> Tensor:
        """x [T, D] -> all entries so far [n, dim]; appends this chunk's full windows to ps in place."""
        m, d = self.rate, self.dim
        proj = self.ops.compress_project(x, ps.kv, ps.gate, self.wkv, self.wgate)  # the cats below, fused
        kv, gate = proj or (torch.cat([ps.kv, self.wkv(x)]), torch.cat([ps.gate, self.wgate(x)]))  # [b + T, C]
        w = kv.shape[0] // m
        if w == 0:  # no window completes (most decode steps): all rows stay buffered
            ps.kv, ps.gate = kv, gate
            return ps.entries
        ps.kv, ps.gate = kv[w * m:], gate[w * m:]
        kv, gate = kv[: w * m].view(w, m, -1), gate[: w * m].view(w, m, -1) + self.ape  # [w, m, C]
        if self.overlap:
            prev_kv = torch.zeros(1, m, d) if ps.overlap_kv is None else ps.overlap_kv[None]
            prev_gate = torch.full((1, m, d), -math.inf) if ps.overlap_gate is None else ps.overlap_gate[None]
            ps.overlap_kv, ps.overlap_gate = kv[-1, :, :d].clone(), gate[-1, :, :d].clone()
            kv = torch.cat([torch.cat([prev_kv, kv[:-1, :, :d]]), kv[:, :, d:]], dim=1)  # [w, 2m, d]
            gate = torch.cat([torch.cat([prev_gate, gate[:-1, :, :d]]), gate[:, :, d:]], dim=1)
        if ps.replay:  # these windows' entries are already in ps.entries (loaded from the KV cache)
            return ps.entries
        new = self.norm(self.ops.compress_pool(kv, gate))  # [w, d]
        n0 = ps.entries.shape[0]
        cos, sin = rope(m * n0, m * (n0 + w), m)  # RoPE at each window's first token
        new = self.ops.rope(new, cos, sin)
        fp4 = self.rotate and ps.official
        if fp4:  # the release indexer's keys: rotate, then FP4 (exact in the KV rounding below for these values)
            new = fp4_round(hadamard(new))
        ps.append(round_kv(new, ps.numerics, 2 * cos.shape[-1]), fp4=fp4)  # the KV's numerics
        return ps.entries


class Indexer(Module):
    """Lightning indexer: scores compressed entries per query, sum_h w_h * ReLU(q_h . k), keeps the top-k.

    Two numerics, chosen per sequence by its indexer pool (PoolState.official, SeqState.empty):
      default      transformers' indexer (`ops.indexer_topk`, the backend op): fp32 queries and keys.
      official     the release's (`official_numerics`, flashport.quant.index_numerics): queries and keys
                   Hadamard-rotated and FP4 (e2m1, UE8M0 scale per 32), scored in exact integer arithmetic by
                   flashport.backends.indexer_fp4 (a C++ kernel on the CPU: tiles of entries, no [T, n] tensor).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.dim, self.topk, self.rate = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk, cfg.csa_rate
        self.wq_b = Linear(self.n_heads * self.dim, cfg.q_lora_rank)
        self.weights_proj = Linear(self.n_heads, cfg.hidden_size)
        self.compressor = Compressor(cfg, cfg.csa_rate, self.dim, overlap=True, rotate=True)

    def forward(self, x: Tensor, qr: Tensor, pos: Tensor, ps: PoolState, rope: RopeTable, cos,
                sin) -> tuple[Tensor | None, Tensor]:
        """-> (cols, chosen): the compressed entries each query attends to (its top-k of the visible ones) as
        chosen [T, u] bool over the entries `cols` [u] (ascending indices), or over all n entries when cols is
        None. The release path returns only the union of the chunk's picks (u <= T * topk, whatever n)."""
        keys = self.compressor(x, ps, rope)  # [n, Di]
        n = keys.shape[0]
        limits = (pos + 1) // self.rate  # [T]: query t sees entries 0..limits[t]-1 (causal over windows)
        if n <= self.topk:  # every visible entry is in the top-k: indexer_topk's result, without scoring
            return None, torch.arange(n)[None, :] < limits[:, None]
        q = self.ops.rope(self.wq_b(qr).view(-1, self.n_heads, self.dim), cos, sin)  # [T, Hi, Di]
        weights = self.weights_proj(x) * self.n_heads ** -0.5  # [T, Hi]
        if not ps.official:
            visible = torch.arange(n)[None, :] < limits[:, None]  # [T, n]
            return None, self.ops.indexer_topk(q, keys, weights, visible, self.topk)  # [T, n] bool
        qc, qe = rotate_quantize(q)  # the release's rotate_activation + fp4_act_quant
        idx = fp4_select(qc, qe, weights * self.dim ** -0.5, ps.fp4_keys(), limits, n, self.topk)  # [T, k]
        picked = idx >= 0
        cols = torch.unique(idx[picked])  # ascending
        chosen = torch.zeros(idx.shape[0], len(cols), dtype=torch.bool)
        rows = torch.arange(idx.shape[0])[:, None].expand_as(idx)[picked]
        chosen[rows, torch.searchsorted(cols, idx[picked])] = True
        return cols, chosen


class Attention(Module):
    """Shared-KV MQA over [sliding window of raw entries | compressed entries], with sinks and grouped output."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.kind = cfg, cfg.layer_kind(layer)
        h, dh = cfg.num_attention_heads, cfg.head_dim
        self.wq_a, self.q_norm = Linear(cfg.q_lora_rank, cfg.hidden_size), RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.wq_b = Linear(h * dh, cfg.q_lora_rank)
        self.wkv, self.kv_norm = Linear(dh, cfg.hidden_size), RMSNorm(dh, cfg.rms_norm_eps)
        self.wo_a = GroupedLinear(cfg.o_groups * cfg.o_lora_rank, cfg.group_in_features)
        self.wo_b = Linear(cfg.hidden_size, cfg.o_groups * cfg.o_lora_rank)
        self.attn_sink = _param(h)
        rate = {"csa": cfg.csa_rate, "hca": cfg.hca_rate}.get(self.kind)
        if rate:
            self.compressor = Compressor(cfg, rate, dh, overlap=self.kind == "csa")
        if self.kind == "csa":
            self.indexer = Indexer(cfg)
        self.register_buffer("inv_freq", rope_inv_freq(cfg, compressed=self.kind != "swa"), persistent=False)

    def rope_table(self) -> RopeTable:
        if self.__dict__.get("_rope", (None,))[0] is not self.inv_freq:  # first call, or the buffer moved device
            self.__dict__["_rope"] = (self.inv_freq, RopeTable.of(self.inv_freq))
        return self.__dict__["_rope"][1]

    def forward(self, x: Tensor, pos: Tensor, st: LayerState) -> Tensor:
        """x [T, D] (one sequence's chunk), pos [T] (consecutive) -> [T, D]; updates st.

        Decode (T = 1) takes a shortcut with the same math: it attends only to the keys it can see (the last W
        raw entries, and on CSA layers the gathered top-k entries) instead of masking the others with -inf,
        so its cost does not grow with the context (the indexer's scoring aside)."""
        cfg, T, W = self.cfg, x.shape[0], self.cfg.sliding_window
        rope, p0 = self.rope_table(), int(pos[0]) if T else 0
        cos, sin = rope(p0, p0 + T)  # [T, r/2]
        proj = self.ops.attn_project(x, self.wq_a, self.q_norm.weight, self.wq_b, self.wkv, self.kv_norm.weight, cos,
                                     sin, cfg.num_attention_heads, cfg.rms_norm_eps)  # the 3 lines below, fused
        if proj is None:
            qr = self.q_norm(self.wq_a(x))  # [T, q_lora]
            q = self.ops.rms_norm(self.wq_b(qr).view(T, cfg.num_attention_heads, cfg.head_dim), None, cfg.rms_norm_eps)
            q, kv = self.ops.rope(q, cos, sin), self.ops.rope(self.kv_norm(self.wkv(x)), cos, sin)  # [T, H | 1, Dh]
        else:
            qr, q, kv = proj

        # sliding window: the previous W raw entries plus this chunk, each query sees keys in (p - W, p]
        keys, first = torch.cat([st.window, kv]), p0 - st.window.shape[0]  # [S, Dh], position of keys[0]
        st.window = keys[-W:]
        decode = T == 1
        if decode:  # the one query sees exactly the last W keys
            keys = st.window
        else:
            dist = pos[:, None] - (first + torch.arange(keys.shape[0]))[None, :]  # [T, S]
            seen = [(dist >= 0) & (dist < W)]  # what each query sees, per part of the keys: built into one bias

        if self.kind != "swa":
            entries = self.compressor(x, st.comp, rope)  # [n, Dh]
            rate, cols = cfg.csa_rate if self.kind == "csa" else cfg.hca_rate, None
            if self.kind == "csa":  # sparse: only the indexer's top-k; HCA: dense over every complete entry
                cols, visible = self.indexer(x, qr, pos, st.index, rope, cos, sin)  # [T, n] or [T, u]
                if cols is not None:  # only these entries can be seen by any query of the chunk
                    entries = entries[cols]
            elif decode and entries.shape[0] == (p0 + 1) // rate:  # every entry is complete: all visible
                visible = None
            else:
                visible = torch.arange(entries.shape[0])[None, :] < ((pos + 1) // rate)[:, None]  # [T, n]
            if decode and visible is None and cols is None:  # [window | every entry], the entries not copied
                keys = st.comp.after(keys, cfg.sliding_window)
            elif decode:  # gather what the query sees, in entry order
                keys = torch.cat([keys, entries if visible is None else entries[visible[0]]])
            else:
                keys = torch.cat([keys, entries])
                seen.append(visible)
        if decode:
            out = self.ops.attn_output(q, keys, self.attn_sink, cfg.head_dim ** -0.5, cos, sin, self.wo_a, cfg.o_groups,
                                       self.wo_b)  # the lines below with a zero bias, fused
            if out is not None:
                return out
            bias = keys.new_zeros(1, keys.shape[0])
        else:
            bias = attention_bias(seen)
        o = self.ops.attention(q, keys, bias, self.attn_sink, cfg.head_dim ** -0.5)  # [T, H, Dh]
        o = self.ops.rope(o, cos, sin, inverse=True)  # K = V carried RoPE into the output: rotate it back
        o = self.wo_a(o.reshape(T, cfg.o_groups, -1))  # [T, G, H*Dh/G] -> [T, G, R]
        return self.wo_b(o.flatten(1))


class Gate(Module):
    """Router: scores sqrt(softplus(logits)); a bias picks the top-k (or a frozen token->expert table on hash
    layers); weights are the unbiased scores of the picks, renormalised to 1 and scaled."""

    def __init__(self, cfg: ModelConfig, hashed: bool):
        super().__init__()
        self.cfg, self.hashed = cfg, hashed
        self.weight = _param(cfg.n_routed_experts, cfg.hidden_size)
        if hashed:
            self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, cfg.num_experts_per_tok, dtype=torch.long))
        else:
            self.bias = _param(cfg.n_routed_experts)

    def forward(self, x: Tensor, token_ids: Tensor) -> tuple[Tensor, Tensor]:
        scores = F.softplus(x @ self.weight.T).sqrt()  # [T, E]
        if self.hashed:
            idx = self.tid2eid[token_ids]
        else:
            idx = topk_indices(scores + self.bias, self.cfg.num_experts_per_tok)  # [T, k], the reference's tie rule
        w = scores.gather(1, idx)
        return w / (w.sum(-1, keepdim=True) + 1e-20) * self.cfg.routed_scaling_factor, idx


class Expert(Module):
    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.w1, self.w2, self.w3 = Linear(inter, dim), Linear(dim, inter), Linear(inter, dim)


class MoE(Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.limit = cfg.swiglu_limit
        self.gate = Gate(cfg, hashed=cfg.is_hash_layer(layer))
        self.experts = nn.ModuleList(Expert(cfg.hidden_size, cfg.moe_intermediate_size)
                                     for _ in range(cfg.n_routed_experts))
        self.shared_experts = Expert(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)

    def forward(self, x: Tensor, token_ids: Tensor) -> Tensor:
        g = self.gate
        # the lines below, fused; not while something watches the router (offload's prefetcher, calibration)
        out = None if g._forward_hooks or g._forward_pre_hooks else self.ops.gated_moe(
            x, token_ids, g.weight, g.tid2eid if g.hashed else None, None if g.hashed else g.bias,
            g.cfg.num_experts_per_tok, g.cfg.routed_scaling_factor, self.experts, self.shared_experts, self.limit)
        if out is not None:
            return out
        weights, idx = self.gate(x, token_ids)  # [T, k]
        shared = self.ops.moe(x, torch.ones(len(x), 1), torch.zeros(len(x), 1, dtype=torch.long),
                              [self.shared_experts], self.limit)  # the shared expert: every token, weight 1
        return self.ops.moe(x, weights, idx, self.experts, self.limit) + shared


class Block(Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, n, d = cfg, cfg.hc_mult, cfg.hidden_size
        self.attn_norm, self.ffn_norm = RMSNorm(d, cfg.rms_norm_eps), RMSNorm(d, cfg.rms_norm_eps)
        self.attn, self.ffn = Attention(cfg, layer), MoE(cfg, layer)
        for part in ("attn", "ffn"):  # release names: layers.N.hc_attn_fn / _base / _scale
            setattr(self, f"hc_{part}_fn", _param((2 + n) * n, n * d))
            setattr(self, f"hc_{part}_base", _param((2 + n) * n))
            setattr(self, f"hc_{part}_scale", _param(3, fill=1.0))

    def forward(self, streams: Tensor, token_ids: Tensor, seqs: list[tuple[slice, Tensor, LayerState]]) -> Tensor:
        """streams [T, N, D] for the rows of every sequence in `seqs` (rows, positions, layer state)."""
        streams, out, post, comb = self.step(streams, token_ids, seqs)
        return self.ops.hc_post(out, streams, post, comb)

    def step(self, streams: Tensor, token_ids: Tensor, seqs: list[tuple[slice, Tensor, LayerState]],
             prev: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The block without its last stream mix: -> (streams, out, post, comb), where forward's result is
        hc_post(out, streams, post, comb). prev: the previous block's (out, post, comb) still to be mixed into
        `streams` (Transformer.forward_batch): that mix and this block's first one then run as one fused call."""
        cfg, ops = self.cfg, self.ops
        hc = (cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps)
        attn_mix = (self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale)
        ffn_mix = (self.hc_ffn_fn, self.hc_ffn_base, self.hc_ffn_scale)
        attn_norm, ffn_norm = self.attn_norm, self.ffn_norm
        if prev is None:
            fused = ops.hc_pre_norm(streams, *attn_mix, *hc, attn_norm.weight, attn_norm.eps)
        else:
            fused = ops.hc_post_pre_norm(prev[0], streams, prev[1], prev[2], *attn_mix, *hc, attn_norm.weight,
                                         attn_norm.eps)
            if fused is None:
                streams = ops.hc_post(prev[0], streams, prev[1], prev[2])
            else:
                streams, fused = fused[0], fused[1:]
        if fused is None:
            x, post, comb = ops.hc_pre(streams, *attn_mix, *hc)
            x = attn_norm(x)
        else:
            x, post, comb = fused
        attn = self.attn
        a = [attn(x[rows], pos, st) for rows, pos, st in seqs]  # attention runs per sequence
        a = a[0] if len(a) == 1 else torch.cat(a)
        fused = ops.hc_post_pre_norm(a, streams, post, comb, *ffn_mix, *hc, ffn_norm.weight, ffn_norm.eps)
        if fused is None:
            streams = ops.hc_post(a, streams, post, comb)
            x, post, comb = ops.hc_pre(streams, *ffn_mix, *hc)
            x = ffn_norm(x)
        else:
            streams, x, post, comb = fused
        return streams, self.ffn(x, token_ids), post, comb


class MTP(Block):
    """Multi-token prediction block: predicts token t+2 from the main model's final streams at t and the embedding
    of token t+1, through one more full block. It shares `embed` and `head` with the main model and has its own
    stream collapse (`hc_head_*`) and norms. Used to draft a token for speculative decoding."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__(cfg, layer)
        n, d = cfg.hc_mult, cfg.hidden_size
        self.e_proj, self.h_proj = Linear(d, d), Linear(d, d)
        self.enorm, self.hnorm, self.norm = (RMSNorm(d, cfg.rms_norm_eps) for _ in range(3))
        self.hc_head_fn, self.hc_head_base, self.hc_head_scale = _param(n, n * d), _param(n), _param(1, fill=1.0)

    def forward(self, streams: Tensor, emb: Tensor, token_ids: Tensor, seqs) -> Tensor:
        """streams [T, N, D] (main model, before its collapse), emb [T, D] of the next tokens -> [T, D]."""
        x = self.e_proj(self.enorm(emb))[:, None, :] + self.h_proj(self.hnorm(streams))  # [T, N, D]
        x = super().forward(x, token_ids, seqs)
        x = self.ops.hc_head(x, self.hc_head_fn, self.hc_head_base, self.hc_head_scale, self.cfg.hc_eps,
                             self.cfg.rms_norm_eps)
        return self.norm(x)


class Transformer(Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg, n, d = cfg, cfg.hc_mult, cfg.hidden_size
        self.embed = Embedding(cfg.vocab_size, d)
        self.embed.weight.requires_grad_(False)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        self.head = Linear(cfg.vocab_size, d)
        self.hc_head_fn, self.hc_head_base, self.hc_head_scale = _param(n, n * d), _param(n), _param(1, fill=1.0)
        self.mtp = nn.ModuleList(MTP(cfg, cfg.num_hidden_layers + i) for i in range(cfg.num_nextn_predict_layers))

    def load_state_dict(self, sd, strict: bool = True, **kwargs):
        """As nn.Module's; a checkpoint without the MTP block (e.g. saved by transformers) loads without it."""
        if self.mtp and not any(k.startswith("mtp.") for k in sd):
            self.mtp = nn.ModuleList()
        return super().load_state_dict(sd, strict=strict, **kwargs)

    def set_ops(self, ops: Ops) -> "Transformer":
        """Route every operation of every module through `ops` (a backend with per-op fallback)."""
        for m in self.modules():
            m.ops = ops
        return self

    def forward_batch(self, chunks: list[Tensor], states: list[SeqState], all_logits: bool = True) -> list[Tensor]:
        """Run one chunk of token ids per sequence; returns logits per sequence ([T_i, V] or [1, V] for the last
        position only). Each state advances by its chunk."""
        seqs, start = [], 0
        for ids, st in zip(chunks, states):
            seqs.append((slice(start, start + len(ids)), torch.arange(st.n_tokens, st.n_tokens + len(ids)), st))
            start += len(ids)
        token_ids = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        streams = self.embed(token_ids)[:, None, :].expand(-1, self.cfg.hc_mult, -1).contiguous()  # [T, N, D]
        prev = None  # each block's last stream mix runs fused with the next block's first (Block.step)
        for i, layer in enumerate(self.layers):
            streams, *prev = layer.step(streams, token_ids, [(rows, pos, st.layers[i]) for rows, pos, st in seqs], prev)
        if prev is not None:
            streams = self.ops.hc_post(prev[0], streams, prev[1], prev[2])
        for (rows, pos, st), ids in zip(seqs, chunks):
            st.n_tokens += len(ids)
        self.last_streams = streams  # [T, N, D]: what an MTP draft starts from
        if not all_logits and any(len(c) != 1 for c in chunks):  # each sequence's last position (decode: every row)
            streams = streams[torch.tensor([s.stop - 1 for s, _, _ in seqs])]
        x = self.ops.hc_head(streams, self.hc_head_fn, self.hc_head_base, self.hc_head_scale, self.cfg.hc_eps,
                             self.cfg.rms_norm_eps)  # final collapse of the N streams
        logits = self.head(self.norm(x))
        if not all_logits:
            return list(logits.split(1))
        return [logits[rows] for rows, _, _ in seqs]

    def mtp_logits(self, streams: Tensor, next_ids: Tensor, state: LayerState, first_pos: int) -> Tensor:
        """Draft logits for tokens t+2 from the final streams at t [T, N, D] and the tokens t+1 [T]. The MTP
        block keeps its own attention state (`state`, a LayerState) for the positions first_pos.."""
        pos = torch.arange(first_pos, first_pos + len(next_ids))
        x = self.mtp[0](streams, self.embed(next_ids), next_ids, [(slice(0, len(next_ids)), pos, state)])
        return self.head(x)

    def forward(self, ids: Tensor, state: SeqState | None = None) -> Tensor:
        """ids [T] -> logits [T, V]; with a state, continues it (a fresh one otherwise)."""
        return self.forward_batch([ids], [state if state is not None else SeqState.empty(self.cfg)])[0]


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Release tensor name -> shape (dequantized), from the config alone: no weights are built."""
    with torch.device("meta"):
        model = Transformer(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return shapes


def workspace_bytes(cfg: ModelConfig, chunk: int, context: int) -> int:
    """Bytes of the fp32 activations of one prefill chunk of `chunk` tokens at `context` (an estimate for memory
    budgets: the mHC streams, one query's attention logits over the keys it can see, the indexer, the routed experts'
    hidden states, and one row of logits)."""
    T = min(chunk, max(context, 1))
    keys = cfg.sliding_window + T + max(cfg.index_topk, context // cfg.hca_rate)  # keys one query sees at most
    per_token = (3 * cfg.hc_mult * cfg.hidden_size                        # streams in / out / mixed
                 + cfg.num_attention_heads * (2 * cfg.head_dim + keys)    # q, output, attention logits
                 + cfg.q_lora_rank + cfg.index_n_heads * cfg.index_head_dim
                 + cfg.num_experts_per_tok * (2 * cfg.moe_intermediate_size + cfg.hidden_size))
    return 4 * (T * per_token + cfg.vocab_size)


PREFILL_CHUNK = 1024  # tokens per prefill step when memory allows (GEMMs of this many rows run near peak)


def stored_bytes(model: "Transformer", extra=()) -> int:
    """Bytes of the weights a model holds (parameters, buffers and every Linear's packed tensors, plus the tensors in
    `extra`; meta placeholders count 0, a storage shared by several tensors counts once, by address)."""
    seen: dict[int, int] = {}
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [t for m in model.modules() if isinstance(m, Linear) and m.packed is not None
                for t in m.packed.tensors.values()]
    for t in [*tensors, *extra]:
        if isinstance(t, torch.Tensor) and not t.is_meta and t.numel():
            s = t.untyped_storage()
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
    return sum(seen.values())


def default_prefill_chunk(cfg: ModelConfig, weight_bytes: int, floor: int = 128) -> int:
    """Tokens per prefill step when the user gives none: PREFILL_CHUNK, halved (not below `floor`) while one
    chunk's activations (`workspace_bytes` at twice the chunk's context) exceed max(256 MiB, 15% of the weights'
    bytes). Why: a prefill's transient memory grows with the chunk, the resident weights do not; at V4-Flash's
    widths a 1024-token chunk holds ~1.1 GB of fp32 activations, which on a 3 GB checkpoint puts generate's peak
    RSS at 1.4x the checkpoint instead of the 1.3x issue 13 asks (docs/performance.md, Memory)."""
    budget = max(256 << 20, int(0.15 * weight_bytes))
    chunk = PREFILL_CHUNK
    while chunk > floor and workspace_bytes(cfg, chunk, 2 * chunk) > budget:
        chunk //= 2
    return chunk


def param_count(cfg: ModelConfig) -> dict[str, int]:
    """Parameters by group (routed_experts, embed_head, other, mtp; total without the MTP block), from the shapes
    alone: works for `v4-flash` without weights."""
    groups: dict[str, int] = {}
    for name, shape in param_shapes(cfg).items():
        g = "mtp" if name.startswith("mtp.") else "routed_experts" if ".experts." in name else (
            "embed_head" if name in ("embed.weight", "head.weight") else "other")
        groups[g] = groups.get(g, 0) + math.prod(shape)
    groups["total"] = sum(v for k, v in groups.items() if k != "mtp")  # the MTP block is counted apart
    return groups
