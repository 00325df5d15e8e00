"""The public attention functions: a drop-in for PyTorch's
``scaled_dot_product_attention``, FlashAttention's ``flash_attn_func``, its
variable-length and packed variants, and ``flash_attn_with_kvcache``. Argument
handling lives here; the work is done by the ``torch.ops.flash_ext``
operators."""
from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import _support
from ._ops import ops

# PyTorch's own SDPA, kept before flash_ext.patch() can replace it.
torch_sdpa = F.scaled_dot_product_attention

_strict = False
_warned: set[str] = set()


def set_strict(strict: bool) -> None:
    """When strict, an input our kernels cannot serve raises instead of
    falling back to PyTorch's own SDPA with a warning."""
    global _strict
    _strict = bool(strict)


def is_strict() -> bool:
    """Whether fallbacks raise (see :func:`set_strict`)."""
    return _strict


def _fall_back(reason: str) -> None:
    if _strict:
        raise RuntimeError(f"flash_ext cannot serve this call (strict mode): {reason}")
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"flash_ext falls back to PyTorch's scaled_dot_product_attention: {reason}",
                      stacklevel=3)


def _broadcast(a: Sequence[int], b: Sequence[int]) -> bool:
    """Whether shapes a and b broadcast together: torch.broadcast_shapes'
    rule, at a fraction of its cost (this check runs on every call)."""
    return all(x == y or x == 1 or y == 1 for x, y in zip(reversed(a), reversed(b)))


def _softmax_scale(fn: str, scale: float | None, head_dim: int) -> float:
    """The factor the scores get: ``scale`` if given (a finite number, named
    in the error otherwise), else ``1/sqrt(head_dim)`` (1 for an empty head
    dim, whose scores are all 0 whatever the factor)."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    if not isinstance(scale, (numbers.Real, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"{fn}: scale must be a float or None, got {type(scale).__name__}")
    value = float(scale)
    if not math.isfinite(value):
        raise ValueError(f"{fn}: scale must be finite, got {scale}")
    return value


def _dropout_fallback(dropout_p: float) -> str | None:
    """Refuses a dropout_p outside [0, 1] (naming it); 1, which PyTorch
    defines (every weight dropped, output 0), is left to PyTorch's SDPA:
    the reason to fall back, else None."""
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"scaled_dot_product_attention: dropout_p must be in [0, 1], got {dropout_p}")
    return "dropout_p = 1 (every weight dropped)" if dropout_p == 1.0 else None


def _check_sdpa_inputs(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attn_mask: torch.Tensor | None, dropout_p: float, is_causal: bool,
                       scale: float | None, enable_gqa: bool) -> None:
    """The errors PyTorch's SDPA raises, with the argument named."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"scaled_dot_product_attention: {name} must be a Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"scaled_dot_product_attention: {name} must be a floating-point tensor, got {t.dtype}")
        if t.dim() < 2:
            raise ValueError(f"scaled_dot_product_attention: {name} must have at least 2 dimensions "
                             f"(..., seq, dim), got {t.dim()}-D")
    if not (query.dtype == key.dtype == value.dtype):
        raise RuntimeError("scaled_dot_product_attention: query, key and value must have the same dtype, "
                           f"got {query.dtype}, {key.dtype} and {value.dtype}")
    if not (query.device == key.device == value.device):
        raise RuntimeError("scaled_dot_product_attention: query, key and value must be on the same device, "
                           f"got {query.device}, {key.device} and {value.device}")
    if query.shape[-1] != key.shape[-1]:
        raise RuntimeError("scaled_dot_product_attention: query and key must have the same head dim, "
                           f"got {query.shape[-1]} and {key.shape[-1]}")
    if key.shape[-2] != value.shape[-2]:
        raise RuntimeError("scaled_dot_product_attention: key and value must have the same sequence "
                           f"length, got {key.shape[-2]} and {value.shape[-2]}")
    if query.dim() >= 4 and key.dim() >= 4 and not _broadcast(query.shape[:-3], key.shape[:-3]):
        raise RuntimeError(f"scaled_dot_product_attention: query batch dims {tuple(query.shape[:-3])} and key "
                           f"batch dims {tuple(key.shape[:-3])} do not broadcast")
    if key.shape[:-2] != value.shape[:-2]:
        raise RuntimeError("scaled_dot_product_attention: key and value must have the same batch and "
                           f"head sizes, got {tuple(key.shape[:-2])} and {tuple(value.shape[:-2])}")
    if query.dim() >= 3 and key.dim() >= 3 and query.shape[-3] != key.shape[-3]:
        # Without enable_gqa a single head broadcasts over the other side's, as any batch dim does.
        if not enable_gqa and 1 not in (query.shape[-3], key.shape[-3]):
            raise RuntimeError(f"scaled_dot_product_attention: query has {query.shape[-3]} heads but key/value "
                               f"have {key.shape[-3]}; pass enable_gqa=True for grouped-query attention")
        if enable_gqa and query.shape[-3] % key.shape[-3]:
            raise RuntimeError(f"scaled_dot_product_attention: query heads ({query.shape[-3]}) must be a "
                               f"multiple of key/value heads ({key.shape[-3]}) for grouped-query attention")
    if attn_mask is not None:
        if is_causal:
            raise RuntimeError("scaled_dot_product_attention: explicit attn_mask should not be set when "
                               "is_causal=True")
        if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
            raise TypeError(f"scaled_dot_product_attention: attn_mask must be bool or floating-point, "
                            f"got {attn_mask.dtype}")
        if attn_mask.device != query.device:
            raise RuntimeError(f"scaled_dot_product_attention: attn_mask must be on the query's device "
                               f"({query.device}), got {attn_mask.device}")
        target = (*query.shape[:-1], key.shape[-2])
        if not _broadcast(attn_mask.shape, target):
            raise RuntimeError(f"scaled_dot_product_attention: attn_mask of shape {tuple(attn_mask.shape)} "
                               f"does not broadcast to (..., L, S) = {tuple(target)}")


# Device types that have an autocast state, found once at import:
# torch.amp.is_autocast_available is not traceable by every torch.compile
# (2.11's Dynamo refuses it), and is_autocast_enabled raises for the others.
_AUTOCAST_DEVICE_TYPES = frozenset(
    d for d in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", torch._C._get_privateuse1_backend_name())
    if torch.amp.is_autocast_available(d))


def _autocast(tensors: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """PyTorch's autocast rule for SDPA (``lower_precision_fp``): inside an
    enabled ``torch.autocast`` region of the inputs' device type, every
    floating-point tensor argument, the float mask included, is cast to the
    region's dtype."""
    first = next(t for t in tensors if t is not None)
    device_type = first.device.type
    if device_type not in _AUTOCAST_DEVICE_TYPES or not torch.is_autocast_enabled(device_type):
        return list(tensors)
    dtype = torch.get_autocast_dtype(device_type)
    return [t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != dtype else t
            for t in tensors]


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    """(*batch, H, N, D) with any number of leading dims as (B, H, N, D); a
    3-D (H, N, D) is one batch entry, so that GQA groups its leading dim."""
    if t.dim() == 2:
        return t.unsqueeze(0).unsqueeze(0)
    if t.dim() == 3:
        return t.unsqueeze(0)
    # math.prod, not -1: a zero-size batch dimension leaves -1 ambiguous.
    return t.reshape(math.prod(t.shape[:-3]), *t.shape[-3:]) if t.dim() > 4 else t


def _mask_as_4d(mask: torch.Tensor, full: tuple[int, ...]) -> torch.Tensor:
    """The mask as the op takes it: 4-D, (batch, heads, L, S) or 1 in each
    dimension it broadcasts over. Not expanded: the op then sums the mask's
    gradient over those dimensions in float32 and rounds once, where autograd's
    sum for an expand would add terms each rounded to fp16/bf16."""
    mask = mask.reshape((1,) * (len(full) - mask.dim()) + tuple(mask.shape))
    if len(full) <= 4:
        return mask.reshape((1,) * (4 - len(full)) + tuple(mask.shape))
    # More than one batch dim: they merge into one, broadcast only if all are.
    if all(n == 1 for n in mask.shape[:-3]):
        return mask.reshape(1, *mask.shape[-3:])
    return mask.expand(*full[:-3], *mask.shape[-3:]).reshape(math.prod(full[:-3]), *mask.shape[-3:])


def scaled_dot_product_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
    scale: float | None = None, enable_gqa: bool = False,
) -> torch.Tensor:
    """Drop-in replacement for :func:`torch.nn.functional.scaled_dot_product_attention`.

    Same signature and semantics: ``query (..., L, E)``, ``key (..., S, E)``,
    ``value (..., S, Ev)``; a boolean ``attn_mask`` keeps the positions that are
    True, a float one is added to the scores, either broadcast to
    ``(..., L, S)``; ``is_causal`` aligns the causal mask to the top left as
    PyTorch does when ``L != S``; ``scale`` defaults to ``1/sqrt(E)``;
    ``enable_gqa`` lets several query heads share one key/value head.

    Jagged nested tensors ``(B, H, j, E)`` (``torch.nested`` with
    ``layout=torch.jagged``, transposed from ``(B, j, H, E)``) run through the
    variable-length kernels without padding and return a nested tensor, as
    PyTorch's SDPA does; ``is_causal`` aligns each sequence top-left.

    Inside ``torch.autocast``, floating-point inputs are cast to the autocast
    dtype first, as PyTorch's SDPA does.

    Differences: a query row whose keys are all masked out gives 0 (and zero
    gradients) where PyTorch's math backend gives NaN. Inputs our kernels do
    not serve go to PyTorch's SDPA with a one-time warning, or raise under
    :func:`flash_ext.set_strict`.
    """
    if all(isinstance(t, torch.Tensor) for t in (query, key, value)):
        query, key, value, attn_mask = _autocast((query, key, value, attn_mask))
    if any(isinstance(t, torch.Tensor) and t.is_nested for t in (query, key, value)):
        return _nested_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    _check_sdpa_inputs(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    softmax_scale = _softmax_scale("scaled_dot_product_attention", scale, query.shape[-1])
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (query, key, value, attn_mask))
    bias_grad = attn_mask is not None and attn_mask.requires_grad and attn_mask.dtype != torch.bool
    reason = _dropout_fallback(dropout_p) or _sdpa_layout_reason(query, key, value)
    if reason is None:
        reason = _support.prefill_unsupported_reason(query, key, value, attn_mask, dropout_p, needs_grad,
                                                     bias_grad, scale=scale)
    if reason is not None:
        _fall_back(reason)
        if scale is not None and scale <= 0 and query.is_cuda:
            # PyTorch's fused CUDA kernels return NaN for scale = 0: its math backend does not.
            with sdpa_kernel([SDPBackend.MATH]):
                return torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                  is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        return torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                          scale=scale, enable_gqa=enable_gqa)

    q4, k4, v4 = (_as_4d(t) for t in (query, key, value))
    q4, k4, v4 = (t if _layout_served(t) else t.contiguous() for t in (q4, k4, v4))
    mask4 = None
    if attn_mask is not None:
        if attn_mask.dtype not in (torch.bool, query.dtype):
            attn_mask = attn_mask.to(query.dtype)
        mask4 = _mask_as_4d(attn_mask, (*query.shape[:-1], key.shape[-2]))
    out, _ = ops.attention(q4, k4, v4, mask4, float(dropout_p), softmax_scale, -1, 0 if is_causal else -1,
                           False, False)
    return out if query.dim() == 4 else out.reshape(*query.shape[:-1], value.shape[-1])


def _nested_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attn_mask: torch.Tensor | None, dropout_p: float, is_causal: bool, scale: float | None,
                 enable_gqa: bool) -> torch.Tensor:
    """SDPA on jagged nested tensors ``(B, H, j, E)`` through the varlen op."""
    reason = _dropout_fallback(dropout_p) or _nested_reason(query, key, value, attn_mask, enable_gqa)
    if reason is None:
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, j, H, E), ragged dim 1
        q_values, k_values, v_values = (t.values() for t in (q, k, v))
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        reason = _support.prefill_unsupported_reason(
            q_values.unsqueeze(0).transpose(1, 2), k_values.unsqueeze(0).transpose(1, 2),
            v_values.unsqueeze(0).transpose(1, 2), None, dropout_p, needs_grad, False, scale=scale, varlen=True)
    if reason is not None:
        _fall_back(reason)
        return torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                          scale=scale, enable_gqa=enable_gqa)
    q_values, k_values, v_values = (t if _layout_served(t) else t.contiguous()
                                    for t in (q_values, k_values, v_values))
    softmax_scale = _softmax_scale("scaled_dot_product_attention", scale, query.shape[-1])
    out, _ = ops.attention_varlen(q_values, k_values, v_values, q.offsets().to(torch.int32),
                                  k.offsets().to(torch.int32), _max_seqlen(q), _max_seqlen(k), float(dropout_p),
                                  softmax_scale, -1, 0 if is_causal else -1, False, False)
    out = torch.nested.nested_tensor_from_jagged(out, q.offsets(), min_seqlen=q._maybe_min_seqlen,
                                                 max_seqlen=q._maybe_max_seqlen)
    return out.transpose(1, 2)


def _nested_reason(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attn_mask: torch.Tensor | None, enable_gqa: bool) -> str | None:
    """Nested inputs outside what the varlen op takes: (B, H, j, E) jagged
    tensors ragged in the sequence dim only, without holes, no attn_mask."""
    if not all(isinstance(t, torch.Tensor) and t.is_nested and t.layout == torch.jagged
               for t in (query, key, value)):
        return "nested tensors are served when query, key and value are all jagged (layout=torch.jagged)"
    if attn_mask is not None:
        return "nested tensors with an attn_mask are not served"
    for t in (query, key, value):
        if t.dim() != 4 or t._ragged_idx != 2 or t._lengths is not None:
            return "nested tensors are served as (batch, heads, jagged seq, dim) without holes (lengths)"
    if query.shape[0] != key.shape[0] or key.shape[0] != value.shape[0]:
        return "nested query, key and value must have the same batch size"
    if key.offsets() is not value.offsets():
        # Under torch.compile comparing the values would be data-dependent.
        if torch.compiler.is_compiling():
            return "under torch.compile, nested key and value must share their offsets tensor"
        if not torch.equal(key.offsets(), value.offsets()):
            return "nested key and value must have the same sequence lengths"
    if query.shape[-1] != key.shape[-1] or query.dtype != key.dtype or key.dtype != value.dtype:
        return "nested query and key must share head dim and dtype"
    if key.shape[1] != value.shape[1] or (query.shape[1] != key.shape[1] and
                                          (not enable_gqa or query.shape[1] % key.shape[1])):
        return "nested query heads must equal key/value heads (or be a multiple with enable_gqa)"
    return None


def _max_seqlen(t: torch.Tensor) -> int | torch.SymInt:
    """The longest sequence of a jagged tensor: cached by PyTorch (a SymInt
    under torch.compile), else read from its offsets (a device sync on CUDA,
    as in PyTorch's own SDPA)."""
    cached = t._maybe_max_seqlen
    if cached is not None:
        return cached
    offsets = t.offsets()
    return int((offsets[1:] - offsets[:-1]).max().item()) if offsets.numel() > 1 else 0


def _layout_served(t: torch.Tensor) -> bool:
    """Whether the ops take ``t`` as it is: a contiguous last dimension (the
    ops copy what else a device's kernels need, see readable_layout in
    csrc/ops/backend.h)."""
    return t.stride(-1) == 1 or t.shape[-1] == 1


def _sdpa_layout_reason(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> str | None:
    """Inputs outside the (B, H, N, D) model our kernels use, and the
    degenerate shapes PyTorch defines that no kernel should carry."""
    if query.dim() != key.dim() or query.shape[:-3] != key.shape[:-3]:
        return "query and key/value batch dimensions differ (broadcast batch)"
    if query.dim() >= 3 and query.shape[-3] == 1 and key.shape[-3] > 1:
        return "one query head broadcast over several key/value heads"
    if query.shape[-1] == 0 or value.shape[-1] == 0:
        return "a head dim of size 0"
    return None


def flash_attn_func(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
    softmax_scale: float | None = None, causal: bool = False,
    window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False, return_attn_probs: bool = False, return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """FlashAttention's interface on ``(batch, seq, heads, dim)`` tensors.

    ``causal`` aligns to the bottom right (query i of L sees keys
    ``j <= i + S - L``), as FlashAttention does; ``window_size=(left, right)``
    limits each query to that many keys before/after its diagonal (-1 =
    unbounded). ``softcap > 0`` caps the scaled scores at
    ``softcap * tanh(s / softcap)`` (Gemma-2); ``alibi_slopes`` ``(heads,)`` or
    ``(batch, heads)`` float32 subtract ``slope * |i + S - L - j|`` (ALiBi).
    Returns the output ``(batch, seq, heads, dim_v)``, and the log-sum-exp
    ``(batch, heads, seq)`` (float32; float64 for float64 inputs) when
    ``return_lse``; ``return_attn_probs`` gives FlashAttention's
    ``(out, lse, None)``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"flash_attn_func: {name} must be 4-D (batch, seq, heads, dim), got {t.dim()}-D")
    left, right = _window("flash_attn_func", window_size, causal)
    scale = _softmax_scale("flash_attn_func", softmax_scale, q.shape[-1])
    reason = _support.prefill_unsupported_reason(
        q, k, v, None, dropout_p, torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)), False,
        softcap=softcap, alibi=alibi_slopes is not None, scale=scale)
    if reason is not None:
        raise RuntimeError(f"flash_attn_func: {reason}")
    q, k, v = (t if _layout_served(t) else t.contiguous() for t in (q, k, v))
    out, lse = ops.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, float(dropout_p),
                             scale, left, right, True, bool(deterministic), float(softcap), alibi_slopes)
    return _results(out.transpose(1, 2), lse, return_lse, return_attn_probs)


def _window(fn: str, window_size: tuple[int, int], causal: bool) -> tuple[int, int]:
    """(left, right) from FlashAttention's window_size and causal flag."""
    if len(window_size) != 2:
        raise ValueError(f"{fn}: window_size must be (left, right), got {window_size}")
    left, right = (int(w) for w in window_size)
    return left, 0 if causal else right


def _results(out: torch.Tensor, lse: torch.Tensor, return_lse: bool, return_attn_probs: bool):
    """FlashAttention's return conventions: ``return_attn_probs`` gives
    (out, lse, None) -- the probabilities are never materialized --, ours
    ``return_lse`` gives (out, lse)."""
    if return_attn_probs:
        return out, lse, None
    return (out, lse) if return_lse else out


def flash_attn_varlen_func(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0, softmax_scale: float | None = None,
    causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None, deterministic: bool = False, return_attn_probs: bool = False,
    return_lse: bool = False,
):
    """FlashAttention's variable-length interface: sequences packed without padding.

    ``q (total_q, heads, dim)``, ``k``/``v (total_k, kv_heads, dim)``;
    sequence b is rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of q against rows
    ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` of k and v (int32 ``(batch + 1,)``
    on the tensors' device, starting at 0, nondecreasing, ending at the
    total). ``max_seqlen_q``/``max_seqlen_k`` bound the lengths. Each sequence
    is attended alone, nothing is computed for padding; ``causal`` aligns to
    the bottom right of each sequence, other arguments as in
    :func:`flash_attn_func` (``alibi_slopes`` ``(heads,)`` or ``(batch,
    heads)``). Returns the output ``(total_q, heads, dim_v)``, with
    ``return_lse`` also the log-sum-exp ``(heads, total_q)``; with
    ``return_attn_probs`` (FlashAttention's flag) ``(out, lse, None)``.

    On CUDA the cu_seqlens values are not read back (that would synchronize):
    kernels clamp them to the tensors, but rows outside every sequence, or
    past ``max_seqlen``, are then left undefined. On the CPU they raise.
    """
    fn = "flash_attn_varlen_func"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 3:
            raise ValueError(f"{fn}: {name} must be 3-D (total_tokens, heads, dim), got {t.dim()}-D")
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be an int32 tensor, got {type(t).__name__}")
    left, right = _window(fn, window_size, causal)
    scale = _softmax_scale(fn, softmax_scale, q.shape[-1])
    q4, k4, v4 = (t.unsqueeze(0).transpose(1, 2) for t in (q, k, v))
    reason = _support.prefill_unsupported_reason(
        q4, k4, v4, None, dropout_p, torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)), False,
        softcap=softcap, alibi=alibi_slopes is not None, scale=scale, varlen=True)
    if reason is not None:
        raise RuntimeError(f"{fn}: {reason}")
    q, k, v = (t if _layout_served(t) else t.contiguous() for t in (q, k, v))
    out, lse = ops.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    float(dropout_p), scale, left, right, True, bool(deterministic),
                                    float(softcap), alibi_slopes)
    return _results(out, lse, return_lse, return_attn_probs)


def _unpack(fn: str, packed: torch.Tensor, name: str, dim: int, count: int) -> tuple[torch.Tensor, ...]:
    """Views of the ``count`` tensors packed along ``dim`` (no copy; gradients
    flow back into ``packed``)."""
    rank = dim + 3
    if not isinstance(packed, torch.Tensor) or packed.dim() != rank or packed.shape[dim] != count:
        layout = ("batch, seq, " if dim == 2 else "total_tokens, ") + f"{count}, heads, dim"
        got = f"shape {tuple(packed.shape)}" if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise ValueError(f"{fn}: {name} must be {rank}-D ({layout}), got {got}")
    return packed.unbind(dim)


def flash_attn_qkvpacked_func(
    qkv: torch.Tensor, dropout_p: float = 0.0, softmax_scale: float | None = None, causal: bool = False,
    window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False, return_attn_probs: bool = False, return_lse: bool = False,
):
    """:func:`flash_attn_func` on ``qkv (batch, seq, 3, heads, dim)``, read in
    place; gradients flow to ``qkv``."""
    q, k, v = _unpack("flash_attn_qkvpacked_func", qkv, "qkv", 2, 3)
    out, lse = flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                               deterministic, return_lse=True)
    return _results(out, lse, return_lse, return_attn_probs)


def flash_attn_kvpacked_func(
    q: torch.Tensor, kv: torch.Tensor, dropout_p: float = 0.0, softmax_scale: float | None = None,
    causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None, deterministic: bool = False, return_attn_probs: bool = False,
    return_lse: bool = False,
):
    """:func:`flash_attn_func` with ``kv (batch, seq_k, 2, kv_heads, dim)``,
    read in place; gradients flow to ``kv``."""
    k, v = _unpack("flash_attn_kvpacked_func", kv, "kv", 2, 2)
    out, lse = flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                               deterministic, return_lse=True)
    return _results(out, lse, return_lse, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(
    qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, dropout_p: float = 0.0,
    softmax_scale: float | None = None, causal: bool = False, window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0, alibi_slopes: torch.Tensor | None = None, deterministic: bool = False,
    return_attn_probs: bool = False, return_lse: bool = False,
):
    """:func:`flash_attn_varlen_func` on ``qkv (total_tokens, 3, heads, dim)``
    with one ``cu_seqlens`` for queries and keys; gradients flow to ``qkv``."""
    q, k, v = _unpack("flash_attn_varlen_qkvpacked_func", qkv, "qkv", 1, 3)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs, return_lse)


def flash_attn_varlen_kvpacked_func(
    q: torch.Tensor, kv: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int, max_seqlen_k: int, dropout_p: float = 0.0, softmax_scale: float | None = None,
    causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None, deterministic: bool = False, return_attn_probs: bool = False,
    return_lse: bool = False,
):
    """:func:`flash_attn_varlen_func` with ``kv (total_k, 2, kv_heads, dim)``;
    gradients flow to ``kv``."""
    k, v = _unpack("flash_attn_varlen_kvpacked_func", kv, "kv", 1, 2)
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs, return_lse)


def flash_attn_with_kvcache(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor | None = None,
    v: torch.Tensor | None = None, cache_seqlens: torch.Tensor | int | None = None,
    softmax_scale: float | None = None, causal: bool = True, num_splits: int = 0,
    return_lse: bool = False, block_table: torch.Tensor | None = None, softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None, window_size: tuple[int, int] = (-1, -1),
    return_softmax_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Decoding against a KV cache, FlashAttention's interface.

    ``q (batch, q_len, heads, dim)`` attends to ``cache_seqlens[b]`` cached
    keys of ``k_cache``/``v_cache`` ``(batch, max_len, kv_heads, dim)``, or of
    a paged cache ``(num_pages, page_size, kv_heads, dim)`` addressed through
    ``block_table (batch, max_pages)`` (int32). When ``k``/``v``
    ``(batch, new_len, kv_heads, dim)`` are given they are first written into
    the cache at ``cache_seqlens`` (in place) and attended too; the caller
    advances ``cache_seqlens``. With ``causal``, new query t sees the keys up
    to its own position ``cache_seqlens[b] + new_len - q_len + t``;
    ``window_size=(left, right)`` limits it to that many keys before/after
    that position (-1 = unbounded; sliding-window models such as Mistral),
    and only the tiles inside some token's window are read. The cache is
    split across ``num_splits`` partitions (0 = chosen from the device) whose
    partial results merge through their log-sum-exp. Returns the output
    ``(batch, q_len, heads, dim)`` and, with ``return_lse`` (or
    FlashAttention's name ``return_softmax_lse``), the log-sum-exp
    ``(batch, heads, q_len)``. ``softcap`` and ``alibi_slopes`` as in
    :func:`flash_attn_func` (ALiBi distance from each new query's own
    position).

    On CUDA, lengths and page ids are not read back to the host (that would
    synchronize): out-of-range values there are the caller's error.
    """
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"flash_attn_with_kvcache: {name} must be a 4-D tensor")
    if not q.dtype.is_floating_point:
        raise TypeError(f"flash_attn_with_kvcache: q must be a floating-point tensor, got {q.dtype}")
    batch = q.shape[0]
    if cache_seqlens is None:
        if k is not None:
            raise ValueError("flash_attn_with_kvcache: cache_seqlens is required when appending k/v")
        cache_seqlens = k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device)
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"flash_attn_with_kvcache: cache_seqlens must be an int32 tensor or an int, "
                        f"got {type(cache_seqlens).__name__}")
    scale = _softmax_scale("flash_attn_with_kvcache", softmax_scale, q.shape[-1])
    left, right = _window("flash_attn_with_kvcache", window_size, causal)
    reason = _support.decode_unsupported_reason(q, v_cache, softcap=softcap, alibi=alibi_slopes is not None)
    if reason is not None:
        raise RuntimeError(f"flash_attn_with_kvcache: {reason}")
    out, lse = ops.kvcache_attention(q, k_cache, v_cache, k, v, cache_seqlens, block_table, scale, bool(causal),
                                     int(num_splits), float(softcap), alibi_slopes, left, right)
    return (out, lse) if return_lse or return_softmax_lse else out
