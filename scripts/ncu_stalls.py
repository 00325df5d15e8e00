"""Where a kernel's warps wait, per SASS instruction: runs Nsight Compute's
warp-state sampling on one launch of ``scripts/ncu_target.py``, exports the
source page (SASS with the samples of each instruction) as CSV, and prints
the instructions and the stall reasons holding the most samples, the
samples per opcode, and the samples per execution-count group (each
instruction's executions per warp place it: per launch, per tile, per
key-loop pass; the producer apart), which is what located the forward's
per-tile cost in session 19.

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
    print_groups(body, col, total_name, total)


# Opcodes worth naming in a group of instructions: tensor-core products, the
# exponentials, barriers and mbarrier waits, TMA and bulk copies, shared and
# generic memory operations (a generic ST.E / LD.E on shared memory is a
# missed address space, session 19).
NOTABLE = ("HGMMA", "MUFU.EX2", "BAR", "SYNCS", "UTMALDG", "UTMASTG", "UBLKCP", "UBLKRED", "STSM", "LDSM", "STS",
           "LDS", "STG", "LDG", "ST.E", "LD.E", "ATOM", "RED")


def execution_groups(rows: list[tuple[int, str, float, float]]) -> list[dict]:
    """The kernel's instructions grouped by how many times each ran (ncu's
    Instructions Executed, per warp): a group is one level of the code, e.g.
    per tile and warp, per key-loop pass, per launch. rows: (address, SASS,
    samples, executions). Each group: its execution count, instructions,
    samples, whether it lies in the producer (from USETMAXREG.DEALLOC on,
    where the compiler places the producer's code), and its notable opcodes.
    Largest share of samples first."""
    rows = sorted(rows)
    dealloc = next((addr for addr, src, _, _ in rows if "USETMAXREG.DEALLOC" in src), None)
    groups: dict[tuple[float, bool], dict] = {}
    for addr, src, samples, executed in rows:
        producer = dealloc is not None and addr >= dealloc
        g = groups.setdefault((executed, producer), {"executed": executed, "producer": producer, "instructions": 0,
                                                    "samples": 0.0, "opcodes": collections.Counter()})
        g["instructions"] += 1
        g["samples"] += samples
        words = src.split()
        opcode = words[1] if words and words[0].startswith("@") and len(words) > 1 else (words[0] if words else "")
        for name in NOTABLE:
            if opcode == name or opcode.startswith(name + "."):
                g["opcodes"][name] += 1
                break
    return sorted(groups.values(), key=lambda g: -g["samples"])


def print_groups(body: list[list[str]], col: dict[str, int], total_name: str, total: float) -> None:
    """Samples per execution-count group (execution_groups), the largest."""
    if "Instructions Executed" not in col or "Address" not in col:
        return
    rows = []
    for r in body:
        try:
            rows.append((int(r[col["Address"]], 16), r[col["Source"]], number(r[col[total_name]]),
                         number(r[col["Instructions Executed"]])))
        except ValueError:
            continue
    print("samples by execution count (one group per level of the code: per launch, per tile, per loop pass):")
    for g in execution_groups(rows)[:12]:
        if g["samples"] / total < 0.002:
            break
        opcodes = ", ".join(f"{name} {n}" for name, n in g["opcodes"].most_common())
        print(f"  {g['executed']:>10.0f} x {'producer' if g['producer'] else 'others':8} {g['instructions']:5d} "
              f"instructions {100 * g['samples'] / total:5.1f}%  {opcodes}")


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
