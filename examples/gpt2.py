"""A GPT-2 in the nanoGPT style, and KV-cache generation through flash_ext.

The attention is ``F.scaled_dot_product_attention(q, k, v, is_causal=True)``
on ``(B, nh, T, hs)`` views, as in nanoGPT. Two of the three ways to put
flash_ext under it work on this file unchanged:

* ``with flash_ext.patch(): model(idx)`` -- the function is looked up at call
  time, so the patch reaches it;
* ``GPT(config, attention_fn=flash_ext.scaled_dot_product_attention)`` -- the
  one-line replacement of the call.

(The third, Hugging Face's ``GPT2LMHeadModel``, is in ``hf_gpt2.py``.)

:func:`generate` decodes greedily or by sampling, either recomputing the whole
sequence every step or against a per-layer KV cache, through
``flash_ext.flash_attn_with_kvcache`` (or, as a baseline, PyTorch's SDPA on
the same cache).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

import flash_ext

AttentionFn = Callable[..., torch.Tensor]
CacheImpl = Literal["flash_ext", "torch"]


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64, as nanoGPT does
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True

    @classmethod
    def small(cls, vocab_size: int = 50304) -> "GPTConfig":
        """GPT-2 small: 124M parameters with GPT-2's vocabulary, T=1024."""
        return cls(vocab_size=vocab_size)

    @classmethod
    def tiny(cls, vocab_size: int = 256) -> "GPTConfig":
        """A byte-level toy for tests and CPU runs (~0.1M parameters)."""
        return cls(block_size=64, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=64)


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                    is_causal: bool = False) -> torch.Tensor:
    """Attention written out (softmax(QKᵀ/√d) V with the (T, T) scores in
    memory), as nanoGPT does without a fused kernel: the reference."""
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
    if is_causal:
        T, S = q.size(-2), k.size(-2)
        visible = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
        att = att.masked_fill(~visible, float("-inf"))
    att = F.dropout(F.softmax(att, dim=-1), p=dropout_p)
    return att @ v


@dataclass
class KVCache:
    """Per-layer key and value caches ``(B, max_len, nh, hs)`` and the number
    of filled positions of each sequence: ``seqlens`` (int32 ``(B,)``, on the
    device, for flash_ext) and ``filled`` (the same for every sequence, on the
    host, so the PyTorch baseline slices without a device sync)."""
    k: list[torch.Tensor]
    v: list[torch.Tensor]
    seqlens: torch.Tensor
    impl: CacheImpl = "flash_ext"
    filled: int = 0

    @classmethod
    def empty(cls, config: GPTConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype,
              impl: CacheImpl = "flash_ext") -> "KVCache":
        shape = (batch, max_len, config.n_head, config.n_embd // config.n_head)
        k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        return cls(k, v, torch.zeros(batch, dtype=torch.int32, device=device), impl)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, attention_fn: AttentionFn | None = None) -> None:
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        # None: F.scaled_dot_product_attention, looked up at each call (so flash_ext.patch() applies).
        self.attention_fn = attention_fn

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.size()
        # (B, T, nh, hs): the layout of the KV cache; .transpose(1, 2) gives SDPA's (B, nh, T, hs).
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head) for t in self.c_attn(x).split(self.n_embd, dim=2))
        if cache is None:
            sdpa = self.attention_fn or F.scaled_dot_product_attention
            y = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                     dropout_p=self.dropout if self.training else 0.0, is_causal=True).transpose(1, 2)
        elif cache.impl == "flash_ext":
            # Appends k, v at cache.seqlens (in place), then attends causally to everything cached.
            y = flash_ext.flash_attn_with_kvcache(q, cache.k[layer], cache.v[layer], k=k, v=v,
                                                  cache_seqlens=cache.seqlens, causal=True)
        else:
            y = _torch_cached_attention(q, k, v, cache, layer)
        return self.resid_dropout(self.c_proj(y.contiguous().view(B, T, C)))


def _torch_cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache,
                            layer: int) -> torch.Tensor:
    """The baseline decode: the same cache written by indexing, attended by
    PyTorch's SDPA. Needs every sequence at the same length (one prompt
    length), where FlashAttention's bottom-right causal mask is SDPA's
    top-left one for a prefill from empty and no mask for one new token."""
    start = cache.filled
    end = start + q.size(1)
    cache.k[layer][:, start:end] = k
    cache.v[layer][:, start:end] = v
    kc, vc = cache.k[layer][:, :end], cache.v[layer][:, :end]
    y = flash_ext.attention.torch_sdpa(q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2),
                                       is_causal=q.size(1) > 1)
    return y.transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, attention_fn: AttentionFn | None = None) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, attention_fn)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, attention_fn: AttentionFn | None = None) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, attention_fn) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of the residual projections
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        """Parameters, without the position embeddings (nanoGPT's count)."""
        return sum(p.numel() for p in self.parameters()) - self.transformer.wpe.weight.numel()

    def set_attention_fn(self, attention_fn: AttentionFn | None) -> None:
        """Swap the attention of every layer (None: F.scaled_dot_product_attention)."""
        for block in self.transformer.h:
            block.attn.attention_fn = attention_fn

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits ``(B, T, vocab)`` and, given targets, the mean cross-entropy.

        With a cache, ``idx`` holds the tokens after the ``cache.seqlens``
        cached ones: their keys and values are appended and the lengths
        advanced.
        """
        B, T = idx.size()
        pos = torch.arange(T, device=idx.device)
        if cache is not None:
            pos = pos + cache.seqlens.unsqueeze(1)  # (B, T): each sequence continues where it stopped
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            x = block(x, cache, i)
        x = self.transformer.ln_f(x)
        if cache is not None:
            cache.seqlens += T
            cache.filled += T
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss


def _next_token(logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """Greedy (temperature 0) or sampled next tokens ``(B, 1)`` from the last
    position's logits ``(B, vocab)``."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)


@torch.no_grad()
def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, use_cache: bool = True, cache_impl: CacheImpl = "flash_ext",
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue the prompts ``idx (B, T0)`` by ``max_new_tokens`` tokens.

    ``temperature`` 0 is greedy; otherwise tokens are sampled (from the
    ``top_k`` most likely when given) with ``generator``. Without the cache
    every step runs the whole sequence (cropped to the block size), as
    nanoGPT does; with it the prompt is prefilled once (q_len = T0, causal)
    and each step attends one new token to the cache, through
    ``flash_attn_with_kvcache`` (``cache_impl="flash_ext"``) or PyTorch's SDPA
    (``"torch"``). Returns ``(B, T0 + max_new_tokens)``.
    """
    model.eval()
    if not use_cache:
        for _ in range(max_new_tokens):
            logits, _ = model(idx[:, -model.config.block_size:])
            idx = torch.cat([idx, _next_token(logits[:, -1], temperature, top_k, generator)], dim=1)
        return idx
    max_len = idx.size(1) + max_new_tokens
    if max_len > model.config.block_size:
        raise ValueError(f"prompt + new tokens ({max_len}) exceed the block size ({model.config.block_size}) "
                         "the position embeddings cover")
    dtype = next(model.parameters()).dtype
    if torch.is_autocast_enabled(idx.device.type):
        dtype = torch.get_autocast_dtype(idx.device.type)
    cache = KVCache.empty(model.config, idx.size(0), max_len, idx.device, dtype, cache_impl)
    logits, _ = model(idx, cache=cache)  # prefill
    for step in range(max_new_tokens):
        token = _next_token(logits[:, -1], temperature, top_k, generator)
        idx = torch.cat([idx, token], dim=1)
        if step + 1 < max_new_tokens:
            logits, _ = model(token, cache=cache)
    return idx
