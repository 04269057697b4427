#!/usr/bin/env bash
# Reproduces the drafters shipped for the bundled stories260K model, on CPU.
#   bash scripts/train_bundled_drafters.sh            # writes runs/bundled/, then copies the drafters into
#                                                     # amphista/assets/drafters/{medusa,amphista}
# 1. self-distillation: the model's own stories from 98 openings (none of them in the benchmark prompts),
#    sampled at temperatures 1.0, 0.6 and 0.3, and its greedy continuation of each opening: low-temperature
#    and greedy stories put the drafters on the paths that greedy decoding walks
# 2. Medusa and Amphista drafters trained on all of it, with the same data, steps and held-out split
#    (about 30 minutes each on one CPU core; both run at once on a 2-core machine), then 2,000 more steps
#    from there (Amphista's tau was still rising, Medusa's had flattened)
# 3. head accuracies measured on 128 fresh stories from a prompt no training story starts with, so the
#    shipped head_accuracy.json (which picks the trees) comes from data neither phase saw
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${RUN_DIR:-runs/bundled}
STEPS=${STEPS:-2000}
AMPHISTA=${AMPHISTA:-amphista}
TARGET=$(${PYTHON:-python} -c "import amphista.bundled as b; print(b.default_target_path())")
mkdir -p "$RUN_DIR"

"$AMPHISTA" distill --target "$TARGET" --prompts scripts/data/story_openings.txt --out "$RUN_DIR/distill_t1.jsonl" \
    --num-samples 40 --temperature 1.0 --max-new-tokens 256 --batch-size 64 --seed 0 --no-progress
"$AMPHISTA" distill --target "$TARGET" --prompts scripts/data/story_openings.txt --out "$RUN_DIR/distill_t06.jsonl" \
    --num-samples 20 --temperature 0.6 --max-new-tokens 256 --batch-size 64 --seed 1 --no-progress
"$AMPHISTA" distill --target "$TARGET" --prompts scripts/data/story_openings.txt --out "$RUN_DIR/distill_t03.jsonl" \
    --num-samples 20 --temperature 0.3 --max-new-tokens 256 --batch-size 64 --seed 2 --no-progress
"$AMPHISTA" distill --target "$TARGET" --prompts scripts/data/story_openings.txt --out "$RUN_DIR/distill_t0.jsonl" \
    --num-samples 1 --temperature 0 --max-new-tokens 256 --batch-size 64 --seed 3 --no-progress

# Both drafters at once, one CPU thread each; a failed run fails the script.
#   train_both OUT_SUFFIX SEED [INIT_SUFFIX]: writes $RUN_DIR/<drafter>OUT_SUFFIX, starting from
#   $RUN_DIR/<drafter>INIT_SUFFIX when given
train_both() {
    local out=$1 seed=$2 pids=() pid drafter init
    for drafter in medusa amphista; do
        init=()
        if [ $# -ge 3 ]; then init=(--init-drafter "$RUN_DIR/$drafter$3"); fi
        OMP_NUM_THREADS=1 "$AMPHISTA" train --target "$TARGET" --data "$RUN_DIR"/distill_t{1,06,03,0}.jsonl \
            --drafter "$drafter" "${init[@]}" --out "$RUN_DIR/$drafter$out" --max-steps "$STEPS" \
            --batch-size 32 --seq-len 256 --seed "$seed" --no-progress "${EXTRA[@]}" &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
}
EXTRA=("$@")  # extra `amphista train` flags for every run
train_both "" 0
train_both _long 1 ""

echo "The little" > "$RUN_DIR/fresh_prompt.txt"
"$AMPHISTA" distill --target "$TARGET" --prompts "$RUN_DIR/fresh_prompt.txt" --out "$RUN_DIR/fresh_eval.jsonl" \
    --num-samples 128 --temperature 0.6 --max-new-tokens 256 --batch-size 64 --seed 7 --no-progress
for drafter in medusa amphista; do
    "$AMPHISTA" heads-accuracy --target "$TARGET" --drafter "$RUN_DIR/${drafter}_long" \
        --data "$RUN_DIR/fresh_eval.jsonl" --max-examples 256 --seq-len 256 \
        --json "$RUN_DIR/${drafter}_long/head_accuracy.json"
done

for drafter in medusa amphista; do
    rm -rf "amphista/assets/drafters/$drafter"
    mkdir -p "amphista/assets/drafters/$drafter"
    cp "$RUN_DIR/${drafter}_long"/{config.json,model.safetensors,head_accuracy.json} "amphista/assets/drafters/$drafter/"
    cp "$RUN_DIR/${drafter}_long"/README.md "amphista/assets/drafters/$drafter/" 2>/dev/null || true
done
