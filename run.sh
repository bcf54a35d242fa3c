#!/usr/bin/env bash
# The whole PRISM pipeline on the built-in synthetic world, then a report:
#   data -> SFT -> curation (the SFT policy's unsolved problems, answered by the world's oracle teacher over HTTP)
#   -> discriminator (upcycle + warm-up) -> alignment -> RL, and RL straight from SFT for comparison,
#   -> eval.py on every stage -> RUN/report.md
# Knobs (environment): NPROC (processes; GPUs when present, default all of them or 1 on CPU), SEED (0), ALGO (grpo, dapo,
# gspo or a list of them, e.g. "grpo dapo gspo"), QUICK=1 (a smoke run of a few minutes), RUN (output dir, default
# runs/shapes-<config>-s<SEED>), DATA (data/shapes-s<SEED>), ABLATIONS (the paper's ablations, each an extra aligned arm
# RL-trained with the first ALGO: dense = a 1-expert discriminator, text = a discriminator that sees no image, gad =
# whole-response scoring, route = hard segment routing (perception -> half the experts, reasoning -> the other half),
# sft2 = no alignment but as many extra SFT examples on the curated demonstrations as alignment samples rollouts;
# e.g. ABLATIONS="dense text gad route sft2"), SAMPLES (sampled responses per eval prompt for mean@k / pass@k; GPU 8,
# CPU 0), SLOTS (ablation processes at once on one GPU, default 2). With one process on a GPU the RL runs and the
# evaluations share the GPU concurrently (each logs to RUN/<name>.log), RL from the SFT policy starting as soon as that
# policy exists; the ablations start once the aligned policy exists and queue for their SLOTS.
# Re-running the same command resumes: finished stages are skipped, interrupted ones continue from their last checkpoint.
set -euo pipefail
cd "$(dirname "$0")"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
SEED=${SEED:-0}
ALGO=${ALGO:-grpo}
QUICK=${QUICK:-0}
ABLATIONS=${ABLATIONS:-}
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  GPU=1; CONFIG=small; NPROC=${NPROC:-$(python -c "import torch; print(torch.cuda.device_count())")}
else
  GPU=0; CONFIG=tiny; NPROC=${NPROC:-1}
fi
SUFFIX=""; [ "$QUICK" = 1 ] && SUFFIX=-quick
RUN=${RUN:-runs/shapes-$CONFIG-s$SEED$SUFFIX}
DATA=${DATA:-data/shapes-s$SEED$SUFFIX}
mkdir -p "$RUN"

# sizes: the CPU default finishes in about 12 minutes on 2 cores; QUICK=1 in a few; the GPU uses the small config.
# TEMP: rollout temperature of alignment and RL. The paper samples at 1.0; the tiny CPU model's distribution has a heavy tail
# of byte tokens (at 1.0 only ~35% of its samples are format-valid, at 0.7 ~95%), so the CPU runs sample at 0.7.
# The CPU warm-up is short (6 steps) and the game's discriminator lr high: a full warm-up saturates on this easy world, and
# the score gap could then only fall; a partly trained discriminator keeps learning first (the gap rises), then the policy
# closes it, as in the paper's curves.
ALIGN_LR=2e-5; DISC_LR=2e-5; RL_LR=2e-5; UPDATE_ARGS=""; RL_UPDATE_ARGS=""; EVAL_BATCH=64; SFT_BATCH=16; RL_P=""
if [ "$QUICK" = 1 ]; then
  DATA_ARGS="--n-sft 600 --n-align 32 --n-rl 64 --n-eval 32 --n-hard 32 --n-warmup 96"
  SFT_STEPS=40; WARM_EPOCHS=1; ALIGN_STEPS=3; RL_STEPS=3; EVAL_N=32; G=4; P=4; TEMP=0.7; POOL=16; K=2
elif [ "$GPU" = 1 ]; then
  DATA_ARGS="--n-sft 16000 --n-align 512 --n-rl 4096 --n-eval 1000 --n-hard 1000 --n-warmup 2048"
  # SFT 800 x 64 (3.2 epochs: a policy that reads its scenes) and GRPO at lr 1e-5 on 32 prompts x 8 rollouts for 150 steps:
  # the regime in which RL raised greedy held-out accuracy (results/rl-regime-h200: +12.2 points, one seed)
  SFT_STEPS=800; SFT_BATCH=64; WARM_EPOCHS=0.5; ALIGN_STEPS=30; RL_STEPS=150; RL_P=32; EVAL_N=1000; G=8; P=8; TEMP=1.0
  RL_LR=1e-5; ALIGN_LR=1e-5; DISC_LR=1e-5; POOL=2048; K=8  # the game at the RL stage's lr, policy and discriminator alike,
  # as in the paper (1e-6 all three): at 2e-5 its 30 steps cost 16.8 points of greedy accuracy (results/comparison-h200)
  # a 34M model's whole rollout batch fits one forward: few, large micro-batches keep the GPU busy
  UPDATE_ARGS="--micro-batch 64 --micro-tokens 65536 --disc-micro 128"
  RL_UPDATE_ARGS="--micro-batch 128 --micro-tokens 65536 --gen-batch 1024"  # DAPO's refill (3 x 256) in one batch
  EVAL_BATCH=1000; SAMPLES=${SAMPLES:-8}
else
  DATA_ARGS=""
  SFT_STEPS=600; WARM_EPOCHS=0.1; ALIGN_STEPS=20; RL_STEPS=25; EVAL_N=200; G=8; P=4; TEMP=0.7; DISC_LR=1e-4; POOL=512; K=4
fi
SAMPLES=${SAMPLES:-0}
RL_P=${RL_P:-$P}  # RL's prompts per step (the alignment game's: P)
P=$(( (P + NPROC - 1) / NPROC * NPROC )); RL_P=$(( (RL_P + NPROC - 1) / NPROC * NPROC ))  # multiples of the process count

SLOTS=${SLOTS:-2}  # concurrent ablation processes on one GPU (more only time-slice it: results/miniature-speed-h200)
launch() {  # one process, or torchrun with NPROC of them; in an ablation's chain on one GPU (SLOT=1), holding one of
            # SLOTS slot locks while it runs, so the ablations queue behind the main comparison instead of slowing it
  local cmd=(python "$@") i fd rc
  [ "$NPROC" -gt 1 ] && cmd=(torchrun --standalone --nproc_per_node "$NPROC" "$@")
  if [ "$PAR" != 1 ] || [ "${SLOT:-0}" != 1 ] || ! command -v flock > /dev/null; then "${cmd[@]}"; return; fi
  while :; do
    for i in $(seq "$SLOTS"); do
      exec {fd}> "$RUN/.slot$i"
      if flock -n "$fd"; then "${cmd[@]}" && rc=0 || rc=$?; exec {fd}>&-; return $rc; fi
      exec {fd}>&-
    done
    sleep 1
  done
}
done_() { [ -f "$1/run_config.json" ]; }  # a stage output is complete once run_config.json is written (it is written last)
say() { echo; echo "=== $* ==="; }
PAR=0; [ "$GPU" = 1 ] && [ "$NPROC" = 1 ] && PAR=1  # one small model per process: independent runs share the GPU
pids=()
bg() {  # NAME CMD...: run CMD; with PAR=1 in the background, its output in RUN/NAME.log (join waits, failing if it failed)
  local name=$1; shift
  if [ "$PAR" = 1 ]; then "$@" > "$RUN/$name.log" 2>&1 & pids+=($!); echo "running in the background, log: $RUN/$name.log"
  else "$@"; fi
}
join() { for p in "${pids[@]}"; do wait "$p"; done; pids=(); }

say "data -> $DATA"
[ -f "$DATA/processor/tokenizer.json" ] || python data.py --out "$DATA" --seed "$SEED" $DATA_ARGS

say "base policy ($CONFIG, random init) -> $RUN/base"
done_ "$RUN/base" || python model.py init --config "$CONFIG" --processor "$DATA/processor" --out "$RUN/base" --seed "$SEED"

say "stage 1: SFT -> $RUN/sft"
done_ "$RUN/sft" || launch sft.py --init "$RUN/base" --data "$DATA/sft.jsonl" --out "$RUN/sft" --steps "$SFT_STEPS" \
  --batch-size "$SFT_BATCH" --micro-batch "$SFT_BATCH" --lr 3e-4 --warmup-ratio 0.05 --eval-every 100 --save-every 100 \
  --seed "$SEED" --max-len 1024

[ "$PAR" = 1 ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}  # concurrent processes: no CPU thread oversubscription
evaluate() {  # STAGE [SAMPLES]: eval.py on RUN/STAGE -> RUN/STAGE/eval.json (greedy; + SAMPLES sampled responses per prompt)
  [ -f "$RUN/$1/eval.json" ] || launch eval.py --model "$RUN/$1" --data "$DATA/eval.parquet" "$DATA/eval_hard.parquet" \
    --limit "$EVAL_N" --samples "${2:-$SAMPLES}" --max-new-tokens 256 --batch-size "$EVAL_BATCH" --out "$RUN/$1/eval.json"
}
rl() {  # FROM ALGO: stage 3 from RUN/FROM -> RUN/FROM-rl-ALGO, then its evaluation
  say "stage 3: RL ($2) from $1 -> $RUN/$1-rl-$2"
  done_ "$RUN/$1-rl-$2" || launch rl.py --policy "$RUN/$1" --algo "$2" --data "$DATA/rl.parquet" --out "$RUN/$1-rl-$2" \
    --steps "$RL_STEPS" --prompts "$RL_P" --group-size "$G" --max-new-tokens 256 --lr "$RL_LR" --temperature "$TEMP" \
    --save-every 10 --eval-every 0 --seed "$SEED" $RL_UPDATE_ARGS
  evaluate "$1-rl-$2"
}
aligned() {  # SUFFIX ALGOS [FLAGS]: discriminator (upcycle the SFT policy + warm-up) -> RUN/discSUFFIX, stage 2 ->
             # RUN/alignSUFFIX, then RL from it with each of ALGOS; FLAGS go to warmup.py and align.py (an ablation's)
  local sfx=$1 algos=$2 A pids=(); shift 2  # (its own pids: join waits only for its own children)
  [ -n "$sfx" ] && SLOT=1  # an ablation (this function runs in its own background shell with PAR=1)
  say "discriminator$sfx: upcycle the SFT policy + warm-up -> $RUN/disc$sfx"
  done_ "$RUN/disc$sfx" || launch warmup.py --disc "upcycle:$RUN/sft" --data "$DATA/warmup.jsonl" --out "$RUN/disc$sfx" \
    --epochs "$WARM_EPOCHS" --batch-size 16 --lr 1e-4 --val 32 --disc-micro 32 --seed "$SEED" "$@"
  say "stage 2: alignment$sfx -> $RUN/align$sfx"
  done_ "$RUN/align$sfx" || launch align.py --policy "$RUN/sft" --disc "$RUN/disc$sfx" --data "$RUN/curated/align.parquet" \
    --out "$RUN/align$sfx" --steps "$ALIGN_STEPS" --prompts "$P" --group-size "$G" --max-new-tokens 256 --lr "$ALIGN_LR" \
    --disc-lr "$DISC_LR" --temperature "$TEMP" --save-every 10 --seed "$SEED" $UPDATE_ARGS "$@"
  if [ -z "$sfx" ]; then bg eval-align evaluate align; fi
  for A in $algos; do bg "align$sfx-rl-$A" rl "align$sfx" "$A"; done
  join
}
sft2() {  # ablation: no alignment; SFT on the curated demonstrations, as many examples as alignment samples rollouts
  SLOT=1
  say "ablation sft2: $ALIGN_STEPS more SFT steps x $((P * G)) curated demonstrations -> $RUN/sft2"
  done_ "$RUN/sft2" || launch sft.py --init "$RUN/sft" --data "$RUN/curated/sft.jsonl" --out "$RUN/sft2" \
    --steps "$ALIGN_STEPS" --batch-size $((P * G)) --micro-batch "$SFT_BATCH" --lr "$ALIGN_LR" --warmup-ratio 0.05 \
    --val-size 0 --eval-every 0 --save-every 10 --seed "$SEED" --max-len 1024
  rl sft2 "$1"
}
ablation_flags() {  # NAME -> the discriminator flags of that ablation
  case $1 in
    dense) echo "--disc-experts 1" ;; text) echo "--disc-text-only" ;; gad) echo "--disc-segments whole" ;;
    route) echo "--disc-routing segment" ;;
    *) echo "unknown ablation '$1' (ABLATIONS: dense text gad route sft2)" >&2; return 1 ;;
  esac
}
for V in $ABLATIONS; do [ "$V" = sft2 ] || ablation_flags "$V" > /dev/null; done  # a misspelt one fails here, not later

bg eval-base evaluate base 0  # the random-init policy: greedy only (it solves nothing)
bg eval-sft evaluate sft
for A in $ALGO; do bg "sft-rl-$A" rl sft "$A"; done  # RL from the SFT policy needs nothing of the alignment stage

say "curation: the SFT policy's unsolved problems of $POOL (pass rate 0 over $K samples), answered by the oracle -> $RUN/curated"
# the world's oracle teacher over the OpenAI protocol, with a few faults and wrong answers for the clean-up to catch;
# a hosted model is the same command with --teacher-url and --teacher-model of its endpoint (README "Curation")
if ! done_ "$RUN/curated"; then
  rm -f "$RUN/teacher.port"
  python data.py teacher --data "$DATA" --port-file "$RUN/teacher.port" --error-rate 0.05 --mistake-rate 0.05 --hang 5 \
    > "$RUN/teacher.log" 2>&1 &
  TEACHER=$!
  trap 'kill $TEACHER 2>/dev/null || true' EXIT
  for _ in $(seq 300); do [ -f "$RUN/teacher.port" ] && break; sleep 0.1; done
  [ -f "$RUN/teacher.port" ] || { cat "$RUN/teacher.log"; echo "the oracle teacher did not start"; exit 1; }
  launch curate.py --policy "$RUN/sft" --pool "$DATA/rl.parquet" --limit "$POOL" --samples "$K" --max-new-tokens 256 \
    --temperature "$TEMP" --out "$RUN/curated" --teacher-url "http://127.0.0.1:$(cat "$RUN/teacher.port")/v1" \
    --teacher-model oracle --timeout 2 --backoff 0.2 --seed "$SEED"
  kill $TEACHER
fi

bg align aligned "" "$ALGO"
FIRST=${ALGO%% *}
# the ablations queue behind the main comparison: they start once the aligned policy exists (a run stopped at a deadline
# then has both arms first)
[ "$PAR" = 1 ] && [ -n "$ABLATIONS" ] && while ! done_ "$RUN/align"; do sleep 2; kill -0 "${pids[-1]}" 2>/dev/null || break; done
for V in $ABLATIONS; do
  if [ "$V" = sft2 ]; then bg sft2 sft2 "$FIRST"; else bg "align-$V" aligned "-$V" "$FIRST" $(ablation_flags "$V"); fi
done
join

say "report"
python eval.py --report "$RUN"
echo "wrote $RUN/report.md"
