"""Routing ``torch.nn.functional.scaled_dot_product_attention`` to flash_ext,
so unchanged model code (nanoGPT, Hugging Face's "sdpa" attention) uses it."""
from __future__ import annotations

import torch.nn.functional as F

from .attention import scaled_dot_product_attention, torch_sdpa


class patch:
    """Swap flash_ext in for ``F.scaled_dot_product_attention``.

    Use as a context manager (``with flash_ext.patch(): model(x)``) or as a
    plain call, undone by :func:`unpatch`. Nested uses restore on the way out.
    """

    _depth = 0

    def __init__(self) -> None:
        patch._depth += 1
        F.scaled_dot_product_attention = scaled_dot_product_attention

    def __enter__(self) -> "patch":
        return self

    def __exit__(self, *exc_info: object) -> None:
        patch._depth = max(0, patch._depth - 1)
        if patch._depth == 0:
            F.scaled_dot_product_attention = torch_sdpa


def unpatch() -> None:
    """Restore PyTorch's own ``F.scaled_dot_product_attention``."""
    patch._depth = 0
    F.scaled_dot_product_attention = torch_sdpa


def is_patched() -> bool:
    """Whether ``F.scaled_dot_product_attention`` is flash_ext's."""
    return F.scaled_dot_product_attention is scaled_dot_product_attention
