"""Shared fixtures: small checkpoints made on the fly (deterministic), and the Triton interpreter switch."""

import os

# Triton kernels run on the CPU through the interpreter in CI (no GPU there); set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# `make test` runs two xdist workers on CI's two cores: one torch thread each. Two threads per worker
# oversubscribe the cores, and OpenMP's spin-waiting then makes small ops tens of times slower.
torch.set_num_threads(1)

from flashport.checkpoint import make_checkpoint, write_checkpoint, init_weights  # noqa: E402
from flashport.config import ModelConfig  # noqa: E402
from flashport.tokenizer import DEFAULT_PATH  # noqa: E402

# A second small config, different from flash-tiny in every dimension that has a code path of its own:
# other compression rates and window, two heads of 128, fewer hash layers, more experts per token.
ALT_CONFIG = dict(
    vocab_size=8192, hidden_size=256, num_hidden_layers=5, num_attention_heads=2, head_dim=128, qk_rope_head_dim=32,
    q_lora_rank=128, o_groups=2, o_lora_rank=128, n_routed_experts=6, num_experts_per_tok=3,
    moe_intermediate_size=96, num_hash_layers=2, csa_rate=4, hca_rate=16, sliding_window=24, index_n_heads=16,
    index_head_dim=64, index_topk=24, compress_ratios=[0, 4, 16, 4, 16], hc_sinkhorn_iters=10,
)


@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny-release"), "flash-tiny", seed=0, fmt="release")


@pytest.fixture
def no_tokenizer(tiny_release, tmp_path):
    """flash-tiny in the release layout without its tokenizer.json (token ids only)."""
    import shutil

    d = tmp_path / "ck"
    shutil.copytree(tiny_release, d)
    (d / "tokenizer.json").unlink()
    return d


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("tiny-hf"), "flash-tiny", seed=0, fmt="hf")


@pytest.fixture(scope="session")
def alt_release(tmp_path_factory):
    cfg = ModelConfig(**ALT_CONFIG, name="alt")
    return write_checkpoint(tmp_path_factory.mktemp("alt-release"), cfg, init_weights(cfg, seed=3), "release",
                            tokenizer_json=DEFAULT_PATH)
