#!/usr/bin/env bash
# RL from run.sh's tiny SFT policy (CPU default, seed 0) with 16 prompts x 8 rollouts per step, 40 steps, lr 2e-5, T 0.7,
# the three algorithms at once; then eval.py (greedy + mean@4 at T 0.7) and paired_eval.py (8 samples, per prompt) on the
# same 200 held-out prompts. Run from the repository root after `bash run.sh`. About 35 min on 2 cores.
set -e
D=data/shapes-s0; S=runs/shapes-tiny-s0/sft; O=runs/rl16; R=results/rl-tiny-cpu
mkdir -p $O
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
for A in grpo dapo gspo; do
  python rl.py --policy $S --algo $A --data $D/rl.parquet --out $O/$A --steps 40 --prompts 16 --group-size 8 \
    --max-new-tokens 256 --lr 2e-5 --temperature 0.7 --save-every 10 --eval-every 0 --seed 0 > $O/$A.log 2>&1 &
done
wait
for m in sft:$S grpo:$O/grpo dapo:$O/dapo gspo:$O/gspo; do
  python eval.py --model ${m#*:} --data $D/eval.parquet --limit 200 --max-new-tokens 256 --samples 4 --temperature 0.7 \
    --out $O/eval4-${m%%:*}.json
  python $R/paired_eval.py ${m%%:*} ${m#*:} $D $O
done
(cd $O && python ../../$R/paired_summary.py)
