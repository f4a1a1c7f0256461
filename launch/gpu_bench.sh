#!/usr/bin/env bash
# Benchmarks the train/eval steps on one GPU against the torch peer (AMP bf16, channels_last), alternating A B A B.
#
#   launch/gpu_bench.sh [--dry-run] [OUTDIR]
#
# Runs `python -m circlemix_jax.bench --peer` at batch 16 (128 and 256 px, the CPU
# target's settings) and at batch 128 / 256 px (a batch that fills a GPU), bf16,
# and writes one JSON file per setting plus the logs to OUTDIR (default runs/gpu_bench).
# About 9 min on an H200: each project process spends 80-90 s compiling.
# PYTHON picks the interpreter (default python3); it needs jax with CUDA, torch and torchvision.
set -euo pipefail

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

dry_run=0 out=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        -h|--help) usage ;;
        -*) echo "error: unknown option $1" >&2; usage ;;
        *) out="$1" ;;
    esac
    shift
done

# shellcheck source=run_or_print.sh
source "$(dirname "$0")/run_or_print.sh"

repo="$(cd "$(dirname "$0")/.." && pwd)"
out="${out:-$repo/runs/gpu_bench}"
python="${PYTHON:-python3}"
cd "$repo"
if [[ $dry_run -eq 0 ]]; then mkdir -p "$out"; nvidia-smi -L >"$out/nvidia-smi.txt" 2>&1 || true; fi

status=0
# batch res steps rounds: many timed steps, because a GPU step takes milliseconds
for setting in "16 128 100 2" "16 256 100 1" "128 256 30 1"; do
    read -r batch res steps rounds <<<"$setting"
    name="b${batch}_r${res}"
    cmd=("$python" -m circlemix_jax.bench --batch "$batch" --res "$res" --steps "$steps" --dtype bfloat16
         --peer "$python" --peer-script launch/torch_peer_gpu.py --rounds "$rounds")
    if [[ $dry_run -eq 1 ]]; then run "${cmd[@]}"; continue; fi
    # One failed setting must not cost the others' figures: the device time is short.
    run "${cmd[@]}" >"$out/$name.out" 2>"$out/$name.log" || { status=1; tail -5 "$out/$name.log" >&2; }
    grep '^{' "$out/$name.out" | tee "$out/$name.json" || true
done
exit "$status"
