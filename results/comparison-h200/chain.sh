#!/usr/bin/env bash
# One seed's whole chain of the miniature comparison on one GPU, as run.sh runs it (small config, its GPU recipe):
#   data -> SFT -> RL from SFT (GRPO, DAPO, GSPO) | curation -> discriminator -> alignment -> RL from it (the three)
#   + the GRPO ablations (dense, text-only and whole-response discriminators, hard segment routing, extra SFT instead of
#   alignment), every final policy evaluated on 1,000 held-out and 1,000 hard prompts, greedy and 8 samples at T 1;
# then the per-stage results (eval.json with per-prompt rows, metrics.jsonl, logs, report) packed into OUT/s<SEED>.tar.gz.
#   bash results/comparison-h200/chain.sh SEED [DEADLINE_S]
# DEADLINE_S (default: none): stop whatever still runs that many seconds after the start, then pack what finished.
# ABLATIONS (default: all five) and SAMPLES (default 8) pass through to run.sh.
set -uo pipefail
cd "$(dirname "$0")/../.."
SEED=$1; DEADLINE=${2:-0}; OUT=${OUT:-runs/comparison}
RUN=$OUT/s$SEED; mkdir -p "$RUN"
T0=$(date +%s)
SEED=$SEED ALGO="grpo dapo gspo" ABLATIONS=${ABLATIONS-dense text gad route sft2} RUN=$RUN DATA=$OUT/data-s$SEED \
  setsid bash run.sh > "$RUN/run.log" 2>&1 &
PID=$!
while kill -0 $PID 2>/dev/null; do
  if [ "$DEADLINE" -gt 0 ] && [ $(( $(date +%s) - T0 )) -ge "$DEADLINE" ]; then
    echo "deadline: stopping run.sh after $(( $(date +%s) - T0 )) s" >> "$RUN/run.log"
    kill -- -$PID 2>/dev/null; sleep 5; kill -9 -- -$PID 2>/dev/null
    python eval.py --report "$RUN" > /dev/null 2>&1
    break
  fi
  sleep 5
done
wait $PID 2>/dev/null; echo "run.sh ended (rc $?) after $(( $(date +%s) - T0 )) s" >> "$RUN/run.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$RUN/run.log" 2>&1
(cd "$RUN" && tar czf "../s$SEED.tar.gz" --exclude='*.safetensors' --exclude='ckpt' --exclude='processor' \
  --exclude='images' --exclude='*.parquet' --exclude='*.jsonl.gz' --exclude='*.pt' \
  $(ls -d */eval.json */metrics.jsonl */run_config.json curated/summary.json *.log report.md *.png 2>/dev/null))
echo "packed $OUT/s$SEED.tar.gz"
