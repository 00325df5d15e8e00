"""The performance notes' analysis tools (scripts/), on made-up inputs whose
answer is known."""
import importlib.util
import random
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
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
