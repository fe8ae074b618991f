#!/usr/bin/env bash
# Threshold-tuning results of docs/RESULTS.md ("Confidence thresholds"), on the CPU.
#
#   bash bench/tune_results.sh            # writes docs/results/tune/*.{json,png,log}
#
# Vision: calibrate on Fashion-MNIST "val" (5,000 images of the training file, never trained on),
# evaluate on "test" (10,000). LM: calibrate on the Austen "val" split (from `make data`), evaluate
# on data/austen-heldout.txt (the "test" split, shipped). Needs the full Fashion-MNIST and .data/prose.
# Model outputs are cached in runs/tune-cache, so a second run only re-tunes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=docs/results/tune
CACHE=runs/tune-cache
mkdir -p "$OUT" "$CACHE"
VISION=checkpoints/matmamba-vision-fmnist
LM=checkpoints/matmamba-lm-austen

tune() {  # name, then router.tune arguments
  local name=$1; shift
  echo "== $name: python -m router.tune $*" | tee "$OUT/$name.log"
  "$PY" -m router.tune "$@" --out "$OUT/$name.json" --plot "$OUT/$name.png" --cache "$CACHE" \
    | tee -a "$OUT/$name.log"
}

V=(--checkpoint "$VISION" --data fashion-mnist:val --eval-data fashion-mnist:test)
# Best accuracy within a 0.5-point drop of the full model (delta 0.05), single levels and chains.
for levels in 4 2 8,2 8,4; do
  tune "fmnist-drop0.5-level${levels/,/-}" "${V[@]}" --edge-level "$levels" --target-escalation 0.1 \
    --max-accuracy-drop 0.005
done
# The same cloud rate (10 %) for a single level and a chain.
for levels in 2 8,2; do
  tune "fmnist-target0.1-level${levels/,/-}" "${V[@]}" --edge-level "$levels" --target-escalation 0.1
done

VAL=$CACHE/austen-val.txt
"$PY" -c "from matmamba.data.prose import load_prose; open('$VAL', 'w').write(load_prose('val'))"
L=(--checkpoint "$LM" --data "$VAL" --eval-data data/austen-heldout.txt)
for levels in 4 8,2; do  # segments of 8 tokens (the router's default --segment-tokens)
  tune "austen-target0.3-level${levels/,/-}" "${L[@]}" --edge-level "$levels" --target-escalation 0.3
done
# Segments of 2 tokens (python -m router ... --segment-tokens 2): exact agreement is common enough to steer.
tune "austen-seg2-target0.3-level4" "${L[@]}" --edge-level 4 --target-escalation 0.3 --segment-tokens 2
{ uname -srm; grep -m1 "model name" /proc/cpuinfo; echo "cpus: $(nproc)"; } > "$OUT/machine.txt"
