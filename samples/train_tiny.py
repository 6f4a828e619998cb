"""Train the `flash-small` preset (~20M parameters) on Python standard-library docstrings, on the CPU.

    python samples/train_tiny.py                     # 30-minute budget (the step count depends on the machine)
    python samples/train_tiny.py --steps 600         # a fixed number of steps (reproducible anywhere)
    python samples/train_tiny.py --minutes 1 --out /tmp/fs   # a quick end-to-end check of the pipeline

Writes a release-format checkpoint (FP8 128x128 linears, MXFP4 experts, bf16/fp32 elsewhere) to
samples/models/flash-small/ plus `heldout.txt` (the held-out documents, separated by "\\x1e\\n") and
`train_log.json` (seed, steps, losses, wall time, command line). See docs/training.md.

Choices (documented in docs/training.md):
- data: docstrings of the standard-library modules (build_tokenizer's list plus every other importable top-level
  module), one document per docstring, each as [BOS] text [EOS]; every 20th document (sorted order) is held out.
  The train documents are packed into one stream and cut into windows of 128 tokens; window order is a fixed
  permutation per epoch (torch.Generator seeded from --seed and the epoch).
- sequence length 128: CSA layers then have 128/4 = 32 compressed entries = index_topk, so the indexer never
  drops an entry and its top-k needs no gradient. The indexer weights therefore stay at their init; beyond
  128 tokens of context its selection is untrained (see the docs).
- the routers' `bias` (non-hash layers, MTP included) is not trained by gradient: after each step it moves by
  gamma * sign(mean load - load of the expert) (DeepSeek's auxiliary-loss-free balancing). `tid2eid` (hash
  layers) is the frozen random table of init_weights.
- the MTP block can be trained too (--mtp-weight > 0: loss on the token two ahead, ~25% more compute per step);
  the shipped checkpoint used 0, so its MTP block is the untrained init (speculative drafts are rejected).
- the routed-expert step runs through a training-friendly `moe` op (same math as the reference; gathers by
  permutation instead of index_add_, whose CPU kernel is very slow); every other op is the torch reference.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import shlex
import tempfile
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "samples"))

import build_tokenizer  # noqa: E402  (the tokenizer's corpus module list)

from flashport.backends import reference  # noqa: E402
from flashport.backends.dispatch import Ops, _ExpertHandles  # noqa: E402
from flashport.checkpoint import init_weights, write_checkpoint  # noqa: E402
from flashport.config import ModelConfig  # noqa: E402
from flashport.model import Gate, LayerState, SeqState, Transformer  # noqa: E402
from flashport.model import param_count  # noqa: E402
from flashport.tokenizer import DEFAULT_PATH, Tokenizer  # noqa: E402

DOC_SEP = "\x1e\n"  # separates the documents in heldout.txt
# stdlib modules not imported for the corpus: side effects (antigravity opens a browser, this prints), GUI,
# platform-specific, deprecated-with-warnings or test-only packages
DENY = {
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "__phello__", "pydoc_data", "lib2to3",
    "ensurepip", "venv", "test", "xxlimited", "xxlimited_35", "xxsubtype", "msvcrt", "winreg", "winsound", "nt",
    "msilib", "curses", "readline", "pty", "tty", "crypt", "spwd", "nis", "ossaudiodev", "sqlite3",
}


# ------------------------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------------------------
def corpus_modules() -> list[str]:
    extra = {m for m in sys.stdlib_module_names if not m.startswith("_") and m not in DENY}
    return sorted(set(build_tokenizer.MODULES) | extra)


def collect_docs() -> list[str]:
    """build_tokenizer.collect_docs over the wider module list (sorted, deduplicated docstrings)."""
    saved = build_tokenizer.MODULES
    build_tokenizer.MODULES = corpus_modules()
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return build_tokenizer.collect_docs()
    finally:
        build_tokenizer.MODULES = saved


def split_docs(docs: list[str], every: int = 20, max_heldout_bytes: int = 280_000) -> tuple[list[str], list[str]]:
    """Every `every`-th document (offset every // 2) is held out, up to max_heldout_bytes of text."""
    train, held, size = [], [], 0
    for i, d in enumerate(docs):
        if i % every == every // 2 and size + len(d.encode()) < max_heldout_bytes:
            held.append(d)
            size += len(d.encode()) + len(DOC_SEP)
        else:
            train.append(d)
    return train, held


def token_stream(tok: Tokenizer, docs: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for d in docs:
        ids += [tok.bos_id] + tok.encode(d) + [tok.eos_id]
    return torch.tensor(ids, dtype=torch.long)


def read_heldout(path: Path) -> list[str]:
    return [d for d in path.read_text(encoding="utf-8").split(DOC_SEP) if d]


def windows(stream: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[n, seq_len + 1] non-overlapping windows (input = [:-1], target = [1:])."""
    n = (len(stream) - 1) // seq_len
    idx = torch.arange(n)[:, None] * seq_len + torch.arange(seq_len + 1)[None]
    return stream[idx]


# ------------------------------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------------------------------
class _Perm(torch.autograd.Function):
    """x[perm] for a permutation; the backward is the inverse permutation (a gather, not an index_add_)."""

    @staticmethod
    def forward(ctx, x, perm, inv):
        ctx.save_for_backward(inv)
        return x[perm]

    @staticmethod
    def backward(ctx, g):
        (inv,) = ctx.saved_tensors
        return g[inv], None, None


class TrainOps(Ops):
    """The reference ops, with a routed-expert step that trains fast on the CPU (same math, other summation
    order: each token's k expert outputs are summed slot by slot instead of by index_add_ per expert)."""

    def moe(self, x, weights, idx, experts, limit):
        handles = _ExpertHandles(self, experts)
        if len(experts) == 1:  # the shared expert: every token, weight 1
            w1, w3, w2 = handles[0]
            return reference.swiglu(x, w1, w3, w2, limit) * weights
        T, k = idx.shape
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)
        inv = torch.empty_like(order)
        inv[order] = torch.arange(len(order))
        counts = torch.bincount(flat, minlength=len(experts)).tolist()
        xs = _Perm.apply(x[:, None].expand(T, k, x.shape[1]).reshape(T * k, -1), order, inv)
        outs = []
        for e, part in enumerate(xs.split(counts)):
            if counts[e]:
                w1, w3, w2 = handles[e]
                outs.append(reference.swiglu(part, w1, w3, w2, limit))
        y = torch.cat(outs) * weights.reshape(-1)[order][:, None]
        return _Perm.apply(y, inv, order).view(T, k, -1).sum(1)


def train_init(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Small-scale init for training (init_weights' scales are for parity tests, far too large to train well):
    linears std 0.02 (residual outputs w2 / wo_b 0.02 / sqrt(2 L)), embed std 1/sqrt(D), norms 1, biases /
    sinks / positional biases 0, mHC mixes near neutral with a small random fn. tid2eid from init_weights."""
    sd = init_weights(cfg, seed)
    g = torch.Generator().manual_seed(seed + 1)
    n, L = cfg.hc_mult, cfg.num_hidden_layers
    for name, t in sd.items():
        if name.endswith("tid2eid"):
            continue
        if name.endswith("norm.weight") or name.endswith("_scale"):
            sd[name] = torch.ones_like(t)
        elif name.endswith(("attn_sink", "gate.bias", ".ape")):
            sd[name] = torch.zeros_like(t)
        elif name.endswith("_base"):
            b = torch.zeros_like(t)
            if b.numel() == (2 + n) * n:  # hc_attn/ffn: comb part leans to the identity
                b[2 * n:] = torch.eye(n).flatten()
            sd[name] = b
        elif name == "embed.weight":
            sd[name] = torch.randn(t.shape, generator=g) / math.sqrt(cfg.hidden_size)
        else:
            std = 0.02 / math.sqrt(2 * L) if name.endswith(("w2.weight", "wo_b.weight")) else 0.02
            sd[name] = torch.randn(t.shape, generator=g) * std
    return sd


def build_model(cfg: ModelConfig, sd: dict[str, torch.Tensor]) -> Transformer:
    model = Transformer(cfg)
    model.load_state_dict(sd)
    model.set_ops(TrainOps(None))
    return model


def trainable(model: Transformer) -> list[tuple[str, torch.nn.Parameter]]:
    """Every float parameter except the routers' balancing bias (updated by sign rule, not gradient)."""
    out = []
    for name, p in model.named_parameters():
        if p.is_floating_point() and not name.endswith("gate.bias"):
            p.requires_grad_(True)
            out.append((name, p))
    return out


def forward_loss(model: Transformer, batch: torch.Tensor, mtp_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """batch [B, S+1] -> (main next-token loss, MTP loss on the token two ahead) averaged over tokens."""
    cfg = model.cfg
    inputs = [row[:-1] for row in batch]
    logits = model.forward_batch(inputs, [SeqState.empty(cfg) for _ in inputs])
    loss = F.cross_entropy(torch.cat(logits), batch[:, 1:].reshape(-1))
    if mtp_weight <= 0 or not len(model.mtp):
        return loss, torch.zeros(())
    S = batch.shape[1] - 1
    streams = model.last_streams.view(len(batch), S, cfg.hc_mult, -1)[:, :-1].reshape(-1, cfg.hc_mult,
                                                                                      cfg.hidden_size)
    next_ids = batch[:, 1:S].reshape(-1)  # token t+1 for positions t = 0 .. S-2
    seqs = [(slice(i * (S - 1), (i + 1) * (S - 1)), torch.arange(S - 1), LayerState.empty(cfg, cfg.num_hidden_layers))
            for i in range(len(batch))]
    x = model.mtp[0](streams, model.embed(next_ids), next_ids, seqs)
    mtp = F.cross_entropy(model.head(x), batch[:, 2:].reshape(-1))
    return loss, mtp


@torch.no_grad()
def eval_loss(logits_fn, wins: torch.Tensor, batch: int = 8) -> float:
    """Mean next-token loss over windows [n, S+1], each from a fresh state."""
    total, count = 0.0, 0
    for i in range(0, len(wins), batch):
        chunk = wins[i:i + batch]
        for row, lg in zip(chunk, logits_fn([r[:-1] for r in chunk])):
            total += F.cross_entropy(lg.float(), row[1:], reduction="sum").item()
            count += len(row) - 1
    return total / max(count, 1)


def lr_at(step: int, total: int, peak: float, warmup: int, final_frac: float) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * p)))


# ------------------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "samples" / "models" / "flash-small")
    ap.add_argument("--preset", default="flash-small")
    ap.add_argument("--minutes", type=float, default=30.0, help="wall-time budget for training (0: none)")
    ap.add_argument("--steps", type=int, default=0,
                    help="length of the LR schedule; 0: estimated from --minutes after the first steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=4, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--final-lr-frac", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--gamma", type=float, default=1e-3, help="router bias update speed")
    ap.add_argument("--mtp-weight", type=float, default=0.0, help="loss weight of the MTP block (0: MTP left at init)")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2, help="torch threads; on a shared, overloaded CPU 1 is far faster")
    ap.add_argument("--eval-windows", type=int, default=32, help="held-out windows scored at the end")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    cfg = ModelConfig.preset(args.preset)
    tok = Tokenizer.default()

    docs = collect_docs()
    train_docs, held_docs = split_docs(docs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "heldout.txt").write_text("".join(d + DOC_SEP for d in held_docs), encoding="utf-8")
    train_w = windows(token_stream(tok, train_docs), args.seq_len)
    held_w = windows(token_stream(tok, held_docs), args.seq_len)
    print(f"corpus: {len(docs)} docstrings from {len(corpus_modules())} modules; train {len(train_docs)} docs "
          f"({train_w.numel()} tokens, {len(train_w)} windows), held out {len(held_docs)} docs "
          f"({held_w.numel()} tokens, {len(held_w)} windows)", flush=True)

    model = build_model(cfg, train_init(cfg, args.seed))
    params = trainable(model)
    decay = [p for n, p in params if p.dim() >= 2 and n != "embed.weight"]
    no_decay = [p for n, p in params if not (p.dim() >= 2 and n != "embed.weight")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    gates = [(n, m) for n, m in model.named_modules() if isinstance(m, Gate) and not m.hashed]
    loads: dict[str, torch.Tensor] = {}
    for n, m in gates:
        def hook(mod, inp, out, n=n):
            loads[n] = loads.get(n, 0) + torch.bincount(out[1].reshape(-1), minlength=cfg.n_routed_experts)
        m.register_forward_hook(hook)
    print(f"model: {args.preset}, {param_count(cfg)['total'] / 1e6:.1f}M parameters (+MTP "
          f"{param_count(cfg)['mtp'] / 1e6:.1f}M), {sum(p.numel() for _, p in params) / 1e6:.1f}M trained", flush=True)

    budget = args.minutes * 60 if args.minutes > 0 else float("inf")
    total = args.steps or 0  # 0 until estimated
    gen = None
    order: torch.Tensor | None = None
    epoch, pos, step = -1, 0, 0
    t_train = time.time()
    hist: list[tuple[float, float]] = []
    stopped_by = "steps"
    while True:
        if total and step >= total:
            break
        if time.time() - t_train >= budget:
            stopped_by = "time"
            break
        if order is None or pos + args.batch > len(order):
            epoch, pos = epoch + 1, 0
            gen = torch.Generator().manual_seed(args.seed * 1000 + epoch)
            order = torch.randperm(len(train_w), generator=gen)
        batch = train_w[order[pos:pos + args.batch]]
        pos += args.batch
        sched_total = total or 10 ** 9
        lr = lr_at(step, sched_total, args.lr, args.warmup, args.final_lr_frac) if total else \
            args.lr * min(1.0, (step + 1) / args.warmup)
        for grp in opt.param_groups:
            grp["lr"] = lr
        t0 = time.time()
        loads.clear()
        loss, mtp = forward_loss(model, batch, args.mtp_weight)
        opt.zero_grad(set_to_none=True)
        (loss + args.mtp_weight * mtp).backward()
        gnorm = torch.nn.utils.clip_grad_norm_([p for _, p in params], args.clip)
        opt.step()
        with torch.no_grad():  # auxiliary-loss-free balancing
            for n, m in gates:
                if n not in loads:  # the MTP gate when the MTP block is not trained
                    continue
                ld = loads[n].float()
                m.bias += args.gamma * torch.sign(ld.mean() - ld)
        dt = time.time() - t0
        step += 1
        hist.append((loss.item(), mtp.item()))
        if not total and step == 5:  # plan the schedule from the measured step time
            per_step = (time.time() - t_train) / step
            total = max(step + 1, int((budget - (time.time() - t_train)) / per_step * 0.9) + step)
            print(f"planned {total} steps ({per_step:.1f} s/step measured); reproduce with --steps {total}", flush=True)
        if step % args.log_every == 0 or step == 1:
            el = time.time() - t_train
            print(f"step {step}/{total or '?'} ep {epoch} loss {loss.item():.3f} mtp {mtp.item():.3f} "
                  f"lr {lr:.2e} gnorm {float(gnorm):.2f} {batch[:, 1:].numel() / dt:.0f} tok/s "
                  f"elapsed {el / 60:.1f} min", flush=True)
    train_seconds = time.time() - t_train
    print(f"stopped after {step} steps ({stopped_by}), {train_seconds / 60:.1f} min", flush=True)

    model.eval()
    from safetensors.torch import save_file  # safetensors, never pickles

    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},  # kept outside the shipped tree
              str(Path(tempfile.gettempdir()) / f"{args.out.name}.fp32.safetensors"))
    eval_w = held_w[: args.eval_windows]  # the same windows for the fp32 and the release-format model
    held_fp32 = eval_loss(lambda chunk: model.forward_batch(chunk, [SeqState.empty(cfg) for _ in chunk]), eval_w)
    last = hist[-20:]
    train_loss = sum(h[0] for h in last) / max(1, len(last))
    print(f"held-out loss (fp32) {held_fp32:.3f}  ppl {math.exp(held_fp32):.1f}; train loss (last 20 steps) "
          f"{train_loss:.3f}", flush=True)

    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for f in args.out.glob("*.safetensors"):
        f.unlink()
    write_checkpoint(args.out, cfg, sd, "release", tokenizer_json=DEFAULT_PATH)

    from flashport import Engine

    engine = Engine.load(args.out, backend="torch")
    engine.model.set_ops(TrainOps(None))  # same math as the reference ops, faster routed-expert step on the CPU
    # engine.model is the Transformer Engine.load built from the quantized tensors (dequantized to fp32)
    held_q = eval_loss(lambda chunk: engine.model.forward_batch(chunk, [SeqState.empty(cfg) for _ in chunk]), eval_w)
    print(f"held-out loss (release-quantized checkpoint) {held_q:.3f}  ppl {math.exp(held_q):.1f}", flush=True)
    samples = {}
    for prompt in ("Return the", "def ", "The socket module"):
        samples[prompt] = engine.generate(prompt, max_new_tokens=24, temperature=0.0).text
        print(f"  {prompt!r} -> {samples[prompt]!r}", flush=True)
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    log = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable.split("/")[-1], "samples/train_tiny.py",
                                                      *(sys.argv[1:] if argv is None else argv)]),
        "reproduce_with": f"--steps {total}" + (f" (stopped at {step} by the time limit)" if stopped_by == "time"
                                                 and step < total else ""),
        "preset": args.preset, "seed": args.seed, "steps": step, "schedule_steps": total, "stopped_by": stopped_by,
        "epochs_started": epoch + 1, "batch": args.batch, "seq_len": args.seq_len, "lr": args.lr,
        "warmup": args.warmup, "tokens_seen": step * args.batch * args.seq_len,
        "train_tokens": int(train_w.numel()), "heldout_tokens": int(held_w.numel()),
        "eval_tokens": int(eval_w[:, 1:].numel()),
        "final_train_loss_last20": round(train_loss, 4), "final_mtp_loss_last20": round(
            sum(h[1] for h in last) / max(1, len(last)), 4),
        "heldout_loss_fp32": round(held_fp32, 4), "heldout_ppl_fp32": round(math.exp(held_fp32), 2),
        "heldout_loss_release": round(held_q, 4), "heldout_ppl_release": round(math.exp(held_q), 2),
        "train_seconds": round(train_seconds, 1), "wall_seconds": round(time.time() - t_start, 1),
        "threads": args.threads, "torch": torch.__version__, "python": sys.version.split()[0],
        "checkpoint_bytes": size, "samples": samples,
        "loss_every_10_steps": [round(h[0], 3) for h in hist[::10]],
    }
    (args.out / "train_log.json").write_text(json.dumps(log, indent=1))
    print(f"wrote {args.out} ({size / 1e6:.1f} MB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
