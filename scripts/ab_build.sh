#!/usr/bin/env bash
# Side-by-side timing of two builds on the GPU machine, in one call
# (machines are not kept between calls, and timings only compare on one):
# builds the extension twice as gpu_check.sh does (sm_90a), then runs one
# benchmark command against each build in turn.
#
#   AB_FLAGS="-DSOME_KNOB=1" bash scripts/ab_build.sh \
#       python3 benchmarks/bench_prefill.py --quick --no-flex --head-dims 128
#   git archive <commit> | gzip > .scratch/base.tgz   # here; carry .scratch/base.tgz
#   AB_A_TREE=.scratch/base.tgz AB_ROUNDS=2 bash scripts/ab_build.sh python3 benchmarks/bench_prefill.py ...
#   AB_REUSE_A=1 AB_ROUNDS=2 bash scripts/ab_build.sh python3 benchmarks/bench_prefill.py ...
#       # A built in place by an earlier call (gpu_check.sh), B = another branch checked out here since
#
# B is the working tree, built with AB_FLAGS (extra nvcc flags, read through
# NVCC_APPEND_FLAGS; may be empty when AB_A_TREE is given). A is the working
# tree without them, or, with AB_A_TREE, the tree in that tarball (another
# commit's `git archive`). AB_REUSE_A=1 takes the extension already built in
# place (by gpu_check.sh, earlier on the same warm machine) as A; without
# AB_FLAGS, B is then the working tree as it is now (another branch checked
# out here between the two calls), rebuilt in place: only the files whose
# sources changed compile (session 36: 136 s against ~200 for a fresh
# build). The command
# gets --out-dir appended and runs a, b, a, b... (AB_ROUNDS rounds, default
# 1): separate processes of the same build differed by up to 8 % on long rows
# (session 12), so a difference that small needs alternating rounds.
# Needs the CUTLASS headers in .cutlass/include (carried). Writes to $OUT
# ab_build.tgz: ab_build_{a,b}.log, ab_{a,b}{round}.log and each run's JSON
# as {a,b}{round}_<name>.json; prints the summaries last. Two builds take ~6
# minutes on 16 cores: keep the command's sweep short.
set -euo pipefail
(( $# > 0 )) || { echo "usage: [AB_FLAGS=...] [AB_A_TREE=tgz] [AB_REUSE_A=1] $0 <benchmark command>" >&2; exit 2; }
[[ -n ${AB_FLAGS:-} || -n ${AB_A_TREE:-} || ${AB_REUSE_A:-0} == 1 ]] ||
  { echo "set AB_FLAGS (build B's nvcc flags), AB_A_TREE or AB_REUSE_A=1" >&2; exit 2; }
# A: the earlier in-place build (AB_A_TREE takes precedence). B rebuilt in
# place, incrementally, only for a tree change: extra flags need a fresh
# build, which ninja would not redo for flags read from the environment.
A_IN_PLACE=$([[ -z ${AB_A_TREE:-} && ${AB_REUSE_A:-0} == 1 ]] && echo 1 || echo 0)
B_IN_PLACE=$([[ $A_IN_PLACE == 1 && -z ${AB_FLAGS:-} ]] && echo 1 || echo 0)
OUT=${OUT:-$PWD/.device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
STASH=$(mktemp -d)
START=$(date +%s)
CUTLASS_INCLUDE=$PWD/.cutlass/include

build() {  # variant, extra nvcc flags, source tree[, in_place: setup.py's own build folder]
  local start=$(date +%s) temp=(--build-temp "build/ab_$1")
  [[ ${4:-} == in_place ]] && temp=()
  (cd "$3" && NVCC_APPEND_FLAGS="$2" FLASH_EXT_CUTLASS_INCLUDE=$CUTLASS_INCLUDE FLASH_EXT_CUDA=1 \
    FLASH_EXT_CUDA_ARCHS="9.0a" MAX_JOBS=16 python3 setup.py build_ext --inplace "${temp[@]}") \
    > "$OUT/ab_build_$1.log" 2>&1 || { echo "build $1 failed:"; grep -E "error" "$OUT/ab_build_$1.log" | head; exit 1; }
  cp "$3"/flash_ext/_C*.so "$STASH/$1.so"
  echo "build $1 (${2:-no extra flags}, $3): $(( $(date +%s) - start ))s"
}
if [[ -n ${AB_A_TREE:-} ]]; then
  mkdir -p "$STASH/tree_a"
  tar xzf "$AB_A_TREE" -C "$STASH/tree_a"
  build a "" "$STASH/tree_a"
elif [[ $A_IN_PLACE == 1 ]]; then
  cp flash_ext/_C*.so "$STASH/a.so"
  echo "build a: the extension built in place"
else
  build a "" "$PWD"
fi
if [[ $B_IN_PLACE == 1 ]]; then
  build b "" "$PWD" in_place  # where A was built
else
  build b "${AB_FLAGS:-}" "$PWD"
fi
SO=$(ls flash_ext/_C*.so)

for round in $(seq 1 "${AB_ROUNDS:-1}"); do
  for variant in a b; do
    cp "$STASH/$variant.so" "$SO"
    mkdir -p "$STASH/results_$variant$round"
    "$@" --out-dir "$STASH/results_$variant$round" > "$OUT/ab_$variant$round.log" 2>&1 || echo "run $variant$round: exit $?"
    for file in "$STASH/results_$variant$round"/*.json; do
      [[ -e $file ]] && cp "$file" "$OUT/$variant${round}_$(basename "$file")"
    done
  done
done

# Later commands get the working tree's build: A in flags mode (B has the
# flags), B in tree mode and when B was rebuilt in place.
cp "$STASH/$([[ -n ${AB_A_TREE:-} || $B_IN_PLACE == 1 ]] && echo b || echo a).so" "$SO"

A_NAME=$([[ $A_IN_PLACE == 1 ]] && echo "the earlier in-place build" || echo "${AB_A_TREE:-the working tree}")
echo "---- $(( $(date +%s) - START ))s in all; A = $A_NAME, B = the working tree ${AB_FLAGS:+with $AB_FLAGS}"
for variant in a b; do
  echo "== $variant"
  jsons=$(ls "$OUT/${variant}"[0-9]*_*.json 2> /dev/null || true)
  [[ -n $jsons ]] && python3 benchmarks/common.py summary $jsons
done
# The device tool brings back at most 8 files: one tarball of them all.
(cd "$OUT" && files=$(ls ab_build_?.log ab_[ab][0-9]*.log [ab][0-9]*_*.json 2> /dev/null) &&
  tar czf ab_build.tgz $files && rm -f $files)
