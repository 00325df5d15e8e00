"""The benchmark scripts (benchmarks/), run as a user runs them: each one's
--dry-run prints its sweep on a machine without a GPU, and the prefill and
decode benchmarks' --smoke runs (tiny shapes, on the CPU) write their results
with our rows measured and checked, not turned into errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("script, word", [
    ("bench_prefill.py", "prefill"), ("bench_decode.py", "decode"), ("bench_memory.py", "memory"),
    ("bench_cpu.py", "cpu"), ("bench_varlen.py", "batch"), ("bench_window.py", "window")])
def test_dry_run_prints_the_sweep(script, word):
    """A line per setting, each naming what it runs (`word` in every line)."""
    result = run(script, "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) >= 2, result.stdout
    assert all(word in line.split() for line in lines), result.stdout


def test_varlen_sweeps_the_head_dims_asked_for():
    result = run("bench_varlen.py", "--dry-run", "--head-dims", "256", "64")
    assert result.returncode == 0, result.stderr
    settings = [line.split() for line in result.stdout.splitlines() if line.strip()]
    # Five (batch, seq) shapes, causal and not, per head dim, in the order asked.
    assert [int(words[1]) for words in settings] == [256] * 10 + [64] * 10
    assert {(words[3], words[5], words[7]) for words in settings[:10]} == \
        {(batch, seq, causal) for batch, seq in (("32", "512"), ("8", "1024"), ("4", "2048"), ("2", "4096"),
                                                 ("1", "8192")) for causal in "01"}
    rejected = run("bench_varlen.py", "--dry-run", "--head-dims", "96")
    assert rejected.returncode == 2
    assert "--head-dims" in rejected.stderr and "96" in rejected.stderr


def test_prefill_smoke_writes_our_rows_checked_against_sdpa(tmp_path):
    result = run("bench_prefill.py", "--smoke", "--device", "cpu", "--no-flex", "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "prefill.json").read_text())
    assert "bench_prefill.py --smoke" in data["command"] and data["rows"]
    ours = [row for row in data["rows"] if row["impl"] == "flash_ext"]
    assert len(ours) == 2
    for row in ours:
        assert "error" not in row, row
        assert row["fwd_ms"] > 0 and row["bwd_ms"] > 0 and row["fwd_tflops"] > 0
        assert row["rel_err"] < 2e-2  # our output against an SDPA backend's, in bf16
    assert (tmp_path / "prefill.md").read_text().count("| flash_ext |") == 2


def test_decode_smoke_writes_contiguous_and_paged_rows(tmp_path):
    result = run("bench_decode.py", "--smoke", "--device", "cpu", "--no-flex", "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "decode.json").read_text())
    ours = [row for row in data["rows"] if row["impl"] == "flash_ext"]
    assert {(row["paged"], row["page_size"]) for row in ours} == {(False, None), (True, 64), (True, 256)}
    for row in ours:
        assert "error" not in row, row
        assert row["us"] > 0 and row["GBps"] > 0
