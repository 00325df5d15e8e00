#!/usr/bin/env bash
# compute-sanitizer over every CUDA kernel (scripts/sanitize_cases.py):
# memcheck, racecheck and initcheck (reads of memory nothing wrote).
# Run on a GPU machine after building the extension in place. Arguments go
# to sanitize_cases.py (e.g. --family sm90); SANITIZE_TOOLS picks the tools.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}"
status=0
for tool in ${SANITIZE_TOOLS:-memcheck racecheck initcheck}; do
  echo "== compute-sanitizer --tool $tool"
  # PyTorch's caching allocator hides out-of-bounds accesses inside its
  # blocks: allocate each tensor separately while sanitizing.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --error-exitcode 9 \
    --target-processes all python3 scripts/sanitize_cases.py "$@" > "$out/sanitize_$tool.log" 2>&1
  rc=$?
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|^ok|Error|error" "$out/sanitize_$tool.log" | tail -n 5
  [ $rc -eq 0 ] || status=1
done
exit $status
