"""Shared helpers of the benchmarks: device naming, timing, the two ceilings,
results files (see RESULTS_FORMAT.md) and compact "ours vs best other" tables.

Run as a script it turns result files into tables:
``python benchmarks/common.py summary A.json [B.json ...]`` prints the compact
comparison of each; ``python benchmarks/common.py import A.json ...`` copies
result files (e.g. fetched from the GPU machine) to
``benchmarks/results/<device>/`` and writes their markdown tables beside them;
``python benchmarks/common.py merge A.json ... [--note TEXT]`` puts a partial
run's rows (a few implementations or head dims) in place of the same
settings' rows there, keeping the rest.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
OURS = "flash_ext"
# Our output against a bf16 reference (rel_err in a row): a right kernel lands near 3e-3.
REL_ERR_LIMIT = 2e-2
# Scripts run from benchmarks/; the extension is built in place in the repo root.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
T = TypeVar("T")

# The columns of each bench's rows, in RESULTS_FORMAT.md's order.
COLUMNS: dict[str, list[str]] = {
    "prefill": ["impl", "dtype", "d", "causal", "n", "batch", "heads", "fwd_ms", "fwd_tflops", "bwd_ms",
                "bwd_tflops"],
    "decode": ["impl", "dtype", "d", "batch", "kv_len", "q_heads", "kv_heads", "q_len", "paged", "page_size",
               "us", "GBps"],
    "memory": ["impl", "n", "d", "heads", "causal", "peak_extra_MiB"],
    "cpu": ["impl", "dtype", "batch", "heads", "n", "d", "causal", "fwd_ms", "fwd_bwd_ms"],
}

# For the compact comparison: the fields that name a setting, and each
# metric with whether higher is better.
KEYS: dict[str, list[str]] = {
    "prefill": ["d", "causal", "n"],
    "decode": ["batch", "kv_len"],
    "memory": ["n"],
    "cpu": ["dtype", "batch", "n"],
    "generate": ["decoding", "batch", "new"],
}
METRICS: dict[str, list[tuple[str, bool]]] = {
    "prefill": [("fwd_tflops", True), ("bwd_tflops", True)],
    "decode": [("us", False)],
    "memory": [("peak_extra_MiB", False)],
    "cpu": [("fwd_ms", False), ("fwd_bwd_ms", False)],
    "generate": [("tokens_per_s", True)],
}


# ---------------------------------------------------------------- device

def device_name(device: torch.device) -> str:
    """The device's marketing name: the GPU's, or the CPU model's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_slug(device: torch.device) -> str:
    """Folder name of a device's results: ``h100-80gb-hbm3``, ``h200``, ``cpu-amd-epyc``."""
    name = device_name(device).lower()
    if device.type == "cuda":
        name = name.removeprefix("nvidia ")
    slug = re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return slug if device.type == "cuda" else f"cpu-{slug}"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- timing

def time_ms(fn: Callable[[], Any], device: torch.device, warmup_ms: float = 25, rep_ms: float = 100,
            grad_to_none: Sequence[torch.Tensor] | None = None) -> float:
    """Median time of ``fn`` in milliseconds.

    CUDA: triton's do_bench (events, L2 flushed between runs) with the
    anchors' warm-up and repetition, so our numbers compare with TABLE.md.
    CPU: wall clock; runs until ``rep_ms`` has passed (at least 3, at most 50)
    after a ``warmup_ms`` warm-up of at least one call.
    """
    if device.type == "cuda":
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                              return_mode="median"))
    start = time.perf_counter()
    while True:
        _reset_grads(grad_to_none)
        fn()
        if (time.perf_counter() - start) * 1e3 >= warmup_ms:
            break
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (len(times) < 50 and (time.perf_counter() - start) * 1e3 < rep_ms):
        _reset_grads(grad_to_none)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


K = TypeVar("K")
V = TypeVar("V")


def in_turns(calls: dict[K, Callable[[], V]], rounds: int) -> tuple[dict[K, list[V]], dict[K, str]]:
    """Each call once per round, in order, for ``rounds`` rounds: timings of
    several implementations or layouts taken close together (one kernel
    timed in separate passes drifted by 5-10 % on an H100, sessions 19-20).
    Returns each call's results and, for a call that raised, its error
    text; a call that raised is left out of the later rounds."""
    results: dict[K, list[V]] = {key: [] for key in calls}
    errors: dict[K, str] = {}
    for _ in range(rounds):
        for key, call in calls.items():
            if key in errors:
                continue
            try:
                results[key].append(call())
            except Exception as err:  # a refused call is a row's error, not the end of the sweep
                errors[key] = error_text(err)
    return results, errors


def _reset_grads(tensors: Sequence[torch.Tensor] | None) -> None:
    for t in tensors or ():
        t.grad = None


def measure_ceilings(device: torch.device) -> dict[str, float]:
    """The two ceilings, measured now on this device.

    CUDA: bf16 8192^3 matmul TFLOP/s and a 2 GiB device copy's GB/s counting
    bytes read plus written (as measure_anchors.py). CPU: float32 2048^3
    matmul GFLOP/s with the current thread count.
    """
    if device.type == "cuda":
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        b = torch.randn_like(a)
        ms = time_ms(lambda: a @ b, device)
        out = {"matmul_bf16_tflops": 2 * 8192**3 / ms / 1e9}
        del a, b
        x = torch.empty(2 * 1024**3, dtype=torch.uint8, device=device)
        y = torch.empty_like(x)
        ms = time_ms(lambda: y.copy_(x), device)
        out["copy_GBps_rw"] = 2 * x.numel() / ms / 1e6
        del x, y
        torch.cuda.empty_cache()
        return out
    n = 2048
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    ms = time_ms(lambda: a @ b, device, warmup_ms=50, rep_ms=500)
    return {"matmul_fp32_gflops": 2 * n**3 / ms / 1e6}


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def error_text(err: BaseException) -> str:
    """One line, short enough for a table cell."""
    if is_oom(err):
        return "out of memory"
    return f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"


# ---------------------------------------------------------------- progress

def progress(items: Iterable[T], total: int | None = None, desc: str = "") -> Iterator[T]:
    """tqdm when importable (to stderr), else one line per item on stderr."""
    try:
        from tqdm import tqdm
        yield from tqdm(items, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)
        return
    except ImportError:
        pass
    for i, item in enumerate(items, 1):
        print(f"{desc} {i}/{total if total is not None else '?'}", file=sys.stderr, flush=True)
        yield item


def log(message: str) -> None:
    """A line on stderr that does not tear the progress bar."""
    try:
        from tqdm import tqdm
        tqdm.write(message, file=sys.stderr)
    except ImportError:
        print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- results

def git_commit() -> str:
    """FLASH_EXT_COMMIT when set (a copy of the tree sent to the GPU machine,
    whose .git, if any, is not ours); else HEAD's sha with "+dirty" for
    uncommitted changes."""
    if os.environ.get("FLASH_EXT_COMMIT"):
        return os.environ["FLASH_EXT_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_header(bench: str, device: torch.device, ceilings: dict[str, float], quick: bool) -> dict[str, Any]:
    """Everything of a results file but its rows."""
    header: dict[str, Any] = {
        "bench": bench,
        "device": device_name(device),
        "slug": device_slug(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "commit": git_commit(),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "date": datetime.date.today().isoformat(),
        "quick": quick,
        "ceilings": {k: round(v, 1) for k, v in ceilings.items()},
    }
    if device.type == "cpu":
        # Wall-clock times on a shared machine: the load says how busy it was.
        header["threads"] = torch.get_num_threads()
        header["loadavg_1min"] = round(os.getloadavg()[0], 2)
    return header


def results_path(bench: str, device: torch.device, quick: bool, out_dir: Path | None = None) -> Path:
    """``benchmarks/results/<device>/<bench>.json``; quick runs go to
    ``<bench>_quick.json`` so they never overwrite a full sweep."""
    folder = out_dir or RESULTS / device_slug(device)
    return folder / f"{bench}{'_quick' if quick else ''}.json"


def _rounded(value: Any) -> Any:
    return float(f"{value:.5g}") if isinstance(value, float) else value


def shown(path: Path) -> str:
    """A path relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def write_results(path: Path, header: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """The JSON record and its markdown table beside it. Called after every
    setting, so a run stopped early still leaves what it measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**header, "rows": [{k: _rounded(v) for k, v in r.items()} for r in rows]}
    for target, text in ((path, json.dumps(record, indent=1) + "\n"), (path.with_suffix(".md"), markdown(record))):
        # Written aside, then renamed: a run killed by its time limit leaves whole files.
        partial = target.with_name(target.name + ".partial")
        partial.write_text(text)
        os.replace(partial, target)


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return "" if value is None else str(value)


def markdown(record: dict[str, Any]) -> str:
    """A results file as markdown: its provenance, then one table of all rows
    (an ``error`` column only when some setting was refused)."""
    bench = record["bench"]
    rows = record["rows"]
    columns = list(COLUMNS.get(bench, []))
    for r in rows:  # fields beyond the format's (rel_err, fwd_bwd_ms...), then the errors
        columns += [k for k in r if k not in columns and k != "error"]
    if any("error" in r for r in rows):
        columns.append("error")
    ceilings = ", ".join(f"{k} {v:g}" for k, v in record.get("ceilings", {}).items())
    lines = [
        f"# {bench}{' (quick)' if record.get('quick') else ''}: {record['device']}",
        "",
        f"{record['date']}, commit `{record['commit']}`, torch {record['torch']}, CUDA {record['cuda']}, "
        f"cuDNN {record['cudnn']}." + (f" Ceilings measured in the same run: {ceilings}." if ceilings else "")
        + (f" {record['threads']} threads, load average {record['loadavg_1min']}." if "threads" in record else ""),
        "",
        f"Command: `{record['command']}`",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    comparison = compare(record)
    if comparison:
        lines += ["", "## flash_ext vs the best other", "", "```", *comparison, "```"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- comparison

def is_ours(impl: str) -> bool:
    """Our implementation or one of its forced variants (e.g. flash_ext_sm80)."""
    return impl == OURS or impl.startswith(OURS + "_")


def _ours_variants(bench: str, rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Our rows, split into the variants compared separately (decode: the
    contiguous and each paged cache)."""
    variants: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["impl"] != OURS:
            continue
        name = OURS
        if bench == "decode" and r.get("paged"):
            name = f"paged{r.get('page_size')}"
        variants.setdefault(name, []).append(r)
    return variants


def compare(record: dict[str, Any]) -> list[str]:
    """Lines of a compact table: per setting and metric, ours, the best other
    implementation and the ratio (> 1 means we are better)."""
    bench = record["bench"]
    keys, metrics = KEYS.get(bench), METRICS.get(bench)
    if not keys or not metrics:
        return []
    rows = record["rows"]
    settings: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        settings.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    variants = list(_ours_variants(bench, rows))  # first-seen order: contiguous, then each page size
    head = " ".join(f"{k}" for k in keys)
    lines = [f"{head:>18} | " + " | ".join(
        f"{m}: {v if v != OURS else 'ours'} / best other = ratio" for m, _ in metrics for v in variants)]
    for key, group in settings.items():
        cells = []
        for metric, higher in metrics:
            others = [r for r in group if not is_ours(r["impl"]) and isinstance(r.get(metric), (int, float))]
            best = (max if higher else min)(others, key=lambda r: r[metric]) if others else None
            mine_by_variant = _ours_variants(bench, group)
            for variant in variants:
                mine = mine_by_variant.get(variant, [{}])[0]
                value = mine.get(metric)
                if not isinstance(value, (int, float)):
                    cells.append("ours: " + ("error" if "error" in mine else "—"))
                    continue
                if best is None or value <= 0 or best[metric] <= 0:
                    cells.append(f"{_cell(value)} / {_cell(best[metric]) if best else '—'}")
                    continue
                ratio = value / best[metric] if higher else best[metric] / value
                cells.append(f"{_cell(value)} / {_cell(best[metric])} {best['impl']} = {ratio:.2f}x")
        label = " ".join(_cell(k) for k in key)
        wrong = [r["rel_err"] for r in group if r["impl"] == OURS and r.get("rel_err", 0) > REL_ERR_LIMIT]
        flag = f" | WRONG? rel_err {wrong[0]:.3g}" if wrong else ""
        lines.append(f"{label:>18} | " + " | ".join(cells) + flag)
    return lines if len(lines) > 1 else []


# ---------------------------------------------------------------- CLI of the benches

def base_parser(description: str) -> argparse.ArgumentParser:
    """The options every bench takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a small subset, for the per-iteration check")
    parser.add_argument("--dry-run", action="store_true", help="print the sweep and exit without running it")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="folder for the results (default benchmarks/results/<device>)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    return parser


def compiled_flex_attention() -> Callable[..., torch.Tensor]:
    """FlexAttention under torch.compile, one static compile per shape as the
    anchors' single-shape compile (no dynamic-shape kernel)."""
    from torch.nn.attention.flex_attention import flex_attention
    # The default recompile limit of 8 would send later shapes to eager.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    return torch.compile(flex_attention, dynamic=False)


def strict_flash_ext() -> Any:
    """flash_ext in strict mode, so an unsupported input raises (and becomes an
    error row) rather than timing PyTorch's SDPA as ours. None when the module
    cannot be imported (no built extension): then every one of our rows is an
    error."""
    try:
        import flash_ext
    except Exception as err:  # an unbuilt or broken extension is a result, not a crash
        log(f"flash_ext unavailable: {error_text(err)}")
        return None
    flash_ext.set_strict(True)
    return flash_ext


# A row's measurements, as against the fields naming its setting.
MEASURED = {"fwd_ms", "fwd_tflops", "bwd_ms", "bwd_tflops", "fwd_bwd_ms", "us", "GBps", "peak_extra_MiB"}


def _setting(bench: str, row: dict[str, Any]) -> tuple:
    return tuple(row.get(c) for c in COLUMNS[bench] if c not in MEASURED)


def merge_records(old: dict[str, Any], new: dict[str, Any], note: str = "") -> dict[str, Any]:
    """``old`` with ``new``'s rows in place of its rows of the same settings
    (implementation, dtype, shape...; the rest kept in order, new settings
    appended), and a provenance that says which rows came from which run.
    ``old``'s ceilings stay in the header; ``new``'s go into the command."""
    bench = old["bench"]
    for field in ("bench", "slug", "quick"):
        if old.get(field) != new.get(field):
            raise ValueError(f"merge: the records differ in {field!r} ({old.get(field)!r} and {new.get(field)!r})")
    if bench not in COLUMNS:
        raise ValueError(f"merge: no setting columns are known for the bench {bench!r}; import the whole file instead")
    fresh = {_setting(bench, r): r for r in new["rows"]}
    if len(fresh) != len(new["rows"]):
        raise ValueError("merge: the new record has two rows of one setting")
    rows = [fresh.pop(_setting(bench, r), r) for r in old["rows"]] + list(fresh.values())
    impls = ", ".join(sorted({str(r.get("impl")) for r in new["rows"]}))
    ceilings = ", ".join(f"{k} {v:g}" for k, v in new.get("ceilings", {}).items())
    source = (f"{note + ': ' if note else ''}{new['command']} (commit {new['commit']}, {new['date']}"
              f"{'; ceilings ' + ceilings if ceilings else ''}) gave {len(new['rows'])} rows ({impls}), "
              "in place of those settings' rows")
    return {**old, "rows": rows, "date": new["date"],
            "commit": f"{new['commit']} ({len(new['rows'])} rows); {old['commit']}",
            "command": f"{source}. The rest: {old['command']}"}


def _write_record(dest: Path, record: dict[str, Any]) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(record, indent=1) + "\n")
    dest.with_suffix(".md").write_text(markdown(record))


def _results_file(record: dict[str, Any], results: Path) -> Path:
    return results / record["slug"] / f"{record['bench']}{'_quick' if record.get('quick') else ''}.json"


def _import(paths: list[str], results: Path = RESULTS) -> None:
    for p in paths:
        record = json.loads(Path(p).read_text())
        dest = _results_file(record, results)
        _write_record(dest, record)
        print(f"{p} -> {dest} (+ .md)")


def _merge(paths: list[str], note: str = "", results: Path = RESULTS) -> None:
    for p in paths:
        new = json.loads(Path(p).read_text())
        dest = _results_file(new, results)
        merged = merge_records(json.loads(dest.read_text()), new, note) if dest.exists() else new
        _write_record(dest, merged)
        print(f"{p} -> {dest} (+ .md): {len(new['rows'])} rows merged into {len(merged['rows'])}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["summary", "import", "merge"])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--note", default="",
                        help="merge: how the new rows were made (machine, build), put before their command")
    args = parser.parse_args(argv)
    if args.action == "import":
        _import(args.files)
        return
    if args.action == "merge":
        _merge(args.files, args.note)
        return
    for p in args.files:
        try:
            record = json.loads(Path(p).read_text())
        except (OSError, json.JSONDecodeError) as err:
            print(f"{p}: unreadable ({err})")
            continue
        errors = sum("error" in r for r in record["rows"])
        print(f"== {record['bench']}{' (quick)' if record.get('quick') else ''}: {record['device']}, "
              f"{len(record['rows'])} rows, {errors} errors; ceilings {record.get('ceilings')}")
        print("\n".join(compare(record)) or "(no comparable rows)")


if __name__ == "__main__":
    main(sys.argv[1:])
