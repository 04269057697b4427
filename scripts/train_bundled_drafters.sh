#!/usr/bin/env bash
# Reproduces the drafters shipped for the bundled stories260K model, on CPU.
#   bash scripts/train_bundled_drafters.sh            # writes runs/bundled/, then copies the drafters into
#                                                     # amphista/assets/drafters/{medusa,amphista}
# 1. self-distillation: the model's own stories from 98 openings (none of them in the benchmark prompts),
#    sampled at temperatures 1.0, 0.6 and 0.3 (twice, with different seeds), its greedy continuation of each
#    opening, and its greedy continuations of 3,920 story beginnings cut from its own temperature-1 stories:
#    greedy text puts the drafters on the paths that greedy decoding walks
# 2. Medusa and Amphista drafters trained on it in five runs of 2,000 steps, each starting from the last
#    (both drafters at once, one CPU core each; about 30 minutes a run): the first two on the first half of
#    the sampled stories, the third on all of them, the fourth with half of the greedy continuations added
#    twice, the fifth with all of them added twice (the benchmark and the demo decode greedily); the same
#    data, steps and seeds for both drafters
# 3. head accuracies, per head and per tree path, measured on fresh text from a prompt no training story
#    starts with ("The little"): 128 stories at temperature 0.6 and the greedy continuations of their first
#    8-15 words, so the shipped head_accuracy.json (which picks the trees) comes from data no run saw
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${RUN_DIR:-runs/bundled}
STEPS=${STEPS:-2000}
AMPHISTA=${AMPHISTA:-amphista}
PYTHON=${PYTHON:-python}
TARGET=$("$PYTHON" -c "import amphista.bundled as b; print(b.default_target_path())")
mkdir -p "$RUN_DIR"

distill() {  # distill PROMPTS OUT NUM_SAMPLES TEMPERATURE SEED
    "$AMPHISTA" distill --target "$TARGET" --prompts "$1" --out "$RUN_DIR/$2" --num-samples "$3" \
        --temperature "$4" --max-new-tokens 256 --batch-size 64 --seed "$5" --no-progress
}
OPENINGS=scripts/data/story_openings.txt
distill $OPENINGS distill_t1.jsonl 40 1.0 0
distill $OPENINGS distill_t06.jsonl 20 0.6 1
distill $OPENINGS distill_t03.jsonl 20 0.3 2
distill $OPENINGS distill_t0.jsonl 1 0 3
distill $OPENINGS distill_t1b.jsonl 40 1.0 10
distill $OPENINGS distill_t06b.jsonl 20 0.6 11
distill $OPENINGS distill_t03b.jsonl 20 0.3 12
# The temperature-1 stories, cut after 4-80 words, continued greedily: even ones, then odd ones.
for half in 0 1; do
    "$PYTHON" - "$RUN_DIR" "$half" <<'EOF'
import json, random, sys
run, half = sys.argv[1], int(sys.argv[2])
rng = random.Random(4 + 2 * half)
stories = [json.loads(line)["text"] for line in open(f"{run}/distill_t1.jsonl")]
with open(f"{run}/greedy_prompts{half or ''}.jsonl", "w") as f:
    for text in stories[half::2]:
        words = text.split(" ")
        f.write(json.dumps({"prompt": " ".join(words[: rng.randint(4, min(80, len(words) - 1))])}) + "\n")
EOF
done
distill "$RUN_DIR/greedy_prompts.jsonl" distill_greedy.jsonl 1 0 5
distill "$RUN_DIR/greedy_prompts1.jsonl" distill_greedy2.jsonl 1 0 6

# Both drafters at once, one CPU thread each; a failed run fails the script.
#   train_both OUT_SUFFIX SEED INIT_SUFFIX DATA...: writes $RUN_DIR/<drafter>OUT_SUFFIX, starting from
#   $RUN_DIR/<drafter>INIT_SUFFIX unless that is "-"
train_both() {
    local out=$1 seed=$2 from=$3 pids=() pid drafter init
    shift 3
    for drafter in medusa amphista; do
        init=()
        if [ "$from" != "-" ]; then init=(--init-drafter "$RUN_DIR/$drafter$from"); fi
        OMP_NUM_THREADS=1 "$AMPHISTA" train --target "$TARGET" --data "$@" \
            --drafter "$drafter" "${init[@]}" --out "$RUN_DIR/$drafter$out" --max-steps "$STEPS" \
            --batch-size 32 --seq-len 256 --seed "$seed" --no-progress "${EXTRA[@]}" &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
}
EXTRA=("$@")  # extra `amphista train` flags for every run
FIRST=("$RUN_DIR"/distill_t{1,06,03,0}.jsonl)
ALL=("${FIRST[@]}" "$RUN_DIR"/distill_t{1b,06b,03b}.jsonl)
train_both "" 0 - "${FIRST[@]}"
train_both _long 1 "" "${FIRST[@]}"
train_both _x 2 _long "${ALL[@]}"
train_both _g 3 _x "${ALL[@]}" "$RUN_DIR/distill_greedy.jsonl" "$RUN_DIR/distill_greedy.jsonl"
GREEDY=("$RUN_DIR"/distill_greedy{,2}.jsonl)
train_both _h 4 _g "${ALL[@]}" "${GREEDY[@]}" "${GREEDY[@]}"

echo "The little" > "$RUN_DIR/fresh_prompt.txt"
distill "$RUN_DIR/fresh_prompt.txt" fresh_eval.jsonl 128 0.6 7
"$PYTHON" - "$RUN_DIR" <<'EOF'
import json, sys
run = sys.argv[1]
texts = [json.loads(line)["text"] for line in open(f"{run}/fresh_eval.jsonl")]
with open(f"{run}/fresh_greedy_prompts.jsonl", "w") as f:
    for i, text in enumerate(texts):
        f.write(json.dumps({"prompt": " ".join(text.split()[: 8 + i % 8])}) + "\n")
EOF
distill "$RUN_DIR/fresh_greedy_prompts.jsonl" fresh_greedy.jsonl 1 0 8
for drafter in medusa amphista; do
    "$AMPHISTA" heads-accuracy --target "$TARGET" --drafter "$RUN_DIR/${drafter}_h" \
        --data "$RUN_DIR/fresh_eval.jsonl" "$RUN_DIR/fresh_greedy.jsonl" --max-examples 512 --seq-len 256 \
        --json "$RUN_DIR/${drafter}_h/head_accuracy.json"
done

# The weights, config and accuracies replace the shipped ones; the shipped README.md (written for the
# package, with how the drafter was trained) stays, and the config names the target the way users load it.
for drafter in medusa amphista; do
    cp "$RUN_DIR/${drafter}_h"/{config.json,model.safetensors,head_accuracy.json} "amphista/assets/drafters/$drafter/"
    "$PYTHON" - "amphista/assets/drafters/$drafter/config.json" <<'EOF'
import json, sys
path = sys.argv[1]
config = json.load(open(path))
config["built_for"]["name_or_path"] = "stories260K (amphista.load_default_target())"
open(path, "w").write(json.dumps(config, indent=2) + "\n")
EOF
done
