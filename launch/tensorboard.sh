#!/usr/bin/env bash
# Serves TensorBoard over a folder of runs, local or on gs://.
#
#   launch/tensorboard.sh [--dry-run] [--port 6006] [LOGDIR]      (LOGDIR defaults to runs/)
#
# A gs:// LOGDIR needs `pip install gcsfs` and gcloud application-default credentials.
# On a remote machine, forward the port first: ssh -L 6006:localhost:6006 HOST
set -euo pipefail

usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

dry_run=0 port=6006 logdir=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --port) port="$2"; shift ;;
        -h|--help) usage ;;
        -*) echo "error: unknown option $1" >&2; usage ;;
        *) logdir="$1" ;;
    esac
    shift
done
logdir="${logdir:-$(cd "$(dirname "$0")/.." && pwd)/runs}"

# shellcheck source=run_or_print.sh
source "$(dirname "$0")/run_or_print.sh"

run "${PYTHON:-python3}" -m tensorboard.main --logdir="$logdir" --port="$port"
