"""
Throughput and memory benchmarks on GPUs with random-weight, real-size Qwen3-VL architectures (no downloads).

    python bench.py train --config 4b --seq 4096 --batch 2 --steps 6                 # 1 GPU
    torchrun --nproc_per_node 2 bench.py train --config 4b --seq 4096 --batch 2       # FSDP2 over 2 GPUs

train: the policy's training step as the stages run it (FSDP2, bf16 compute / fp32 master weights, chunked log-probs,
AdamW), on random text sequences of --seq tokens; reports tokens/s per GPU, MFU and peak memory.
MFU counts 6 N FLOPs per token (N = decoder + output-layer parameters) plus causal attention, 6 L H Q T per token
(fwd + bwd), against 989 TFLOP/s of bf16 per H100. Results are printed as one JSON line (and written to --out).
"""

import argparse
import json
import time

import torch
import torch.distributed as dist

import model as M

H100_BF16 = 989e12

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("what", choices=["train"], help="which measurement")
p.add_argument("--config", default="4b", choices=list(M.CONFIGS), help="architecture (random weights)")
p.add_argument("--processor", default="data/shapes/processor", help="any processor dir (special-token ids only)")
p.add_argument("--seq", type=int, default=4096, help="tokens per sequence")
p.add_argument("--batch", type=int, default=2, help="sequences per GPU per step")
p.add_argument("--steps", type=int, default=6, help="timed steps (after 2 warm-up steps)")
p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing in every block")
p.add_argument("--out", default=None, help="append the result JSON line to this file")
args = p.parse_args()

rank, world, device = M.init_dist()
processor = M.load_processor(args.processor)
with torch.device("meta"):
    hf = M.load_policy(args.config, processor, device)
cfg = hf.config.text_config
n_dec = sum(p.numel() for n, p in hf.named_parameters() if ".language_model.layers." in n)
N = n_dec + cfg.vocab_size * cfg.hidden_size  # decoder + output layer (the input embedding is a lookup)
flops_tok = 6 * N + 6 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * args.seq
hf.to_empty(device=device)
hf.tie_weights()
torch.manual_seed(0)
with torch.no_grad():  # random weights, scaled like an init (values do not matter for speed, only finiteness)
    for p_ in hf.parameters():
        p_.normal_(0, 0.02) if p_.ndim > 1 else p_.fill_(1.0)
policy = M.shard(M.LogProbs(hf), device, grad_ckpt=args.grad_ckpt)
opt = M.make_optimizer(policy, 1e-5, 0.0)
ids = torch.randint(100, cfg.vocab_size, (args.batch, args.seq))
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
         "mm_token_type_ids": torch.zeros_like(ids)}
batch["labels"][:, : args.seq // 4] = -100  # a prompt quarter without loss, like the stages
times = []
for step in range(args.steps + 2):
    torch.cuda.synchronize() if device.type == "cuda" else None
    t0 = time.time()
    lp = policy(batch)
    loss = -lp.sum() / (batch["labels"] != -100).sum()
    loss.backward()
    M.clip_grad(policy, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize() if device.type == "cuda" else None
    if step >= 2:
        times.append(time.time() - t0)
dt = sum(times) / len(times)
tok_s = args.batch * args.seq / dt  # per GPU
res = {"what": "train", "config": args.config, "gpus": world, "seq": args.seq, "batch_per_gpu": args.batch,
       "grad_ckpt": args.grad_ckpt, "step_s": dt, "tok_s_per_gpu": tok_s, "mfu": tok_s * flops_tok / H100_BF16,
       "peak_mem_gb": M.peak_mem_gb(), "params_b": sum(p.numel() for p in hf.parameters()) / 1e9,
       "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}
mem = torch.tensor([res["peak_mem_gb"]], device=device)
dist.all_reduce(mem, op=dist.ReduceOp.MAX)
res["peak_mem_gb"] = mem.item()
if rank == 0:
    print(json.dumps(res), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(res) + "\n")
dist.destroy_process_group()
