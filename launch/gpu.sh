#!/usr/bin/env bash
# Trains one config on one GPU node with all of its GPUs: one process, data parallel over every GPU.
#
#   launch/gpu.sh [--dry-run] [--install] [--gpus 0,1] CONFIG [WORKDIR] [-- --config.FIELD=VALUE ...]
#
# --install  pip-installs JAX for CUDA 12 and this project into the current Python first.
# --gpus     restricts the run to these GPUs (CUDA_VISIBLE_DEVICES); the default is all of them.
# The global batch (config batch_size) is split over the GPUs, so it must divide by their count.
# Run it from the repository root. Rerun the same command to resume; SIGTERM (e.g. from a scheduler) saves a checkpoint and exits 0.
set -euo pipefail

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

dry_run=0 install=0 gpus="" config="" workdir=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --install) install=1 ;;
        --gpus) gpus="$2"; shift ;;
        -h|--help) usage ;;
        --) shift; break ;;
        -*) echo "error: unknown option $1" >&2; usage ;;
        *) if [[ -z "$config" ]]; then config="$1"; else workdir="$1"; fi ;;
    esac
    shift
done
if [[ -z "$config" ]]; then echo "error: CONFIG is required" >&2; usage; fi

# shellcheck source=run_or_print.sh
source "$(dirname "$0")/run_or_print.sh"

repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
if [[ $install -eq 1 ]]; then
    run "$python" -m pip install -U "jax[cuda12]" -e "$repo"
fi
cmd=()
if [[ -n "$gpus" ]]; then cmd=(env CUDA_VISIBLE_DEVICES="$gpus"); fi
cmd+=("$python" -m circlemix_jax.main --config="$config")
if [[ -n "$workdir" ]]; then cmd+=(--workdir="$workdir"); fi
run "${cmd[@]}" "$@"
