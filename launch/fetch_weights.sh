#!/usr/bin/env bash
# Downloads ImageNet EfficientNet-B0 weights and converts them for --config.model.init_from.
#
# Usage: launch/fetch_weights.sh [--dry-run] WHICH [OUT_DIR]
#   WHICH: timm | timm_tf | torchvision | efficientnet_pytorch | keras | keras_notop
#   OUT_DIR: default weights/WHICH (the download goes to OUT_DIR.download/)
# Needs internet; timm needs huggingface_hub, torch formats need torch.
# --dry-run prints the commands instead of running them.
set -euo pipefail

dry=0
if [[ "${1:-}" == "--dry-run" ]]; then dry=1; shift; fi
which="${1:?usage: $0 [--dry-run] timm|timm_tf|torchvision|efficientnet_pytorch|keras|keras_notop [OUT_DIR]}"
out="${2:-weights/$which}"
dl="$out.download"
py="${PYTHON:-python}"

run() {
  if ((dry)); then printf '%q ' "$@"; echo; else "$@"; fi
}

# torchvision's file name carries the first 8 hex digits of its sha256; Keras publishes md5s.
check() {  # check FILE ALGO EXPECTED_PREFIX
  if ((dry)); then echo "# verify $2 of $1 starts with $3"; return; fi
  local sum
  sum="$("${2}sum" "$1" | cut -c1-${#3})"
  [[ "$sum" == "$3" ]] || { echo "error: $1 has $2 $sum..., expected $3..." >&2; exit 2; }
}

hf() {  # hf REPO: model.safetensors and config.json of a timm repo on the Hugging Face Hub
  run "$py" -c "import sys; from huggingface_hub import hf_hub_download as get
for f in ('model.safetensors', 'config.json'): get(sys.argv[1], f, local_dir=sys.argv[2])" "$1" "$dl"
}

case "$which" in
  timm | timm_tf | torchvision | efficientnet_pytorch | keras | keras_notop) ;;
  *) echo "error: unknown weights '$which' (timm, timm_tf, torchvision, efficientnet_pytorch, keras, keras_notop)" >&2
     exit 2 ;;
esac
run mkdir -p "$dl"
case "$which" in
  timm)
    hf timm/efficientnet_b0.ra_in1k
    src=(--source timm --input "$dl/model.safetensors") ;;
  timm_tf)
    hf timm/tf_efficientnet_b0.ns_jft_in1k
    src=(--source timm --input "$dl/model.safetensors") ;;
  torchvision)
    f="$dl/efficientnet_b0_rwightman-7f5810bc.pth"
    run curl -fL --retry 3 -o "$f" "https://download.pytorch.org/models/${f##*/}"
    check "$f" sha256 7f5810bc
    src=(--source torchvision --input "$f") ;;
  efficientnet_pytorch)
    f="$dl/efficientnet-b0-355c32eb.pth"
    run curl -fL --retry 3 -o "$f" "https://github.com/lukemelas/EfficientNet-PyTorch/releases/download/1.0/${f##*/}"
    # No hash check: unlike torchvision's, this name's suffix is not documented as a sha256 prefix.
    src=(--source efficientnet_pytorch --input "$f") ;;
  keras | keras_notop)
    if [[ "$which" == keras ]]; then name=efficientnetb0.h5 md5=902e53a9f72be733fc0bcb005b3ebbac
    else name=efficientnetb0_notop.h5 md5=50bc09e76180e00e4465e1a485ddc09d; fi
    run curl -fL --retry 3 -o "$dl/$name" "https://storage.googleapis.com/keras-applications/$name"
    check "$dl/$name" md5 "$md5"
    src=(--source keras --input "$dl/$name") ;;
esac
run "$py" -m circlemix_jax.convert "${src[@]}" --output "$out" --force
