#!/usr/bin/env bash
# Local multi-process training: NUM_PROCESSES processes on this machine, each with
# DEVICES_PER_PROCESS simulated CPU devices, joined by jax.distributed over 127.0.0.1 with the gloo
# CPU collectives. This is the launcher tests/test_multiprocess.py runs.
#
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=2 launch/local.sh \
#       --config configs/shapes.py:autoencoder,smoke --workdir runs/local_mp
#
# Arguments: those of `ldm-jax train`. Environment (all optional): PYTHON (default python3),
# PORT (coordinator port; default: a free one), LOG_DIR (per-process logs process_<i>.log;
# default ./launch_logs), EXTRA_XLA_FLAGS. Exit status: 0 if every process exited 0, else the
# status of the first one that failed (the others are then stopped). SIGTERM/SIGINT are passed on
# to all processes, which then save a checkpoint and exit (a simulated preemption).
set -euo pipefail

num_processes=${NUM_PROCESSES:-2}
devices_per_process=${DEVICES_PER_PROCESS:-2}
python=${PYTHON:-python3}
log_dir=${LOG_DIR:-launch_logs}
if [[ -z "${PORT:-}" ]]; then
  PORT=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
mkdir -p "$log_dir"

pids=()
for ((i = 0; i < num_processes; i++)); do
  JAX_COORDINATOR_ADDRESS="127.0.0.1:$PORT" \
    JAX_NUM_PROCESSES="$num_processes" \
    JAX_PROCESS_ID="$i" \
    JAX_PLATFORMS=cpu \
    XLA_FLAGS="--xla_force_host_platform_device_count=$devices_per_process ${EXTRA_XLA_FLAGS:-}" \
    "$python" -m ldm_jax.cli train "$@" >"$log_dir/process_$i.log" 2>&1 &
  pids+=("$!")
done
echo "started ${num_processes} processes (pids ${pids[*]}), coordinator 127.0.0.1:$PORT, logs in $log_dir"

forward() { kill -s "$1" "${pids[@]}" 2>/dev/null || true; }
trap 'forward TERM' TERM
trap 'forward INT' INT

remaining=$num_processes
while ((remaining > 0)); do
  rc=0
  wait -n || rc=$?
  remaining=$((remaining - 1))
  if ((rc != 0)); then
    # A dead peer would leave the others waiting in a collective until the heartbeat timeout.
    echo "a process exited with status $rc; stopping the others (see $log_dir)" >&2
    forward KILL
    wait || true
    exit "$rc"
  fi
done
echo "all ${num_processes} processes finished"
