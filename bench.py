"""
Throughput and memory benchmarks on GPUs with random-weight, real-size Qwen3-VL architectures (no downloads).

    python bench.py train --config 4b --seq 4096 --batch 2 --steps 6                 # 1 GPU
    torchrun --nproc_per_node 2 bench.py train --config 4b --seq 4096 --batch 2       # FSDP2 over 2 GPUs

    python bench.py rollout --config 4b --batches 16 64 256 --prompt 256 --new 128      # 1 GPU

train: the policy's training step as the stages run it (FSDP2, bf16 compute / fp32 master weights, chunked log-probs,
AdamW), on random text sequences of --seq tokens; reports tokens/s per GPU, MFU and peak memory.
MFU counts 6 N FLOPs per token (N = decoder + output-layer parameters) plus causal attention, 6 L H Q T per token
(fwd + bwd), against 989 TFLOP/s of bf16 per H100.
rollout: decode time per step of the static-cache loop (model.decode) and of plain generate() with the dynamic cache, in
the same run, on the bf16 inference copy, for prompts of one image + text; ms per step is (time for --new tokens - time for
1 token) / (--new - 1), so the prefill is excluded. The floor: bytes read per step (bf16 weights + the KV cache at the
mean context) over 3.35 TB/s. Results are printed as JSON lines (and appended to --out).
"""

import argparse
import json
import time

import torch
import torch.distributed as dist

import model as M

H100_BF16 = 989e12

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("what", choices=["train", "rollout"], help="which measurement")
p.add_argument("--config", default="4b", choices=list(M.CONFIGS), help="architecture (random weights)")
p.add_argument("--processor", default="data/shapes/processor", help="any processor dir (special-token ids only)")
p.add_argument("--seq", type=int, default=4096, help="tokens per sequence")
p.add_argument("--batch", type=int, default=2, help="sequences per GPU per step")
p.add_argument("--steps", type=int, default=6, help="timed steps (after 2 warm-up steps)")
p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing in every block")
p.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256], help="rollout: sequences per decode batch")
p.add_argument("--prompt", type=int, default=256, help="rollout: text tokens per prompt (plus one 448x448 image)")
p.add_argument("--new", type=int, default=128, help="rollout: tokens generated per sequence")
p.add_argument("--out", default=None, help="append the result JSON lines to this file")
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
for m in hf.modules():  # to_empty leaves the rotary tables uninitialised (NaN logits at random): recompute them
    if hasattr(m, "inv_freq"):
        m.__init__(m.config)
        m.to(device)
torch.manual_seed(0)
with torch.no_grad():  # random weights, scaled like an init (values do not matter for speed, only finiteness)
    for p_ in hf.parameters():
        p_.normal_(0, 0.02) if p_.ndim > 1 else p_.fill_(1.0)
dev_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"


def emit(res):
    if rank == 0:
        print(json.dumps(res), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(res) + "\n")


if args.what == "rollout":
    import io

    import numpy as np
    from PIL import Image

    import data
    infer = M.make_inference_copy(hf, device)
    tok = processor.tokenizer
    eos, pad = -1, tok.convert_tokens_to_ids("<|endoftext|>")  # no eos: every sequence runs all --new steps
    png = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (448, 448, 3), dtype=np.uint8)).save(png, format="PNG")
    img = {"bytes": png.getvalue()}
    words = " ".join(["shape"] * args.prompt)
    prompt = data.render_chat(processor, data.Example(question="<image>" + words, images=[img], where="bench"))
    L = len(prompt["input_ids"])
    kv_per_tok = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2  # K and V, bf16 bytes
    w_bytes = 2 * (n_dec + cfg.vocab_size * cfg.hidden_size)

    def timed(fn):
        torch.cuda.synchronize() if device.type == "cuda" else None
        t0 = time.time()
        fn()
        torch.cuda.synchronize() if device.type == "cuda" else None
        return time.time() - t0

    for B in args.batches:
        batch = data.collate([prompt] * B, pad, left=True)
        paths = {
            "static": lambda n: M.decode(infer, batch, device, n, eos, pad, [], temperature=1.0),
            "hf_generate": lambda n: infer.generate(**M.model_inputs(batch, device), max_new_tokens=n, min_new_tokens=n,
                                                    do_sample=True, top_k=None, pad_token_id=pad)}
        res = {"what": "rollout", "config": args.config, "batch": B, "prompt_tokens": L, "new_tokens": args.new,
               "device": dev_name, "torch": torch.__version__}
        for name, fn in paths.items():
            fn(1), fn(args.new)  # warm-up, and compilation of both cache lengths where there is any
            t1, tn = timed(lambda: fn(1)), timed(lambda: fn(args.new))
            res[f"{name}_ms_per_step"] = (tn - t1) / (args.new - 1) * 1e3
            res[f"{name}_tok_s"] = B * (args.new - 1) / (tn - t1)
        res["ratio_static_vs_hf"] = res["hf_generate_ms_per_step"] / res["static_ms_per_step"]
        # greedy agreement of the two paths on 32 tokens (bf16 kernels differ, so a near-tie can flip a random model's argmax)
        a = M.decode(infer, batch, device, 32, eos, pad, [], temperature=0)
        b = infer.generate(**M.model_inputs(batch, device), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                           pad_token_id=pad)[:, L:]
        res["greedy_rows_equal"] = (a == b).all(1).float().mean().item()
        res["greedy_tokens_equal"] = (a == b).float().mean().item()
        res["floor_ms_per_step"] = (w_bytes + B * kv_per_tok * (L + args.new / 2)) / 3.35e12 * 1e3
        res["peak_mem_gb"] = M.peak_mem_gb()
        emit(res)
    dist.destroy_process_group()
    raise SystemExit(0)

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
       "device": dev_name, "torch": torch.__version__}
res["peak_mem_gb"] = M.all_sum(res["peak_mem_gb"], device, dist.ReduceOp.MAX)
emit(res)
dist.destroy_process_group()
