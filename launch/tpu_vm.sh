#!/usr/bin/env bash
# Trains one config on a Cloud TPU VM (one host or a pod slice): create it, install, run on all workers.
#
#   launch/tpu_vm.sh [--dry-run] --name NAME --zone ZONE --workdir gs://BUCKET/DIR CONFIG \
#       [--type v4-8] [--version tpu-ubuntu2204-base] [--project P] [--spot] [--skip-create] \
#       [--data gs://BUCKET/DATA] [-- --config.FIELD=VALUE ...]
#
# Every worker runs the same command; `main --distributed` joins them into one JAX job, and all
# of them write one Orbax checkpoint, so a pod needs a gs:// workdir. --data copies a folder
# holding manifest.csv to every worker and trains on it. After a preemption, delete the VM and
# run the same command again: training resumes from the workdir's latest checkpoint.
set -euo pipefail

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

dry_run=0 name="" zone="" workdir="" config="" type="v4-8" version="tpu-ubuntu2204-base"
project="" spot=0 create=1 data=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --name) name="$2"; shift ;;
        --zone) zone="$2"; shift ;;
        --workdir) workdir="$2"; shift ;;
        --type) type="$2"; shift ;;
        --version) version="$2"; shift ;;
        --project) project="$2"; shift ;;
        --spot) spot=1 ;;
        --skip-create) create=0 ;;
        --data) data="$2"; shift ;;
        -h|--help) usage ;;
        --) shift; break ;;
        -*) echo "error: unknown option $1" >&2; usage ;;
        *) config="$1" ;;
    esac
    shift
done
extra=("$@")
if [[ -z "$name" || -z "$zone" || -z "$workdir" || -z "$config" ]]; then
    echo "error: --name, --zone, --workdir and CONFIG are required" >&2; usage
fi

# shellcheck source=run_or_print.sh
source "$(dirname "$0")/run_or_print.sh"

repo="$(cd "$(dirname "$0")/.." && pwd)"
where=(--zone="$zone")
if [[ -n "$project" ]]; then where+=(--project="$project"); fi
tpu=(gcloud compute tpus tpu-vm)
tarball="${TMPDIR:-/tmp}/circlemix_jax.tar.gz"

if [[ $create -eq 1 ]]; then
    spot_flag=()
    if [[ $spot -eq 1 ]]; then spot_flag=(--spot); fi
    run "${tpu[@]}" create "$name" "${where[@]}" --accelerator-type="$type" --version="$version" "${spot_flag[@]}"
fi
# Ship the working tree, not only HEAD, so what runs is what you see here.
run tar -czf "$tarball" -C "$repo" --exclude=.git --exclude=runs --exclude=.pytest_cache --exclude=__pycache__ .
run "${tpu[@]}" scp "$tarball" "$name:circlemix_jax.tar.gz" "${where[@]}" --worker=all
# TPU images ship Python 3.10 and the project needs 3.11: uv fetches one into a venv.
# gcsfs lets Orbax (etils) and TensorBoard's writer reach gs://.
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "rm -rf ~/circlemix_jax && mkdir ~/circlemix_jax \
&& tar -xzf ~/circlemix_jax.tar.gz -C ~/circlemix_jax && python3 -m pip install -q -U uv \
&& python3 -m uv venv -q --allow-existing --python 3.11 ~/venv \
&& python3 -m uv pip install -q --python ~/venv/bin/python -U \"jax[tpu]\" gcsfs -e ~/circlemix_jax"
if [[ -n "$data" ]]; then
    run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "gcloud storage rsync --recursive $data ~/circlemix_data"
    extra=("--config.data.manifest=../circlemix_data/manifest.csv" "${extra[@]}")
fi
if [[ "$workdir" != gs://* ]]; then
    echo "warning: a workdir outside gs:// works on a one-host TPU VM only, and is lost with the VM" >&2
fi
cmd="cd ~/circlemix_jax && ~/venv/bin/python -m circlemix_jax.main --distributed"
for a in "--config=$config" "--workdir=$workdir" "${extra[@]}"; do cmd+=" $(printf '%q' "$a")"; done
run "${tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command "$cmd"
