"""flashport: run DeepSeek-V4-Flash-class MoE models on edge boxes and non-NVIDIA accelerators.

Public surface (kept stable):
    flashport.load_engine(path, backend="auto", backend_options=None, device=None, deterministic=False,
                          kv=KVOptions(...) | None, offload=OffloadOptions(...) | None,
                          parallel=ParallelOptions(...) | None)  -> Engine   (Engine.load is the same call)
    engine.logits(token_ids)                      -> torch.Tensor [len(token_ids), vocab] float32
    engine.generate(prompt_or_ids, max_new_tokens=..., temperature=0.0, top_p=1.0, seed=None, stream=False)
    flashport.ModelConfig, flashport.make_checkpoint
"""

__version__ = "0.1.0"

from .checkpoint import make_checkpoint  # noqa: E402
from .config import ModelConfig  # noqa: E402
from .engine import Engine, Generation, load_engine  # noqa: E402
from .options import KVOptions, OffloadOptions, OptionError, ParallelOptions  # noqa: E402

__all__ = ["Engine", "Generation", "KVOptions", "ModelConfig", "OffloadOptions", "OptionError", "ParallelOptions",
           "load_engine", "make_checkpoint", "__version__"]
