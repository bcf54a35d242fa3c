"""
Stage 2 of PRISM: black-box on-policy distillation against a Mixture-of-Experts discriminator, and its warm-up.

    # 1. discriminator warm-up (Bradley-Terry, teacher over student, per channel): upcycle the SFT policy, train on pairs
    python align.py --warmup-only --disc upcycle:runs/x/sft --warmup-data data/shapes/warmup.jsonl --out runs/x/disc
    # 2. the alignment game: policy rollouts scored by the discriminator, both models updated every step
    python align.py --policy runs/x/sft --disc runs/x/disc --data data/shapes/align.parquet --out runs/x/align
    torchrun --nproc_per_node 8 align.py --policy runs/x/sft --disc runs/x/disc --data align.parquet --out runs/x/align

One step (PRISM_NOTES.md "Stage 2, one step"): G rollouts per prompt -> split into perception (caption block) and reasoning
(think + answer) segments -> score valid responses per channel with the discriminator (no grad, before its update) ->
alignment_advantages -> one discriminator step on (teacher demonstration, valid rollout) pairs -> one policy step with the
PPO clipped loss (token-mean; on-policy by default, so it is REINFORCE with these advantages). No accuracy reward, no KL.
Outputs: OUT is the policy as an HF directory, OUT/disc the discriminator in the released layout (model.* + score.weight).
Without --warmup-data the warm-up pairs are built on the fly: one rollout of the policy per prompt of --data against its
teacher columns.
"""

import argparse
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
import model as M
import rl
import verify


def alignment_advantages(cap, cot, valid, group_size, alpha=0.5, format_penalty=1.5, eps=1e-6):
    """The released "mode 1" advantage. cap, cot: discriminator scores (B,) (anything on invalid rows); valid: (B,) bool.
    Per group of `group_size` contiguous rows and per channel: invalid (or non-finite) scores are replaced by the lowest
    valid score of the group minus 1 (0 - 1 when none is valid); then group normalisation GN(s) = (s - mean) / (std + eps)
    (unbiased std; a group of one has mean 0 and std 1);  A = alpha GN(cap) + (1 - alpha) GN(cot) - format_penalty F."""
    G = group_size
    valid = valid.view(-1, G)

    def gn(s):
        s = s.view(-1, G).double()
        ok = valid & torch.isfinite(s)
        low = torch.where(ok, s, torch.full_like(s, float("inf"))).min(1, keepdim=True).values
        fill = torch.where(torch.isfinite(low), low, torch.zeros_like(low)) - 1.0  # (groups, 1)
        s = torch.where(ok, s, fill)
        if G == 1:
            return s
        return (s - s.mean(1, keepdim=True)) / (s.std(1, keepdim=True) + eps)

    adv = alpha * gn(cap) + (1 - alpha) * gn(cot) - format_penalty * (~valid).double()
    return adv.view(-1).float()


def discriminator_loss(teacher_cap, student_cap, teacher_cot, student_cot, valid, score_reg=1e-3, denom=None):
    """Bradley-Terry per channel, teacher over student, averaged over the valid pairs, + score_reg * mean(s^2) over the four
    score sets. All inputs (B,); teacher_* hold the prompt's teacher score repeated on each of its rollouts' rows.
    denom: the number of valid pairs to average over (the global count under data parallelism; default: the local count).
    With no valid pair at all: the fallback 0.01 * (-log sig(mean teacher cap) - log sig(mean teacher cot)).
    Returns (loss, metrics)."""
    v = valid.bool()
    if denom is None:
        denom = float(v.sum())
    if denom == 0:
        loss = 0.01 * (-F.logsigmoid(teacher_cap.mean()) - F.logsigmoid(teacher_cot.mean()))
        return loss, {"pairs": 0, "cap_acc": float("nan"), "cot_acc": float("nan")}
    tc, sc, tt, st = teacher_cap[v], student_cap[v], teacher_cot[v], student_cot[v]
    bt = -F.logsigmoid(tc - sc) - F.logsigmoid(tt - st)  # (n,)
    reg = (tc ** 2 + sc ** 2 + tt ** 2 + st ** 2) / 4  # mean over the four score sets, per pair
    loss = (bt.sum() + score_reg * reg.sum()) / denom
    return loss, {"pairs": int(v.sum()), "cap_acc": float((tc > sc).float().mean()) if len(tc) else float("nan"),
                  "cot_acc": float((tt > st).float().mean()) if len(tt) else float("nan")}


def routing_mask(channels, num_experts):
    """Hard segment routing: perception ("cap") sequences may use experts [0, E/2), reasoning ("cot") [E/2, E). (B, E)"""
    m = torch.zeros(len(channels), num_experts, dtype=torch.bool)
    for i, c in enumerate(channels):
        if c == "cap":
            m[i, :num_experts // 2] = True
        elif c == "cot":
            m[i, num_experts // 2:] = True
        else:
            m[i] = True
    return m


def score_segments(disc, processor, exs, segments, channels, device, *, pad, max_pixels, text_only=False, routing=False,
                   clip=None, micro=16, with_aux=False, grad=False):
    """THE discriminator framing, used by warm-up and stage 2 alike: for each (prompt example, segment) the chat is
    system + user (image + question) + assistant = segment; the trunk runs with the processor's real M-RoPE positions and
    pixels (none with text_only); the score is read at the segment's last token (its end-of-turn token), for teacher and
    student alike. channels: "cap" | "cot" | "whole" per sequence (used by hard routing).
    Collective under FSDP: every rank runs the same number of forwards; a rank with fewer sequences scores `pad`
    (an (example, segment) pair) instead. Returns (scores (B,) clipped to +-clip when given, mean router aux loss, tie):
    `tie` is 0 but depends on every forward, so adding it to a loss keeps all of this rank's forwards in the backward."""
    items = [data.render_chat(processor, ex, seg, max_pixels, with_images=not text_only) for ex, seg in zip(exs, segments)]
    n = max(M.all_max(math.ceil(len(items) / micro), device), 1)
    E = getattr(disc.config.text_config, "num_experts", 0)
    scores, aux, tie = [], torch.zeros((), device=device), torch.zeros((), device=device)
    for i in range(n):
        chunk, ch = items[i * micro:(i + 1) * micro], channels[i * micro:(i + 1) * micro]
        real = len(chunk)
        if not chunk:
            chunk, ch = [data.render_chat(processor, pad[0], pad[1], max_pixels, with_images=not text_only)], ["whole"]
        b = data.collate(chunk, processor.tokenizer.convert_tokens_to_ids("<|endoftext|>"))
        last = b["attention_mask"].sum(1) - 1  # (B,) index of each segment's last token (right padding)
        with torch.set_grad_enabled(grad):
            s, a = disc(b, last, routing_mask(ch, E) if routing else None, with_aux)
        scores.append(s[:real])
        aux, tie = aux + a / n, tie + 0.0 * s.sum()
    s = torch.cat(scores)
    return (s.clamp(-clip, clip) if clip else s), aux, tie


def segments_of(text, mode):
    """(caption segment, reasoning segment) of a response, or the whole response twice in "whole" mode; None if invalid."""
    parts = verify.split_response(text)
    if parts is None:
        return None
    return (text.strip(), text.strip()) if mode == "whole" else parts


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # models
    p.add_argument("--policy", default=None, help="the SFT policy HF directory (not needed with --warmup-only + --warmup-data)")
    p.add_argument("--disc", required=True, help="discriminator: an HF directory (released layout), or upcycle:DENSE_DIR")
    p.add_argument("--processor", default=None, help="processor directory (default: the policy's, else the disc's)")
    p.add_argument("--disc-experts", type=int, default=4, help="experts when upcycling (1 = the dense-discriminator ablation)")
    p.add_argument("--disc-top-k", type=int, default=2, help="experts per token when upcycling")
    p.add_argument("--disc-noise", type=float, default=0.01, help="upcycling noise std added to each expert copy")
    p.add_argument("--disc-text-only", action="store_true", help="ablation: the discriminator sees no image")
    p.add_argument("--disc-segments", default="split", choices=["split", "whole"],
                   help="split: perception and reasoning channels (PRISM); whole: one score per response (GAD)")
    p.add_argument("--disc-routing", default="learned", choices=["learned", "segment"],
                   help="learned: the router decides (PRISM); segment: perception -> first half of the experts, reasoning "
                        "-> second half (hard routing, tests the 'dedicated experts' claim)")
    p.add_argument("--freeze-vision", action="store_true", help="the policy's vision tower gets no gradient")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing in both models")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder block of the policy (4B on GPUs: "
                   "+25-33%% training tokens/s, bench/results; the first steps compile)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the model directories")
    # data
    p.add_argument("--data", default=None, help="alignment parquet: prompt, images, teacher_caption, teacher_cot")
    p.add_argument("--max-pixels", type=int, default=560 * 560, help="images are downscaled to at most this many pixels")
    p.add_argument("--max-prompt-len", type=int, default=2048, help="drop (and count) prompts longer than this, images included")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of stopping at the first")
    # warm-up
    p.add_argument("--warmup-only", action="store_true", help="train the discriminator on pairs, save it to --out, stop")
    p.add_argument("--warmup-data", default=None, help="warm-up pairs JSONL (default: built from policy rollouts on --data)")
    p.add_argument("--warmup-epochs", type=float, default=1.0, help="passes over the warm-up pairs")
    p.add_argument("--warmup-batch", type=int, default=128, help="pairs per warm-up optimizer step (global)")
    p.add_argument("--warmup-lr", type=float, default=1e-5, help="warm-up peak lr (cosine, 10%% linear warm-up)")
    p.add_argument("--warmup-val", type=int, default=64, help="pairs held out for the warm-up's pair accuracy")
    p.add_argument("--aux-coef", type=float, default=0.01, help="router load-balancing loss weight (warm-up only)")
    # the game
    p.add_argument("--prompts", type=int, default=4, help="prompts per step (global); each has --group-size rollouts")
    p.add_argument("--group-size", type=int, default=16, help="rollouts per prompt (G)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0; the update's log-probs use it too)")
    p.add_argument("--max-new-tokens", type=int, default=6144, help="response length limit in tokens")
    p.add_argument("--gen-batch", type=int, default=64, help="sequences per generation call")
    p.add_argument("--hf-generate", action="store_true", help="roll out with Hugging Face generate() (dynamic cache), the "
                   "readable reference path, instead of the static-cache decode loop (compiled with CUDA graphs on GPUs)")
    p.add_argument("--steps", type=int, default=500, help="alignment steps")
    p.add_argument("--lr", type=float, default=1e-6, help="policy lr (constant)")
    p.add_argument("--disc-lr", type=float, default=1e-6, help="discriminator lr (constant)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay, both models")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the perception channel in the advantage")
    p.add_argument("--format-penalty", type=float, default=1.5, help="advantage penalty of a format-invalid response")
    p.add_argument("--score-clip", type=float, default=10.0, help="scores for the advantage are clipped to +-this")
    p.add_argument("--score-reg", type=float, default=1e-3, help="discriminator score regulariser weight (mean s^2)")
    p.add_argument("--mini-batches", type=int, default=1, help="policy optimizer steps per rollout batch (1 = on-policy)")
    p.add_argument("--epochs", type=int, default=1, help="policy passes over each rollout batch")
    p.add_argument("--clip-low", type=float, default=0.2, help="PPO ratio clip below 1")
    p.add_argument("--clip-high", type=float, default=0.2, help="PPO ratio clip above 1")
    p.add_argument("--clip-c", type=float, default=3.0, help="dual-clip constant for A < 0")
    p.add_argument("--kl-coef", type=float, default=0.0, help="k3 KL to a frozen reference policy (loaded only when > 0)")
    p.add_argument("--disc-updates-per-step", type=int, default=1, help="discriminator optimizer steps per game step")
    p.add_argument("--disc-warmup-steps", type=int, default=0, help="game steps that update only the discriminator")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip each model's global grad norm to this")
    p.add_argument("--micro-batch", type=int, default=8, help="at most this many policy sequences per forward/backward per rank")
    p.add_argument("--micro-tokens", type=int, default=16384, help="and at most this many padded tokens (0: no cap), in the "
                   "policy's and the discriminator's updates, so the activation memory stays bounded at long responses; "
                   "sequences are sorted by length into micro-batches")
    p.add_argument("--disc-micro", type=int, default=16, help="discriminator sequences per forward per rank (its update: "
                   "also at most --micro-tokens padded tokens)")
    p.add_argument("--seed", type=int, default=0, help="seed for data order and sampling")
    p.add_argument("--max-bad-steps", type=int, default=5, help="stop after this many non-finite updates in a row")
    # checkpoint / logging
    p.add_argument("--out", required=True, help="output directory (policy HF dir; disc/; metrics.jsonl; ckpt/)")
    p.add_argument("--save-every", type=int, default=50, help="resume checkpoint every N steps (0: only at the end)")
    p.add_argument("--wandb", default=None, help="wandb project name (off when unset)")
    args = p.parse_args()

    rank, world, device = M.init_dist()
    M.seed_all(args.seed)
    os.makedirs(args.out, exist_ok=True)
    spec_dir = args.disc.split(":", 1)[-1]
    processor = M.load_processor(args.processor or args.policy or spec_dir)
    tok = processor.tokenizer
    pad_id = tok.convert_tokens_to_ids("<|endoftext|>")
    mode = "whole" if args.disc_segments == "whole" else "split"
    channels = ("cap", "cot") if mode == "split" else ("whole",)  # the discriminator's score channels
    nch = len(channels)
    if not args.warmup_only and (args.policy is None or args.data is None):
        raise SystemExit("the alignment game needs --policy and --data (or pass --warmup-only)")
    if args.warmup_only and args.warmup_data is None and (args.policy is None or args.data is None):
        raise SystemExit("--warmup-only without --warmup-data builds pairs from policy rollouts: pass --policy and --data")
    if args.temperature <= 0:
        raise SystemExit(f"--temperature {args.temperature}: the game samples its rollouts, the temperature must be > 0")
    if args.prompts * args.group_size % world:
        raise SystemExit(f"--prompts x --group-size ({args.prompts} x {args.group_size}) must be divisible by the world size "
                         f"{world} (each rank rolls out the same number of sequences)")
    if os.path.isfile(os.path.join(spec_dir, "preprocessor_config.json")) or \
            os.path.isfile(os.path.join(spec_dir, "processor_config.json")):
        # the discriminator reads the policy's tokens and pixels: its tokenizer and image processor must be the same
        other = M.load_processor(spec_dir)
        keys = ("patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std")
        ip_a, ip_b = processor.image_processor.to_dict(), other.image_processor.to_dict()
        if other.tokenizer.get_vocab() != tok.get_vocab() or any(ip_a.get(k) != ip_b.get(k) for k in keys):
            raise SystemExit(f"{spec_dir}: its tokenizer or image processor differs from the policy's; build the "
                             f"discriminator from the same family (e.g. --disc upcycle:<the SFT policy dir>)")

    disc = M.load_discriminator(args.disc, processor, device, args.disc_experts, args.disc_top_k, args.disc_noise, args.seed,
                                args.trust_remote_code)
    E = getattr(disc.config.text_config, "num_experts", 0)
    if args.disc_routing == "segment" and E < 2:
        raise SystemExit("--disc-routing segment needs a Mixture-of-Experts discriminator (--disc-experts >= 2)")
    routing = args.disc_routing == "segment"
    disc = M.shard(disc, device, grad_ckpt=args.grad_ckpt)
    ckpt_dir = os.path.join(args.out, "ckpt")

    def score(exs, segs, chans, pad, clip=None, grad=False, with_aux=False):
        return score_segments(disc, processor, exs, segs, list(chans), device, pad=pad, max_pixels=args.max_pixels,
                              text_only=args.disc_text_only, routing=routing, clip=clip, micro=args.disc_micro,
                              with_aux=with_aux, grad=grad)

    policy = infer = None
    if args.policy is not None:
        hf = M.load_policy(args.policy, processor, device, seed=args.seed, trust_remote_code=args.trust_remote_code)
        infer = M.make_inference_copy(hf, device)

    # =====================================================================================================================
    # warm-up: Bradley-Terry per channel on (teacher, student) pairs + router aux loss; cosine lr with 10% warm-up
    if args.warmup_only:
        if args.warmup_data:
            pairs, skipped = data.read_examples(args.warmup_data, "pair", skip_bad=args.skip_bad)
        else:  # one rollout of the policy per prompt, paired with the prompt's teacher columns (valid rollouts only)
            exs, skipped = data.read_examples(args.data, "prompt", skip_bad=args.skip_bad, require=("teacher_caption",
                                                                                                      "teacher_cot"))
            mine = exs[rank::world]
            outs = M.generate(infer, [data.render_chat(processor, ex, None, args.max_pixels) for ex in mine], tok, device,
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
            M.print0(f"built {len(pairs)} warm-up pairs from {len(exs)} policy rollouts (format-valid ones)")
        if skipped:
            M.print0(f"skipped {len(skipped)} bad records (first: {skipped[0]})")
        if len(pairs) <= args.warmup_val:
            raise SystemExit(f"{len(pairs)} warm-up pairs: not enough for --warmup-val {args.warmup_val}")
        val, train = pairs[-args.warmup_val:], pairs[:-args.warmup_val]
        B = args.warmup_batch
        if B % world:
            raise SystemExit(f"--warmup-batch {B} must be divisible by the world size {world}")
        steps = max(1, int(args.warmup_epochs * len(train) / B))
        warm = max(1, int(0.1 * steps))
        opt = M.make_optimizer(disc, args.warmup_lr, 0.01)
        M.print0(f"warm-up: {len(train)} pairs ({len(val)} held out), batch {B}, {steps} steps, lr {args.warmup_lr} | "
                 f"disc {args.disc} experts {E or 1} | segments {mode} | routing {args.disc_routing} | "
                 f"text-only {args.disc_text_only}")

        pad = (train[0], train[0].teacher_caption)

        def pair_segments(prs):
            """Sequences of a list of pairs, per pair and channel: teacher then student segment."""
            exs, segs, chans = [], [], []
            for q in prs:
                t, s = (q.teacher_caption, q.teacher_cot), (q.student_caption, q.student_cot)
                if mode == "whole":
                    t, s = (t[0] + "\n" + t[1],), (s[0] + "\n" + s[1],)
                for c in range(len(t)):
                    exs += [q, q]
                    segs += [t[c], s[c]]
                    chans += [channels[c]] * 2
            return exs, segs, chans

        def bt_pairs(sc):
            """Scores in pair_segments order -> per-pair BT loss summed over channels (B,), teacher wins per channel."""
            sc = sc.view(-1, nch, 2)  # (B, channels, teacher/student)
            loss = -F.logsigmoid(sc[..., 0] - sc[..., 1]).sum(1)
            wins = sc[..., 0] > sc[..., 1]
            return loss, wins[:, 0], wins[:, -1]

        @torch.no_grad()
        def warmup_eval():
            disc.eval()
            mine = val[rank::world]
            sc, _, _ = score(*pair_segments(mine), pad=pad)
            loss, cw, tw = bt_pairs(sc)
            tot = M.all_sum([float(loss.sum()), float(cw.sum()), float(tw.sum()), len(mine)], device)
            disc.train()
            return {"d_loss": tot[0] / tot[3], "cap_acc": tot[1] / tot[3], "cot_acc": tot[2] / tot[3]}

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
                r = warmup_eval()
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
            sc, aux, tie = score(*pair_segments(mine), pad=pad, grad=True, with_aux=True)
            loss_pairs, cw, tw = bt_pairs(sc)
            # global mean over the step's pairs (each rank holds B / world of them) + the router aux loss (mean over ranks)
            loss = loss_pairs.sum() / B + args.aux_coef * aux / world + tie
            loss.backward()
            gnorm = M.clip_grad(disc, args.grad_clip)
            lr = args.warmup_lr * ((step + 1) / warm if step < warm else
                                   0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm))))
            if math.isfinite(gnorm):  # global: every rank takes or skips the step together
                for g in opt.param_groups:
                    g["lr"] = lr
                opt.step()
                bad_in_row = 0
            else:
                n_skipped, bad_in_row = n_skipped + 1, bad_in_row + 1
                M.print0(f"step {step + 1}: non-finite grad norm, step skipped ({bad_in_row} in a row)")
                if bad_in_row >= args.max_bad_steps:
                    raise SystemExit(f"{bad_in_row} non-finite steps in a row: stopping. Lower --warmup-lr or check the data.")
            opt.zero_grad(set_to_none=True)
            tot = M.all_sum([float(loss_pairs.detach().sum()), float(cw.sum()), float(tw.sum()), float(aux.detach())], device)
            rec = {"step": step + 1, "d_loss": tot[0] / B, "cap_acc": tot[1] / B, "cot_acc": tot[2] / B,
                   "aux": tot[3] / world, "lr": lr, "grad_norm": gnorm, "skipped_steps": n_skipped, "dt": time.time() - t0}
            log(rec)
            if rank == 0:
                tqdm.write(f"step {step + 1:05d}/{steps:05d} | d_loss {rec['d_loss']:.4f} | cap_acc {rec['cap_acc']:.3f} | "
                           f"cot_acc {rec['cot_acc']:.3f} | aux {rec['aux']:.3f} | lr {lr:.2e} | gnorm {gnorm:.3f} | "
                           f"dt {rec['dt'] * 1000:.0f}ms")
            bar.update()
        bar.close()
        M.save_hf(disc, processor, args.out, {"stage": "disc-warmup", **vars(args), "val": warmup_eval(),
                                              "skipped_steps": n_skipped})
        M.print0(f"saved the discriminator to {args.out}")
        dist.destroy_process_group()
        raise SystemExit(0)

    # =====================================================================================================================
    # the alignment game
    prompts, skipped = data.read_examples(args.data, "prompt", skip_bad=args.skip_bad, require=("teacher_caption",
                                                                                                  "teacher_cot"))
    if skipped:
        M.print0(f"skipped {len(skipped)} bad records of {args.data} (first: {skipped[0]})")
    prompts, n_long = data.drop_long_prompts(processor, prompts, args.max_prompt_len, args.max_pixels)
    if not prompts:
        raise SystemExit(f"{args.data}: every prompt is longer than --max-prompt-len {args.max_prompt_len}")
    ref = None
    if args.kl_coef > 0:
        ref = M.shard(M.LogProbs(M.load_policy(args.policy, processor, device), args.temperature), device)
        ref.requires_grad_(False)
    policy = M.shard(M.LogProbs(hf, args.temperature), device, args.freeze_vision, args.grad_ckpt, args.compile)
    opt_p = M.make_optimizer(policy, args.lr, args.weight_decay)
    opt_d = M.make_optimizer(disc, args.disc_lr, args.weight_decay)
    P, G = args.prompts, args.group_size
    R = P * G // world  # rollouts per rank: rows [rank R, (rank + 1) R) of the step's P x G; with world > P a group spans ranks
    M.print0(f"world {world} | {P} prompts x {G} rollouts per step ({R} per rank) | {args.steps} steps | "
             f"disc {args.disc} experts {E or 1} segments {mode} routing {args.disc_routing} text-only {args.disc_text_only} | "
             f"alpha {args.alpha} format-penalty {args.format_penalty} | lr {args.lr} / {args.disc_lr} | {len(prompts)} prompts "
             f"({n_long} over-long dropped)")

    start, pos, bad_in_row, n_skipped = 0, 0, 0, 0
    if (last := M.latest_checkpoint(ckpt_dir)) is not None:
        meta = M.load_checkpoint(last, {"policy": (policy, opt_p), "disc": (disc, opt_d)})
        start, pos, n_skipped = meta["step"], meta["pos"], meta["skipped"]
        M.print0(f"resumed from {last} at step {start}")
    log = M.metrics_logger(args.out, start, args)

    for step in range(start, args.steps + 1):
        last_step = step == args.steps
        if step > start and (last_step or (args.save_every and step % args.save_every == 0)):
            M.save_checkpoint(ckpt_dir, step, {"policy": (policy, opt_p), "disc": (disc, opt_d)},
                              {"pos": pos, "skipped": n_skipped})
        if last_step:
            break

        # ---- rollouts: G per prompt, each group whole on this rank -------------------------------------------------
        t0 = time.time()
        M.sync_weights(policy, infer)
        torch.manual_seed(args.seed * 100003 + step * 101 + rank)
        first = rank * R // G  # this rank's prompts: those of its rows
        mine = [prompts[i] for i in data.stream_indices(len(prompts), args.seed, pos, P)[first:(rank * R + R - 1) // G + 1]]
        pid = [(rank * R + j) // G - first for j in range(R)]  # (R,) each rollout's prompt in `mine`
        pos += P
        enc = [data.render_chat(processor, ex, None, args.max_pixels) for ex in mine]
        outs = M.generate(infer, [enc[k] for k in pid], tok, device, args.max_new_tokens, args.temperature,
                          1.0, args.gen_batch, args.hf_generate)
        texts = [tok.decode(o, skip_special_tokens=True) for o in outs]
        segs = [segments_of(t, mode) for t in texts]
        valid = torch.tensor([s is not None for s in segs])  # (R,)
        t_gen = time.time() - t0

        # ---- score (no grad, before the discriminator's update), advantages ---------------------------------------
        t1 = time.time()
        disc.eval()
        vi = [i for i in range(len(segs)) if segs[i] is not None]
        ex_of = lambda i: mine[pid[i]]  # noqa: E731  the prompt of rollout row i
        teach = [(ex.teacher_caption, ex.teacher_cot) if mode == "split" else
                 ((ex.teacher_caption + "\n" + ex.teacher_cot).strip(),) for ex in mine]
        pad = (mine[0], teach[0][0])
        # one list of sequences: the teacher's segments per prompt, then each valid rollout's segments
        exs = [ex for ex in mine for _ in range(nch)] + [ex_of(i) for i in vi for _ in range(nch)]
        sg = [s for t in teach for s in t] + [s for i in vi for s in segs[i][:nch]]
        with torch.no_grad():
            sc, _, _ = score(exs, sg, channels * (len(mine) + len(vi)), pad, clip=args.score_clip)
        sc = sc.cpu().view(-1, nch)  # (prompts here + n_valid, channels)
        t_s = sc[:len(mine)]  # (prompts here, channels) teacher scores
        s_s = torch.full((len(segs), nch), float("nan"))  # (R, channels) rollout scores, nan where invalid
        s_s[vi] = sc[len(mine):]
        t_cap, t_cot, s_cap, s_cot = t_s[:, 0], t_s[:, -1], s_s[:, 0], s_s[:, -1]
        # the group statistics need every rollout of the group: gather the step's P x G rows from all ranks, keep this rank's
        here = torch.stack([s_cap, s_cot, valid.float()], 1).to(device)  # (R, 3)
        parts = [torch.empty_like(here) for _ in range(world)]
        dist.all_gather(parts, here)
        g = torch.cat(parts).cpu()  # (P * G, 3)
        adv = alignment_advantages(g[:, 0], g[:, 1], g[:, 2].bool(), G, args.alpha if mode == "split" else 1.0,
                                   args.format_penalty)[rank * R:(rank + 1) * R]
        t_score = time.time() - t1

        # ---- discriminator update: teacher demonstration vs each valid rollout of its prompt ---------------------
        t2 = time.time()
        disc.train()
        n_pairs = M.all_sum(len(vi), device)
        d_loss, dm, d_skipped = 0.0, {}, 0
        for _ in range(args.disc_updates_per_step):
            # the teacher's segments are scored once per prompt (with grad); the loss is a sum over (teacher, rollout)
            # pairs, so each student micro-batch backpropagates its own terms against a detached copy of the teacher
            # scores, whose accumulated gradient then flows through the teacher forward in one backward at the end
            t_sc, _, t_tie = score([ex for ex in mine for _ in range(nch)], [s for t in teach for s in t],
                                   channels * len(mine), pad, grad=True)
            t_sc = t_sc.view(-1, nch)  # (prompts here, channels)
            if n_pairs > 0:
                t_leaf = t_sc.detach().requires_grad_(True)
                # pairs in micro-batches of at most --disc-micro sequences and --micro-tokens padded tokens, sorted by
                # length (a pair is nch sequences, each at most its prompt + response long)
                lens = [nch * (len(enc[pid[i]]["input_ids"]) + len(outs[i])) for i in vi]
                chunks = [[vi[j] for j in g] for g in rl.micro_groups(lens, max(1, args.disc_micro // nch), args.micro_tokens)]
                n_chunks = max(M.all_max(len(chunks), device), 1)
                d_loss, wins = 0.0, torch.zeros(nch)
                for k in range(n_chunks):  # the same count on every rank; a rank out of pairs scores `pad` only
                    rows = chunks[k] if k < len(chunks) else []
                    s_sc, _, tie = score([ex_of(i) for i in rows for _ in range(nch)], [s for i in rows for s in segs[i][:nch]],
                                         channels * len(rows), pad, grad=True)
                    s_sc = s_sc.view(-1, nch)  # (pairs, channels)
                    t_rows = t_leaf[[pid[i] for i in rows]]  # (pairs, channels): each pair's teacher score
                    v = torch.ones(len(rows), dtype=torch.bool, device=device)
                    if not rows:
                        loss = torch.zeros((), device=device)
                    elif mode == "split":
                        loss, _ = discriminator_loss(t_rows[:, 0], s_sc[:, 0], t_rows[:, 1], s_sc[:, 1], v, args.score_reg,
                                                     denom=n_pairs)
                    else:  # one channel: pass it twice with twice the regulariser and halve -> one BT term, mean(s^2)
                        loss = discriminator_loss(t_rows[:, 0], s_sc[:, 0], t_rows[:, 0], s_sc[:, 0], v,
                                                  2 * args.score_reg, denom=n_pairs)[0] / 2
                    (loss + tie).backward()
                    d_loss += loss.item()
                    wins += (t_rows > s_sc).float().sum(0).detach().cpu()
                grad_t = t_leaf.grad if t_leaf.grad is not None else torch.zeros_like(t_sc)
                ((t_sc * grad_t).sum() + t_tie).backward()  # the teacher side of every pair, in one backward
                tot = M.all_sum([d_loss, *wins.tolist()], device)
                dm = {"d_loss": tot[0], "cap_acc": tot[1] / n_pairs, "cot_acc": tot[-1] / n_pairs}
            else:  # no valid rollout on any rank: the fallback loss on the teacher scores (mean over ranks)
                loss, _ = discriminator_loss(t_sc[:, 0], t_sc[:, 0], t_sc[:, -1], t_sc[:, -1],
                                             torch.zeros(len(mine), dtype=torch.bool), args.score_reg, denom=0)
                (loss / world + t_tie).backward()
                dm = {"d_loss": M.all_sum(loss.item(), device) / world, "cap_acc": float("nan"), "cot_acc": float("nan")}
            gnorm_d = M.clip_grad(disc, args.grad_clip)  # global: every rank takes or skips the step together
            if math.isfinite(gnorm_d) and math.isfinite(dm["d_loss"]):
                opt_d.step()
            else:
                d_skipped += 1
                M.print0(f"non-finite discriminator loss/grad norm ({dm['d_loss']}, {gnorm_d}): its step skipped")
            opt_d.zero_grad(set_to_none=True)
        t_disc = time.time() - t2

        # ---- policy update: PPO clipped loss with the alignment advantages (REINFORCE when on-policy) -------------
        items = [M.join_response(enc[pid[i]], outs[i]) for i in range(len(outs))]
        up = {"grad_norm": float("nan"), "t_update": 0.0, "skipped": 0}
        if step >= args.disc_warmup_steps:
            up = rl.update_policy(policy, opt_p, items, adv.tolist(), items[0], pad_id, device, algo="grpo",
                                  clip_low=args.clip_low, clip_high=args.clip_high, clip_c=args.clip_c,
                                  mini_batches=args.mini_batches, epochs=args.epochs, micro_batch=args.micro_batch,
                                  micro_tokens=args.micro_tokens, grad_clip=args.grad_clip, lr=args.lr, ref=ref,
                                  kl_coef=args.kl_coef)
        n_skipped += up["skipped"] + d_skipped
        bad_in_row = bad_in_row + 1 if up["skipped"] or d_skipped else 0
        if bad_in_row >= args.max_bad_steps:
            raise SystemExit(f"{bad_in_row} non-finite updates in a row: stopping. Lower --lr or check the data.")

        # ---- log: scores before the update, per channel -----------------------------------------------------------
        fin = lambda x: (float(x[torch.isfinite(x)].sum()), int(torch.isfinite(x).sum()))  # noqa: E731
        parts = [*fin(t_cap), *fin(t_cot), *fin(s_cap), *fin(s_cot), float(valid.sum()), len(valid),
                 float(sum(len(o) for o in outs))]
        tot = M.all_sum(parts, device)
        mean = lambda a, b: a / b if b else float("nan")  # noqa: E731
        rec = {"step": step + 1, **dm, "teacher_cap": mean(tot[0], tot[1]), "teacher_cot": mean(tot[2], tot[3]),
               "student_cap": mean(tot[4], tot[5]), "student_cot": mean(tot[6], tot[7]), "valid": tot[8] / tot[9],
               "length": tot[10] / tot[9], "disc_grad_norm": gnorm_d, "grad_norm": up["grad_norm"],
               "t_gen": t_gen, "t_score": t_score, "t_disc": t_disc, "t_policy": up["t_update"], "skipped_steps": n_skipped,
               "mem_gb": M.peak_mem_gb()}
        rec["gap_cap"], rec["gap_cot"] = rec["teacher_cap"] - rec["student_cap"], rec["teacher_cot"] - rec["student_cot"]
        log(rec)
        M.print0(f"step {step + 1:05d}/{args.steps:05d} | d_loss {rec.get('d_loss', float('nan')):.4f} | "
                 f"cap_acc {rec.get('cap_acc', float('nan')):.3f} | cot_acc {rec.get('cot_acc', float('nan')):.3f} | "
                 f"T/S cap {rec['teacher_cap']:.2f}/{rec['student_cap']:.2f} cot {rec['teacher_cot']:.2f}/"
                 f"{rec['student_cot']:.2f} | gap {rec['gap_cap']:.2f}/{rec['gap_cot']:.2f} | valid {rec['valid']:.2f} | "
                 f"len {rec['length']:.0f} | gen {t_gen:.1f}s score {t_score:.1f}s disc {t_disc:.1f}s "
                 f"policy {up['t_update']:.1f}s" + (f" | mem {rec['mem_gb']:.1f}GB" if device.type == "cuda" else ""))

    M.save_hf(policy, processor, args.out, {"stage": "align", **vars(args), "skipped_steps": n_skipped,
                                            "dropped_long_prompts": n_long})
    os.makedirs(os.path.join(args.out, "disc"), exist_ok=True)
    M.save_hf(disc, processor, os.path.join(args.out, "disc"), {"stage": "align-disc", **vars(args)})
    M.print0(f"saved the policy to {args.out} and the discriminator to {os.path.join(args.out, 'disc')}")
    dist.destroy_process_group()
