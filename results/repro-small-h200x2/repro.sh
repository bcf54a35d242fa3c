#!/usr/bin/env bash
# The miniature reproduction of the paper's comparison on the synthetic world (small config on GPUs):
#   per seed: SFT -> RL and SFT -> PRISM alignment -> RL, for GRPO, DAPO and GSPO (run.sh with ALGO="grpo dapo gspo");
#   the paper's two discriminator ablations for GRPO on the first seed's SFT policy: dense (1 expert) and text-only.
# Every run is one process on one GPU; runs are spread over the visible GPUs round-robin (a small model leaves most of an
# H100 idle, so several share one). Then summarize.py (beside this script) writes the per-seed numbers and the summary table to OUT/summary.md.
#   bash results/repro-small-h200x2/repro.sh
# Knobs: SEEDS ("0 1 2"), OUT (runs/repro).
set -euo pipefail
cd "$(dirname "$0")/../.."
SEEDS=${SEEDS:-"0 1 2"}
# several runs share the host's CPU cores: without a cap every process starts a thread per core and the CPU-side image
# preprocessing crawls (a first attempt ran SFT 3x slower than a lone run)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
OUT=${OUT:-runs/repro}
NGPU=$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")
mkdir -p "$OUT"
first=${SEEDS%% *}
i=0
pids=()
for s in $SEEDS; do
  CUDA_VISIBLE_DEVICES=$((i % NGPU)) NPROC=1 SEED=$s ALGO="grpo dapo gspo" RUN="$OUT/s$s" DATA="$OUT/data-s$s" \
    bash run.sh > "$OUT/s$s.log" 2>&1 &
  pids+=($!)
  i=$((i + 1))
done
# the ablations start from the first seed's SFT policy once it exists, and run only the aligned arm
until [ -f "$OUT/s$first/sft/run_config.json" ]; do sleep 10; done
for abl in dense:--disc-experts=1 text:--disc-text-only; do
  name=${abl%%:*}
  mkdir -p "$OUT/s$first-$name"
  cp -r "$OUT/s$first/base" "$OUT/s$first/sft" "$OUT/s$first-$name/"
  CUDA_VISIBLE_DEVICES=$((i % NGPU)) NPROC=1 SEED=$first ALGO=grpo ARMS=align RUN="$OUT/s$first-$name" \
    DATA="$OUT/data-s$first" DISC_ARGS="${abl#*:}" bash run.sh > "$OUT/s$first-$name.log" 2>&1 &
  pids+=($!)
  i=$((i + 1))
done
for p in "${pids[@]}"; do wait "$p"; done
python results/repro-small-h200x2/summarize.py "$OUT" > "$OUT/summary.md"
cat "$OUT/summary.md"
