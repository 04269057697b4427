#!/usr/bin/env bash
# Reproduces the drafters shipped for the bundled stories260K model, on CPU.
#   bash scripts/train_bundled_drafters.sh            # writes runs/bundled/, then copies the drafters into
#                                                     # amphista/assets/drafters/{medusa,amphista}
# 1. self-distillation: the model's own stories from 98 openings (none of them in the benchmark prompts)
# 2. Medusa and Amphista drafters trained on them, with the same data, steps and held-out split
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${RUN_DIR:-runs/bundled}
STEPS=${STEPS:-1500}
AMPHISTA=${AMPHISTA:-amphista}
TARGET=$(${PYTHON:-python} -c "import amphista.bundled as b; print(b.default_target_path())")
mkdir -p "$RUN_DIR"

"$AMPHISTA" distill --target "$TARGET" --prompts scripts/data/story_openings.txt --out "$RUN_DIR/distill_t1.jsonl" \
    --num-samples 40 --temperature 1.0 --max-new-tokens 256 --batch-size 64 --seed 0 --no-progress
"$AMPHISTA" distill --target "$TARGET" --prompts scripts/data/story_openings.txt --out "$RUN_DIR/distill_t06.jsonl" \
    --num-samples 20 --temperature 0.6 --max-new-tokens 256 --batch-size 64 --seed 1 --no-progress

for drafter in medusa amphista; do
    "$AMPHISTA" train --target "$TARGET" --data "$RUN_DIR/distill_t1.jsonl" "$RUN_DIR/distill_t06.jsonl" \
        --drafter "$drafter" --out "$RUN_DIR/$drafter" --max-steps "$STEPS" --batch-size 32 --seq-len 256 \
        --seed 0 --no-progress "$@"
done

for drafter in medusa amphista; do
    rm -rf "amphista/assets/drafters/$drafter"
    mkdir -p "amphista/assets/drafters/$drafter"
    cp "$RUN_DIR/$drafter"/{config.json,model.safetensors,head_accuracy.json} "amphista/assets/drafters/$drafter/"
    cp "$RUN_DIR/$drafter"/README.md "amphista/assets/drafters/$drafter/" 2>/dev/null || true
done
