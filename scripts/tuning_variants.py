"""Running one measurement under several settings of a tuning variable
(FLASH_EXT_DECODE_TUNING), one process each: the kernels read the variable
once per process. Used by decode_tuning.py (fwd_tuning.py alternates its
settings in one process)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any


def variants_from(args: list[str], defaults: dict[str, str]) -> dict[str, str]:
    """``--variant NAME=SPEC`` arguments as name -> spec; the defaults when none."""
    return dict(v.split("=", 1) for v in args) if args else defaults


def run_variants(variable: str, variants: dict[str, str], child: list[str],
                 timeout_s: float = 150.0) -> dict[str, Any]:
    """name -> the JSON that ``child`` (a command) prints on its last line,
    run with ``variable`` set to each spec. A variant whose process fails, or
    runs past ``timeout_s`` (a kernel that hangs), is reported and left out,
    so the others still come back; none left exits with status 1."""
    results: dict[str, Any] = {}
    for name, spec in variants.items():
        try:
            run = subprocess.run(child, env=dict(os.environ, **{variable: spec}), capture_output=True, text=True,
                                 timeout=timeout_s)
        except subprocess.TimeoutExpired:
            print(f"{name}: no result within {timeout_s:.0f} s")
            continue
        if run.returncode != 0:
            print(f"{name}: failed\n{run.stderr[-2000:]}")
            continue
        results[name] = json.loads(run.stdout.strip().splitlines()[-1])
    if not results:
        sys.exit(1)
    return results
