#!/usr/bin/env bash
# Coverage-guided fuzzing (atheris) of every parser that takes outside bytes: scripts/fuzz.sh [TARGET] [--seconds S]
# Runs one target, or every target of tests/fuzz/targets.py in turn, S seconds each (default 600), and prints
# executions, coverage (libFuzzer's `cov`: instrumented branches reached, `ft`: features) and crashes per target.
# The corpus grows under $FUZZ_DIR (default .fuzz/, ignored by git) so a later run continues from it; a crash
# input lands in $FUZZ_DIR/TARGET/crashes/: fix the parser, copy the input to tests/fuzz/regressions/TARGET/
# (the suite replays it). Exit 1 when any target crashed. Needs `scripts/setup.sh --dev` (atheris).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=600
targets=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    -h|--help) sed -n 2,7p "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) targets+=("$1"); shift ;;
  esac
done
python=.venv/bin/python
if [[ ${#targets[@]} -eq 0 ]]; then
  mapfile -t targets < <("$python" -c 'from tests.fuzz.targets import TARGETS; print("\n".join(TARGETS))')
fi
dir=${FUZZ_DIR:-.fuzz}
mkdir -p "$dir"
printf '%-10s %8s %12s %8s %6s %6s %8s\n' target seconds executions exec/s cov ft crashes
failed=0
for target in "${targets[@]}"; do
  log="$dir/$target.log"
  # libFuzzer exits non-zero on a crash; the summary below says so
  "$python" -m tests.fuzz.run "$target" --seconds "$seconds" --corpus "$dir" >"$log" 2>&1 || true
  execs=$(grep -o 'number_of_executed_units: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || echo 0)
  rate=$(grep -o 'average_exec_per_sec: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || echo 0)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || echo 0)
  ft=$(grep -o 'ft: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || echo 0)
  crashes=$(find "$dir/$target/crashes" -type f 2>/dev/null | wc -l)
  printf '%-10s %8s %12s %8s %6s %6s %8s\n' "$target" "$seconds" "$execs" "$rate" "$cov" "$ft" "$crashes"
  if [[ $crashes -gt 0 ]] || ! grep -q 'DONE' "$log"; then
    failed=1
    grep -m1 -B2 -A12 'Traceback' "$log" || tail -20 "$log"
  fi
done
exit $failed
