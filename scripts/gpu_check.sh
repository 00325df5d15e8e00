#!/usr/bin/env bash
# The per-iteration check on the GPU machine, in one call: build the extension
# with its CUDA kernels, run the CUDA tests, time prefill and decode against
# PyTorch's backends, and print a short table last.
#
#   FLASH_EXT_COMMIT=<sha> bash scripts/gpu_check.sh                 # ~9 min on an H100: --quick sweeps
#   FLASH_EXT_COMMIT=<sha> bash scripts/gpu_check.sh full [BENCH...]  # full sweeps, no tests
#   GPU_CHECK_BENCH=0 GPU_CHECK_BUDGET_S=590 FLASH_EXT_COMMIT=<sha> bash scripts/gpu_check.sh
#       # build and every CUDA test (a ~220 s build leaves the quick mode's
#       # tests too little time beside the benchmarks: ~420 tests, ~170 s)
#
# BENCH is prefill, decode or memory (default all three); the three full
# sweeps and a build may not fit one 10-minute call: split them over two
# (`full prefill`, then `full decode memory`).
# Needs the CUTLASS headers in .cutlass/include (carried). The working tree is
# a copy without .git, so the commit comes from FLASH_EXT_COMMIT. Optional
# wheels in .whl/ (pytest, hypothesis...) are installed to /tmp/site first.
# Environment: GPU_CHECK_BUDGET_S (default 540) bounds the run: later steps get
# what is left; GPU_CHECK_TESTS=0/1 skips/forces the tests (default: run them
# in the quick mode only); GPU_CHECK_BENCH=0 skips the quick benchmarks;
# GPU_CHECK_BUILD=0 takes the extension already built in place (by
# ab_build.sh or gpu_check.sh earlier on the same warm machine).
#
# Writes to $OUT: summary.txt, and gpu_check.tgz holding build.log,
# ptxas.txt, smoke.log, tests.log, bench.log, prefill.json, decode.json and
# memory.json (full only): the device tool brings back at most 8 files.
# Bring results into the repo with: python benchmarks/common.py import <files>.
set -euo pipefail

MODE=${1:-quick}
case "$MODE" in quick|full) ;; *) echo "usage: $0 [full [prefill|decode|memory]...]" >&2; exit 2 ;; esac
shift $(( $# > 0 ? 1 : 0 ))
if (( $# > 0 )); then FULL_BENCHES=("$@"); else FULL_BENCHES=(prefill decode memory); fi
for name in "${FULL_BENCHES[@]}"; do
  [[ $name == prefill || $name == decode || $name == memory ]] || { echo "unknown bench: $name" >&2; exit 2; }
done
OUT=${OUT:-$PWD/.device_out}
mkdir -p "$OUT"
START=$(date +%s)
BUDGET_S=${GPU_CHECK_BUDGET_S:-540}
export PYTHONUNBUFFERED=1
RESULTS_TMP=$(mktemp -d)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
# On any exit, this script's files but the summary go into one tarball.
pack() {
  local files=() name
  for name in build.log ptxas.txt smoke.log tests.log bench.log prefill.json decode.json memory.json; do
    [[ -e $OUT/$name ]] && files+=("$name")
  done
  if (( ${#files[@]} > 0 )); then
    tar czf "$OUT/gpu_check.tgz" -C "$OUT" "${files[@]}" && (cd "$OUT" && rm -f "${files[@]}")
  fi
}
trap pack EXIT

# Seconds a step may take: at most $1, leaving $2 for the steps after it.
step_limit() {
  local want=$1 reserve=$2 left
  left=$(( BUDGET_S - ($(date +%s) - START) - reserve ))
  (( left < want )) && want=$left
  echo $(( want < 0 ? 0 : want ))
}

note "gpu_check $MODE: $(nvidia-smi --query-gpu=name,driver_version,temperature.gpu,clocks.sm --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi'); $(python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'); commit ${FLASH_EXT_COMMIT:-unknown}"

if compgen -G ".whl/*.whl" > /dev/null; then
  # A wheel for another Python (the GPU machine's is 3.12) is reported, not fatal.
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    note "wheels in .whl/: not installed (see the pip error above)"
  fi
fi

# ---- build (no time limit: nothing after it means anything without it)
build_start=$(date +%s)
build_status=ok
if [[ ${GPU_CHECK_BUILD:-1} == 0 ]] && compgen -G "flash_ext/_C*.so" > /dev/null; then
  echo "GPU_CHECK_BUILD=0: the extension built in place by the call before" > "$OUT/build.log"
else
  FLASH_EXT_CUTLASS_INCLUDE=$PWD/.cutlass/include FLASH_EXT_CUDA=1 FLASH_EXT_CUDA_ARCHS="9.0a" \
    FLASH_EXT_PTXAS_VERBOSE=1 MAX_JOBS=16 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
    || build_status=FAILED
fi
build_s=$(( $(date +%s) - build_start ))

# ---- ptxas: registers and spills per kernel, spilling and largest first
python3 - "$OUT/build.log" > "$OUT/ptxas.txt" <<'EOF' || true
import re, subprocess, sys
kernels, current = [], None
for line in open(sys.argv[1], errors="replace"):
    if m := re.search(r"Compiling entry function '(\S+)' for '(\w+)'", line):
        current = {"name": m[1], "arch": m[2], "regs": 0, "stack": 0, "spill_st": 0, "spill_ld": 0}
        kernels.append(current)
    elif current and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)):
        current.update(stack=int(m[1]), spill_st=int(m[2]), spill_ld=int(m[3]))
    elif current and (m := re.search(r"Used (\d+) registers", line)):
        current["regs"] = int(m[1])
        current = None
names = subprocess.run(["c++filt"], input="\n".join(k["name"] for k in kernels), capture_output=True,
                       text=True).stdout.splitlines() if kernels else []
for k, name in zip(kernels, names):
    k["name"] = name
kernels.sort(key=lambda k: (-(k["spill_st"] + k["spill_ld"]), -k["regs"]))
spilling = [k for k in kernels if k["spill_st"] or k["spill_ld"]]
print(f"# {len(kernels)} kernels, {len(spilling)} spilling, max {max((k['regs'] for k in kernels), default=0)} registers")
print("# regs stack spill_stores spill_loads arch kernel")
for k in kernels:
    print(f"{k['regs']:4d} {k['stack']:6d} {k['spill_st']:6d} {k['spill_ld']:6d} {k['arch']} {k['name'][:300]}")
EOF
note "build: $build_status in ${build_s}s; ptxas: $(head -1 "$OUT/ptxas.txt" 2>/dev/null | sed 's/^# //')"
if [[ $build_status != ok ]]; then
  note "build failed; last lines of build.log:"
  grep -E "error|Error" "$OUT/build.log" | head -8 | tee -a "$SUMMARY" || tail -8 "$OUT/build.log" | tee -a "$SUMMARY"
  exit 1
fi

# ---- smoke: one call per kernel family, bounded, so a hanging or faulting
# kernel costs a minute, not the whole call
smoke_rc=0
timeout -k 5 60 python3 - > "$OUT/smoke.log" 2>&1 <<'PYEOF' || smoke_rc=$?
import torch, torch.nn.functional as F
import flash_ext
families = flash_ext._support.cuda_families(torch.cuda.get_device_capability()[0])
for family in families:
    flash_ext.set_cuda_path(family)
    for d in (64, 128, 256):
        q, k, v = (torch.randn(2, 4, 1000, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for causal in (False, True):
            out = flash_ext.scaled_dot_product_attention(q, k, v, is_causal=causal)
            torch.cuda.synchronize()
            ran = flash_ext.last_cuda_kernel_family()
            err = (out.float() - F.scaled_dot_product_attention(q, k, v, is_causal=causal).float()).abs().max().item()
            print(f"smoke {family} ran {ran} d={d} causal={causal}: max abs diff vs SDPA {err:.2e}")
            assert ran == family and err < 0.05, "wrong kernel or wrong answer"
            # backward: gradients against SDPA's, relative to their norm
            q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
            grad = torch.randn_like(out)
            ours = torch.autograd.grad(flash_ext.scaled_dot_product_attention(q, k, v, is_causal=causal), (q, k, v), grad)
            torch.cuda.synchronize()
            ran = flash_ext.last_cuda_kernel_family()
            theirs = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=causal), (q, k, v), grad)
            errs = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(ours, theirs)]
            print(f"smoke {family} backward ran {ran} d={d} causal={causal}: dq/dk/dv relative error vs SDPA "
                  + " ".join(f"{e:.1e}" for e in errs))
            assert max(errs) < 0.03, "wrong gradients"
            q, k, v = (t.detach() for t in (q, k, v))
PYEOF
note "smoke (exit $smoke_rc): $(grep -c '^smoke' "$OUT/smoke.log") calls ok; backward ran: $(grep -o 'backward ran [a-z0-9]* d=[0-9]*' "$OUT/smoke.log" | sort -u | cut -d' ' -f3- | tr '\n' ' ')"
if (( smoke_rc != 0 )); then
  tail -15 "$OUT/smoke.log" | tee -a "$SUMMARY"
  exit 1
fi

# ---- tests: the CUDA-parametrized and cuda-marked ones; failures are recorded, not fatal.
# A test file whose imports are missing there (hypothesis) must not keep the others from running.
if [[ ${GPU_CHECK_TESTS:-$([[ $MODE == quick ]] && echo 1 || echo 0)} != 0 ]]; then
  # (the quick benchmarks after them get 170 s, when they run)
  limit=$(step_limit 300 $([[ $MODE == quick && ${GPU_CHECK_BENCH:-1} != 0 ]] && echo 170 || echo 10))
  if ! python3 -c "import pytest" 2> /dev/null; then
    note "tests: pytest is not installed here (carry its wheel in .whl/)"
  elif (( limit < 20 )); then
    note "tests: skipped, no time left"
  else
    rc=0
    # SIGINT at the limit: pytest stops as on Ctrl-C and still reports the
    # failures so far and its summary (a TERM or KILL leaves no report).
    timeout -s INT -k 10 "$limit" python3 -m pytest tests -q -k cuda --maxfail=5 -p no:cacheprovider \
      --continue-on-collection-errors > "$OUT/tests.log" 2>&1 || rc=$?
    result=$(grep -E "^(=+ )?[0-9]+ (passed|failed|error|skipped|deselected)|no tests ran" "$OUT/tests.log" | tail -1 | tr -d '=' || true)
    (( rc == 124 || rc == 137 )) && result="$result (stopped at its ${limit}s limit)"
    note "tests (exit $rc): ${result:-see tests.log}"
    grep -E "^(FAILED|ERROR) " "$OUT/tests.log" | head -5 | tee -a "$SUMMARY" || true
  fi
fi

# ---- benchmarks: each writes its JSON after every setting, so a stop at the limit keeps what ran
run_bench() {  # name, seconds wanted, seconds to leave for later steps
  local name=$1 limit rc=0 flag=--quick
  [[ $MODE == full ]] && flag=""
  limit=$(step_limit "$2" "$3")
  if (( limit < 20 )); then note "$name: skipped, no time left"; return; fi
  echo "=== bench_$name $flag (limit ${limit}s)" >> "$OUT/bench.log"
  timeout -k 10 "$limit" python3 "benchmarks/bench_$name.py" $flag --out-dir "$RESULTS_TMP" \
    >> "$OUT/bench.log" 2>&1 || rc=$?
  local file
  file=$(ls "$RESULTS_TMP/$name"*.json 2> /dev/null | head -1 || true)
  if [[ -n $file ]]; then cp "$file" "$OUT/$name.json"; fi
  (( rc == 0 )) || note "$name: exit $rc$( (( rc == 124 || rc == 137 )) && echo " (stopped at its ${limit}s limit; partial results)")"
}
if [[ $MODE == full ]]; then
  for name in "${FULL_BENCHES[@]}"; do run_bench "$name" 100000 10; done
elif [[ ${GPU_CHECK_BENCH:-1} != 0 ]]; then
  run_bench prefill 240 75
  run_bench decode 120 10
fi

# ---- the short table, last
{
  echo "---- $(( $(date +%s) - START ))s in all"
  jsons=$(ls "$OUT"/prefill.json "$OUT"/decode.json "$OUT"/memory.json 2> /dev/null || true)
  if [[ -n $jsons ]]; then python3 benchmarks/common.py summary $jsons; fi
  grep -h "WARNING" "$OUT/bench.log" 2> /dev/null | head -5 || true
} | tee -a "$SUMMARY"
