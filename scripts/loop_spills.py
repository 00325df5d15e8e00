"""Local-memory traffic and register pressure in the tensor-core loops of our
CUDA kernels, read from the SASS: for each kernel, its innermost loops that
issue wgmma (HGMMA) or mma (HMMA), each loop's instruction count, the spill
loads and stores (LDL/STL) and returning global atomics (ATOMG) inside it
with their source lines, and the live registers at the loop's head and at
their peak. ptxas's "bytes spill" says how much spills somewhere; this says
whether it is on the hot path, which is what sessions 13, 20 and 21 of
benchmarks/NOTES.md needed (and found by hand).

    python scripts/loop_spills.py csrc/cuda/instantiations/sm90_bwd_hdim128_bf16.cu [--kernel attention_bwd]
    python scripts/loop_spills.py some.cubin [--kernel REGEX]
    python scripts/loop_spills.py FILE.cu -D FLASH_EXT_SOME_KNOB=0   # extra nvcc defines

A .cu file is compiled first for sm_90a with the build's kernel flags and
-lineinfo (CUTLASS headers from FLASH_EXT_CUTLASS_INCLUDE or .cutlass/include);
nvdisasm comes from PATH, CUDA_HOME or Triton's bundled copy.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_SECTION = re.compile(r"^\s*\.section\s+\.text\.(\S+?),")
_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')
_LABEL = re.compile(r"^\s*\.(L_x_\d+):")
_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_TARGET = re.compile(r"BRA\b.*?`?\(?\.(L_x_\d+)\)?")
_LIVE = re.compile(r"/\*([0-9a-f]{4,})\*/.*?//\s*\|\s*(\d+)")


@dataclass
class Instr:
    address: int
    text: str
    source: str = ""  # file:line of the instruction, when the cubin has line info


@dataclass
class Function:
    name: str
    instrs: list[Instr] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)  # label -> address of the instruction after it


def parse_disassembly(text: str) -> dict[str, Function]:
    """nvdisasm output (with or without --print-line-info) -> functions by
    mangled name."""
    functions: dict[str, Function] = {}
    current: Function | None = None
    source, pending = "", []
    for line in text.splitlines():
        if m := _SECTION.match(line):
            current = functions.setdefault(m[1], Function(m[1]))
            source, pending = "", []
            continue
        if current is None:
            continue
        if m := _LINE.search(line):
            source = f"{Path(m[1]).name}:{m[2]}"
            continue
        if m := _LABEL.match(line):
            pending.append(m[1])
            continue
        if m := _INSTR.search(line):
            address = int(m[1], 16)
            current.instrs.append(Instr(address, m[2].strip(), source))
            for label in pending:
                current.labels[label] = address
            pending = []
    return {name: f for name, f in functions.items() if f.instrs}


def mma_loops(fn: Function) -> list[tuple[int, int]]:
    """(first, last) addresses of the innermost loops that hold a tensor-core
    instruction: backward-branch ranges around an HGMMA/HMMA that overlap
    no smaller such range (a kernel may have several: masked and unmasked
    key loops), in address order."""
    mma = [i.address for i in fn.instrs if re.search(r"\bHG?MMA\b", i.text)]
    loops = set()
    for i in fn.instrs:
        if "BRA" not in i.text or not (m := _TARGET.search(i.text)) or m[1] not in fn.labels:
            continue
        head = fn.labels[m[1]]
        if head < i.address and any(head <= a <= i.address for a in mma):
            loops.add((head, i.address))
    # Smallest first; a range overlapping a kept one (an enclosing loop, or
    # one of a rotated loop's several back branches) is not reported.
    inner: list[tuple[int, int]] = []
    for r in sorted(loops, key=lambda r: r[1] - r[0]):
        if not any(r[0] <= k[1] and k[0] <= r[1] for k in inner):
            inner.append(r)
    return sorted(inner)


def parse_live_counts(text: str) -> dict[str, dict[int, int]]:
    """nvdisasm -plr -lrm count output -> per function, live general-purpose
    registers at each instruction address."""
    counts: dict[str, dict[int, int]] = {}
    current: dict[int, int] | None = None
    for line in text.splitlines():
        if m := _SECTION.match(line):
            current = counts.setdefault(m[1], {})
            continue
        if current is not None and (m := _LIVE.search(line)):
            current[int(m[1], 16)] = int(m[2])
    return counts


def _where(i: Instr) -> str:
    """One listed instruction: address, text and source line."""
    return f"    {i.address:#06x} {i.text[:48]:48s} {i.source}"


def report(fn: Function, live: dict[int, int]) -> list[str]:
    lines = []
    for first, last in mma_loops(fn):
        body = [i for i in fn.instrs if first <= i.address <= last]
        local = [i for i in body if re.search(r"\b(LDL|STL)\b", i.text)]
        # A global atomic whose result nobody reads should be a fire-and-forget
        # REDG; ptxas kept d = 256's dQ adds as ATOMG once the kernel held a
        # release fence (session 38), at the same instruction count.
        atoms = [i for i in body if re.search(r"\bATOMG\b", i.text)]
        lines.append(f"  loop {first:#x}-{last:#x}: {len(body)} instructions, {len(local)} local loads/stores")
        lines += [_where(i) for i in local]
        if atoms:
            lines.append(f"    {len(atoms)} returning global atomics (ATOMG; REDG if the result is unused):")
            lines += [_where(i) for i in atoms]
        if live:
            lines.append(f"    live registers: {live.get(first, '?')} at the loop head, "
                         f"{max(live.get(i.address, 0) for i in body)} at most in it")
    if not lines:
        return ["  no tensor-core loop"]
    if live:
        lines.append(f"  live registers at most in the kernel: {max(live.values())}")
    return lines


def find_tool(name: str) -> str:
    candidates = [shutil.which(name), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", name)]
    try:
        import triton  # its wheel bundles the CUDA binary utilities
        candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name))
    except ImportError:
        pass
    for c in candidates:
        if c and Path(c).is_file():
            return c
    sys.exit(f"{name} not found (PATH, CUDA_HOME/bin, triton's bundle)")


def compile_cubin(source: Path, defines: list[str], out: Path) -> str:
    """nvcc as setup.py compiles a kernel file for sm_90a, plus -lineinfo;
    returns ptxas's report."""
    cutlass = os.environ.get("FLASH_EXT_CUTLASS_INCLUDE", str(ROOT / ".cutlass" / "include"))
    cmd = [find_tool("nvcc"), "-std=c++17", "-O3", "--use_fast_math", "--expt-relaxed-constexpr",
           "--expt-extended-lambda", "-lineinfo", "-Xptxas=-v", f"-I{ROOT / 'csrc'}", f"-I{cutlass}",
           "-DFLASH_EXT_SM90A", "-DFLASH_EXT_WITH_CUDA", "-gencode=arch=compute_90a,code=sm_90a", "-cubin",
           *[f"-D{d}" for d in defines], str(source), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(done.stderr[-4000:])
    return done.stderr


def ptxas_spills(report_text: str) -> dict[str, str]:
    """Mangled function name -> ptxas's 'N bytes spill stores, M bytes spill loads'."""
    spills, current = {}, None
    for line in report_text.splitlines():
        if m := re.search(r"Compiling entry function '(\S+)'", line):
            current = m[1]
        elif current and (m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            spills[current] = f"{m[1]}/{m[2]} bytes of spill"
    return spills


def demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if not tool:
        return names
    return subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path, help="a .cu file (compiled here) or a .cubin")
    parser.add_argument("--kernel", default="attention", help="regex on the mangled names (default: attention)")
    parser.add_argument("-D", dest="defines", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        spills: dict[str, str] = {}
        cubin = args.input
        if args.input.suffix == ".cu":
            cubin = Path(tmp) / "kernels.cubin"
            spills = ptxas_spills(compile_cubin(args.input, args.defines, cubin))
        nvdisasm = find_tool("nvdisasm")
        sass = subprocess.run([nvdisasm, "--print-line-info", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
        lr = subprocess.run([nvdisasm, "-plr", "-lrm", "count", "-c", str(cubin)], capture_output=True,
                            text=True).stdout
    functions = {n: f for n, f in parse_disassembly(sass).items() if re.search(args.kernel, n)}
    live = parse_live_counts(lr)
    names = sorted(functions)
    for name, pretty in zip(names, demangle(names)):
        print(f"{pretty[:160]}{'  (' + spills[name] + ')' if name in spills else ''}")
        print("\n".join(report(functions[name], live.get(name, {}))))


if __name__ == "__main__":
    main()
