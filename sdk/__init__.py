"""flashport: run DeepSeek-V4-Flash-class MoE models on edge boxes and non-NVIDIA accelerators.

Public surface (kept stable):
    flashport.Engine.load(path, backend="auto")   -> Engine
    engine.logits(token_ids)                      -> torch.Tensor [len(token_ids), vocab] float32
    engine.generate(prompt_or_ids, max_new_tokens=..., temperature=0.0, top_p=1.0, seed=None, stream=False)
    flashport.ModelConfig, flashport.make_checkpoint
"""

__version__ = "0.1.0"

from .checkpoint import make_checkpoint  # noqa: E402
from .config import ModelConfig  # noqa: E402
from .engine import Engine, Generation  # noqa: E402

__all__ = ["Engine", "Generation", "ModelConfig", "make_checkpoint", "__version__"]
