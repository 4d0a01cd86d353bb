#!/usr/bin/env bash
# The preparation stages (tokenizer, prepare) are Ray jobs: submit them to a running Ray cluster.
#   ray start --head                                    # on the head node; `ray start --address head:6379` on workers
#   ssh -N -L 8265:127.0.0.1:8265 head &                # the job API runs any code it is sent: keep it on loopback
#   launch/prepare_ray_submit.sh my.yaml http://127.0.0.1:8265      (launch/README.md: exposing it needs auth)
# The run directory must be on storage every Ray worker can read and write (shared filesystem).
set -euo pipefail
CONFIG=${1:?config yaml}
DASHBOARD=${2:-http://127.0.0.1:8265}
for STAGE in tokenizer prepare; do
    ray job submit --address "$DASHBOARD" --working-dir . \
        --runtime-env-json '{"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}' \
        -- hyperofa "$STAGE" --config "$CONFIG" ray.address=auto
done
