# issue 10: 8B alignment step on 4 GPUs, then the 4B step at --new 14336; 16 CPU threads per rank for the random init (64 cores)
set -u
export OMP_NUM_THREADS=16 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
(python -c "import pyarrow" 2>/dev/null || python -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl); export PYTHONPATH=/tmp/site
R=/tmp/res; mkdir -p $R; P=.gc/processor
nvidia-smi --query-gpu=name,memory.total --format=csv > $R/gpus.txt
git log -1 --format=%H > $R/commit.txt 2>/dev/null
echo "align8b $(date +%T)" >> $R/phases
timeout 900 torchrun --standalone --nproc_per_node 4 bench.py align --config 8b --disc-config 2b --prompts 4 --group-size 16 \
  --prompt 1800 --new 6144 --gen-batch 8 --steps 2 --grad-ckpt --processor $P --out $R/align.jsonl 2>&1 | while IFS= read -r l; do echo "$(date +%T) $l"; done > $R/align8b.log
echo "align4b_long $(date +%T)" >> $R/phases
timeout 900 torchrun --standalone --nproc_per_node 4 bench.py align --config 4b --disc-config 2b --prompts 4 --group-size 16 \
  --prompt 1800 --new 14336 --steps 2 --grad-ckpt --processor $P --out $R/align.jsonl 2>&1 | while IFS= read -r l; do echo "$(date +%T) $l"; done > $R/align4b_long.log
echo "ALL DONE $(date +%T)" >> $R/phases
