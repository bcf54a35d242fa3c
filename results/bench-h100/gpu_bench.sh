#!/usr/bin/env bash
# Every bench.py measurement of this folder on one host with 4 or more GPUs, into RES (default runs/gpu_bench): phase A
# runs the 1-GPU rollout bench + the greedy check (GPU 0), the 1-GPU training steps (GPU 1) and the 2-GPU ones (GPUs 2-3)
# side by side; phase B the full alignment step (4B and 8B policy) and RL steps at the paper's shapes on every GPU, then
# training steps. Each measurement appends a JSON line to RES/*.jsonl; logs in RES/*.log. PROC: a processor dir (special
# tokens only); SFT, EVAL: a trained policy + RL-format prompts for the greedy check.
set -u
cd "$(dirname "$0")/../.."  # the repository root
RES=${RES:-runs/gpu_bench}; PROC=${PROC:-data/shapes/processor}; SFT=${SFT:-}; EVAL=${EVAL:-}
mkdir -p "$RES"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv > "$RES/gpus.txt"
tr() { local gpus=$1 n=$2; shift 2  # GPUS NPROC ARGS...: one training-step measurement, 4B, 4096-token sequences
  CUDA_VISIBLE_DEVICES=$gpus timeout 300 torchrun --standalone --nproc_per_node "$n" bench.py train --config 4b --seq 4096 \
    --processor "$PROC" --out "$RES/train.jsonl" "$@" >> "$RES/train_${n}gpu.log" 2>&1 || echo "FAILED: $n GPU $*" >> "$RES/train_${n}gpu.log"
}
# ---- phase A
( CUDA_VISIBLE_DEVICES=0 timeout 600 python bench.py rollout --config 4b --batches 16 64 256 --prompt 256 --new 128 \
    --processor "$PROC" --out "$RES/rollout.jsonl" > "$RES/rollout.log" 2>&1
  [ -n "$SFT" ] && CUDA_VISIBLE_DEVICES=0 timeout 300 python results/bench-h100/greedy_check.py --model "$SFT" --data "$EVAL" --limit 64 \
    --max-new-tokens 256 --batch-sizes 16 64 --out "$RES/greedy.jsonl" > "$RES/greedy.log" 2>&1 ) &
( tr 1 1 --batch 2 --grad-ckpt; tr 1 1 --batch 2 --grad-ckpt --compile; tr 1 1 --batch 1 --grad-ckpt --compile ) &
( tr 2,3 2 --batch 2 --grad-ckpt; tr 2,3 2 --batch 2; tr 2,3 2 --batch 2 --compile; tr 2,3 2 --batch 4 --grad-ckpt --compile ) &
wait
# ---- phase B: every GPU of the host (the RL batch scales with the GPUs: 32 prompts on 8)
N=$(nvidia-smi -L | wc -l)
export OMP_NUM_THREADS=$(( $(nproc) / N ))  # the random init runs on the CPU: 1 thread per rank (torchrun) took ~5.8 min at 4B
al() { timeout 900 torchrun --standalone --nproc_per_node "$N" bench.py align --disc-config 2b --prompts 4 --group-size 16 \
  --prompt 1800 --new 6144 --steps 2 --grad-ckpt --processor "$PROC" --out "$RES/align.jsonl" "$@" >> "$RES/align.log" 2>&1; }
al --config 4b
al --config 8b --gen-batch $((N >= 8 ? 64 : 8))  # 4 GPUs: 16 rollouts per GPU of the 8B's cache do not fit beside its states
timeout 1200 torchrun --standalone --nproc_per_node "$N" bench.py rl --config 4b --prompts $((4 * N)) --group-size 16 \
  --prompt 1800 --new 8192 --gen-batch 16 --steps 2 --grad-ckpt --processor "$PROC" --out "$RES/rl.jsonl" > "$RES/rl.log" 2>&1
tr "$(seq -s, 0 $((N - 1)))" "$N" --batch 2 --compile
tr "$(seq -s, 0 $((N - 1)))" "$N" --batch 4 --grad-ckpt --compile
echo ALL DONE >> "$RES/done"
