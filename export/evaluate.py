"""Quality metrics: perplexity of a model on text and, against a reference model, the mean KL divergence and the
top-1 agreement of the next-token distributions.

    flashport eval BUNDLE --text heldout.txt --reference CHECKPOINT [--max-tokens 1024]

Both models read the same token ids (BOS + the text, never control tokens) through `Engine.logits` in fp32.
KL(reference || model) is averaged over positions in nats; top-1 agreement is the share of positions where both
argmaxes agree. Perplexity = exp(mean negative log-likelihood of each next token).
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..engine import Engine
from .calibrate import read_text_arg


@dataclass
class Quality:
    tokens: int            # positions scored
    perplexity: float
    kl: float | None = None          # mean KL(reference || model), nats
    top1_agreement: float | None = None
    ref_perplexity: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def text_ids(engine: Engine, text: str | Path, max_tokens: int) -> list[int]:
    """BOS + the tokens of `text` (a file path or the text itself), at most max_tokens ids."""
    ids = engine.encode(read_text_arg(text))[:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"evaluation text {str(text)[:60]!r} has fewer than 2 tokens")
    return ids


def _load(m: str | Path | Engine) -> Engine:
    return m if isinstance(m, Engine) else Engine.load(m)


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    """exp of the mean NLL of ids[1:] under logits[:-1] ([T, V])."""
    logp = torch.log_softmax(logits[:-1].double(), -1)
    nll = -logp.gather(1, torch.tensor(ids[1:])[:, None]).mean()
    return float(math.exp(nll))


def compare(logits: torch.Tensor, ref_logits: torch.Tensor) -> tuple[float, float]:
    """(mean KL(ref || model) in nats, top-1 agreement) over positions of two [T, V] logit tensors."""
    lp, lq = torch.log_softmax(ref_logits.double(), -1), torch.log_softmax(logits.double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).clamp(min=0).mean()
    agree = (ref_logits.argmax(-1) == logits.argmax(-1)).double().mean()
    return float(kl), float(agree)


def evaluate(model: str | Path | Engine, text: str | Path, reference: str | Path | Engine | None = None,
             max_tokens: int = 1024, progress: bool = False) -> Quality:
    """Quality of `model` on `text`; progress: one status line per stage on stderr (loading, scoring)."""
    def status(msg: str) -> None:
        if progress:
            print(f"eval: {msg}", file=sys.stderr, flush=True)

    status(f"loading {model}")
    eng = _load(model)
    ids = text_ids(eng, text, max_tokens)
    status(f"scoring {len(ids)} tokens")
    logits = eng.logits(ids)
    q = Quality(len(ids) - 1, perplexity(logits, ids))
    if reference is not None:
        status(f"loading reference {reference}")
        ref = _load(reference)
        if ref.cfg.vocab_size != eng.cfg.vocab_size:
            raise ValueError(f"reference vocabulary {ref.cfg.vocab_size} != model vocabulary {eng.cfg.vocab_size}")
        status(f"scoring {len(ids)} tokens on the reference")
        ref_logits = ref.logits(ids)
        q.kl, q.top1_agreement = compare(logits, ref_logits)
        q.ref_perplexity = perplexity(ref_logits, ids)
    return q


def eval_cli(path: str, text: str, reference: str | None = None, max_tokens: int = 1024, json: bool = False) -> str:
    """Perplexity of PATH (checkpoint or bundle) on TEXT (a file); with --reference PATH also the mean KL divergence
    and top-1 agreement of next-token distributions against that model, on the same tokens."""
    q = evaluate(path, text, reference, max_tokens, progress=True)
    if json:
        import json as _json

        return _json.dumps(q.as_dict(), indent=2)
    out = f"{path}: perplexity {q.perplexity:.3f} over {q.tokens} tokens"
    if reference is not None:
        out += (f"; against {reference} (perplexity {q.ref_perplexity:.3f}): mean KL {q.kl:.5f} nats, "
                f"top-1 agreement {100 * q.top1_agreement:.1f}%")
    return out


def quality_table(reference: str | Path, bundles: dict[str, str | Path], text: str | Path,
                  max_tokens: int = 1024) -> tuple[str, dict[str, Quality]]:
    """Rows of evaluate(bundle, text, reference) per named bundle, plus the reference itself."""
    ref = _load(reference)
    results = {"reference": evaluate(ref, text, None, max_tokens)}
    for name, b in bundles.items():
        results[name] = evaluate(b, text, ref, max_tokens)
    rows = [f"{'model':<16} {'perplexity':>10} {'mean KL (nats)':>15} {'top-1 agree':>12}"]
    for name, q in results.items():
        kl = "-" if q.kl is None else f"{q.kl:.5f}"
        ag = "-" if q.top1_agreement is None else f"{100 * q.top1_agreement:.1f}%"
        rows.append(f"{name:<16} {q.perplexity:>10.3f} {kl:>15} {ag:>12}")
    return "\n".join(rows), results
