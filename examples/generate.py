"""Greedy and sampled generation with the GPT-2 of ``gpt2.py``: without a
cache (the whole sequence recomputed each step, nanoGPT's way), with a KV
cache attended by PyTorch's SDPA, and with a KV cache through
``flash_ext.flash_attn_with_kvcache``. Prints tokens/s of each and whether
they give the same tokens: greedy decoding must in float32 (the exit status
says); in bfloat16 the differently rounded paths may break near-ties of a
random model's logits differently, so there the first difference is shown.

The weights are random unless ``--train-steps`` trains the model briefly on
the bundled corpus first (so the text looks like text); nothing is downloaded.

    python examples/generate.py                                    # CPU, tiny model
    python examples/generate.py --size small --batch 8 --new 256  # GPU, GPT-2 small
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from train_gpt2 import batch_offsets, common, get_batch, load_corpus  # first: puts the repo on sys.path
import flash_ext  # noqa: E402
from gpt2 import GPT, GPTConfig, generate  # noqa: E402

MODES: dict[str, dict[str, object]] = {
    "no cache": dict(use_cache=False),
    "cache, torch SDPA": dict(use_cache=True, cache_impl="torch"),
    "cache, flash_ext": dict(use_cache=True, cache_impl="flash_ext"),
}
# The `impl` of each mode in the results file.
IMPLS = {"no cache": "no_cache_sdpa", "cache, torch SDPA": "cache_sdpa", "cache, flash_ext": "flash_ext"}


def quick_train(model: GPT, data: torch.Tensor, steps: int, device: torch.device) -> float:
    """A few AdamW steps on the corpus; returns the last loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    offsets = batch_offsets(len(data), model.config.block_size, 16, steps, seed=0)
    model.train()
    loss = torch.tensor(float("nan"))
    for starts in offsets:
        _, loss = model(*get_batch(data, starts, model.config.block_size, device))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss.item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "small"], default="tiny")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="weights' dtype (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", default="Return the ", help="the prompt of every sequence")
    parser.add_argument("--new", type=int, default=48, help="tokens to generate")
    parser.add_argument("--temperature", type=float, default=0.8, help="of the sampled run")
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--train-steps", type=int, default=0, help="train this many steps first")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder: writes <out>/<device>/generate[_quick].json and .md "
                             "(quick: the tiny model)")
    args = parser.parse_args(argv)

    device = torch.device(args.device) if args.device else common.default_device()
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    flash_ext.set_strict(True)
    torch.manual_seed(args.seed)
    config = GPTConfig.tiny() if args.size == "tiny" else GPTConfig.small()
    model = GPT(config).to(device)
    if args.train_steps:
        print(f"trained {args.train_steps} steps: loss {quick_train(model, load_corpus(), args.train_steps, device):.3f}")
    model = model.to(dtype).eval()
    prompt = torch.tensor(list(args.prompt.encode()), device=device).repeat(args.batch, 1)
    if prompt.size(1) + args.new > config.block_size:
        parser.error(f"prompt + --new must fit the block size ({config.block_size})")
    print(f"gpt2-{args.size}, {common.device_name(device)}, {dtype}, batch {args.batch}, "
          f"{prompt.size(1)}-byte prompt, {args.new} new tokens")

    exact = dtype == torch.float32  # in bf16/fp16, differently rounded paths may break near-ties differently
    same = True
    rows: list[dict[str, object]] = []
    for label, temperature in (("greedy", 0.0), (f"sampled (T={args.temperature}, top-k {args.top_k})",
                                                 args.temperature)):
        outs: dict[str, torch.Tensor] = {}
        for mode, kwargs in MODES.items():
            def run() -> torch.Tensor:
                g = torch.Generator(device).manual_seed(args.seed)
                return generate(model, prompt, args.new, temperature=temperature, top_k=args.top_k,
                                generator=g, **kwargs)
            outs[mode] = run()  # also the warm-up
            seconds = common.time_ms(run, device) / 1e3
            print(f"{label:>34} | {mode:<18} {args.batch * args.new / seconds:10,.0f} tokens/s")
            rows.append(dict(impl=IMPLS[mode], model=f"gpt2-{args.size}", dtype=str(dtype).removeprefix("torch."),
                             decoding="greedy" if temperature == 0.0 else "sampled", batch=args.batch,
                             prompt=prompt.size(1), new=args.new, tokens_per_s=args.batch * args.new / seconds))
        ref = outs["no cache"]
        for mode, out in outs.items():
            if mode != "no cache":
                print(f"{label:>34} | {mode:<18} tokens {agreement(ref, out, prompt.size(1))}")
            rows[-len(outs) + list(outs).index(mode)]["tokens"] = agreement(ref, out, prompt.size(1))
        if temperature == 0.0 and exact:
            same &= all(torch.equal(ref, o) for o in outs.values())
        print(f"{'':>34} | {text(ref[0])!r}")
    if args.out is not None:
        quick = args.size == "tiny"
        path = args.out / common.device_slug(device) / f"generate{'_quick' if quick else ''}.json"
        header = common.run_header("generate", device, {}, quick)
        header.update(seed=args.seed, temperature=args.temperature, top_k=args.top_k, greedy_identical=same)
        common.write_results(path, header, rows)
        print(f"wrote {common.shown(path)}")
    return 0 if same else 1


def agreement(ref: torch.Tensor, out: torch.Tensor, prompt_len: int) -> str:
    """'identical', or where the first sequence that differs first differs."""
    differs = (ref != out).any(dim=0).nonzero()
    return "identical" if differs.numel() == 0 else f"differ from new token {int(differs[0]) - prompt_len}"


def text(tokens: torch.Tensor) -> str:
    """Bytes as text; ids past the byte range (GPT-2 small's padded vocabulary) as '?'."""
    return bytes(t if t < 256 else ord("?") for t in tokens.tolist()).decode("utf-8", "replace")


if __name__ == "__main__":
    sys.exit(main())
