"""The performance notes' analysis tools (scripts/) and the results files'
helpers (benchmarks/common.py), on made-up inputs whose answer is known."""
import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_tile_cost_recovers_the_cost_per_tile_and_the_rate(causal, backward):
    """Rows timed as rounds * (c + w / r) give back c and r, from the forward
    or the backward times (2.5x the FLOPs); the rows' shapes are the prefill
    benchmark's (batch * n = 16k tokens, heads * d = 2048)."""
    tile_cost = _load("tile_cost")
    rng = random.Random()
    d, sms = rng.choice([64, 128, 256]), rng.choice([108, 132])
    c_us, rate = rng.uniform(0.5, 10.0), rng.uniform(300.0, 800.0)  # us, TFLOP/s
    rows = []
    for n in (512, 1024, 2048, 4096, 8192, 16384):
        batch, heads = 16384 // n, 2048 // d
        tiles = -(-n // 128) * batch * heads
        flops = 4 * batch * heads * n * n * d / (2 if causal else 1) * (2.5 if backward else 1)
        us_per_tile = c_us + flops / tiles / (rate * 1e6 / sms)
        ms = tiles / sms * us_per_tile / 1e3
        # the other pass's time is noise the fit must not read
        rows.append({"n": n, "batch": batch, "heads": heads, "fwd_ms": ms if not backward else rng.random(),
                     "bwd_ms": ms if backward else rng.random()})
    rng.shuffle(rows)
    fitted_c, fitted_rate, per_tile = tile_cost.tile_model(rows, d, causal, sms, backward)
    assert fitted_c == pytest.approx(c_us, rel=1e-6)
    assert fitted_rate == pytest.approx(rate, rel=1e-6)
    assert [n for n, _ in per_tile] == sorted(row["n"] for row in rows)


def test_ncu_stalls_groups_instructions_by_execution_count():
    # A made-up kernel: setup once per warp, a tile loop (per tile), a key
    # loop (per pass) and the producer's code after USETMAXREG.DEALLOC; the
    # groups' sizes, samples, producer flags and opcodes are known.
    ncu_stalls = _load("ncu_stalls")
    rng = random.Random(3)
    rows, want = [], {}
    layout = [(8, False, 12, ["S2R", "SHFL.IDX"]),
              (4096, False, 30, ["HGMMA.64x128x16.F32.BF16", "MUFU.EX2", "@P0 BAR.SYNC.DEFER_BLOCKING", "FMUL"]),
              (1024, False, 20, ["STSM.16.M88.4", "SYNCS.ARRIVE.TRANS64", "ST.E"]),
              (9, True, 1, ["USETMAXREG.DEALLOC.CTAPOOL"]),
              (256, True, 10, ["UTMALDG.4D", "SYNCS.PHASECHK.TRANS64.TRYWAIT"])]
    address = 0
    for executed, producer, count, opcodes in layout:
        for i in range(count):
            samples = float(rng.randint(0, 50))
            rows.append((address, f"{opcodes[i % len(opcodes)]} R1, R2", samples, float(executed)))
            entry = want.setdefault((executed, producer), [0, 0.0])
            entry[0] += 1
            entry[1] += samples
            address += 16
    rng.shuffle(rows)
    groups = ncu_stalls.execution_groups(rows)
    got = {(g["executed"], g["producer"]): [g["instructions"], g["samples"]] for g in groups}
    assert got == want
    assert [g["samples"] for g in groups] == sorted((g["samples"] for g in groups), reverse=True)
    per_pass = next(g for g in groups if g["executed"] == 4096)
    assert per_pass["opcodes"] == {"HGMMA": 8, "MUFU.EX2": 8, "BAR": 7}
    per_tile = next(g for g in groups if g["executed"] == 1024)
    assert per_tile["opcodes"] == {"STSM": 7, "SYNCS": 7, "ST.E": 6}
    assert next(g for g in groups if g["executed"] == 256)["producer"]


def _made_up_sass(loop_spills: int, rng: random.Random, loop_atoms: int = 0) -> tuple[str, str, list[int]]:
    """nvdisasm text (line info, labels) of two functions: `other`, without
    tensor-core code, and `kernel`, whose outer loop holds an inner loop that
    issues HGMMA with `loop_spills` local accesses and `loop_atoms` returning
    atomics (beside a REDG) spread in it, plus STL/LDL and an ATOMG outside
    it; and the matching -plr -lrm count text. Returns both and the inner
    loop's (first, last, instruction count)."""
    lines, live_lines = [], []
    address = 0

    def emit(text: str, source: int) -> None:
        nonlocal address
        lines.append(f'\t//## File "/src/kernel.cuh", line {source}')
        lines.append(f"        /*{address:04x}*/                   {text} ;   /* 0x0000 */")
        live_lines.append(f"        /*{address:04x}*/                   {text} ;   // | {100 + address // 16 % 50} |")
        address += 16

    for name in ("_Z5otherv", "_Z6kernelv"):
        header = f'\t.section\t.text.{name},"ax",@progbits'
        lines.append(header)
        live_lines.append(header)
        address = 0
        if name == "_Z5otherv":
            for _ in range(5):
                emit("FADD R1, R2, R3", 10)
            emit("STL [R1], R2", 11)
            emit("EXIT", 12)
            continue
        emit("STL [R1+0x4], R7", 20)                 # before the loops: not counted
        lines.append(".L_x_0:")                        # outer loop head
        emit("IMAD R2, R3, R4, RZ", 21)
        lines.append(".L_x_1:")                        # inner loop head
        first = address
        body = ["HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ", "FFMA R5, R6, R7, R8", "MUFU.EX2 R9, R9"]
        body += ["LDL R10, [R1+0x8]"] * loop_spills
        body += ["ATOMG.E.ADD.F32x4.FTZ.RN.STRONG.GPU PT, RZ, desc[UR6][R2.64], R4"] * loop_atoms
        body += ["REDG.E.ADD.F32x4.FTZ.RN.STRONG.GPU desc[UR6][R2.64], R4"]
        rng.shuffle(body)
        for i, text in enumerate(body):
            emit(text, 30 + i)
        emit("@P0 BRA `(.L_x_1)", 40)
        last = address - 16
        emit("LDL R2, [R1+0x4]", 41)                 # in the outer loop only
        emit("ATOMG.E.ADD.STRONG.GPU PT, R3, desc[UR6][R4.64], R5", 41)
        emit("@P1 BRA `(.L_x_0)", 42)
        emit("EXIT", 43)
    return "\n".join(lines), "\n".join(live_lines), [first, last, len(body) + 1]


@pytest.mark.parametrize("loop_spills", [0, 3])
@pytest.mark.parametrize("loop_atoms", [0, 2])
def test_loop_spills_finds_the_innermost_tensor_core_loop(loop_spills, loop_atoms):
    """The loop reported is the smallest backward branch around an HGMMA;
    only the spills and returning atomics (ATOMG, not REDG) inside it count;
    the live-register column is read per instruction."""
    loop_spills_tool = _load("loop_spills")
    sass, live_text, (first, last, count) = _made_up_sass(loop_spills, random.Random(), loop_atoms)
    functions = loop_spills_tool.parse_disassembly(sass)
    assert sorted(functions) == ["_Z5otherv", "_Z6kernelv"]
    assert loop_spills_tool.mma_loops(functions["_Z5otherv"]) == []
    assert loop_spills_tool.report(functions["_Z5otherv"], {}) == ["  no tensor-core loop"]
    kernel = functions["_Z6kernelv"]
    assert loop_spills_tool.mma_loops(kernel) == [(first, last)]
    live = loop_spills_tool.parse_live_counts(live_text)["_Z6kernelv"]
    assert live[first] == 100 + first // 16 % 50
    lines = loop_spills_tool.report(kernel, live)
    assert lines[0].endswith(f"{count} instructions, {loop_spills} local loads/stores")
    spill_lines = [line for line in lines[1:] if "LDL" in line]
    assert len(spill_lines) == loop_spills and all("kernel.cuh:" in line for line in spill_lines)
    atom_lines = [line for line in lines[1:] if "ATOMG.E" in line]
    assert len(atom_lines) == loop_atoms and all("kernel.cuh:" in line for line in atom_lines)
    assert any(f"{loop_atoms} returning global atomics" in line for line in lines) == (loop_atoms > 0)
    assert not any("REDG.E" in line for line in lines)
    assert f"{live[first]} at the loop head" in lines[-2]
    assert lines[-1].endswith(str(max(live.values())))


def test_loop_spills_reports_each_innermost_tensor_core_loop():
    """Two sibling loops with HGMMA (a masked and an unmasked key loop) inside
    an outer one: both are reported, the outer one is not; a loop without
    tensor-core instructions is not either."""
    loop_spills_tool = _load("loop_spills")
    rng = random.Random()
    spills = [rng.randint(0, 3), rng.randint(0, 3)]
    text, address, want = ['\t.section\t.text._Z1kv,"ax",@progbits'], 0, []

    def emit(instr: str) -> int:
        nonlocal address
        text.append(f"        /*{address:04x}*/                   {instr} ;")
        address += 16
        return address - 16

    text.append(".L_x_9:")
    emit("IADD3 R1, R1, 1, RZ")
    for loop, n in enumerate(spills):
        text.append(f".L_x_{loop}:")
        first = emit("HGMMA.64x128x16.F32.BF16 R24, R8, gdesc[UR4], R24")
        for _ in range(n):
            emit("LDL R3, [R1]")
        last = emit(f"@P{loop} BRA `(.L_x_{loop})")
        want.append((first, last))
    text.append(".L_x_7:")
    emit("STL [R1], R3")
    emit("@P3 BRA `(.L_x_7)")  # a loop without tensor-core work
    emit("@P2 BRA `(.L_x_9)")
    fn = loop_spills_tool.parse_disassembly("\n".join(text))["_Z1kv"]
    assert loop_spills_tool.mma_loops(fn) == want
    lines = [line for line in loop_spills_tool.report(fn, {}) if line.startswith("  loop")]
    assert [int(line.split(", ")[1].split()[0]) for line in lines] == spills


def _load_bench_common():
    spec = importlib.util.spec_from_file_location("bench_common", SCRIPTS.parent / "benchmarks" / "common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    return common


def test_in_turns_takes_turns_and_drops_a_call_that_raised():
    """benchmarks/common.in_turns: every call once per round in order; a call
    that raises keeps its error, its earlier results, and no later turn."""
    common = _load_bench_common()
    rounds, fail_at = random.randint(2, 5), random.randint(1, 2)
    order = []

    def call(key: str):
        def run() -> int:
            order.append(key)
            if key == "b" and order.count("b") == fail_at:
                raise RuntimeError("refused")
            return len(order)
        return run

    results, errors = common.in_turns({"a": call("a"), "b": call("b"), "c": call("c")}, rounds)
    assert order[:3] == ["a", "b", "c"]
    assert order.count("a") == order.count("c") == rounds and order.count("b") == fail_at
    assert errors == {"b": "RuntimeError: refused"}
    assert len(results["b"]) == fail_at - 1 and len(results["a"]) == rounds
    assert results["a"] == sorted(results["a"])  # in round order


def test_merge_puts_a_partial_runs_rows_in_place_of_the_same_settings(tmp_path):
    """benchmarks/common.py merge: a run of two implementations at one head
    dim replaces exactly those rows of the device's prefill file, keeps the
    others and their order, appends a setting the file lacked, and says in
    the command which run gave which rows; a record of another device is
    refused."""
    common = _load_bench_common()
    rng = random.Random()
    header = {"bench": "prefill", "device": "GPU X", "slug": "gpu-x", "torch": "t", "cuda": "c", "cudnn": 1,
              "quick": False}

    def row(impl, d, causal, n):
        return {"impl": impl, "dtype": "bfloat16", "d": d, "causal": causal, "n": n, "batch": 16384 // n,
                "heads": 2048 // d, "fwd_ms": rng.random(), "fwd_tflops": rng.uniform(100, 700),
                "bwd_ms": rng.random(), "bwd_tflops": rng.uniform(100, 600)}

    settings = [(impl, d, causal, n) for impl in ("flash_ext", "sdpa_cudnn", "sdpa_flash") for d in (64, 128)
                for causal in (False, True) for n in (512, 2048)]
    old = {**header, "commit": "aaa", "command": "the full sweep", "date": "2026-01-01",
           "ceilings": {"matmul_bf16_tflops": 780.0}, "rows": [row(*s) for s in settings]}
    d = rng.choice([64, 128])
    added = ("flash_ext", d, False, 4096)
    new_settings = [s for s in settings if s[0] != "sdpa_flash" and s[1] == d] + [added]
    rng.shuffle(new_settings)
    new = {**header, "commit": "bbb", "command": "the partial sweep", "date": "2026-02-02",
           "ceilings": {"matmul_bf16_tflops": 790.0}, "rows": [row(*s) for s in new_settings]}
    results = tmp_path / "results"
    dest = results / "gpu-x" / "prefill.json"
    dest.parent.mkdir(parents=True)
    dest.write_text(json.dumps(old))
    new_file = tmp_path / "new.json"
    new_file.write_text(json.dumps(new))

    common._merge([str(new_file)], "machine Y", results=results)
    merged = json.loads(dest.read_text())

    def key(r):
        return (r["impl"], r["d"], r["causal"], r["n"])

    assert [key(r) for r in merged["rows"]] == settings + [added]
    by_old, by_new = {key(r): r for r in old["rows"]}, {key(r): r for r in new["rows"]}
    for r in merged["rows"]:
        assert r == by_new.get(key(r), by_old.get(key(r)))
    assert sum(key(r) in by_new for r in merged["rows"]) == len(new_settings)
    assert merged["command"].startswith("machine Y: the partial sweep (commit bbb, 2026-02-02; ceilings "
                                        "matmul_bf16_tflops 790)")
    assert merged["command"].endswith("The rest: the full sweep")
    assert merged["ceilings"] == old["ceilings"] and merged["date"] == new["date"]
    assert "the partial sweep" in dest.with_suffix(".md").read_text()
    with pytest.raises(ValueError, match="slug"):
        common.merge_records(old, {**new, "slug": "gpu-z"})


def test_fwd_trace_cuts_tiles_into_phases():
    """scripts/fwd_trace.py: made-up consumer timelines with random phase
    lengths come back as those lengths; a tile's fixed cost is its time
    beyond its key tiles at the steady rate; the producer's events and a
    tile cut off by a full buffer are left out."""
    fwd_trace = _load("fwd_trace")
    import numpy as np
    rng = random.Random()
    events = np.zeros((fwd_trace.SMS, fwd_trace.ROLES, fwd_trace.EVENTS), dtype=np.uint64)
    counts = np.zeros((fwd_trace.SMS, fwd_trace.ROLES), dtype=np.int32)
    step = 10 * rng.randint(100, 180)  # every key tile after the first: 5 phases summing to it
    want_fixed, want_epilogue, want_gaps = [], [], []
    for sm, role in ((0, 1), (0, 2), (3, 3)):
        clock, trace = 1000, [(1000, 0)]
        for tile in range(rng.randint(2, 4)):
            if tile:
                gap = rng.randint(10, 500)
                want_gaps.append(gap)
                clock += gap
            trace.append((clock, 2))
            begin = clock
            for event in (3, 4, 5, 6):
                clock += rng.randint(1, 400)
                trace.append((clock, event))
            keys = rng.randint(2 if tile == 0 else 1, 5)  # the key loop runs at least once
            for _ in range(keys - 1):
                parts = [step // 10, step // 5, step // 10, step // 5, step - 3 * (step // 5)]
                for event, part in zip((13, 7, 14, 8, 9), parts):
                    clock += part
                    trace.append((clock, event))
            for event in (10, 11, 12):
                clock += rng.randint(1, 400)
                trace.append((clock, event))
            want_epilogue.append(trace[-1][0] - trace[-2][0])
            want_fixed.append(clock - begin - (keys - 1) * step)
        trace += [(clock + 5, 1), (clock + 9, 2), (clock + 20, 3)]  # cut off before its epilogue
        for i, (at, event) in enumerate(trace):
            events[sm, role, i] = (at << 8) | event
        counts[sm, role] = len(trace)
    events[0, 0, :3] = [(1 << 8) | 20, (2 << 8) | 21, (3 << 8) | 22]
    counts[0, 0] = 3
    found = fwd_trace.tile_phases(events, counts)
    assert found["fixed"] == want_fixed and found["gaps"] == want_gaps
    assert found["phases"]["epilogue"] == want_epilogue
    assert found["steady"] == step
    assert set(found["phases"]["loop: K -> turn"]) == {step // 5}


def test_fwd_trace_patch_applies():
    """scripts/fwd_trace.patch still applies to the kernel it instruments."""
    import shutil
    import subprocess
    if shutil.which("patch") is None:
        pytest.skip("no patch program")
    result = subprocess.run(["patch", "--dry-run", "-p1", "-d", str(SCRIPTS.parent), "-i",
                             str(SCRIPTS / "fwd_trace.patch")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
