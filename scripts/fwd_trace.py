"""Where the Hopper forward's time goes inside a tile: clock64 timestamps of
its phases (scripts/fwd_trace.patch, compiled in only with
-DFLASH_EXT_FWD_TRACE) for the first 8 blocks, one thread per warp group.

    patch -p1 < scripts/fwd_trace.patch
    NVCC_APPEND_FLAGS=-DFLASH_EXT_FWD_TRACE FLASH_EXT_CUDA=1 FLASH_EXT_CUDA_ARCHS=9.0a \\
        python3 setup.py build_ext --inplace
    python3 scripts/fwd_trace.py run [--out-dir DIR]      # on the GPU: traces of the prefill shapes, .npz each
    python3 scripts/fwd_trace.py summary DIR/trace_*.npz  # anywhere: each phase's mean, median and p90

Events (an id in the low 8 bits of each 64-bit word, the SM's clock above):
the producer's tile pushed (20), K stage acquired (21), Q load issued (22), V
stage acquired (23); each consumer group's tile taken (1), Q landed (2), first
K landed (3), first turn (4), first S landed (5), first P ready (6), then per
key tile K landed (13), turn (7), V landed (14), S landed (8), P ready (9),
and the last P V's turn (10), its product landed (11), the epilogue done (12).
A tile's time beyond (key tiles - 1) x the steady key tile is its fixed cost
(scripts/tile_cost.py fits the same from whole-call times).
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
from pathlib import Path

import numpy as np

SMS, ROLES, EVENTS = 8, 4, 8192  # as trace::k* in the patch
# (head dim, causal, n), in fwd_tuning.py's (the prefill bench's) shapes.
CONFIGS = [(128, 0, 2048), (128, 0, 512), (256, 1, 512), (64, 1, 512), (128, 0, 16384), (128, 1, 2048),
           (256, 0, 2048), (64, 0, 512)]


def run(out_dir: Path) -> None:
    """Trace one forward of each configuration (after five untraced ones) into out_dir/trace_*.npz."""
    import torch
    from fwd_tuning import forward_calls  # (scripts/ is the script's directory; it puts the repo on the path)

    import flash_ext
    lib = ctypes.CDLL(flash_ext._C.__file__)
    out_dir.mkdir(parents=True, exist_ok=True)
    for d, causal, n in CONFIGS:
        ours, _, _ = forward_calls(d, causal, n)
        for _ in range(5):
            ours()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        ours()
        end.record()
        torch.cuda.synchronize()
        events = np.zeros((SMS, ROLES, EVENTS), dtype=np.uint64)
        counts = np.zeros((SMS, ROLES), dtype=np.int32)
        rc = getattr(lib, f"flash_ext_fwd_trace_d{d}")(ctypes.c_void_p(events.ctypes.data),
                                                        ctypes.c_void_p(counts.ctypes.data))
        if rc != 0:
            raise RuntimeError(f"reading the trace of d = {d} failed: cudaError {rc}")
        path = out_dir / f"trace_d{d}_c{causal}_n{n}.npz"
        np.savez_compressed(path, events=events, counts=counts, us=start.elapsed_time(end) * 1e3)
        print(f"d={d} causal={causal} n={n}: {start.elapsed_time(end) * 1e3:.1f} us, events per role "
              f"{counts[0].tolist()} -> {path}", flush=True)


def consumer_tiles(events: list[tuple[int, int]]) -> list[dict[int, list[int]]]:
    """A consumer group's events cut into tiles (Q landed .. epilogue done): event id -> its clocks."""
    tiles, current = [], None
    for clock, event in events:
        if event == 2:
            current = {}
        if current is not None:
            current.setdefault(event, []).append(clock)
            if event == 12:
                tiles.append(current)
                current = None
    return tiles


def tile_phases(events: np.ndarray, counts: np.ndarray) -> dict:
    """The consumer groups' tiles in `events` (SMS x ROLES x EVENTS, `counts` used each): "phases" (name ->
    cycles of each occurrence), "steady" (the median key tile after the first), "fixed" (each tile's cycles
    beyond (key tiles - 1) x steady) and "gaps" (a group's epilogue end to its next tile's Q)."""
    phases: dict[str, list[int]] = {}
    tiles, steady, gaps = [], [], []

    def phase(name: str, begin: int, end: int) -> None:
        phases.setdefault(name, []).append(end - begin)

    for sm in range(events.shape[0]):
        for role in range(1, events.shape[1]):
            raw = events[sm, role, :counts[sm, role]]
            previous_end = None
            for t in consumer_tiles([(int(x) >> 8, int(x) & 0xFF) for x in raw]):
                q = t[2][0]
                if previous_end is not None:
                    gaps.append(q - previous_end)
                previous_end = t[12][0]
                phase("Q -> first K", q, t[3][0])
                phase("first K -> turn", t[3][0], t[4][0])
                phase("turn -> first S", t[4][0], t[5][0])
                phase("first S -> P", t[5][0], t[6][0])
                p = t[6][0]
                for k, turn, v, s, p_next in zip(*(t.get(e, []) for e in (13, 7, 14, 8, 9))):
                    phase("loop: P -> K", p, k)
                    phase("loop: K -> turn", k, turn)
                    phase("loop: turn -> V", turn, v)
                    phase("loop: V -> S", v, s)
                    phase("loop: S -> P", s, p_next)
                    steady.append(p_next - p)
                    p = p_next
                phase("last: P -> turn", p, t[10][0])
                phase("last: turn -> P V", t[10][0], t[11][0])
                phase("epilogue", t[11][0], t[12][0])
                tiles.append((t[12][0] - q, len(t.get(9, [])) + 1))
    step = statistics.median(steady) if steady else 0.0
    return {"phases": phases, "steady": step, "fixed": [c - (k - 1) * step for c, k in tiles], "gaps": gaps,
            "key_tiles": [k for _, k in tiles]}


def summary(path: Path) -> None:
    """Each phase's mean / median / p90 in cycles over the traced blocks' consumer groups, and the tiles'
    fixed cost."""
    data = np.load(path)
    found = tile_phases(data["events"], data["counts"])
    if not found["fixed"]:
        print(f"{path}: no consumer tiles traced")
        return
    mean = statistics.fmean
    print(f"{path}: {float(data['us']):.1f} us; {len(found['fixed'])} group tiles of {mean(found['key_tiles']):.2f} "
          f"key tiles; steady key tile {found['steady']:.0f} cycles, fixed cost {mean(found['fixed']):.0f} "
          f"+ {mean(found['gaps']) if found['gaps'] else 0:.0f} between tiles")
    for name, cycles in found["phases"].items():
        ordered = sorted(cycles)
        print(f"  {name:20s} mean {mean(cycles):7.0f}  median {statistics.median(cycles):7.0f}  "
              f"p90 {ordered[int(0.9 * (len(ordered) - 1))]:7.0f}  n {len(cycles)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    run_parser = sub.add_parser("run", help="trace the configurations (GPU, traced build)")
    run_parser.add_argument("--out-dir", type=Path, default=Path("."))
    summary_parser = sub.add_parser("summary", help="print the phases of saved traces")
    summary_parser.add_argument("paths", type=Path, nargs="+")
    args = parser.parse_args()
    if args.action == "run":
        run(args.out_dir)
    else:
        for path in args.paths:
            summary(path)


if __name__ == "__main__":
    main()
