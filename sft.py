"""
Stage 1 of PRISM: supervised fine-tuning on multimodal demonstrations (loss on assistant tokens only).

    python sft.py --init tiny --processor data/shapes/processor --data data/shapes/sft.jsonl --out runs/x/sft
    torchrun --nproc_per_node 8 sft.py --init /ckpt/Qwen3-VL-4B-Instruct --data sft.jsonl --out runs/x/sft --grad-ckpt

The loss is the sum of token log-losses divided by the number of supervised tokens of the WHOLE optimizer step (all ranks,
all micro-batches), so gradient accumulation and world size do not change the update. Re-running the same command resumes
from the latest checkpoint in OUT/ckpt. Output: OUT is a plain Hugging Face directory (+ metrics.jsonl).
"""

import argparse
import math
import os
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import model as M

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# model
p.add_argument("--init", required=True, help="a Qwen3-VL HF directory, or a built-in config: tiny | small (random init)")
p.add_argument("--processor", default=None, help="processor directory (default: the --init directory)")
p.add_argument("--freeze-vision", action="store_true", help="the vision tower gets no gradient")
p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing in every block (less memory, ~30%% slower)")
p.add_argument("--compile", action="store_true", help="torch.compile each decoder block of the policy (4B on GPUs: "
               "+25-33%% training tokens/s, bench/results; the first steps compile)")
p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the --init directory")
# data
p.add_argument("--data", required=True, help="sharegpt JSON/JSONL with messages + images")
p.add_argument("--val-size", type=int, default=128, help="examples held out from the end of --data for the validation loss (0: none, no validation)")
p.add_argument("--max-len", type=int, default=8192, help="drop (and count) examples longer than this many tokens; never truncate")
p.add_argument("--max-pixels", type=int, default=560 * 560, help="images are downscaled to at most this many pixels")
p.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of stopping at the first")
p.add_argument("--image-root", default=None, help="relative image paths resolve against this folder (the release's "
               "IMAGE_BASE_PATH), else against the data file's folder")
p.add_argument("--workers", type=int, default=-1, help="DataLoader processes rendering and collating the next steps "
               "(-1: on a GPU this process's share of the host's cores, at most 8; on a CPU none)")
p.add_argument("--system-prompt", default=None, help="a text file: the system prompt of records that carry none "
               "(default: data.SYSTEM_PROMPT)")
# optimisation
p.add_argument("--steps", type=int, default=0, help="optimizer steps (0: derive from --epochs)")
p.add_argument("--epochs", type=float, default=1.0, help="passes over the data when --steps is 0")
p.add_argument("--batch-size", type=int, default=128, help="global batch in examples per optimizer step")
p.add_argument("--micro-batch", type=int, default=4, help="examples per forward/backward per rank")
p.add_argument("--pack", action="store_true", help="each micro-batch's sequences in one row, no FLOPs on padding "
               "(varlen flash attention on GPUs); the same log-probs as padded batches (tests/test_model.py)")
p.add_argument("--lr", type=float, default=1e-5, help="peak learning rate")
p.add_argument("--warmup-ratio", type=float, default=0.1, help="linear warm-up as a share of the steps, then cosine to 0")
p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
p.add_argument("--grad-clip", type=float, default=1.0, help="clip the global grad norm to this")
p.add_argument("--seed", type=int, default=0, help="seed for init and data order")
p.add_argument("--max-bad-steps", type=int, default=5, help="stop after this many non-finite steps in a row")
# eval / checkpoint / logging
p.add_argument("--out", required=True, help="output directory: the HF model, metrics.jsonl, ckpt/")
p.add_argument("--eval-every", type=int, default=50, help="validation loss every N steps (0: only at the end)")
p.add_argument("--save-every", type=int, default=100, help="resume checkpoint every N steps (0: never)")
p.add_argument("--wandb", default=None, help="wandb project name (off when unset)")
args = p.parse_args()

rank, world, device = M.init_dist()
M.seed_all(args.seed)
os.makedirs(args.out, exist_ok=True)
processor = M.load_processor(args.processor or args.init)
tok = processor.tokenizer
pad_id = tok.convert_tokens_to_ids("<|endoftext|>")

# -----------------------------------------------------------------------------
# data: read and validate every record up front (errors name file and record); images decode lazily per batch

examples, skipped = data.read_examples(args.data, "sft", skip_bad=args.skip_bad, image_root=args.image_root,
                                       system=data.system_prompt(args.system_prompt))
if skipped:
    M.print0(f"skipped {len(skipped)} bad records of {args.data} (first: {skipped[0]})")
if len(examples) <= args.val_size:
    raise SystemExit(f"{args.data}: {len(examples)} examples, not enough for --val-size {args.val_size}")
val, train = examples[len(examples) - args.val_size:], examples[:len(examples) - args.val_size]
B = args.batch_size
if B % world:
    raise SystemExit(f"--batch-size {B} must be divisible by the world size {world}: change one of them")
per_rank = B // world
accum = math.ceil(per_rank / args.micro_batch)
steps = args.steps or max(1, int(args.epochs * len(train) / B))
M.print0(f"world {world} | device {device.type} | train {len(train)} val {len(val)} | batch {B} = {world} ranks x {accum} "
         f"micro-steps x <= {args.micro_batch} | steps {steps} (~{steps * B / len(train):.2f} epochs)")


n_dropped = n_bad = 0


def encode(exs):
    """render_chat for each example: (items, over-long ones dropped, bad ones skipped under --skip-bad)."""
    items, dropped, bad = [], 0, 0
    for ex in exs:
        try:
            it = data.render_chat(processor, ex, ex.response, args.max_pixels)
        except data.DataError:
            if not args.skip_bad:
                raise
            bad += 1
            continue
        if len(it["input_ids"]) > args.max_len:
            dropped += 1
            continue
        items.append(it)
    return items, dropped, bad


class Steps(torch.utils.data.Dataset):
    """Step i of this rank, rendered (images decoded, tokenised) and collated into its micro-batches, with the counts
    the step needs: on a GPU, DataLoader workers prepare the next steps while the current one trains, so the GPU does
    not wait on the host. Collated in the worker, a step crosses over as a few large tensors, not five per example
    (unpickling 320 small shared-memory tensors and concatenating them in the main process took ~0.2 s of a 0.25 s
    step on an H200)."""

    def __getitem__(self, step):
        idx = data.stream_indices(len(train), args.seed, step * B, B)  # this step's global batch
        items, dropped, bad = encode([train[i] for i in idx[rank * per_rank:(rank + 1) * per_rank]])
        lens = [len(it["input_ids"]) for it in items]
        counts = {"sup": sum(int((it["labels"] != -100).sum()) for it in items), "tok": sum(lens),
                  "longest": max(lens, default=0), "n": len(items), "dropped": dropped, "bad": bad}
        return micro_batches(items), counts

    def __len__(self):
        return steps


def micro_batches(items):
    """Exactly `accum` micro-batches on every rank (FSDP needs every rank in every forward): an empty one carries a
    placeholder item whose labels are all -100, so it contributes no loss and no gradient."""
    out = []
    for i in range(accum):
        chunk = items[i * args.micro_batch:(i + 1) * args.micro_batch]
        if not chunk:
            ph = dict(placeholder)
            ph["labels"] = torch.full_like(ph["labels"], -100)
            chunk = [ph]
        out.append(data.collate(chunk, pad_id, packed=args.pack))
    return out


placeholder = data.render_chat(processor, train[0], train[0].response, args.max_pixels)

# -----------------------------------------------------------------------------
# model, optimizer, schedule

hf = M.load_policy(args.init, processor, device, seed=args.seed, trust_remote_code=args.trust_remote_code)
n_params = sum(p.numel() for p in hf.parameters())
policy = M.shard(M.LogProbs(hf), device, args.freeze_vision, args.grad_ckpt, args.compile)
opt = M.make_optimizer(policy, args.lr, args.weight_decay)
warmup = int(args.warmup_ratio * steps)


def lr_at(step):
    if step < warmup:
        return args.lr * (step + 1) / warmup
    return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


ckpt_dir = os.path.join(args.out, "ckpt")
start = 0
if (last := M.latest_checkpoint(ckpt_dir)) is not None:
    meta = M.load_checkpoint(last, {"policy": (policy, opt)})
    start, n_dropped, n_bad = meta["step"], meta["dropped"], meta["bad"]
    M.print0(f"resumed from {last} at step {start}")
log = M.metrics_logger(args.out, start, args)
M.print0(f"policy {args.init}: {n_params / 1e6:.2f}M params | lr {args.lr} warm-up {warmup} steps, cosine | out {args.out}")


@torch.no_grad()
def val_loss():
    """Mean token loss over the held-out examples (all ranks share them, the sums are all-reduced)."""
    policy.eval()
    mine = encode(val[rank::world])[0]
    tot = cnt = 0.0
    n_mb = math.ceil(math.ceil(len(val) / world) / args.micro_batch)
    for i in range(n_mb):  # the same number of forwards on every rank
        chunk = mine[i * args.micro_batch:(i + 1) * args.micro_batch] or [placeholder]
        b = data.collate(chunk, pad_id, packed=args.pack)
        lp = policy(b)
        mask = b["labels"].to(device) != -100
        if chunk[0] is not placeholder:
            tot, cnt = tot - lp[mask].sum().item(), cnt + mask.sum().item()
    tot, cnt = M.all_sum([tot, cnt], device)
    policy.train()
    return tot / max(cnt, 1)


# -----------------------------------------------------------------------------
# training loop

# on a GPU, workers render ahead (~4 ms of chat template and image processing per example: 64 examples need several
# workers to keep up with a small model's step); this process's share of the host's cores, at most 8
workers = args.workers
if workers < 0:
    workers = min(8, max(1, (os.cpu_count() or 2) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1)) if device.type == "cuda" else 0
batches = iter(torch.utils.data.DataLoader(Steps(), batch_size=None, sampler=range(start, steps), collate_fn=lambda x: x,
                                           num_workers=workers, prefetch_factor=4 if workers else None,
                                           pin_memory=device.type == "cuda"))
bar = tqdm(total=steps, initial=start, desc="sft", disable=rank != 0, dynamic_ncols=True)
bad_in_row = n_skipped_steps = 0
policy.train()
for step in range(start, steps + 1):
    last_step = step == steps
    if val and (args.eval_every and step % args.eval_every == 0 or last_step):
        vl = val_loss()
        tqdm.write(f"step {step:05d}/{steps:05d} | val_loss {vl:.4f}") if rank == 0 else None
        log({"step": step, "eval": True, "val_loss": vl})
    if step > start and (last_step or (args.save_every and step % args.save_every == 0)):
        M.save_checkpoint(ckpt_dir, step, {"policy": (policy, opt)}, {"dropped": n_dropped, "bad": n_bad})
    if last_step:
        break

    t0 = time.time()
    mbs, c = next(batches)
    n_dropped, n_bad = n_dropped + c["dropped"], n_bad + c["bad"]
    # THE GLOBAL NORMALISER (the gradient contract of model.shard: FSDP sums gradients, it does not average): supervised
    # tokens in the whole optimizer step, over all ranks and micro-batches
    n_tok, n_in = M.all_sum([c["sup"], c["tok"]], device)
    loss_sum = 0.0
    with M.oom_guard("the SFT step", f"{c['n']} examples on this rank, the longest {c['longest']} tokens, --micro-batch "
                     f"{args.micro_batch}", "a lower --micro-batch or --max-len, --grad-ckpt"):
        for b in mbs:
            lp = policy(b)  # (B, T) log-probs of the supervised tokens, 0 elsewhere
            loss = -lp.sum() / max(n_tok, 1.0)  # this micro-batch's share of the global token-mean loss
            loss.backward()
            loss_sum += loss.item()
    loss_sum = M.all_sum(loss_sum, device)
    gnorm = M.clip_grad(policy, args.grad_clip)
    if not math.isfinite(gnorm) or not math.isfinite(loss_sum):  # the grad norm is global, so every rank agrees here
        opt.zero_grad(set_to_none=True)
        bad_in_row += 1
        n_skipped_steps += 1
        M.print0(f"step {step}: non-finite loss/grad norm ({loss_sum}, {gnorm}), step skipped ({bad_in_row} in a row)")
        if bad_in_row >= args.max_bad_steps:
            raise SystemExit(f"{bad_in_row} non-finite steps in a row: stopping. Lower --lr or check the data.")
        continue
    bad_in_row = 0
    lr = lr_at(step)
    for g in opt.param_groups:
        g["lr"] = lr
    opt.step()
    opt.zero_grad(set_to_none=True)
    dt = time.time() - t0
    rec = {"step": step + 1, "loss": loss_sum, "lr": lr, "grad_norm": gnorm, "tok_s": n_in / dt, "dt": dt,
           "dropped": n_dropped, "bad": n_bad, "skipped_steps": n_skipped_steps, "mem_gb": M.peak_mem_gb()}
    log(rec)
    if rank == 0:
        tqdm.write(f"step {step + 1:05d}/{steps:05d} | loss {loss_sum:.4f} | lr {lr:.2e} | gnorm {gnorm:.3f} | "
                   f"tok/s {n_in / dt:,.0f} | dt {dt * 1000:.0f}ms | dropped {n_dropped}" +
                   (f" | mem {rec['mem_gb']:.1f}GB" if device.type == "cuda" else ""))
    bar.update()
bar.close()

M.save_hf(policy, processor, args.out, {"stage": "sft", **vars(args), "steps_done": steps, "dropped_overlong": n_dropped,
                                        "skipped_bad": n_bad, "skipped_steps": n_skipped_steps})
M.print0(f"saved {args.out} | dropped {n_dropped} over-long, {n_bad} bad examples, {n_skipped_steps} non-finite steps")
dist.destroy_process_group()
