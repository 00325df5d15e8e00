"""Where a kernel's warps wait, per SASS instruction: runs Nsight Compute's
warp-state sampling on one launch of ``scripts/ncu_target.py``, exports the
source page (SASS with the samples of each instruction) as CSV, and prints
the instructions and the stall reasons holding the most samples, and the
samples per opcode.

    python3 scripts/ncu_stalls.py --kernel regex:attention_fwd --skip 1 --out DIR -- 128 512 0
    python3 scripts/ncu_stalls.py --kernel regex:^attention_kernel --skip 2 --out DIR -- decode 1 32768
    python3 scripts/ncu_stalls.py --csv DIR/stalls_sass.csv      # the summary again, from the CSV

Arguments after ``--`` go to ncu_target.py, which runs the prefill forward
twice (``--skip 1``) and the decode three times (``--skip 2``). Writes DIR/<name>.ncu-rep and
DIR/<name>_sass.csv (open the report in Nsight Compute for the full view);
prints the summary. Needs ncu on PATH (the GPU machine has it).
"""
from __future__ import annotations

import argparse
import collections
import csv
import io
import re
import subprocess
import sys
from pathlib import Path

TARGET = Path(__file__).with_name("ncu_target.py")


def profile(kernel: str, skip: int, report: Path, target_args: list[str]) -> None:
    cmd = ["ncu", "--kernel-name", kernel, "--launch-skip", str(skip), "--launch-count", "1",
           "--section", "WarpStateStats", "--section", "SourceCounters", "--section", "SpeedOfLight",
           "--import-source", "yes", "-f", "-o", str(report.with_suffix("")),
           sys.executable, str(TARGET), *target_args]
    subprocess.run(cmd, check=True)


def source_page(report: Path) -> str:
    cmd = ["ncu", "-i", str(report), "--page", "source", "--csv", "--print-source", "sass"]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def summarize(page: str, top: int) -> None:
    rows = list(csv.reader(io.StringIO(page)))
    header_at = next((i for i, r in enumerate(rows) if any("Source" == c.strip() for c in r)), None)
    if header_at is None:
        print("no SASS table in the source page; its first lines:\n" + "\n".join(page.splitlines()[:5]))
        return
    header = [c.strip() for c in rows[header_at]]
    body = [r for r in rows[header_at + 1:] if len(r) == len(header)]
    col = {name: i for i, name in enumerate(header)}
    sampled = [name for name in header if "Sampling" in name and "Not-issued" not in name]
    total_name = next((n for n in sampled if "All" in n), sampled[0] if sampled else None)
    if total_name is None:
        print("no sampling column; columns: " + ", ".join(header))
        return
    stall_names = [n for n in header if n.startswith("stall_") or n.startswith("smsp__pcsamp_warps_issue_stalled")]
    total = sum(number(r[col[total_name]]) for r in body) or 1.0
    print(f"{len(body)} SASS instructions, {total:.0f} samples ({total_name})")
    by_opcode: collections.Counter[str] = collections.Counter()
    for r in body:
        by_opcode[r[col["Source"]].split()[0] if r[col["Source"]].split() else "?"] += number(r[col[total_name]])
    print("samples per opcode: " + ", ".join(f"{op} {100 * s / total:.1f}%" for op, s in by_opcode.most_common(12)))
    if stall_names:
        reasons = {n: sum(number(r[col[n]]) for r in body) for n in stall_names}
        print("stall reasons: " + ", ".join(f"{n} {100 * s / total:.1f}%" for n, s in
                                            sorted(reasons.items(), key=lambda kv: -kv[1])[:10] if s > 0))
    address = col.get("Address", 0)
    print(f"top {top} instructions:")
    for r in sorted(body, key=lambda r: -number(r[col[total_name]]))[:top]:
        share = 100 * number(r[col[total_name]]) / total
        worst = ""
        if stall_names:
            name = max(stall_names, key=lambda n: number(r[col[n]]))
            worst = f"  (most: {name} {number(r[col[name]]):.0f})"
        print(f"{share:5.1f}%  {r[address]:>8}  {r[col['Source']][:70]}{worst}")
    if "Address" in col:
        print_loops(body, col, total_name, total)


def print_loops(body: list[list[str]], col: dict[str, int], total_name: str, total: float) -> None:
    """Samples inside and outside the kernel's tensor-core loops: each backward
    branch spans a loop; those holding HGMMA and at most half the code (not the
    barrier retry stubs placed at the end, which branch back across
    everything) are the main loops, and what lies outside them is a tile's
    start and end, the setup and the producer."""
    rows = []
    for r in body:
        try:
            rows.append((int(r[col["Address"]], 16), r[col["Source"]], number(r[col[total_name]])))
        except ValueError:
            continue
    rows.sort()
    if not rows:
        return
    position = {addr: i for i, (addr, _, _) in enumerate(rows)}
    loops = []
    for i, (addr, source, _) in enumerate(rows):
        m = re.search(r"\bBRA\b.*?(0x[0-9a-fA-F]+)", source)
        target = int(m[1], 16) if m else None
        if target is None or target >= addr or target not in position:
            continue
        first = position[target]
        inside = rows[first:i + 1]
        if len(inside) <= len(rows) // 2 and any("HGMMA" in src for _, src, _ in inside):
            loops.append((first, i))
    covered = set()
    print("tensor-core loops (backward branches around HGMMA):")
    for first, last in sorted(set(loops)):
        inside = rows[first:last + 1]
        samples = sum(s for _, _, s in inside)
        hgmma = sum("HGMMA" in src for _, src, _ in inside)
        covered.update(range(first, last + 1))
        print(f"  {rows[first][0]:#x}-{rows[last][0]:#x}: {len(inside)} instructions, {hgmma} HGMMA, "
              f"{100 * samples / total:.1f}% of samples")
    outside = sum(s for i, (_, _, s) in enumerate(rows) if i not in covered)
    print(f"  outside them: {100 * outside / total:.1f}% of samples")
    dealloc = next((i for i, (_, src, _) in enumerate(rows) if "USETMAXREG.DEALLOC" in src), None)
    if dealloc is not None:
        after = sum(s for _, _, s in rows[dealloc:])
        print(f"  from USETMAXREG.DEALLOC on (the producer, where the compiler placed it last): "
              f"{100 * after / total:.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", help="ncu --kernel-name (e.g. regex:attention_fwd)")
    parser.add_argument("--csv", type=Path, help="summarize this source-page CSV of an earlier run instead")
    parser.add_argument("--skip", type=int, default=1, help="launches of that kernel to skip (warm-up)")
    parser.add_argument("--out", type=Path, help="folder for the report and the CSV")
    parser.add_argument("--name", default="stalls", help="file name stem in --out")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("target", nargs="*", help="arguments of ncu_target.py (after --)")
    args = parser.parse_args()
    if args.csv:
        summarize(args.csv.read_text(), args.top)
        return
    if not args.kernel or not args.out:
        parser.error("--kernel and --out are needed to profile (or --csv to summarize)")
    args.out.mkdir(parents=True, exist_ok=True)
    report = args.out / f"{args.name}.ncu-rep"
    profile(args.kernel, args.skip, report, args.target)
    page = source_page(report)
    (args.out / f"{args.name}_sass.csv").write_text(page)
    summarize(page, args.top)


if __name__ == "__main__":
    main()
