#!/usr/bin/env bash
# N processes on this host joined by jax.distributed over localhost, CPU collectives (gloo),
# each process with D fake CPU devices: the multi-host code path, runnable on one machine.
#
#   launch/multiprocess_localhost.sh [-n NUM_PROCESSES] [-d DEVICES_PER_PROCESS] -- \
#       --config=experiments/quickstart.py:smoke --workdir=runs/mp
#
# Process 0's output goes to the console and to $LOGDIR/process_0.log; the others' only to
# $LOGDIR/process_<i>.log. The first process to fail stops the others; the exit status is the
# first failure's (0 when all succeed).
# Environment: PYTHON (default: python), RING_JAX_MODULE (default: ring_jax.main),
# PORT (default: a free port), LOGDIR (default: a new temporary directory).
set -uo pipefail
NUM_PROCESSES=2
DEVICES_PER_PROCESS=1
while getopts "n:d:" opt; do
  case "$opt" in
    n) NUM_PROCESSES="$OPTARG" ;;
    d) DEVICES_PER_PROCESS="$OPTARG" ;;
    *) echo "usage: $0 [-n NUM_PROCESSES] [-d DEVICES_PER_PROCESS] -- ARGS..." >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ "${1:-}" = "--" ] && shift

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"
MODULE="${RING_JAX_MODULE:-ring_jax.main}"
PORT="${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
LOGDIR="${LOGDIR:-$(mktemp -d -t ring_jax_mp.XXXXXX)}"
mkdir -p "$LOGDIR"
echo "[multiprocess_localhost] $NUM_PROCESSES processes x $DEVICES_PER_PROCESS CPU devices," \
     "coordinator 127.0.0.1:$PORT, logs in $LOGDIR" >&2

pids=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  log="$LOGDIR/process_$i.log"
  env RING_JAX_COORDINATOR="127.0.0.1:$PORT" RING_JAX_NUM_PROCESSES="$NUM_PROCESSES" \
      RING_JAX_PROCESS_ID="$i" JAX_PLATFORMS=cpu \
      XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$DEVICES_PER_PROCESS" \
      "$PYTHON" -m "$MODULE" "$@" > "$log" 2>&1 &
  pids+=($!)
done
# Process 0 on the console while it runs.
tail -n +1 -f "$LOGDIR/process_0.log" --pid="${pids[0]}" &
tail_pid=$!
trap 'kill "${pids[@]}" 2>/dev/null' INT TERM

# Poll rather than `wait -n`: the first process to exit with an error stops the others.
rc=0
remaining=$NUM_PROCESSES
declare -A done_pids=()
while [ "$remaining" -gt 0 ]; do
  for pid in "${pids[@]}"; do
    [ -n "${done_pids[$pid]:-}" ] && continue
    kill -0 "$pid" 2>/dev/null && continue
    wait "$pid"
    status=$?
    done_pids[$pid]=1
    remaining=$((remaining - 1))
    if [ "$status" -ne 0 ] && [ "$rc" -eq 0 ]; then
      rc=$status
      echo "[multiprocess_localhost] process pid $pid failed (exit $status); stopping the others" >&2
      kill "${pids[@]}" 2>/dev/null
    fi
  done
  sleep 0.2
done
kill "$tail_pid" 2>/dev/null
wait "$tail_pid" 2>/dev/null
if [ "$rc" -ne 0 ]; then
  for ((i = 1; i < NUM_PROCESSES; i++)); do
    echo "----- process $i (last lines of $LOGDIR/process_$i.log) -----" >&2
    tail -n 20 "$LOGDIR/process_$i.log" >&2
  done
fi
exit "$rc"
