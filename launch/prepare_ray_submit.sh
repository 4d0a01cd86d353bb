#!/usr/bin/env bash
# The Ray stages (prepare, mapping) as jobs on a running Ray cluster, submitted from a checkout:
#   ray start --head                                 # on the head node; `ray start --address head:6379` on workers
#   ssh -N -L 8265:127.0.0.1:8265 head &             # the job API runs any code it is sent: keep it on loopback
#   hyperofa tokenizer --config my.yaml              # not Ray stages: on this machine first, when the config
#   hyperofa vectors train --config my.yaml          #   builds the tokenizer or trains the vectors
#   launch/prepare_ray_submit.sh my.yaml http://127.0.0.1:8265 [key=value ...] [--print]
# (launch/README.md: exposing the job API needs authentication.) Run it from the checkout: its code is uploaded
# (without runs/, models/, vectors/, data/, .venv/, ...). run.dir and the config's relative input paths are resolved
# here, so they must be on storage every node sees at the same path. --print shows the `ray job submit` commands
# without submitting them (hyperofa_dist/runtime/ray_jobs.py).
set -euo pipefail
CONFIG=${1:?usage: launch/prepare_ray_submit.sh CONFIG [DASHBOARD] [key=value ...] [--print]}
DASHBOARD=${2:-http://127.0.0.1:8265}
shift $(( $# > 1 ? 2 : 1 ))
export HYPEROFA_WORKING_DIR="$PWD"
exec "${PYTHON:-python}" -m hyperofa_dist.runtime.ray_jobs "$CONFIG" "$DASHBOARD" "$@"
