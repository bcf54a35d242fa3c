"""
The discriminator warm-up, before stage 2 (the release's `moe/train_moe_vl_warmup_fast.py`): upcycle a dense Qwen3-VL into
a Mixture-of-Experts discriminator and train it to rank the teacher's segments above a student's, per channel.

    python warmup.py --disc upcycle:runs/x/sft --data data/shapes/warmup.jsonl --out runs/x/disc
    torchrun --nproc_per_node 8 warmup.py --disc runs/4b/disc-init --data warmup_pairs.jsonl --out runs/4b/disc --grad-ckpt
    python warmup.py --disc upcycle:runs/x/sft --policy runs/x/sft --prompts data/shapes/align.parquet --out runs/x/disc

Loss per pair (PRISM_NOTES.md "Warm-up"): -log sigmoid(D(teacher) - D(student)) for the caption and the reasoning segment,
averaged over the step's pairs on all ranks, + --aux-coef x the router's load-balancing loss; AdamW, cosine lr with 10%
linear warm-up. Segments are scored by align.score_segments, the framing the game uses. Pairs come from a warm-up JSONL
(--data) or are built on the fly (--policy + --prompts): one rollout of the policy per alignment prompt, its valid
segments as the student, the prompt's teacher columns as the teacher. Output: OUT, the discriminator in the released layout
(model.* + score.weight), + metrics.jsonl and run_config.json with the held-out pair accuracy ("val").
"""

import argparse
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import align
import data
import engine
import model as M
import verify

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# models
align.add_discriminator_args(p)
p.add_argument("--processor", default=None, help="processor directory (default: the --policy's, else the --disc's)")
# data
p.add_argument("--data", default=None, help="warm-up pairs JSONL: prompt, image, teacher_caption, teacher_cot, "
               "student_caption, student_cot")
p.add_argument("--policy", default=None, help="instead of --data: build the pairs from this policy's rollouts on --prompts")
p.add_argument("--prompts", default=None, help="with --policy: an alignment parquet (prompt, images, teacher_* columns)")
p.add_argument("--temperature", type=float, default=1.0, help="with --policy: sampling temperature of the rollouts")
p.add_argument("--max-new-tokens", type=int, default=6144, help="with --policy: response length limit in tokens")
p.add_argument("--gen-batch", type=int, default=64, help="with --policy: sequences per generation call")
p.add_argument("--hf-generate", action="store_true", help="with --policy: roll out with Hugging Face generate()")
p.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of stopping at the first")
p.add_argument("--image-root", default=None, help="relative image paths resolve against this folder (the release's "
               "IMAGE_BASE_PATH), else against the data file's folder")
p.add_argument("--system-prompt", default=None, help="a text file: the system prompt of records that carry none "
               "(default: data.SYSTEM_PROMPT)")
# optimisation
p.add_argument("--epochs", type=float, default=1.0, help="passes over the warm-up pairs")
p.add_argument("--batch-size", type=int, default=128, help="pairs per optimizer step (global)")
p.add_argument("--lr", type=float, default=1e-5, help="peak lr (cosine, 10%% linear warm-up)")
p.add_argument("--aux-coef", type=float, default=0.01, help="router load-balancing loss weight")
p.add_argument("--grad-clip", type=float, default=1.0, help="clip the global grad norm to this")
p.add_argument("--val", type=int, default=64, help="pairs held out (from the end) for the pair accuracy")
p.add_argument("--seed", type=int, default=0, help="seed for upcycling, data order and sampling")
p.add_argument("--max-bad-steps", type=int, default=5, help="stop after this many non-finite steps in a row")
# checkpoint / logging
p.add_argument("--out", required=True, help="output directory: the discriminator HF dir, metrics.jsonl, ckpt/")
p.add_argument("--save-every", type=int, default=50, help="resume checkpoint every N steps (0: only at the end)")
p.add_argument("--wandb", default=None, help="wandb project name (off when unset)")
args = p.parse_args()
if (args.data is None) == (args.policy is None) or (args.policy is not None and args.prompts is None):
    p.error("give the pairs (--data PAIRS.jsonl) or a policy to build them from (--policy DIR --prompts ALIGN.parquet)")

rank, world, device = M.init_dist()
M.seed_all(args.seed)
os.makedirs(args.out, exist_ok=True)
processor = M.load_processor(args.processor or args.policy or args.disc.split(":", 1)[-1])
tok = processor.tokenizer
mode, channels = args.disc_segments, align.CHANNELS[args.disc_segments]
disc, framing, E = align.setup_discriminator(args, processor, device)

# -----------------------------------------------------------------------------
# the pairs: (prompt, teacher segments, student segments)

if args.data:
    pairs, skipped = data.read_examples(args.data, "pair", skip_bad=args.skip_bad, image_root=args.image_root,
                                        system=data.system_prompt(args.system_prompt))
else:  # one rollout of the policy per prompt, paired with the prompt's teacher columns (valid rollouts only)
    infer = engine.make_inference_copy(M.load_policy(args.policy, processor, device, seed=args.seed,
                                                     trust_remote_code=args.trust_remote_code), device)
    exs, skipped = data.read_examples(args.prompts, "prompt", skip_bad=args.skip_bad, require=("teacher_caption",
                                      "teacher_cot"), image_root=args.image_root, system=data.system_prompt(args.system_prompt))
    mine = exs[rank::world]
    outs = engine.generate(infer, [data.render_chat(processor, ex, None, args.max_pixels) for ex in mine], tok, device,
                           args.max_new_tokens, args.temperature, 1.0, args.gen_batch, args.hf_generate)
    pairs = []
    for ex, o in zip(mine, outs):
        seg = verify.split_response(tok.decode(o, skip_special_tokens=True))
        if seg is not None:
            pairs.append(data.Example(question=ex.question, images=ex.images, where=ex.where, system=ex.system,
                                      teacher_caption=ex.teacher_caption, teacher_cot=ex.teacher_cot,
                                      student_caption=seg[0], student_cot=seg[1]))
    gathered = [None] * world
    dist.all_gather_object(gathered, pairs)
    pairs = [x for g in gathered for x in g]
    del infer
    M.print0(f"built {len(pairs)} warm-up pairs from {len(exs)} policy rollouts (format-valid ones)")
if skipped:
    M.print0(f"skipped {len(skipped)} bad records (first: {skipped[0]})")
if mode == "split" and any(q.teacher_response is not None for q in pairs):
    q = next(q for q in pairs if q.teacher_response is not None)
    raise SystemExit(f"{q.where}: a whole-response pair (teacher_response / student_response): the perception and reasoning "
                     f"channels need caption / cot pairs; train a one-channel discriminator with --disc-segments whole")
if len(pairs) <= args.val:
    raise SystemExit(f"{len(pairs)} warm-up pairs: not enough for --val {args.val}")
val, train = pairs[-args.val:], pairs[:-args.val]
B = args.batch_size
if B % world:
    raise SystemExit(f"--batch-size {B} must be divisible by the world size {world}")
steps = max(1, int(args.epochs * len(train) / B))
warm = max(1, int(0.1 * steps))
opt = M.make_optimizer(disc, args.lr, 0.01)
M.print0(f"warm-up: {len(train)} pairs ({len(val)} held out), batch {B}, {steps} steps, lr {args.lr} | disc {args.disc} "
         f"experts {E or 1} | segments {mode} | routing {args.disc_routing} | text-only {args.disc_text_only}")
pad = align.Seq(train[0], train[0].teacher_caption, "whole")


def pair_seqs(prs):
    """The sequences of a list of pairs, per pair and channel: the teacher's segment, then the student's."""
    seqs = []
    for q in prs:
        if q.teacher_response is not None:  # a whole-response pair (GAD-style)
            t, s = (q.teacher_response,), (q.student_response,)
        else:
            t, s = (q.teacher_caption, q.teacher_cot), (q.student_caption, q.student_cot)
            if mode == "whole":
                t, s = (t[0] + "\n" + t[1],), (s[0] + "\n" + s[1],)
        for c in range(len(t)):
            seqs += [align.Seq(q, t[c], channels[c]), align.Seq(q, s[c], channels[c])]
    return seqs


def bt_pairs(sc):
    """Scores in pair_seqs order -> per-pair Bradley-Terry loss summed over channels (B,), teacher wins per channel."""
    sc = sc.view(-1, len(channels), 2)  # (B, channels, teacher/student)
    wins = sc[..., 0] > sc[..., 1]
    return -F.logsigmoid(sc[..., 0] - sc[..., 1]).sum(1), wins[:, 0], wins[:, -1]


@torch.no_grad()
def evaluate():
    """Held-out pair loss and accuracy per channel (the pairs are split over ranks, the sums all-reduced)."""
    disc.eval()
    mine = val[rank::world]
    loss, cw, tw = bt_pairs(align.score_segments(disc, framing, pair_seqs(mine), device, pad)[0])
    tot = M.all_sum([float(loss.sum()), float(cw.sum()), float(tw.sum()), len(mine)], device)
    disc.train()
    return {"d_loss": tot[0] / tot[3], "cap_acc": tot[1] / tot[3], "cot_acc": tot[2] / tot[3]}


def lr_at(step):
    return args.lr * ((step + 1) / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm))))


# -----------------------------------------------------------------------------
# training loop

ckpt_dir = os.path.join(args.out, "ckpt")
start, n_skipped, bad_in_row = 0, 0, 0
if (last := M.latest_checkpoint(ckpt_dir)) is not None:
    meta = M.load_checkpoint(last, {"disc": (disc, opt)})
    start, n_skipped = meta["step"], meta["skipped"]
    M.print0(f"resumed from {last} at step {start}")
log = M.metrics_logger(args.out, start, args)
bar = tqdm(total=steps, initial=start, desc="warm-up", disable=rank != 0, dynamic_ncols=True)
disc.train()
for step in range(start, steps + 1):
    last_step = step == steps
    if step % max(1, steps // 5) == 0 or last_step:
        r = evaluate()
        tqdm.write(f"step {step:05d}/{steps:05d} | val d_loss {r['d_loss']:.4f} | cap_acc {r['cap_acc']:.3f} | "
                   f"cot_acc {r['cot_acc']:.3f}") if rank == 0 else None
        log({"step": step, "eval": True, **r})
    if step > start and (last_step or (args.save_every and step % args.save_every == 0)):
        M.save_checkpoint(ckpt_dir, step, {"disc": (disc, opt)}, {"skipped": n_skipped})
    if last_step:
        break

    t0 = time.time()
    idx = data.stream_indices(len(train), args.seed, step * B, B)  # this step's global batch of pairs
    mine = [train[i] for i in idx[rank * (B // world):(rank + 1) * (B // world)]]
    with M.oom_guard("the warm-up step", f"{len(mine)} pairs on this rank, --disc-micro {framing.micro}",
                     "a lower --disc-micro, --grad-ckpt, more GPUs"):
        sc, aux, tie = align.score_segments(disc, framing, pair_seqs(mine), device, pad, grad=True, with_aux=True)
        loss_pairs, cw, tw = bt_pairs(sc)
        # the global mean over the step's B pairs (each rank holds B / world of them; the gradient contract of model.shard)
        # + the router aux loss, whose mean over ranks the summed gradients give by dividing by world
        loss = loss_pairs.sum() / B + args.aux_coef * aux / world + tie
        loss.backward()
    gnorm = M.clip_grad(disc, args.grad_clip)
    lr = lr_at(step)
    if math.isfinite(gnorm):  # global: every rank takes or skips the step together
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        bad_in_row = 0
    else:
        n_skipped, bad_in_row = n_skipped + 1, bad_in_row + 1
        M.print0(f"step {step + 1}: non-finite grad norm, step skipped ({bad_in_row} in a row)")
        if bad_in_row >= args.max_bad_steps:
            raise SystemExit(f"{bad_in_row} non-finite steps in a row: stopping. Lower --lr or check the data.")
    opt.zero_grad(set_to_none=True)
    tot = M.all_sum([float(loss_pairs.detach().sum()), float(cw.sum()), float(tw.sum()), float(aux.detach())], device)
    rec = {"step": step + 1, "d_loss": tot[0] / B, "cap_acc": tot[1] / B, "cot_acc": tot[2] / B, "aux": tot[3] / world,
           "lr": lr, "grad_norm": gnorm, "skipped_steps": n_skipped, "dt": time.time() - t0}
    log(rec)
    if rank == 0:
        tqdm.write(f"step {step + 1:05d}/{steps:05d} | d_loss {rec['d_loss']:.4f} | cap_acc {rec['cap_acc']:.3f} | "
                   f"cot_acc {rec['cot_acc']:.3f} | aux {rec['aux']:.3f} | lr {lr:.2e} | gnorm {gnorm:.3f} | "
                   f"dt {rec['dt'] * 1000:.0f}ms")
    bar.update()
bar.close()

align.save_framing(framing, args.out)  # before save_hf, whose run_config.json marks the save complete
M.save_hf(disc, processor, args.out, {"stage": "disc-warmup", **vars(args), "val": evaluate(), "skipped_steps": n_skipped})
M.print0(f"saved the discriminator to {args.out}")
dist.destroy_process_group()
