"""Is the last, part-empty round of equal tiles paid in full? Non-causal
bf16 at the prefill bench's widths, N against N' = N * 33 / 32: d = 128
16 heads at N = 16k, 2,048 query (and key) tiles of 128 rows, 15.5 rounds
on 132 SMs; at 16,896 2,112 tiles, 16 rounds exactly. If the last round is
paid in full, t(N') / t(N) = N' / N = 1.031 (as many rounds, longer tiles);
if it costs only its share, (N' / N)^2 = 1.063. Forward and backward (the
forward+backward median less the forward's), ours and cuDNN's, in turns
(three rounds, medians).

    python scripts/tail_probe.py
"""
import statistics
import sys
from pathlib import Path

# The extension is built in place in the repo root; benchmarks/common.py times.
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import common  # noqa: E402
import flash_ext  # noqa: E402

DEVICE = torch.device("cuda")
# (N, N', batch, heads, d): the prefill bench's widths (heads * d = 2048).
SHAPES = ((16384, 16896, 1, 16, 128), (8192, 8448, 2, 16, 128), (16384, 16896, 1, 8, 256))


def medians(n: int, batch: int, heads: int, d: int) -> dict[str, float]:
    """Median ms of our and cuDNN's forward ("fwd") and forward+backward ("fb")."""
    q, k, v = (torch.randn(batch, heads, n, d, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    grad = torch.randn_like(q)

    def ours() -> torch.Tensor:
        return flash_ext.scaled_dot_product_attention(q, k, v)

    def cudnn() -> torch.Tensor:
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v)

    calls = {}
    for name, fwd in (("ours", ours), ("cudnn", cudnn)):
        calls[name + " fwd"] = lambda fwd=fwd: common.time_ms(fwd, DEVICE)
        calls[name + " fb"] = lambda fwd=fwd: common.time_ms(lambda: fwd().backward(grad), DEVICE,
                                                              grad_to_none=(q, k, v))
    times, errors = common.in_turns(calls, 3)
    if errors:
        raise RuntimeError(f"N = {n}: {errors}")
    return {key: statistics.median(values) for key, values in times.items()}


def main() -> None:
    for n0, n1, batch, heads, d in SHAPES:
        t0, t1 = medians(n0, batch, heads, d), medians(n1, batch, heads, d)
        print(f"d={d} N {n0} -> {n1}, batch {batch}, heads {heads}: paid in full {n1 / n0:.3f}, "
              f"its share {(n1 / n0) ** 2:.3f}")
        for impl in ("ours", "cudnn"):
            fwd0, fwd1 = t0[impl + " fwd"], t1[impl + " fwd"]
            bwd0, bwd1 = t0[impl + " fb"] - fwd0, t1[impl + " fb"] - fwd1
            print(f"  {impl:5s} forward  {fwd0:.3f} -> {fwd1:.3f} ms, ratio {fwd1 / fwd0:.3f}")
            print(f"  {impl:5s} backward {bwd0:.3f} -> {bwd1:.3f} ms, ratio {bwd1 / bwd0:.3f}")


if __name__ == "__main__":
    main()
