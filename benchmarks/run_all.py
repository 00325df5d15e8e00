"""Every benchmark that applies to this machine, then the plots.

CUDA: prefill, decode, memory, varlen, window. CPU only: cpu, memory. Each runs in its own
process (a crash or a leaked allocation stays there); the run goes on past a
failed one and exits non-zero at the end. ``--quick`` and ``--dry-run`` pass
through.

    python benchmarks/run_all.py [--quick] [--dry-run] [--only prefill,decode]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def benches(cuda: bool) -> list[str]:
    return ["prefill", "decode", "memory", "varlen", "window"] if cuda else ["cpu", "memory"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--only", help="comma-separated subset of the benches")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args()
    names = benches(torch.cuda.is_available())
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    flags = [f for f, on in (("--quick", args.quick), ("--dry-run", args.dry_run)) if on]
    failed = []
    for name in names:
        command = [sys.executable, str(HERE / f"bench_{name}.py"), *flags]
        print(f"== {' '.join(command[1:])}", flush=True)
        start = time.time()
        if subprocess.run(command).returncode:
            failed.append(name)
        print(f"== {name}: {time.time() - start:.0f} s", flush=True)
    if not (args.dry_run or args.no_plots):
        try:
            import matplotlib  # noqa: F401
            subprocess.run([sys.executable, str(HERE / "plots.py")], check=False)
        except ImportError:
            print("matplotlib missing: no plots (pip install matplotlib)")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
