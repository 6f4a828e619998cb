"""flashport.kernels: Triton kernels (CUDA, or the CPU interpreter with TRITON_INTERPRET=1),
each beside a plain-torch ``*_ref``. Wrappers pick Triton when ``triton_usable(x)``
(x.is_cuda or TRITON_INTERPRET=1) and the reference otherwise. See docs/kernels.md."""
from ._common import HAS_TRITON, triton_usable
from .attention import sparse_attn_decode, sparse_attn_decode_ref
from .compress import compress_pool, compress_pool_ref
from .moe import (moe_ffn, moe_ffn_ref, moe_grouped_gemm, moe_grouped_gemm_ref, moe_sort,
                  swiglu_clamped)
from .norm_rope import (rmsnorm, rmsnorm_ref, rmsnorm_unweighted, rmsnorm_unweighted_ref,
                        rope_interleaved, rope_interleaved_ref)
from .quant_gemm import (QuantWeight, dequant_int4_ref, dequant_int8_ref, dequant_mxfp4_ref,
                         int4_gemm, int4_gemm_ref, int8_gemm, int8_gemm_ref, mxfp4_gemm,
                         mxfp4_gemm_ref)

__all__ = [n for n in dir() if not n.startswith("_")]
