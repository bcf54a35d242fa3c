#!/usr/bin/env bash
# The miniature reproduction of the paper's comparison on the synthetic world (small config, one GPU per seed):
#   per seed: SFT -> RL and SFT -> PRISM alignment -> RL, for GRPO, DAPO and GSPO (run.sh with ALGO="grpo dapo gspo");
#   on the next GPU, the paper's two discriminator ablations for GRPO on seed 0's SFT policy: dense (1 expert) and text-only.
# Then results/summarize.py writes the per-seed numbers and the summary table to OUT/summary.md.
#   bash results/repro.sh                      # needs len(SEEDS) + 1 GPUs (4 by default)
# Knobs: SEEDS ("0 1 2"), OUT (results/runs).
set -euo pipefail
cd "$(dirname "$0")/.."
SEEDS=${SEEDS:-"0 1 2"}
# several runs share the host's CPU cores: without a cap every process starts a thread per core and the CPU-side image
# preprocessing crawls (a first attempt ran SFT 3x slower than a lone run)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
OUT=${OUT:-results/runs}
mkdir -p "$OUT"
first=${SEEDS%% *}
gpu=0
pids=()
for s in $SEEDS; do
  CUDA_VISIBLE_DEVICES=$gpu NPROC=1 SEED=$s ALGO="grpo dapo gspo" RUN="$OUT/s$s" DATA="$OUT/data-s$s" \
    bash run.sh > "$OUT/s$s.log" 2>&1 &
  pids+=($!)
  gpu=$((gpu + 1))
done
# the ablations start from the first seed's SFT policy once it exists (they redo its SFT -> RL arm: a spare replicate)
until [ -f "$OUT/s$first/sft/run_config.json" ]; do sleep 10; done
for abl in dense:--disc-experts=1 text:--disc-text-only; do
  name=${abl%%:*}
  mkdir -p "$OUT/s$first-$name"
  cp -r "$OUT/s$first/base" "$OUT/s$first/sft" "$OUT/s$first-$name/"
  CUDA_VISIBLE_DEVICES=$gpu NPROC=1 SEED=$first ALGO=grpo RUN="$OUT/s$first-$name" DATA="$OUT/data-s$first" \
    DISC_ARGS="${abl#*:}" bash run.sh > "$OUT/s$first-$name.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
python results/summarize.py "$OUT" > "$OUT/summary.md"
cat "$OUT/summary.md"
