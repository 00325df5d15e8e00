"""Train the nanoGPT-style GPT-2 of ``gpt2.py`` on the corpus that ships in
``examples/data/`` (bytes as tokens: nothing is downloaded), with PyTorch's
attention and with flash_ext, and compare them.

Every implementation starts from the same initial weights and sees the same
batches, so their loss curves must agree (to rounding in float32, to bf16
noise under bfloat16 autocast). Prints tokens/s and peak memory, and writes
the ``gpt2`` results (``benchmarks/results/<device>/gpt2.json``, rows
``impl, model, seq, batch, compiled, tokens_per_s, peak_MiB, final_loss``,
plus the loss curves) and a loss-curve plot beside it.

Implementations (``--impl``): ``eager`` (attention written out, nanoGPT's
fallback), ``sdpa`` (``F.scaled_dot_product_attention``, PyTorch's choice of
backend), ``flash_ext`` (``flash_ext.scaled_dot_product_attention`` through
the model's ``attention_fn`` hook); ``both`` = eager and flash_ext, ``all`` =
the three.

    python examples/train_gpt2.py --size tiny --steps 200                  # CPU
    python examples/train_gpt2.py --size small --steps 300 --compile both  # GPU, GPT-2 small, T=1024
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import common  # noqa: E402  (benchmarks/common.py: device names, results files)
import flash_ext  # noqa: E402
from gpt2 import GPT, AttentionFn, GPTConfig, eager_attention  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
IMPLS: dict[str, AttentionFn | None] = {
    "eager": eager_attention,
    "sdpa": None,  # the model's own F.scaled_dot_product_attention call
    "flash_ext": flash_ext.scaled_dot_product_attention,
}
GROUPS = {"both": ["eager", "flash_ext"], "all": list(IMPLS)}
# The curves agree when the mean loss over the last tenth of the steps differs by less than this.
AGREEMENT = {torch.float32: 1e-3, torch.bfloat16: 5e-2}


@dataclass
class Run:
    impl: str
    compiled: bool
    losses: list[float]
    tokens_per_s: float
    peak_MiB: float | None

    @property
    def name(self) -> str:
        return self.impl + (" + compile" if self.compiled else "")

    @property
    def final_loss(self) -> float:
        """Mean loss of the last tenth of the steps (one step's loss is noisy)."""
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return sum(tail) / len(tail)


def load_corpus(folder: Path = DATA) -> torch.Tensor:
    """Every ``*.txt`` of ``folder`` as one uint8 tensor of bytes (the tokens)."""
    data = b"".join(p.read_bytes() for p in sorted(folder.glob("*.txt")))
    if not data:
        raise FileNotFoundError(f"no *.txt corpus in {folder}")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def batch_offsets(n_tokens: int, seq: int, batch: int, steps: int, seed: int) -> torch.Tensor:
    """``(steps, batch)`` random window starts, the same for every implementation."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_tokens - seq - 1, (steps, batch), generator=g)


def get_batch(data: torch.Tensor, starts: torch.Tensor, seq: int,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-byte targets ``(batch, seq)`` (int64) on ``device``."""
    windows = torch.stack([data[s:s + seq + 1] for s in starts.tolist()]).long()
    return windows[:, :-1].to(device), windows[:, 1:].to(device)


def train(config: GPTConfig, init_state: dict[str, torch.Tensor], impl: str, compiled: bool, data: torch.Tensor,
          offsets: torch.Tensor, device: torch.device, dtype: torch.dtype, lr: float) -> Run:
    """Train from ``init_state`` on the batches at ``offsets`` with AdamW
    (linear warm-up over the first tenth of the steps, then constant lr).
    Tokens/s counts the steps after the first ``warmup`` (compilation and
    allocator warm-up excluded)."""
    model = GPT(config, attention_fn=IMPLS[impl]).to(device)
    model.load_state_dict(init_state)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    forward = torch.compile(model, fullgraph=True) if compiled else model  # fullgraph: a graph break raises
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())
    steps = len(offsets)
    warmup = min(steps // 2, 3 if not compiled else 5)
    lr_warmup = max(1, steps // 10)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses: list[float] = []
    model.train()
    for step in range(steps):
        if step == warmup:
            common.synchronize(device)
            start = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / lr_warmup)
        x, y = get_batch(data, offsets[step], config.block_size, device)
        with autocast:
            _, loss = forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    common.synchronize(device)
    elapsed = time.perf_counter() - start
    tokens = (steps - warmup) * offsets.shape[1] * config.block_size
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    del model, opt, forward
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Run(impl, compiled, losses, tokens / elapsed, peak)


def compare(runs: list[Run], dtype: torch.dtype) -> tuple[float, bool]:
    """Largest per-step loss difference against the first run, and whether
    every final loss agrees with its final loss within ``AGREEMENT``."""
    ref = runs[0]
    max_diff = max((abs(a - b) for r in runs[1:] for a, b in zip(ref.losses, r.losses)), default=0.0)
    tol = AGREEMENT.get(dtype, AGREEMENT[torch.bfloat16])
    return max_diff, all(abs(r.final_loss - ref.final_loss) < tol for r in runs[1:])


def plot(runs: list[Run], title: str, path: Path) -> bool:
    """The loss curves and their differences from the first run's, as a PNG;
    False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(2, 1))
    steps = range(1, len(runs[0].losses) + 1)
    for i, r in enumerate(runs):
        style = dict(label=r.name, color=f"C{i}", linewidth=1.2, linestyle=("-", "--", ":", "-.")[i % 4])
        top.plot(steps, r.losses, **style)
        if i:
            bottom.plot(steps, [a - b for a, b in zip(r.losses, runs[0].losses)], **style)
    top.set(ylabel="training loss (nats/byte)", title=title, yscale="log")
    bottom.set(xlabel="step", ylabel=f"loss − {runs[0].name}")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    top.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "small"], default="tiny",
                        help="tiny: 2 layers, T=64, byte vocabulary; small: GPT-2 small (124M), T=1024")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 16 tiny, 8 small)")
    parser.add_argument("--impl", choices=[*IMPLS, *GROUPS], default="both")
    parser.add_argument("--compile", choices=["off", "on", "both"], default="off",
                        help="torch.compile(model, fullgraph=True): off, on, or each impl both ways")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="bfloat16 = autocast with float32 weights (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-3 tiny, 6e-4 small)")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                        help="results folder; files go to <out>/<device>/gpt2[_quick].json and .png")
    args = parser.parse_args(argv)

    device = torch.device(args.device) if args.device else common.default_device()
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    flash_ext.set_strict(True)  # timing PyTorch's SDPA as ours after a silent fallback would be a lie
    config = GPTConfig.tiny() if args.size == "tiny" else GPTConfig.small()
    batch = args.batch or (16 if args.size == "tiny" else 8)
    lr = args.lr or (2e-3 if args.size == "tiny" else 6e-4)
    impls = GROUPS.get(args.impl, [args.impl])
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]

    data = load_corpus()
    offsets = batch_offsets(len(data), config.block_size, batch, args.steps, args.seed)
    torch.manual_seed(args.seed)
    init_state = GPT(config).state_dict()
    n_params = sum(p.numel() for p in GPT(config).parameters())  # tied lm_head counted once
    print(f"gpt2-{args.size}: {n_params / 1e6:.1f}M parameters, T={config.block_size}, batch {batch}, "
          f"{args.steps} steps on {len(data) / 1e3:.0f} kB of text; {common.device_name(device)}, {dtype}")

    runs: list[Run] = []
    for compiled in modes:
        for impl in impls:
            run = train(config, init_state, impl, compiled, data, offsets, device, dtype, lr)
            runs.append(run)
            peak = f"{run.peak_MiB:.0f} MiB" if run.peak_MiB is not None else "n/a (CPU)"
            print(f"{run.name:>20}: loss {run.losses[0]:.3f} -> {run.final_loss:.3f}, "
                  f"{run.tokens_per_s:,.0f} tokens/s, peak memory {peak}")
    max_diff, agree = compare(runs, dtype)
    if len(runs) > 1:
        print(f"loss curves: max per-step difference {max_diff:.2e}; final losses "
              f"{'agree' if agree else 'DISAGREE'} (tolerance {AGREEMENT.get(dtype, AGREEMENT[torch.bfloat16]):g})")

    quick = args.size == "tiny"
    path = args.out / common.device_slug(device) / f"gpt2{'_quick' if quick else ''}.json"
    header = common.run_header("gpt2", device, common.measure_ceilings(device), quick)
    header.update(dtype=str(dtype).removeprefix("torch."), steps=args.steps, lr=lr, seed=args.seed,
                  max_loss_diff=max_diff, losses_agree=agree,
                  loss_curves={r.name: [round(x, 5) for x in r.losses] for r in runs})
    rows = [dict(impl=r.impl, model=f"gpt2-{args.size}", seq=config.block_size, batch=batch, compiled=r.compiled,
                 tokens_per_s=r.tokens_per_s, peak_MiB=r.peak_MiB, final_loss=r.final_loss) for r in runs]
    common.write_results(path, header, rows)
    png = path.with_suffix(".png")
    title = f"gpt2-{args.size}, {common.device_name(device)}, {header['dtype']}"
    print(f"wrote {path}" + (f" and {png}" if plot(runs, title, png) else " (no plot: matplotlib missing)"))
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
