#!/usr/bin/env bash
# The pretraining sweep (`hyperofa bench pretrain-sweep`) on a bare GPU machine that has torch, transformers and
# tokenizers but not the rest of this project's dependencies. Its import path needs DeepSpeed, pydantic and PyYAML
# only (no Ray, MLflow or webdataset), so carry just those as wheels, built on a machine with the project installed:
#
#     pip wheel --no-deps -w wheels "deepspeed==$(python -c 'import deepspeed; print(deepspeed.__version__)')" \
#         pydantic pydantic-core annotated-types typing-inspection hjson ninja py-cpuinfo msgpack
#
# (DeepSpeed ships as a source package; `pip wheel` builds a pure-Python wheel whose CUDA ops compile on first use.)
# Then, in the repository root on the GPU machine:
#
#     WHEELS=wheels OUT=/tmp/sweep launch/gpu_sweep.sh [--only default,combined] [key=value ...]
#
# It writes <OUT>/<configuration>.json and prints one JSON line per configuration and a summary line. About
# 5 minutes on one H100/H200 at XLM-R-base x 401,145, sequence 512, bf16. `--dry-run` checks it in seconds.
set -euo pipefail
WHEELS=${WHEELS:-wheels}
OUT=${OUT:-sweep}
if ! python -c "import deepspeed, pydantic" 2>/dev/null; then
    pip install --quiet --no-index --find-links "$WHEELS" deepspeed pydantic
fi
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 python -m hyperofa_dist.bench.sweep --out "$OUT" "$@"
