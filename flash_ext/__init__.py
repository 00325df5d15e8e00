"""flash_ext: exact, fused, IO-aware attention for PyTorch.

CPU and CUDA kernels registered as ``torch.ops.flash_ext`` operators with
autograd and fake kernels (eager, ``torch.compile`` and LibTorch), behind a
drop-in ``scaled_dot_product_attention`` and FlashAttention's interfaces.
"""
from ._ops import ops
from ._support import cuda_built, last_cuda_kernel_family, set_cuda_path, support_table
from .attention import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
    is_strict,
    scaled_dot_product_attention,
    set_strict,
)
from .patching import is_patched, patch, unpatch

__version__ = "0.1.0"

__all__ = [
    "scaled_dot_product_attention", "flash_attn_func", "flash_attn_varlen_func", "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func",
    "flash_attn_with_kvcache", "patch", "unpatch", "is_patched", "set_strict", "is_strict", "cuda_built",
    "support_table", "set_cuda_path", "last_cuda_kernel_family", "ops", "__version__",
]
