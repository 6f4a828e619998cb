"""Greedy decoding through transformers' model and through flashport's reference model, the same way for every
parity test (imported by test_parity.py and test_transformers_layouts.py)."""

import torch

from flashport.model import SeqState


def hf_greedy(hf, ids, n):
    """n greedy tokens of transformers' DeepseekV4ForCausalLM after ids [T], with its own cache."""
    out, toks = hf(input_ids=ids[None], use_cache=True), []
    for _ in range(n):
        tok = out.logits[0, -1].argmax()
        toks.append(int(tok))
        out = hf(input_ids=tok.view(1, 1), cache=out.cache, use_cache=True)
    return toks


def ours_greedy(model, ids, n):
    """n greedy tokens of flashport's Transformer after ids [T], one token per step on its decoding state."""
    state = SeqState.empty(model.cfg)
    logits, toks = model(ids, state)[-1], []
    for _ in range(n):
        toks.append(int(logits.argmax()))
        logits = model(torch.tensor([toks[-1]]), state)[-1]
    return toks
