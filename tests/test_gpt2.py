"""The GPT-2 examples (examples/) in a tiny configuration on the CPU, float32.

* training: a few steps under ``flash_ext.patch()`` lower the loss and follow
  the curve of PyTorch's own attention from the same init and batches;
* generation: greedy decoding with the KV cache (``flash_attn_with_kvcache``)
  gives the same tokens as recomputing the sequence each step;
* the three ways in (``patch()``, the one-line ``attention_fn`` replacement,
  transformers' attention registry) give eager's logits and do call our op;
* ``torch.compile(fullgraph=True)`` traces the model on our op with no graph
  break.
"""
from __future__ import annotations

import copy
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import flash_ext
from conftest import DEVICES
from flash_ext import attention as fa_attention

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from gpt2 import GPT, GPTConfig, KVCache, eager_attention, generate  # noqa: E402
from train_gpt2 import batch_offsets, get_batch, load_corpus  # noqa: E402

CONFIG = GPTConfig(block_size=32, vocab_size=256, n_layer=2, n_head=2, n_embd=32)
STEPS, BATCH = 25, 8


class CountingOps:
    """Stands in for ``torch.ops.flash_ext`` in flash_ext.attention and counts
    the calls of each operator, to prove a path reaches our kernels."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Callable[..., object]:
        op = getattr(torch.ops.flash_ext, name)

        def counted(*args: object) -> object:
            self.calls[name] += 1
            return op(*args)
        return counted


@pytest.fixture
def counting_ops(monkeypatch: pytest.MonkeyPatch) -> CountingOps:
    ops = CountingOps()
    monkeypatch.setattr(fa_attention, "ops", ops)
    return ops


def train_losses(model: GPT, data: torch.Tensor, offsets: torch.Tensor) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for starts in offsets:
        _, loss = model(*get_batch(data, starts, CONFIG.block_size, torch.device("cpu")))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def trained() -> dict[str, list[float]]:
    """The same init and batches trained with PyTorch's SDPA and, under
    patch(), with flash_ext (strict: no silent fallback)."""
    data = load_corpus()
    offsets = batch_offsets(len(data), CONFIG.block_size, BATCH, STEPS, seed=0)
    torch.manual_seed(0)
    torch_model = GPT(CONFIG)
    ours = GPT(CONFIG)
    ours.load_state_dict(torch_model.state_dict())
    was_strict = flash_ext.is_strict()
    flash_ext.set_strict(True)
    try:
        torch_losses = train_losses(torch_model, data, offsets)
        with flash_ext.patch():
            our_losses = train_losses(ours, data, offsets)
    finally:
        flash_ext.set_strict(was_strict)
    return {"torch": torch_losses, "flash_ext": our_losses}


def test_training_lowers_the_loss(trained: dict[str, list[float]]) -> None:
    losses = trained["flash_ext"]
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses


def test_training_matches_torch_attention(trained: dict[str, list[float]]) -> None:
    torch.testing.assert_close(torch.tensor(trained["flash_ext"]), torch.tensor(trained["torch"]),
                               atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def lively_model() -> GPT:
    """Random weights drawn large (std 0.3), so greedy continuations vary
    instead of repeating one byte, as GPT-2's small init makes them do."""
    torch.manual_seed(4)
    model = GPT(CONFIG).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("cache_impl", ["flash_ext", "torch"])
def test_generation_with_cache_matches_without(lively_model: GPT, cache_impl: str,
                                               counting_ops: CountingOps) -> None:
    prompts = torch.randint(0, CONFIG.vocab_size, (2, 7), generator=torch.Generator().manual_seed(5))
    without = generate(lively_model, prompts, 20, use_cache=False)
    assert not counting_ops.calls  # the uncached path runs the model's own F.scaled_dot_product_attention
    with_cache = generate(lively_model, prompts, 20, use_cache=True, cache_impl=cache_impl)
    # One call per layer and step: the prefill and the 19 tokens after it that are fed back.
    assert counting_ops.calls["kvcache_attention"] == (20 * CONFIG.n_layer if cache_impl == "flash_ext" else 0)
    assert without.shape == (2, 27)
    assert len(set(without[0, 7:].tolist())) > 3, "degenerate continuation: the test would prove little"
    assert torch.equal(with_cache, without)
    # Sampling with the same seed draws the same tokens too (probabilities agree to rounding).
    sampled = [generate(lively_model, prompts, 20, temperature=1.0, top_k=50, use_cache=use_cache,
                        cache_impl=cache_impl, generator=torch.Generator().manual_seed(6))
               for use_cache in (False, True)]
    assert torch.equal(sampled[0], sampled[1])


@pytest.mark.parametrize("device", DEVICES)
def test_cached_logits_match_full_forward(lively_model: GPT, device: str) -> None:
    """Prefill then one token at a time through flash_attn_with_kvcache gives
    the full forward's logits at every position (float32 on the CPU, bfloat16
    on CUDA, whose kernels serve 16-bit types only)."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = copy.deepcopy(lively_model).to(device, dtype)
    idx = torch.randint(0, CONFIG.vocab_size, (2, 24), generator=torch.Generator().manual_seed(7)).to(device)
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache.empty(CONFIG, 2, 24, idx.device, dtype)
        steps = [model(idx[:, :10], cache=cache)[0]]
        steps += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(10, 24)]
    assert cache.seqlens.tolist() == [24, 24]
    tol = 1e-5 if dtype == torch.float32 else 0.1  # bf16 logits of size ~10: a few units of rounding
    torch.testing.assert_close(torch.cat(steps, dim=1).float(), full.float(), atol=tol, rtol=tol)


def test_patch_and_one_line_replacement_match_eager(counting_ops: CountingOps) -> None:
    torch.manual_seed(1)
    model = GPT(CONFIG, attention_fn=eager_attention).eval()
    idx = torch.randint(0, CONFIG.vocab_size, (3, CONFIG.block_size))
    with torch.no_grad():
        expected, _ = model(idx)
        model.set_attention_fn(None)  # the model's F.scaled_dot_product_attention call
        with flash_ext.patch():
            patched, _ = model(idx)
        assert counting_ops.calls["attention"] == CONFIG.n_layer
        model.set_attention_fn(flash_ext.scaled_dot_product_attention)
        replaced, _ = model(idx)
        assert counting_ops.calls["attention"] == 2 * CONFIG.n_layer
    torch.testing.assert_close(patched, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(replaced, expected, atol=1e-5, rtol=1e-5)


def test_hugging_face_gpt2_matches_eager(counting_ops: CountingOps) -> None:
    pytest.importorskip("transformers")
    import hf_gpt2

    torch.manual_seed(2)
    ours = hf_gpt2.build(hf_gpt2.TINY).eval()
    eager = hf_gpt2.build(hf_gpt2.TINY, "eager").eval()
    eager.load_state_dict(ours.state_dict())
    assert ours.config._attn_implementation == hf_gpt2.NAME
    idx = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        got, expected = ours(idx).logits, eager(idx).logits
        assert counting_ops.calls["attention"] == hf_gpt2.TINY["n_layer"]
        # generate() decodes through transformers' own cache; one token per step reaches us without a mask.
        gen_ours = ours.generate(idx[:, :8], max_new_tokens=12, do_sample=False)
        gen_eager = eager.generate(idx[:, :8], max_new_tokens=12, do_sample=False)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(gen_ours, gen_eager)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_forward_backward(device: str) -> None:
    """No graph break from our op (fullgraph=True raises on one); aot_eager
    runs the traced graph without code generation, so this stays fast. On
    CUDA under bfloat16 autocast, as the training script runs it."""
    torch.manual_seed(3)
    model = GPT(CONFIG, attention_fn=flash_ext.scaled_dot_product_attention).to(device)
    idx, targets = torch.randint(0, CONFIG.vocab_size, (2, 2, CONFIG.block_size), device=device)
    autocast = torch.autocast(device, torch.bfloat16, enabled=device != "cpu")
    with autocast:
        _, expected = model(idx, targets)
    expected.backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    with autocast:
        _, loss = torch.compile(model, backend="aot_eager", fullgraph=True)(idx, targets)
    loss.backward()
    tol = {} if device == "cpu" else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(loss, expected, **tol)
    for p, g in zip(model.parameters(), expected_grads):
        torch.testing.assert_close(p.grad, g, **(tol or dict(atol=1e-6, rtol=1e-5)))
