#!/usr/bin/env bash
# The preparation stages (tokenizer, prepare) are Ray jobs: submit them to a running Ray cluster.
#   ray start --head --dashboard-host 0.0.0.0           # on the head node; `ray start --address head:6379` on workers
#   launch/prepare_ray_submit.sh my.yaml http://head:8265
# The run directory must be on storage every Ray worker can read and write (shared filesystem).
set -euo pipefail
CONFIG=${1:?config yaml}
DASHBOARD=${2:-http://127.0.0.1:8265}
for STAGE in tokenizer prepare; do
    ray job submit --address "$DASHBOARD" --working-dir . \
        --runtime-env-json '{"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}' \
        -- hyperofa "$STAGE" --config "$CONFIG" ray.address=auto
done
