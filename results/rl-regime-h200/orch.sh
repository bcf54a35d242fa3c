#!/bin/bash
# The whole device session, detached: data -> base -> SFT (800 x 64) -> SFT eval (greedy + 8 samples) concurrently with
# 7 GRPO runs from the SFT policy -> sampled eval of each finished RL run -> kill what is still running at the deadline
# -> /tmp/res.tgz, then /tmp/ALLDONE.   RL_DEADLINE_S: seconds after this script's start at which RL runs are stopped.
set -u
C=/tmp/code; R=/tmp/res; D=/tmp/data; W=/tmp/runs
mkdir -p $R $W
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=/tmp/site
T0=$(date +%s); DEADLINE=$((T0 + ${RL_DEADLINE_S:-1350}))
now() { echo $(( $(date +%s) - T0 )); }
log() { echo "[$(now)s] $*" >> $R/orch.log; }
finish() { log "finish: $1"; for n in $NAMES; do cp -f $W/$n/metrics.jsonl $R/${n}_metrics.jsonl 2>/dev/null;
  cp -f $W/$n/evalpp.jsonl $R/${n}_evalpp.jsonl 2>/dev/null; done; cp -f $W/sft/metrics.jsonl $R/sft_metrics.jsonl 2>/dev/null
  nvidia-smi >> $R/orch.log 2>&1; tar czf /tmp/res.tgz -C /tmp res; touch /tmp/ALLDONE; exit 0; }
NAMES=""
cd $C
python3 -c "import math_verify; print(\"math_verify ok\")" >> $R/orch.log 2>&1
log "start $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader) $(python3 -c 'import torch,transformers;print(torch.__version__,transformers.__version__)')"
python3 data.py --out $D --seed 0 --n-sft 16000 --n-align 32 --n-rl 4096 --n-eval 1000 --n-hard 1000 --n-warmup 32 \
  > $R/data.log 2>&1 || finish "data failed"
log "data done"
python3 model.py init --config small --processor $D/processor --out $W/base --seed 0 > $R/init.log 2>&1 || finish "init failed"
log "init done"
python3 sft.py --init $W/base --data $D/sft.jsonl --out $W/sft --steps 800 --batch-size 64 --micro-batch 64 --lr 3e-4 \
  --warmup-ratio 0.05 --eval-every 100 --save-every 0 --seed 0 --max-len 1024 > $R/sft.log 2>&1 || finish "sft failed"
cp -f $W/sft/metrics.jsonl $R/sft_metrics.jsonl
log "sft done"

export OMP_NUM_THREADS=2
python3 x_eval.py --model $W/sft --data $D/eval.parquet $D/eval_hard.parquet --samples 8 --out $R/eval_sft.json \
  > $R/eval_sft.log 2>&1 &
COMMON="--policy $W/sft --algo grpo --data $D/rl.parquet --eval-data $D/eval.parquet $D/eval_hard.parquet --group-size 8
  --max-new-tokens 256 --temperature 1.0 --save-every 0 --seed 0 --micro-batch 256 --micro-tokens 32768 --gen-batch 512"
declare -A PID EV
launch() {  # NAME ENV(or -) ARGS...
  local n=$1 e=$2; shift 2; NAMES="$NAMES $n"
  [ "$e" = - ] && e=""
  env XRL_SKIP0=1 $e python3 x_rl.py $COMMON --out $W/$n "$@" > $R/$n.log 2>&1 &
  PID[$n]=$!; log "launched $n (pid ${PID[$n]}): $e $*"
}
launch g1e5    -             --lr 1e-5 --prompts 32 --steps 200 --eval-every 50
launch g3e5    -             --lr 3e-5 --prompts 32 --steps 200 --eval-every 50
launch g3e5b64 -             --lr 3e-5 --prompts 64 --steps 150 --eval-every 50
launch g1e4    -             --lr 1e-4 --prompts 32 --steps 100 --eval-every 25
launch g1e4plc XRL_PLACEBO=1 --lr 1e-4 --prompts 32 --steps 100 --eval-every 25
launch g1e4kl  -             --lr 1e-4 --prompts 32 --steps 100 --eval-every 25 --kl-coef 0.5
launch g1e4b64 -             --lr 1e-4 --prompts 64 --steps 100 --eval-every 25

while :; do
  alive=0
  for n in $NAMES; do
    if kill -0 ${PID[$n]} 2>/dev/null; then alive=1
    elif [ -z "${EV[$n]:-}" ]; then
      EV[$n]=1
      if [ -f $W/$n/run_config.json ] && [ $(( DEADLINE - $(date +%s) )) -gt 120 ]; then
        python3 x_eval.py --model $W/$n --data $D/eval.parquet --samples 8 --out $R/eval_$n.json > $R/eval_$n.log 2>&1 &
        log "$n finished; sampled eval started"
      else log "$n ended (run_config: $([ -f $W/$n/run_config.json ] && echo yes || echo no))"; fi
    fi
  done
  for n in $NAMES; do cp -f $W/$n/metrics.jsonl $R/${n}_metrics.jsonl 2>/dev/null; cp -f $W/$n/evalpp.jsonl $R/${n}_evalpp.jsonl 2>/dev/null; done
  [ $alive = 0 ] && break
  if [ $(date +%s) -ge $DEADLINE ]; then
    for n in $NAMES; do kill -0 ${PID[$n]} 2>/dev/null && kill ${PID[$n]} && log "deadline: killed $n"; done
    break
  fi
  sleep 10
done
# sampled evals still running: wait at most until the deadline + 30 s
while jobs -r | grep -q . && [ $(date +%s) -lt $((DEADLINE + 30)) ]; do sleep 3; done
for p in $(jobs -rp); do kill $p 2>/dev/null && log "killed leftover job $p"; done
finish "done"
