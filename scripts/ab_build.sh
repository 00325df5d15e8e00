#!/usr/bin/env bash
# Side-by-side timing of a build-time knob on the GPU machine, in one call
# (machines are not kept between calls, and timings only compare on one):
# builds the extension twice as gpu_check.sh does (sm_90a), the second with
# extra nvcc flags, then runs one benchmark command against each build in turn.
#
#   AB_FLAGS="-DSOME_KNOB=1" bash scripts/ab_build.sh \
#       python3 benchmarks/bench_prefill.py --quick --no-flex --head-dims 128
#
# A is the default build, B the one with AB_FLAGS (read by nvcc through
# NVCC_APPEND_FLAGS). The command gets --out-dir appended. Needs the CUTLASS
# headers in .cutlass/include (carried). Writes to $OUT: ab_build_{a,b}.log,
# ab_{a,b}.log, and each run's JSON as {a,b}_<name>.json; prints both
# summaries last. Two builds take ~5 minutes on 16 cores: keep the command's
# sweep short. AB_REUSE_A=1 takes the extension already built in place (by
# gpu_check.sh, earlier on the same warm machine) as A and builds only B.
set -euo pipefail
(( $# > 0 )) || { echo "usage: AB_FLAGS=... $0 <benchmark command>" >&2; exit 2; }
: "${AB_FLAGS:?set AB_FLAGS to the nvcc flags of build B}"
OUT=${OUT:-$PWD/.device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
STASH=$(mktemp -d)
START=$(date +%s)

build() {  # variant, extra nvcc flags
  local start=$(date +%s)
  NVCC_APPEND_FLAGS="$2" FLASH_EXT_CUTLASS_INCLUDE=$PWD/.cutlass/include FLASH_EXT_CUDA=1 \
    FLASH_EXT_CUDA_ARCHS="9.0a" MAX_JOBS=16 python3 setup.py build_ext --inplace --build-temp "build/ab_$1" \
    > "$OUT/ab_build_$1.log" 2>&1 || { echo "build $1 failed:"; grep -E "error" "$OUT/ab_build_$1.log" | head; exit 1; }
  cp flash_ext/_C*.so "$STASH/$1.so"
  echo "build $1 (${2:-default}): $(( $(date +%s) - start ))s"
}
if [[ ${AB_REUSE_A:-0} == 1 ]]; then
  cp flash_ext/_C*.so "$STASH/a.so"
  echo "build a: the extension built in place"
else
  build a ""
fi
build b "$AB_FLAGS"

for variant in a b; do
  cp "$STASH/$variant.so" flash_ext/"$(basename flash_ext/_C*.so)"
  mkdir -p "$STASH/results_$variant"
  "$@" --out-dir "$STASH/results_$variant" > "$OUT/ab_$variant.log" 2>&1 || echo "run $variant: exit $?"
  for file in "$STASH/results_$variant"/*.json; do
    [[ -e $file ]] && cp "$file" "$OUT/${variant}_$(basename "$file")"
  done
done

cp "$STASH/a.so" flash_ext/"$(basename flash_ext/_C*.so)"  # later commands get the default build

echo "---- $(( $(date +%s) - START ))s in all; A = default, B = $AB_FLAGS"
for variant in a b; do
  echo "== $variant"
  jsons=$(ls "$OUT/${variant}_"*.json 2> /dev/null || true)
  [[ -n $jsons ]] && python3 benchmarks/common.py summary $jsons
done
