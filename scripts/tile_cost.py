"""A fixed cost per tile and a steady rate, fitted to a prefill sweep's
forward (or backward) rows: how much of each row is per-tile overhead rather
than work.

For each implementation and (d, causal), over the sequence lengths, the
forward time of a row is modelled as rounds * (c + w / r): 128-row query
tiles (the Hopper forward's tile at d = 128 and 256; d = 64's long rows use
192, so its c is per 128 rows of queries), rounds = tiles / SMs (the tail
ignored), w = the FLOPs of one tile, c = a fixed cost per tile (its start
and end: loads not yet hidden, the pipeline's fill and drain, the epilogue)
and r = one SM's steady rate. A least-squares fit of time / rounds against
w gives c and r; the table prints them with the share of each row's time
that c takes. --backward fits the backward times instead (2.5x the
forward's FLOPs, per 128-key tile: as many as query tiles on these square
shapes; c then also holds the side kernels, a constant time per token).
Rows come from benchmarks/bench_prefill.py's JSON (RESULTS_FORMAT.md
``prefill``).

    python scripts/tile_cost.py benchmarks/results/h100-80gb-hbm3/prefill.json [--sms 132]
        [--impls flash_ext sdpa_cudnn] [--backward]
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

TILE_ROWS = 128


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares y = c + s * x: (c, s)."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var_x = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / var_x if var_x else 0.0
    return mean_y - slope * mean_x, slope


def tile_model(group: list[dict], d: int, causal: bool, sms: int,
               backward: bool = False) -> tuple[float, float, list[tuple[int, float]]]:
    """(c in us, r in TFLOP/s, [(n, us per tile)]) fitted to one implementation's
    rows at one (d, causal), sorted by n: forward times, or backward ones."""
    points, per_tile = [], []
    for row in sorted(group, key=lambda r: r["n"]):
        tiles = -(-row["n"] // TILE_ROWS) * row["batch"] * row["heads"]
        flops = 4 * row["batch"] * row["heads"] * row["n"] ** 2 * d / (2 if causal else 1) * (2.5 if backward else 1)
        us = row["bwd_ms" if backward else "fwd_ms"] * 1e3 / (tiles / sms)
        points.append((flops / tiles, us))
        per_tile.append((row["n"], us))
    c_us, us_per_flop = fit(points)
    rate = sms / us_per_flop / 1e6 if us_per_flop > 0 else float("nan")
    return c_us, rate, per_tile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    parser.add_argument("--sms", type=int, default=132, help="multiprocessors of the GPU (H100 and H200: 132)")
    parser.add_argument("--impls", nargs="+", default=["flash_ext", "sdpa_cudnn"])
    parser.add_argument("--backward", action="store_true", help="fit the backward times")
    args = parser.parse_args()
    time_key = "bwd_ms" if args.backward else "fwd_ms"
    rows = json.loads(args.results.read_text())["rows"]
    groups: dict[tuple[str, int, bool], list[dict]] = defaultdict(list)
    for row in rows:
        if row["impl"] in args.impls and row.get(time_key):
            groups[(row["impl"], row["d"], bool(row["causal"]))].append(row)
    pass_name = "backward" if args.backward else "forward"
    print(f"fixed cost c per {TILE_ROWS}-row tile and steady rate r (whole GPU) fitted over N; "
          f"then c's share of each row's {pass_name} time")
    for (impl, d, causal), group in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        if len(group) < 2:
            continue
        c_us, rate, per_tile = tile_model(group, d, causal, args.sms, args.backward)
        shares = [f"{n}: {100 * c_us / us:3.0f}%" for n, us in per_tile]
        print(f"d={d:3d} causal={int(causal)} {impl:>10}: c = {c_us:5.2f} us, r = {rate:4.0f} TFLOP/s | "
              + ", ".join(shares))


if __name__ == "__main__":
    main()
