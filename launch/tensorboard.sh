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

# Prints a command as a shell would read it back; runs it unless --dry-run.
run() {
    local out="" a
    for a in "$@"; do
        if [[ "$a" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then out+="$a "; else out+="'${a//\'/\'\\\'\'}' "; fi
    done
    echo "+ ${out% }"
    if [[ $dry_run -eq 0 ]]; then "$@"; fi
}

run "${PYTHON:-python3}" -m tensorboard.main --logdir="$logdir" --port="$port"
