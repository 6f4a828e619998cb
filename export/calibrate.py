"""Calibration: run the model over calibration text and record, per MoE layer and routed expert, the tokens routed
to it and the activation statistics that error-aware rounding needs.

The model runs one layer at a time straight from the checkpoint (`run_layers`): the embedding, then block 0 built
and loaded alone, its output streams fed to block 1, and so on, so peak memory is one layer of fp32 weights plus
the calibration activations, never the whole model. Routed experts run inside the backend's `moe` op, so the
capture sits at the MoE level: a forward hook on each block's router (`ffn.gate`) sees the MoE input rows x [T, D]
and the routing (weights, idx [T, k]); expert e's inputs are the rows of x whose idx holds e.

Recorded per MoE layer ("layers.N"):
  counts [E]     tokens routed to each expert (what the placement planner balances and pins by)
  x_sq   [E, D]  mean square of each input channel over the rows routed to expert e (w1 / w3 inputs)
  h_sq   [E, I]  the same for the SwiGLU hidden that feeds w2
  x, idx         the MoE inputs and routing themselves (kept in memory for GPTQ; T x D floats per layer)

The MTP block is not calibrated (it needs the main model's final streams and next-token embeddings): its
experts are rounded to nearest and the planner treats its routing as uniform.

Calibration runs at the checkpoint's own precision (the release values), which is the model the export is
trying to reproduce.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor
from tqdm import tqdm

from ..bundle import ROUTING_STATS, load_routing_stats
from ..checkpoint import CheckpointError, CheckpointReader, save_tensors
from ..config import ModelConfig
from ..loader import load_tokenizer
from ..model import Block, LayerState
from ..tokenizer import Tokenizer

log = logging.getLogger("flashport.export")

ACTIVATION_STATS = "activation_stats.safetensors"


TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".json", ".jsonl", ".csv", ".tsv", ".html", ".xml", ".py")


def looks_like_path(text: str | Path) -> bool:
    """Whether a text argument names a file rather than being the text: a Path, or one line that starts like a
    path (/, ./, ../, ~) or ends in a text file's suffix."""
    if isinstance(text, Path):
        return True
    s = str(text)
    return ("\n" not in s and len(s) < 1024 and s.strip() == s and
            (s.startswith(("/", "./", "../", "~")) or s.lower().endswith(TEXT_SUFFIXES)))


def read_text_arg(text: str | Path) -> str:
    """A text argument: the contents of the file it names, else the text itself. Raises FileNotFoundError when it
    looks like a path (see looks_like_path) but no such file exists, so a mistyped path is never used as the text."""
    s = str(text)
    try:
        p = Path(s).expanduser()
        if "\n" not in s and len(s) < 1024 and p.is_file():
            return p.read_text(encoding="utf-8")
    except OSError:  # not a usable path (e.g. a name too long): it is text
        pass
    if looks_like_path(text):
        raise FileNotFoundError(f"text file {s} does not exist")
    return s


def calibration_ids(text: str | Path, tokenizer: Tokenizer, max_tokens: int = 512, seq_len: int = 256) -> list[list[int]]:
    """Calibration text (a file path or the text itself) -> token id segments of at most seq_len, each starting
    with BOS, max_tokens in all. Text never becomes control tokens (Tokenizer.encode)."""
    ids = tokenizer.encode(read_text_arg(text))
    if not ids:
        raise ValueError(f"calibration text {str(text)[:60]!r} is empty")
    step = seq_len - 1
    segs = [[tokenizer.bos_id] + ids[a:a + step] for a in range(0, len(ids), step)]
    out, n = [], 0
    for s in segs:
        if n >= max_tokens:
            break
        out.append(s[: max_tokens - n])
        n += len(out[-1])
    return [s for s in out if len(s) > 1]


def swiglu_hidden(x: Tensor, w1: Tensor, w3: Tensor, limit: float) -> Tensor:
    """The clamped SwiGLU hidden of backends.reference.swiglu (the input of w2): x [n, D] -> [n, I]."""
    return F.silu((x @ w1.T).clamp(max=limit)) * (x @ w3.T).clamp(-limit, limit)


@dataclass
class LayerCalib:
    counts: Tensor          # [E] int64
    x_sq: Tensor            # [E, D]
    h_sq: Tensor            # [E, I]
    x: Tensor | None = None  # [T, D] MoE inputs
    idx: Tensor | None = None  # [T, k]

    def rows(self, expert: int) -> Tensor:
        """Inputs routed to `expert` [n_e, D]."""
        return self.x[(self.idx == expert).any(-1)]


@dataclass
class Calibration:
    tokens: int
    top_k: int
    layers: dict[str, LayerCalib] = field(default_factory=dict)
    source: str = ""

    def routing_stats(self) -> dict:
        return {"tokens": self.tokens, "top_k": self.top_k, "source": self.source,
                "layers": {k: v.counts.tolist() for k, v in self.layers.items()}}

    def save(self, out: str | Path) -> list[Path]:
        """Write routing_stats.json and activation_stats.safetensors into directory `out`."""
        out = Path(out)
        (out / ROUTING_STATS).write_text(json.dumps(self.routing_stats(), indent=1))
        tensors = {}
        for k, v in self.layers.items():
            tensors[f"{k}.x_sq"], tensors[f"{k}.h_sq"] = v.x_sq.contiguous(), v.h_sq.contiguous()
        save_tensors(tensors, out / ACTIVATION_STATS, metadata={"tokens": str(self.tokens)})
        return [out / ROUTING_STATS, out / ACTIVATION_STATS]

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        """From a directory holding routing_stats.json (and activation_stats.safetensors when present)."""
        path = Path(path)
        stats = load_routing_stats(path)
        act = load_file(str(path / ACTIVATION_STATS)) if (path / ACTIVATION_STATS).exists() else {}
        cal = cls(stats["tokens"], stats.get("top_k", 0), source=stats.get("source", ""))
        for k, counts in stats["layers"].items():
            cal.layers[k] = LayerCalib(torch.tensor(counts), act.get(f"{k}.x_sq", torch.zeros(0)),
                                       act.get(f"{k}.h_sq", torch.zeros(0)))
        return cal


def load_layer(reader: CheckpointReader, i: int) -> tuple[Block, dict[str, Tensor]]:
    """Block i built alone and loaded from the checkpoint (fp32); also returns its release-named tensors."""
    prefix = f"layers.{i}."
    sd = {n: reader.get(n) for n in reader.names() if n.startswith(prefix)}
    block = Block(reader.cfg, i)
    block.load_state_dict({n[len(prefix):]: t for n, t in sd.items()})
    return block.eval(), sd


@torch.no_grad()
def run_layers(reader: CheckpointReader, segments: list[list[int]], on_layer, progress: bool = True):
    """Run the main stack layer by layer over token segments (each its own sequence from position 0).
    on_layer(i, block, sd, moe_x [T, D], weights [T, k], idx [T, k]) is called after block i ran."""
    cfg: ModelConfig = reader.cfg
    ids = torch.tensor([t for s in segments for t in s])
    bounds, a = [], 0
    for s in segments:
        bounds.append(slice(a, a + len(s)))
        a += len(s)
    embed = reader.get("embed.weight")
    streams = embed[ids][:, None, :].expand(-1, cfg.hc_mult, -1).contiguous()  # [T, N, D]
    del embed
    for i in tqdm(range(cfg.num_hidden_layers), desc="calibrate", unit="layer", disable=not progress):
        block, sd = load_layer(reader, i)
        seen = {}
        hook = block.ffn.gate.register_forward_hook(
            lambda mod, inp, out: seen.update(x=inp[0], weights=out[0], idx=out[1]))
        seqs = [(sl, torch.arange(sl.stop - sl.start), LayerState.empty(cfg, i)) for sl in bounds]
        streams = block(streams, ids, seqs)
        hook.remove()
        on_layer(i, block, sd, seen["x"], seen["weights"], seen["idx"])
        del block, sd


def calibrate(src: str | Path | CheckpointReader, text: str | Path, max_tokens: int = 512, seq_len: int = 256,
              keep_inputs: bool = True, progress: bool = True) -> Calibration:
    """Run checkpoint `src` over calibration `text` (file or string); see the module docstring."""
    reader = src if isinstance(src, CheckpointReader) else CheckpointReader(src)
    cfg = reader.cfg
    tok = load_tokenizer(reader.path, cfg.vocab_size)
    if tok is None:
        raise CheckpointError(f"{reader.path}: no tokenizer.json: calibration text needs the model's tokenizer")
    segments = calibration_ids(text, tok, max_tokens, seq_len)
    cal = Calibration(sum(map(len, segments)), cfg.num_experts_per_tok, source=str(text)[:200])

    def on_layer(i, block, sd, x, weights, idx):
        E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        x_sq, h_sq = torch.zeros(E, D), torch.zeros(E, I)
        for e in idx.unique().tolist():
            rows = x[(idx == e).any(-1)]
            ex = block.ffn.experts[e]
            x_sq[e] = rows.square().mean(0)
            h_sq[e] = swiglu_hidden(rows, ex.w1.weight, ex.w3.weight, cfg.swiglu_limit).square().mean(0)
        cal.layers[f"layers.{i}"] = LayerCalib(torch.bincount(idx.flatten(), minlength=E), x_sq, h_sq,
                                               x.clone() if keep_inputs else None, idx.clone() if keep_inputs else None)

    run_layers(reader, segments, on_layer, progress)
    return cal
