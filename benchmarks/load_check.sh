#!/usr/bin/env bash
# Load check: the README's test command with extra busy processes competing for the CPU cores, as
# on a loaded CI machine. Reports the wall time, the load average and pytest's failures; exits with
# pytest's status. A test that fails here and passes on an idle machine depends on speed: a bug.
#
#   bash benchmarks/load_check.sh                          # the whole suite, 2 busy processes
#   BUSY=4 bash benchmarks/load_check.sh tests/test_x.py   # other files / pytest arguments, 4 busy
#
# The busy processes are plain shell loops (one core each while they run); they are ended when the
# script ends, however it ends.
set -uo pipefail
cd "$(dirname "$0")/.."
BUSY=${BUSY:-2}
PY=${PYTHON:-.venv/bin/python}
LOG=${LOG:-$(mktemp -t load_check.XXXXXX.log)}
[ $# -gt 0 ] || set -- tests
busy=()
pytest_pid=
stop() {
  [ -z "$pytest_pid" ] || kill "$pytest_pid" 2>/dev/null
  [ ${#busy[@]} -eq 0 ] || kill "${busy[@]}" 2>/dev/null
  wait 2>/dev/null
  busy=(); pytest_pid=
}
trap stop EXIT
trap 'stop; exit 130' INT TERM
for _ in $(seq "$BUSY"); do
  ( trap - INT TERM; while :; do :; done ) &
  busy+=($!)
done
echo "load check: $BUSY busy processes on $(getconf _NPROCESSORS_ONLN 2>/dev/null || nproc) cores; load average $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"
echo "+ $PY -m pytest -q $*"
t0=$(date +%s)
# pytest in the background and `wait`: a trapped signal interrupts `wait` at once (not a foreground command)
"$PY" -m pytest -q "$@" > "$LOG" 2>&1 &
pytest_pid=$!
tail -n +1 -f --pid="$pytest_pid" "$LOG" &
wait "$pytest_pid"
rc=$?
pytest_pid=
t=$(( $(date +%s) - t0 ))
load=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)
stop
echo
echo "load check: $BUSY busy processes, $(( t / 60 )) min $(( t % 60 )) s, load average at the end $load, pytest exit $rc"
echo "log: $LOG"
echo "summary: $(grep -E '(passed|failed|error)' "$LOG" | tail -1)"
grep -E '^(FAILED|ERROR) ' "$LOG" || true
exit "$rc"
