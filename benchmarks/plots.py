"""PNG plots of the results files, written beside them.

For each device folder under benchmarks/results (the full sweep's file where
there is one, else the quick run's):
- ``prefill.png``: forward and backward TFLOP/s against sequence length, one
  panel per head dim and causal, the bf16 matmul rate of the same run as a line;
- ``decode.png``: GB/s against cache length, one panel per batch, the device
  copy bandwidth (read+write) of the same run as a line;
- ``memory.png``: peak extra memory against sequence length, log-log;
- ``cpu.png``: forward and forward+backward milliseconds per shape.

    python benchmarks/plots.py [--device SLUG] [--results FOLDER]
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on the GPU machine or in CI
import matplotlib.pyplot as plt  # noqa: E402

from common import OURS, RESULTS, shown  # noqa: E402

# Ours stands out; the others keep a fixed colour across plots.
STYLE = {OURS: dict(color="black", linewidth=2.2, marker="o"), "sdpa_flash": dict(color="tab:blue"),
         "sdpa_cudnn": dict(color="tab:green"), "sdpa_efficient": dict(color="tab:orange"),
         "sdpa_math": dict(color="tab:red"), "flex": dict(color="tab:purple"),
         "flashinfer": dict(color="tab:brown"), "torch_cpu": dict(color="tab:blue")}


SHORT_DTYPE = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def style(label: str) -> dict[str, Any]:
    base = dict(marker=".", linewidth=1.4)
    base.update(STYLE.get(label.split(" ")[0], {}))
    if label.startswith(OURS) and "paged" in label:
        base.update(color="dimgray", linewidth=1.6, linestyle="--" if label.endswith(" 64") else ":")
    return base


def legend(fig: Any, axes: Any) -> None:
    """One legend for the figure: every label of every panel (a series may be
    missing from some panels, e.g. FlexAttention's single setting)."""
    handles: dict[str, Any] = {}
    for ax in getattr(axes, "flat", [axes]):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(8, len(handles)), fontsize=8,
               frameon=False)


def load(folder: Path, bench: str) -> dict[str, Any] | None:
    for name in (f"{bench}.json", f"{bench}_quick.json"):
        if (folder / name).exists():
            return json.loads((folder / name).read_text())
    return None


def title(record: dict[str, Any], what: str) -> str:
    return f"{what}\n{record['device']}, torch {record['torch']}, {record['date']} ({record['commit'][:9]})"


def series(rows: list[dict[str, Any]], x: str, y: str, label_of: Any) -> dict[str, tuple[list, list]]:
    """label -> (xs, ys) sorted by x, rows without y left out."""
    points: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        if isinstance(r.get(y), (int, float)):
            points[label_of(r)].append((r[x], r[y]))
    return {label: tuple(map(list, zip(*sorted(p)))) for label, p in points.items()}


def plot_prefill(record: dict[str, Any], out: Path) -> None:
    panels = sorted({(r["d"], r["causal"]) for r in record["rows"]})
    fig, axes = plt.subplots(2, len(panels), figsize=(3.6 * len(panels), 7), squeeze=False, sharey=True)
    ceiling = record["ceilings"].get("matmul_bf16_tflops")
    for col, (d, causal) in enumerate(panels):
        rows = [r for r in record["rows"] if r["d"] == d and r["causal"] == causal]
        for row_i, (metric, name) in enumerate((("fwd_tflops", "forward"), ("bwd_tflops", "backward"))):
            ax = axes[row_i][col]
            for label, (xs, ys) in series(rows, "n", metric, lambda r: r["impl"]).items():
                ax.plot(xs, ys, label=label, **style(label))
            if ceiling:
                ax.axhline(ceiling, color="gray", linestyle="--", linewidth=1, label=f"bf16 matmul {ceiling:.0f}")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{name}, d={d}, {'causal' if causal else 'full'}", fontsize=9)
            ax.set_xlabel("sequence length")
            ax.grid(alpha=0.3)
        axes[0][col].set_ylim(bottom=0)
    axes[0][0].set_ylabel("TFLOP/s")
    axes[1][0].set_ylabel("TFLOP/s")
    fig.suptitle(title(record, "prefill, bf16, batch·n = 16k tokens, heads·d = 2048"))
    legend(fig, axes)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)


def decode_label(r: dict[str, Any]) -> str:
    return f"{r['impl']} paged {r['page_size']}" if r.get("paged") else r["impl"]


def plot_decode(record: dict[str, Any], out: Path) -> None:
    batches = sorted({r["batch"] for r in record["rows"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 4), squeeze=False, sharey=True)
    ceiling = record["ceilings"].get("copy_GBps_rw")
    for ax, batch in zip(axes[0], batches):
        rows = [r for r in record["rows"] if r["batch"] == batch]
        for label, (xs, ys) in series(rows, "kv_len", "GBps", decode_label).items():
            ax.plot(xs, ys, label=label, **style(label))
        if ceiling:
            ax.axhline(ceiling, color="gray", linestyle="--", linewidth=1, label=f"device copy {ceiling:.0f}")
        ax.set_xscale("log", base=2)
        ax.set_title(f"batch {batch}", fontsize=9)
        ax.set_xlabel("KV cache length")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("effective GB/s (K+V read once)")
    axes[0][0].set_ylim(bottom=0)
    fig.suptitle(title(record, "decode, bf16, d=128, 32 query / 8 KV heads, 1 query token"))
    legend(fig, axes)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_memory(record: dict[str, Any], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for label, (xs, ys) in series(record["rows"], "n", "peak_extra_MiB", lambda r: r["impl"]).items():
        ax.plot(xs, ys, label=label, **style(label))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length")
    ax.set_ylabel("peak extra memory, forward+backward (MiB)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.suptitle(title(record, "memory, 16 heads, d=128, causal"), fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_cpu(record: dict[str, Any], out: Path) -> None:
    rows = [r for r in record["rows"] if "error" not in r]
    shapes = sorted({(r["dtype"], r["batch"], r["n"]) for r in rows})
    impls = sorted({r["impl"] for r in rows}, key=lambda i: i != OURS)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(impls))
    for ax, metric in zip(axes, ("fwd_ms", "fwd_bwd_ms")):
        for i, impl in enumerate(impls):
            by_shape = {(r["dtype"], r["batch"], r["n"]): r[metric] for r in rows if r["impl"] == impl}
            ax.bar([s + i * width for s in range(len(shapes))], [by_shape.get(s, 0) for s in shapes], width,
                   label=impl, color=STYLE.get(impl, {}).get("color") if impl != OURS else "black")
        ax.set_xticks([s + 0.4 - width / 2 for s in range(len(shapes))])
        ax.set_xticklabels([f"{SHORT_DTYPE.get(dt, dt)}\nb{b} n{n}" for dt, b, n in shapes], fontsize=6)
        ax.set_yscale("log")  # shapes span two orders of magnitude
        ax.set_ylabel(f"{metric.replace('_ms', '')} ms (lower is better)")
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend()
    fig.suptitle(title(record, f"CPU, 12 heads, d=64, causal, {record.get('threads', '?')} threads"), fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


PLOTS = {"prefill": plot_prefill, "decode": plot_decode, "memory": plot_memory, "cpu": plot_cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", help="one device folder (slug) under the results folder")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the results folder")
    args = parser.parse_args()
    root = args.results
    folders = [root / args.device] if args.device else sorted(p for p in root.iterdir() if p.is_dir())
    for folder in folders:
        for bench, plot in PLOTS.items():
            record = load(folder, bench)
            if record is None or not record["rows"]:
                continue
            out = folder / f"{bench}.png"
            plot(record, out)
            print(f"wrote {shown(out)}")


if __name__ == "__main__":
    main()
