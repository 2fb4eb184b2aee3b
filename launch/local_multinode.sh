#!/usr/bin/env bash
# Several simulated nodes on one machine, over loopback: one `accelerate launch` per "node" with
# the real multi-node config, exactly what launch/slurm/multinode.sbatch runs on each node of a
# cluster. For trying the multi-node path (rendezvous, ranks across nodes, checkpoints, resume)
# without a cluster. Without GPUs the processes train on the CPU over gloo.
#
#   launch/local_multinode.sh NODES [--procs-per-node P] [--port PORT] -- [skd train arguments]
#   launch/local_multinode.sh 2 -- --config configs/demo.yaml output_dir=runs/two-nodes
#
# Exits with the first failing node's status (the other nodes are then stopped); SIGTERM/SIGINT
# are passed on to every node, so the run checkpoints and stops as under SLURM.
set -euo pipefail
ACCELERATE_CONFIG="$(dirname "$0")/accelerate/multinode.yaml"
NODES=${1:?usage: launch/local_multinode.sh NODES [--procs-per-node P] [--port PORT] -- [skd train args]}
shift
PROCS=1
PORT=$((29500 + RANDOM % 2000))
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  case "$1" in
    --procs-per-node) PROCS=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    *) echo "local_multinode.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
[ "${1:-}" = "--" ] && shift
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export ACCELERATE_USE_CPU=1  # gloo on the CPU: the path every test machine has
fi

pids=()
stop_all() { kill -TERM "${pids[@]}" 2>/dev/null || true; }
trap 'stop_all' TERM INT
for ((node = 0; node < NODES; node++)); do
  accelerate launch --config_file "$ACCELERATE_CONFIG" \
    --num_machines "$NODES" --num_processes "$((NODES * PROCS))" --machine_rank "$node" \
    --main_process_ip 127.0.0.1 --main_process_port "$PORT" \
    -m skd train "$@" &
  pids+=($!)
done
status=0
for _ in "${pids[@]}"; do
  wait -n && continue
  rc=$?
  [ "$status" -eq 0 ] && status=$rc
  stop_all
done
exit "$status"
