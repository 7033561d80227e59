#!/usr/bin/env bash
# Submit an rlmem training run as a Ray job.
#   launch/submit.sh CONFIG.yaml [dotted.key=value ...]
# Env: RAY_ADDRESS (default http://127.0.0.1:8265, the head's dashboard), RLMEM_PYTHON (default python),
#      SUBMIT_ARGS (extra `ray job submit` flags, e.g. "--no-wait --submission-id my-run").
# The config is validated locally first, so a typo fails here and not on the cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $# -ge 1 ]] || { echo "usage: $0 CONFIG.yaml [key=value ...]" >&2; exit 2; }
PY="${RLMEM_PYTHON:-python}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"     # Ray 2.60 job API: token auth (~/.ray/auth_token)
export RAY_ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
# Local paths (model dirs, data files) are checked on the cluster, where they live.
"$PY" -m rlmem.cli config show "$@" --no-check-files > /dev/null
# shellcheck disable=SC2086
exec ray job submit --runtime-env launch/runtime_env.yaml ${SUBMIT_ARGS:-} -- python -m rlmem.cli train "$@"
