#!/usr/bin/env bash
# Rebuild docs/gallery/ with the inspection lab's commands on the built-in model (or the model folder given).
# Usage: scripts/make_gallery.sh [MODEL_DIR]     (run from the repository root with the venv's dapple on PATH)
set -euo pipefail
model=(); [[ $# -gt 0 ]] && model=(--model "$1")
out=docs/gallery
rm -rf "$out" && mkdir -p "$out" && work=$(mktemp -d)
dapple() { "${DAPPLE:-.venv/bin/dapple}" "$@"; }

# A picture to look inside: the built-in model's own drawing of a held-out caption.
dapple generate "a large yellow square in the center on a purple background" --seed 3 "${model[@]}" \
  --out "$work" >/dev/null
picture=$(ls "$work"/*.png | head -1)
cp "$picture" "$out/input.png"

dapple inspect tokens "a red circle at the left on a blue background" "${model[@]}" > "$out/tokens.txt"
dapple inspect embeddings "a red circle on a blue background" --vs "a red square on a blue background" \
  "${model[@]}" --out "$out"
# `inspect schedule` plots SD's schedule unless given a model; the gallery shows the built-in model's own.
schedule_model=("${model[@]}"); [[ ${#model[@]} -eq 0 ]] && schedule_model=(--model src/dapple/models/assets/builtin)
dapple inspect schedule --sampler "Euler a,DDIM,DPM++ 2M Karras" --steps 20 "${schedule_model[@]}" --out "$out"
dapple inspect vae "$picture" "${model[@]}" --out "$out" 2> "$out/vae.txt"
dapple inspect noise "$picture" "${model[@]}" --out "$out"
dapple inspect denoise "a red circle at the top left on a white background" --steps 20 --guidance 6 --seed 1 \
  "${model[@]}" --out "$out"
dapple inspect guidance "a green triangle on a black background" --scales 1,3,6,9 --steps 5,10,20 --seed 2 \
  "${model[@]}" --out "$out"
dapple inspect unet "$picture" "a large yellow square in the center on a purple background" --t 500 \
  "${model[@]}" --out "$out"
rm -rf "$work"
ls -la "$out"
