#!/usr/bin/env bash
# The whole PRISM pipeline on the built-in synthetic world, then a report:
#   data -> SFT -> discriminator (upcycle + warm-up) -> alignment -> RL, and RL straight from SFT for comparison,
#   -> eval.py on every stage -> RUN/report.md
# Knobs (environment): NPROC (processes; GPUs when present, default all of them or 1 on CPU), SEED (0), ALGO (grpo|dapo|gspo),
# QUICK=1 (a smoke run of a few minutes), RUN (output dir, default runs/shapes-<config>-s<SEED>), DATA (data/shapes-s<SEED>).
# Re-running the same command resumes: finished stages are skipped, interrupted ones continue from their last checkpoint.
set -euo pipefail
cd "$(dirname "$0")"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
SEED=${SEED:-0}
ALGO=${ALGO:-grpo}
QUICK=${QUICK:-0}
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  GPU=1; CONFIG=small; NPROC=${NPROC:-$(python -c "import torch; print(torch.cuda.device_count())")}
else
  GPU=0; CONFIG=tiny; NPROC=${NPROC:-1}
fi
SUFFIX=""; [ "$QUICK" = 1 ] && SUFFIX=-quick
RUN=${RUN:-runs/shapes-$CONFIG-s$SEED$SUFFIX}
DATA=${DATA:-data/shapes-s$SEED$SUFFIX}
mkdir -p "$RUN"

# sizes: the CPU default finishes in about 20 minutes on 2 cores; QUICK=1 in a few; the GPU uses the small config
if [ "$QUICK" = 1 ]; then
  DATA_ARGS="--n-sft 600 --n-align 32 --n-rl 64 --n-eval 32 --n-hard 32 --n-warmup 96"
  SFT_STEPS=40; WARM_EPOCHS=1; ALIGN_STEPS=3; RL_STEPS=3; EVAL_N=32; G=4; P=4
elif [ "$GPU" = 1 ]; then
  DATA_ARGS="--n-sft 16000 --n-align 512 --n-rl 2048 --n-eval 400 --n-hard 400 --n-warmup 2048"
  SFT_STEPS=1000; WARM_EPOCHS=0.5; ALIGN_STEPS=30; RL_STEPS=30; EVAL_N=200; G=8; P=8
else
  DATA_ARGS=""
  SFT_STEPS=600; WARM_EPOCHS=0.5; ALIGN_STEPS=20; RL_STEPS=25; EVAL_N=100; G=8; P=4
fi
P=$(( (P + NPROC - 1) / NPROC * NPROC ))  # prompts per step: a multiple of the process count

launch() {  # one process, or torchrun with NPROC of them
  if [ "$NPROC" -gt 1 ]; then torchrun --standalone --nproc_per_node "$NPROC" "$@"; else python "$@"; fi
}
done_() { [ -f "$1/run_config.json" ]; }  # a stage output is complete once run_config.json is written (it is written last)
say() { echo; echo "=== $* ==="; }

say "data -> $DATA"
[ -f "$DATA/processor/tokenizer.json" ] || python data.py --out "$DATA" --seed "$SEED" $DATA_ARGS

say "base policy ($CONFIG, random init) -> $RUN/base"
done_ "$RUN/base" || python model.py init --config "$CONFIG" --processor "$DATA/processor" --out "$RUN/base" --seed "$SEED"

say "stage 1: SFT -> $RUN/sft"
done_ "$RUN/sft" || launch sft.py --init "$RUN/base" --data "$DATA/sft.jsonl" --out "$RUN/sft" --steps "$SFT_STEPS" \
  --batch-size 16 --micro-batch 16 --lr 3e-4 --warmup-ratio 0.05 --eval-every 100 --save-every 100 --seed "$SEED" \
  --max-len 1024

say "discriminator: upcycle the SFT policy to 4 experts + warm-up -> $RUN/disc"
done_ "$RUN/disc" || launch align.py --warmup-only --disc "upcycle:$RUN/sft" --warmup-data "$DATA/warmup.jsonl" \
  --out "$RUN/disc" --warmup-epochs "$WARM_EPOCHS" --warmup-batch 16 --warmup-lr 1e-4 --warmup-val 32 --disc-micro 32 \
  --seed "$SEED"

say "stage 2: alignment -> $RUN/align"
done_ "$RUN/align" || launch align.py --policy "$RUN/sft" --disc "$RUN/disc" --data "$DATA/align.parquet" \
  --out "$RUN/align" --steps "$ALIGN_STEPS" --prompts "$P" --group-size "$G" --max-new-tokens 256 --lr 2e-5 \
  --disc-lr 2e-5 --save-every 10 --seed "$SEED"

for FROM in sft align; do
  say "stage 3: RL ($ALGO) from $FROM -> $RUN/$FROM-rl-$ALGO"
  done_ "$RUN/$FROM-rl-$ALGO" || launch rl.py --policy "$RUN/$FROM" --algo "$ALGO" --data "$DATA/rl.parquet" \
    --out "$RUN/$FROM-rl-$ALGO" --steps "$RL_STEPS" --prompts "$P" --group-size "$G" --max-new-tokens 256 --lr 2e-5 \
    --save-every 10 --eval-every 0 --seed "$SEED"
done

for STAGE in base sft align sft-rl-$ALGO align-rl-$ALGO; do
  say "eval $STAGE"
  [ -f "$RUN/$STAGE/eval.json" ] || launch eval.py --model "$RUN/$STAGE" --data "$DATA/eval.parquet" \
    "$DATA/eval_hard.parquet" --limit "$EVAL_N" --max-new-tokens 256 --out "$RUN/$STAGE/eval.json"
done

say "report"
python eval.py --report "$RUN"
echo "wrote $RUN/report.md"
