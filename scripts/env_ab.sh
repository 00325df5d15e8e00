#!/usr/bin/env bash
# Side-by-side timing of one build under several environment settings (the
# run-time variants of FLASH_EXT_FWD_TUNING), each run
# in a process of its own (the variables are read once per process), the
# settings alternating for ENV_AB_ROUNDS rounds (default 2): processes of one
# build differed by up to 8 % on long rows (session 12), so small differences
# need alternating rounds. Prints forward and backward TFLOP/s per row,
# setting and round.
#
#   bash scripts/env_ab.sh "" "FLASH_EXT_FWD_TUNING=wide_keys_min_kv=0" -- \
#       python3 benchmarks/bench_prefill.py --no-flex --impls flash_ext --head-dims 64 128 --seqlens 2048 16384
#
# A setting is a space-separated list of VAR=VALUE ("" runs the defaults).
# The command gets --out-dir appended and must write prefill.json there.
# Writes $OUT/env_ab.tgz (each run's log and JSON).
set -uo pipefail
settings=()
while (( $# > 0 )) && [[ $1 != -- ]]; do settings+=("$1"); shift; done
(( $# > 1 )) && [[ $1 == -- ]] || { echo "usage: $0 SETTING... -- <benchmark command>" >&2; exit 2; }
shift
(( ${#settings[@]} > 0 )) || { echo "give at least one setting" >&2; exit 2; }
OUT=${OUT:-$PWD/.device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
RUNS=$(mktemp -d)
start=$(date +%s)
for round in $(seq 1 "${ENV_AB_ROUNDS:-2}"); do
  for i in "${!settings[@]}"; do
    tag="s${i}r$round"
    # shellcheck disable=SC2086  # a setting is a list of VAR=VALUE words
    env ${settings[$i]} "$@" --out-dir "$RUNS/$tag" > "$RUNS/$tag.log" 2>&1 || echo "run $tag (${settings[$i]:-defaults}): exit $?"
  done
  echo "round $round: $(( $(date +%s) - start ))s"
done
for i in "${!settings[@]}"; do echo "s$i = ${settings[$i]:-defaults}"; done
python3 - "$RUNS" "${#settings[@]}" "${ENV_AB_ROUNDS:-2}" <<'PY'
import json, sys
from pathlib import Path
runs, n, rounds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
tags = [f"s{i}r{r}" for i in range(n) for r in range(1, rounds + 1)]
rows = {}
for tag in tags:
    path = runs / tag / "prefill.json"
    if not path.exists():
        continue
    for row in json.loads(path.read_text())["rows"]:
        if row["impl"] == "flash_ext" and "error" not in row:
            rows.setdefault((row["d"], row["causal"], row["n"]), {})[tag] = (row["fwd_tflops"],
                                                                             row.get("bwd_tflops"))
for phase, col in (("fwd", 0), ("bwd", 1)):
    if not any(v[col] is not None for per_tag in rows.values() for v in per_tag.values()):
        continue  # --no-backward
    print(f"{phase} TFLOP/s | d causal n | " + " ".join(f"{t:>6}" for t in tags))
    for key in sorted(rows):
        print(f"{phase} | {key[0]:3d} {key[1]} {key[2]:5d} | " +
              " ".join(f"{rows[key][t][col]:6.0f}" if rows[key].get(t, (None, None))[col] is not None
                       else "     -" for t in tags))
PY
(cd "$RUNS" && tar czf "$OUT/env_ab.tgz" .)
