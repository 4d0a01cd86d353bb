#!/usr/bin/env bash
# Multi-node continued pretraining with the DeepSpeed runner over pdsh (ssh) or OpenMPI.
# Run on the node that is first in the hostfile, from a directory on the shared filesystem.
#   launch/pretrain_pdsh.sh my.yaml launch/hostfile [pdsh|openmpi]
set -euo pipefail
CONFIG=${1:?config yaml}
HOSTFILE=${2:?hostfile}
LAUNCHER=${3:-pdsh}
NODES=$(grep -cv '^\s*\(#\|$\)' "$HOSTFILE")
exec hyperofa pretrain --config "$CONFIG" --hostfile "$HOSTFILE" --num_nodes "$NODES" --launcher "$LAUNCHER" \
    tracking.tracking_uri="${MLFLOW_TRACKING_URI:-http://mlflow-host:5000}"
