"""Hugging Face ``transformers``' GPT-2 on flash_ext, through its attention registry.

:func:`register` adds ``"fext"`` (see :data:`NAME`) to ``AttentionInterface`` (the attention
function) and ``AttentionMaskInterface`` (the mask it gets: SDPA's, which is
None for an unpadded causal batch, so ``is_causal=True`` reaches our kernel);
then ``attn_implementation="fext"`` selects it like ``"sdpa"``. The model
is built from a config: no weights are downloaded.

Run ``python examples/hf_gpt2.py`` to compare it with ``"eager"`` on the same
weights.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AttentionInterface, GPT2Config, GPT2LMHeadModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the extension is built in place
import flash_ext  # noqa: E402

# Not "flash_ext": transformers takes every implementation whose name contains "flash" for a
# FlashAttention kernel to import (transformers.utils.generic.is_flash_attention_requested).
NAME = "fext"


def flash_ext_attention_forward(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
    is_causal: bool | None = None, **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query (B, H, T, D)``,
    ``key``/``value (B, Hkv, S, D)``, a boolean or additive mask or None;
    returns ``(B, T, H, D)`` and no attention weights (as "sdpa" does)."""
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # One query (decoding) sees every cached key; a mask, when given, already holds causality.
    is_causal = bool(is_causal) and query.shape[2] > 1 and attention_mask is None
    out = flash_ext.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=is_causal,
        enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make ``attn_implementation="fext"`` available (idempotent)."""
    AttentionInterface.register(NAME, flash_ext_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


# A small GPT-2 on the byte vocabulary, for tests and CPU runs; GPT2Config() is GPT-2 small (124M).
TINY = dict(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, bos_token_id=None, eos_token_id=None)


def build(config_kwargs: dict[str, object], attn_implementation: str = NAME) -> GPT2LMHeadModel:
    """``GPT2LMHeadModel(GPT2Config(**config_kwargs))`` (random init) on the given attention."""
    if attn_implementation == NAME:
        register()
    return GPT2LMHeadModel(GPT2Config(**config_kwargs, attn_implementation=attn_implementation))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--small", action="store_true", help="GPT-2 small (124M) instead of the tiny config")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    torch.manual_seed(0)
    config_kwargs = {} if args.small else TINY
    ours = build(config_kwargs).to(args.device, dtype).eval()
    eager = build(config_kwargs, "eager").to(args.device, dtype).eval()
    config = ours.config
    eager.load_state_dict(ours.state_dict())
    idx = torch.randint(0, config.vocab_size, (2, min(config.n_positions, 256)), device=args.device)
    with torch.no_grad():
        a, b = ours(idx).logits.float(), eager(idx).logits.float()
        ga = ours.generate(idx[:, :16], max_new_tokens=32, do_sample=False)
        gb = eager.generate(idx[:, :16], max_new_tokens=32, do_sample=False)
    print(f"{config.n_layer}-layer GPT2LMHeadModel, {args.device} {dtype}: max |logits flash_ext - eager| = "
          f"{(a - b).abs().max().item():.2e}; greedy generate() tokens equal: {torch.equal(ga, gb)}")


if __name__ == "__main__":
    main()
