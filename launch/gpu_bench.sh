#!/usr/bin/env bash
# Benchmarks one GPU: our step against the torch peer (eager and torch.compile), and our whole training loop.
#
#   launch/gpu_bench.sh [--dry-run] [--cpu-check] [OUTDIR]
#
# 1. Our train/eval steps alternated A B A B with launch/torch_peer_gpu.py (bf16 AMP,
#    channels_last): eager at batch 16 (128, 256 px) and 128 (256 px), then torch.compile
#    ('default' and 'max-autotune') at batch 128 / 256 px. Each project line carries
#    train_cost/eval_cost: XLA's flops and bytes of the compiled step and the fractions of
#    PEAK_TFLOPS (bf16 dense, default 989: H200 SXM) and PEAK_GB_S (default 4800) reached.
# 2. bench --end-to-end (Grain pipeline, copy to the device, step) beside the step alone.
# Writes one JSON file per setting plus logs to OUTDIR (default runs/gpu_bench). The XLA cache
# (OUTDIR/xla unless JAX_COMPILATION_CACHE_DIR is set) compiles each program once; later
# settings' compile_s are then cache loads. PYTHON picks the interpreter (default python3):
# jax with CUDA, torch and torchvision. --cpu-check runs the same tools at 32 px on the CPU
# (no peer): it checks the plumbing and prints the step's flops and bytes.
set -euo pipefail

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }

dry_run=0 cpu=0 out=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --cpu-check) cpu=1 ;;
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
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$out/xla}"
peaks=(--peak-tflops "${PEAK_TFLOPS:-989}" --peak-gb-s "${PEAK_GB_S:-4800}")
cd "$repo"
if [[ $dry_run -eq 0 ]]; then mkdir -p "$out"; nvidia-smi -L >"$out/nvidia-smi.txt" 2>&1 || true; fi

status=0
# Runs one benchmark into OUTDIR/NAME.{out,log,json}; one failed setting must not cost the others' figures.
bench() {
    local name="$1"; shift
    if [[ $dry_run -eq 1 ]]; then run "$@"; return; fi
    run "$@" >"$out/$name.out" 2>"$out/$name.log" || { status=1; tail -5 "$out/$name.log" >&2; }
    grep '^{' "$out/$name.out" | tee "$out/$name.json" || true
}

if [[ $cpu -eq 1 ]]; then
    bench cpu_step "$python" -m circlemix_jax.bench --batch 4 --res 32 --steps 2
    bench cpu_loop "$python" -m circlemix_jax.bench --end-to-end --batch 4 --res 32 --steps 2 --rounds 1
    exit "$status"
fi

# batch res steps rounds peer-compile-mode: many timed steps, because a GPU step takes milliseconds
for setting in "16 128 100 2 eager" "16 256 100 1 eager" "128 256 30 1 eager" "128 256 30 1 default" \
               "128 256 30 1 max-autotune"; do
    read -r batch res steps rounds mode <<<"$setting"
    extra=()
    if [[ $mode != eager ]]; then extra=(--peer-arg=--compile --peer-arg="$mode"); fi
    bench "b${batch}_r${res}_${mode}" "$python" -m circlemix_jax.bench --batch "$batch" --res "$res" \
        --steps "$steps" --dtype bfloat16 "${peaks[@]}" --peer "$python" --peer-script launch/torch_peer_gpu.py \
        --rounds "$rounds" "${extra[@]}"
done
for setting in "16 128 100" "128 256 30"; do
    read -r batch res steps <<<"$setting"
    bench "loop_b${batch}_r${res}" "$python" -m circlemix_jax.bench --end-to-end --batch "$batch" --res "$res" \
        --steps "$steps" --rounds 2 --dtype bfloat16
done
exit "$status"
