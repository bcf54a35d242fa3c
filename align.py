"""
Stage 2 of PRISM: black-box on-policy distillation against a Mixture-of-Experts discriminator (warm it up first: warmup.py).

    python align.py --policy runs/x/sft --disc runs/x/disc --data data/shapes/align.parquet --out runs/x/align
    torchrun --nproc_per_node 8 align.py --policy runs/x/sft --disc runs/x/disc --data align.parquet --out runs/x/align

One step (PRISM_NOTES.md "Stage 2, one step"): G rollouts per prompt -> split into perception (caption block) and reasoning
(think + answer) segments -> score the valid ones per channel with the discriminator (no grad, before its update) ->
alignment_advantages -> discriminator_step on (teacher demonstration, valid rollout) pairs -> one policy step with the
PPO clipped loss (rl.update_policy; on-policy by default, so it is REINFORCE with these advantages). No accuracy reward, no KL.
Outputs: OUT is the policy as an HF directory, OUT/disc the discriminator in the released layout (model.* + score.weight).
The functions above `__main__` are the method: the advantage, the discriminator's loss, its framing (score_segments, which
warmup.py uses too) and its update.
"""

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
import engine
import model as M
import rl
import verify

CHANNELS = {"split": ("cap", "cot"), "whole": ("whole",)}  # the discriminator's score channels per --disc-segments mode


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


def discriminator_loss(teacher_cap, student_cap, teacher_cot, student_cot, valid, score_reg=1e-3, clip=10.0):
    """The discriminator's loss on one batch, as the release's dp_critic.py computes it. All inputs (B,), one row per rollout;
    teacher_* hold the prompt's teacher score repeated on each of its rollouts' rows; student scores of invalid rows are
    ignored (an invalid response has no segments to score). Every score is clamped to +-clip first (a hard clamp: no
    gradient beyond it).
        L = mean over valid rows of [-log sig(T_cap - S_cap) - log sig(T_cot - S_cot)]
            + score_reg * (mean_rows T_cap^2 + mean_valid S_cap^2 + mean_rows T_cot^2 + mean_valid S_cot^2) / 4
    With no valid row: the fallback 0.01 * (-log sig(mean T_cap) - log sig(mean T_cot)) + the regulariser's teacher terms.
    Returns (loss, metrics). discriminator_step computes the same loss over the whole (multi-rank) batch in pieces."""
    v = valid.bool()
    tc, sc, tt, st = (x.clamp(-clip, clip) if clip else x for x in (teacher_cap, student_cap, teacher_cot, student_cot))
    reg = (tc ** 2).mean() + (tt ** 2).mean()  # the teacher terms: every row
    if not v.any():
        loss = 0.01 * (-F.logsigmoid(tc.mean()) - F.logsigmoid(tt.mean())) + score_reg * reg / 4
        return loss, {"pairs": 0, "cap_acc": float("nan"), "cot_acc": float("nan")}
    bt = -F.logsigmoid(tc[v] - sc[v]) - F.logsigmoid(tt[v] - st[v])  # (n,)
    reg = reg + (sc[v] ** 2).mean() + (st[v] ** 2).mean()
    return bt.mean() + score_reg * reg / 4, {"pairs": int(v.sum()), "cap_acc": float((tc[v] > sc[v]).float().mean()),
                                             "cot_acc": float((tt[v] > st[v]).float().mean())}


# -----------------------------------------------------------------------------
# the discriminator's framing: one function for the warm-up and the game

@dataclass
class Framing:
    """How the discriminator sees a segment (score_segments), the same in warmup.py and the game. The first three fields
    are the discriminator's own: saved beside it as framing.json by warmup.py and align.py and read back with it, so the
    game scores exactly as its warm-up did; a released discriminator (its head in the v_head layout) gets the release's."""
    processor: object
    system: str | None = None  # the system turn: None = the record's (ours); the release's warm-up hard-codes its own
    max_pixels: int = 560 * 560  # images are downscaled to at most this many pixels ...
    max_side: int | None = None  # ... and to at most this longer side (the release's warm-up: 560)
    text_only: bool = False  # ablation: no image at all
    routing: bool = False  # ablation: hard segment routing (perception -> first half of the experts, reasoning -> second)
    micro: int = 16  # sequences per forward per rank


RELEASE_FRAMING = {"system": data.RELEASE_WARMUP_SYSTEM_PROMPT, "max_pixels": 560 * 560, "max_side": 560}


class Seq(NamedTuple):
    """One sequence to score: the prompt's example, the segment text (the assistant turn), its channel."""
    example: data.Example
    text: str
    channel: str  # "cap" | "cot" | "whole"


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


def score_segments(disc, framing, seqs, device, pad, *, clip=None, grad=False, with_aux=False):
    """THE discriminator framing: for each Seq the chat is system + user (image + question) + assistant = the segment,
    rendered as the release's warm-up renders it (data.render_segment: no generation prompt, tokenised whole); the trunk
    runs with the processor's real M-RoPE positions and pixels (none with text_only); the score is read at the last
    token of that text (the template's newline after the end-of-turn token), for teacher and student alike.
    Collective under FSDP: every rank runs the same number of forwards (micro-batches of framing.micro); a rank with fewer
    sequences scores `pad` (a Seq) instead. Returns (scores (B,) clipped to +-clip when given, mean router aux loss, tie):
    `tie` is 0 but depends on every forward, so adding it to a loss keeps all of this rank's forwards in the backward."""
    f = framing
    render = lambda s: data.render_segment(f.processor, s.example, s.text, f.system, f.max_pixels, f.max_side,  # noqa: E731
                                           with_images=not f.text_only)
    items = [render(s) for s in seqs]
    n = max(M.all_max(math.ceil(len(items) / f.micro), device), 1)
    E = getattr(disc.config.text_config, "num_experts", 0)
    scores, aux, tie = [], torch.zeros((), device=device), torch.zeros((), device=device)
    for i in range(n):
        chunk, ch = items[i * f.micro:(i + 1) * f.micro], [s.channel for s in seqs[i * f.micro:(i + 1) * f.micro]]
        real = len(chunk)
        if not chunk:
            chunk, ch = [render(pad)], [pad.channel]
        b = data.collate(chunk, f.processor.tokenizer.convert_tokens_to_ids("<|endoftext|>"))
        last = b["attention_mask"].sum(1) - 1  # (B,) index of each segment's last token (right padding)
        with torch.set_grad_enabled(grad):
            s, a = disc(b, last, routing_mask(ch, E) if f.routing else None, with_aux)
        scores.append(s[:real])
        aux, tie = aux + a / n, tie + 0.0 * s.sum()
    s = torch.cat(scores)
    return (s.clamp(-clip, clip) if clip else s), aux, tie


def segments_of(text, mode):
    """(caption segment, reasoning segment) of a response, or (the whole response,) in "whole" mode; None if invalid."""
    parts = verify.split_response(text)
    if parts is None:
        return None
    return (text.strip(),) if mode == "whole" else parts


def teacher_segments(ex, mode):
    """The teacher demonstration's segments per channel: (caption, reasoning), or in "whole" mode (its teacher_response
    when the record has one, else caption + reasoning,)."""
    if mode == "split":
        return ex.teacher_caption, ex.teacher_cot
    return (ex.teacher_response or (ex.teacher_caption + "\n" + ex.teacher_cot)).strip(),


def add_discriminator_args(p):
    """The discriminator's flags, shared by warmup.py and align.py (so both build and frame it the same way)."""
    p.add_argument("--disc", required=True, help="discriminator: an HF directory (released layout), or upcycle:DENSE_DIR")
    p.add_argument("--disc-experts", type=int, default=4, help="experts when upcycling (1 = the dense-discriminator ablation)")
    p.add_argument("--disc-top-k", type=int, default=2, help="experts per token when upcycling")
    p.add_argument("--disc-noise", type=float, default=0.01, help="upcycling noise std added to each expert copy")
    p.add_argument("--disc-text-only", action="store_true", help="ablation: the discriminator sees no image")
    p.add_argument("--disc-segments", default="split", choices=list(CHANNELS),
                   help="split: perception and reasoning channels (PRISM); whole: one score per response (GAD)")
    p.add_argument("--disc-routing", default="learned", choices=["learned", "segment"],
                   help="learned: the router decides (PRISM); segment: perception -> first half of the experts, reasoning "
                        "-> second half (hard routing, tests the 'dedicated experts' claim)")
    p.add_argument("--disc-micro", type=int, default=16, help="discriminator sequences per forward per rank (its update: "
                   "also at most --micro-tokens padded tokens)")
    p.add_argument("--disc-fresh-head", action="store_true", help="accept a --disc directory with no score head and start "
                   "from a random one (otherwise refused: e.g. a checkpoint that was never warmed up)")
    p.add_argument("--max-pixels", type=int, default=560 * 560, help="images are downscaled to at most this many pixels")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing in every block")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the model directories")


def setup_discriminator(args, processor, device):
    """(the discriminator sharded for training, its Framing, its expert count) from add_discriminator_args' flags. The
    framing is the one stored beside the discriminator (framing.json), else the release's for a released one (its head in
    the v_head layout), else ours: the record's system prompt and --max-pixels."""
    disc = M.load_discriminator(args.disc, processor, device, args.disc_experts, args.disc_top_k, args.disc_noise, args.seed,
                                args.trust_remote_code, args.disc_fresh_head)
    E = getattr(disc.config.text_config, "num_experts", 0)
    if args.disc_routing == "segment" and E < 2:
        raise SystemExit("--disc-routing segment needs a Mixture-of-Experts discriminator (--disc-experts >= 2)")
    stored = os.path.join(args.disc, "framing.json")
    own = {"system": None, "max_pixels": args.max_pixels, "max_side": None}
    own = json.load(open(stored)) if os.path.isfile(stored) else RELEASE_FRAMING if (disc.head_source or "").startswith(
        "v_head") else own
    framing = Framing(processor, own["system"], own["max_pixels"], own["max_side"], args.disc_text_only,
                      args.disc_routing == "segment", args.disc_micro)
    M.print0(f"discriminator framing: system prompt {'of each record' if framing.system is None else repr(framing.system[:40]) + '...'}"
             f", images <= {framing.max_pixels} pixels" + (f" and {framing.max_side} px a side" if framing.max_side else ""))
    return M.shard(disc, device, grad_ckpt=args.grad_ckpt), framing, E


def save_framing(framing, out):
    """framing.json beside a saved discriminator (rank 0): the framing its scores were trained under."""
    if dist.get_rank() == 0:
        with open(os.path.join(out, "framing.json"), "w") as f:
            json.dump({"system": framing.system, "max_pixels": framing.max_pixels, "max_side": framing.max_side}, f, indent=1)


# -----------------------------------------------------------------------------
# one discriminator update

class Rollout(NamedTuple):
    """One sampled response on this rank."""
    prompt: int  # index into this rank's prompts
    ids: list  # response token ids
    segments: tuple | None  # one text per channel; None when format-invalid
    length: int  # prompt + response tokens (micro-batching by length)


def discriminator_step(disc, opt, framing, prompts, rollouts, mode, device, *, score_reg, score_clip, grad_clip, micro_tokens):
    """One optimizer step of the discriminator: discriminator_loss over the step's whole batch (every rank's rollouts; each
    prompt's teacher demonstration against each of its valid rollouts), divided by the GLOBAL pair and row counts (the
    gradient contract of model.shard). The batch does not fit one forward, so the loss is taken in pieces that sum to it:
    the teacher's segments are scored once per prompt, with grad; each student micro-batch backpropagates its own terms
    (Bradley-Terry against a detached copy of the teacher scores, and its scores' regulariser); the teacher copy's
    accumulated gradient, plus the teacher's regulariser over every row, then flows through the teacher forward in one
    backward at the end. In "whole" mode the one channel stands for both (the loss's cap = cot). Returns the metrics."""
    channels, nch = CHANNELS[mode], len(CHANNELS[mode])
    w = 2 / nch  # the regulariser averages four score sets (teacher/student x two channels); one channel counts twice
    disc.train()
    valid = [r for r in rollouts if r.segments is not None]
    n_pairs, n_rows = M.all_sum([len(valid), len(rollouts)], device)
    pad = Seq(prompts[0], teacher_segments(prompts[0], mode)[0], "whole")
    t_seqs = [Seq(ex, s, c) for ex in prompts for s, c in zip(teacher_segments(ex, mode), channels)]
    t_sc, _, t_tie = score_segments(disc, framing, t_seqs, device, pad, clip=score_clip, grad=True)
    t_sc = t_sc.view(-1, nch)  # (prompts here, channels)
    t_rows = t_sc[[r.prompt for r in rollouts]]  # (rollouts here, channels): the teacher score of every row
    reg_t = score_reg / 4 * w * (t_rows ** 2).sum() / n_rows
    if n_pairs > 0:
        t_leaf = t_sc.detach().requires_grad_(True)
        # pairs in micro-batches of at most --disc-micro sequences and --micro-tokens padded tokens, sorted by length
        chunks = [[valid[j] for j in g] for g in rl.micro_groups([nch * r.length for r in valid],
                                                                  max(1, framing.micro // nch), micro_tokens)]
        n_chunks = max(M.all_max(len(chunks), device), 1)
        d_loss, wins = 0.0, torch.zeros(nch)
        for k in range(n_chunks):  # the same count on every rank; a rank out of pairs scores `pad` only
            rows = chunks[k] if k < len(chunks) else []
            s_sc, _, tie = score_segments(disc, framing, [Seq(prompts[r.prompt], s, c) for r in rows
                                                          for s, c in zip(r.segments, channels)], device, pad,
                                          clip=score_clip, grad=True)
            s_sc = s_sc.view(-1, nch)  # (pairs, channels)
            t_pair = t_leaf[[r.prompt for r in rows]]  # (pairs, channels): each pair's teacher score
            loss = (-F.logsigmoid(t_pair - s_sc).sum() + score_reg / 4 * w * (s_sc ** 2).sum()) / n_pairs
            (loss + tie).backward()
            d_loss += loss.item()
            wins += (t_pair > s_sc).float().sum(0).detach().cpu()
        grad_t = t_leaf.grad if t_leaf.grad is not None else torch.zeros_like(t_sc)
        ((t_sc * grad_t).sum() + reg_t + t_tie).backward()  # the teacher side of every pair, and its regulariser
        tot = M.all_sum([d_loss + reg_t.item(), *wins.tolist()], device)
        m = {"d_loss": tot[0], "cap_acc": tot[1] / n_pairs, "cot_acc": tot[-1] / n_pairs}
    else:  # no valid rollout on any rank: the fallback on this rank's teacher scores (mean over ranks) + the regulariser
        world = dist.get_world_size()
        loss = 0.01 * (-F.logsigmoid(t_rows[:, 0].mean()) - F.logsigmoid(t_rows[:, -1].mean())) / world + reg_t
        (loss + t_tie).backward()
        m = {"d_loss": M.all_sum(loss.item(), device), "cap_acc": float("nan"), "cot_acc": float("nan")}
    m["disc_grad_norm"] = M.clip_grad(disc, grad_clip)  # global: every rank takes or skips the step together
    m["skipped"] = not (math.isfinite(m["disc_grad_norm"]) and math.isfinite(m["d_loss"]))
    if m["skipped"]:
        M.print0(f"non-finite discriminator loss/grad norm ({m['d_loss']}, {m['disc_grad_norm']}): its step skipped")
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return m


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # models
    p.add_argument("--policy", required=True, help="the SFT policy HF directory")
    p.add_argument("--processor", default=None, help="processor directory (default: the --policy directory)")
    add_discriminator_args(p)
    p.add_argument("--freeze-vision", action="store_true", help="the policy's vision tower gets no gradient")
    p.add_argument("--offload", action="store_true", help="keep the model not in use in pinned host memory (its fp32 "
                   "shards and optimizer state): the policy's during the discriminator's scoring and update, the "
                   "discriminator's during the rollouts and the policy update; the copies overlap the rollouts. For the "
                   "paper's shape on one large GPU")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder block of the policy (4B on GPUs: "
                   "+25-33%% training tokens/s, bench.py; the first steps compile)")
    # data
    p.add_argument("--data", required=True, help="alignment parquet: prompt, images, teacher_caption, teacher_cot")
    p.add_argument("--max-prompt-len", type=int, default=2048, help="drop (and count) prompts longer than this, images included")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of stopping at the first")
    p.add_argument("--image-root", default=None, help="relative image paths resolve against this folder (the release's "
                       "IMAGE_BASE_PATH), else against the data file's folder")
    p.add_argument("--system-prompt", default=None, help="a text file: the system prompt of records that carry none "
                       "(default: data.SYSTEM_PROMPT)")
    # rollouts
    p.add_argument("--prompts", type=int, default=4, help="prompts per step (global); each has --group-size rollouts")
    p.add_argument("--group-size", type=int, default=16, help="rollouts per prompt (G)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0; the update's log-probs use it too)")
    p.add_argument("--max-new-tokens", type=int, default=6144, help="response length limit in tokens")
    p.add_argument("--gen-batch", type=int, default=64, help="sequences per generation call")
    p.add_argument("--hf-generate", action="store_true", help="roll out with Hugging Face generate() (dynamic cache), the "
                   "readable reference path, instead of engine.decode (compiled with CUDA graphs on GPUs)")
    # the game
    p.add_argument("--steps", type=int, default=500, help="alignment steps")
    p.add_argument("--lr", type=float, default=1e-6, help="policy lr (constant)")
    p.add_argument("--disc-lr", type=float, default=1e-6, help="discriminator lr (constant)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay, both models")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the perception channel in the advantage")
    p.add_argument("--format-penalty", type=float, default=1.5, help="advantage penalty of a format-invalid response")
    p.add_argument("--score-clip", type=float, default=10.0, help="scores are clipped to +-this, for the advantage and in "
                   "the discriminator's loss (as the release's dp_critic.py)")
    p.add_argument("--score-reg", type=float, default=1e-3, help="discriminator score regulariser weight (mean s^2 over the "
                   "four score sets: teacher scores on every row, student scores on the valid rows)")
    p.add_argument("--disc-updates-per-step", type=int, default=1, help="discriminator optimizer steps per game step")
    p.add_argument("--disc-warmup-steps", type=int, default=0, help="game steps that update only the discriminator")
    # the policy update
    p.add_argument("--mini-batches", type=int, default=1, help="policy optimizer steps per rollout batch (1 = on-policy)")
    p.add_argument("--epochs", type=int, default=1, help="policy passes over each rollout batch")
    p.add_argument("--clip-low", type=float, default=0.2, help="PPO ratio clip below 1")
    p.add_argument("--clip-high", type=float, default=0.2, help="PPO ratio clip above 1")
    p.add_argument("--clip-c", type=float, default=3.0, help="dual-clip constant for A < 0")
    p.add_argument("--kl-coef", type=float, default=0.0, help="k3 KL to a frozen reference policy (loaded only when > 0)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip each model's global grad norm to this")
    p.add_argument("--micro-batch", type=int, default=8, help="at most this many policy sequences per forward/backward per rank")
    p.add_argument("--micro-tokens", type=int, default=16384, help="and at most this many padded tokens (0: no cap), in the "
                   "policy's and the discriminator's updates, so the activation memory stays bounded at long responses; "
                   "sequences are sorted by length into micro-batches")
    p.add_argument("--pack", action="store_true", help="the policy update: each micro-batch's sequences in one row, "
                   "no FLOPs on padding (varlen flash attention on GPUs); the same log-probs as padded batches (tests/test_model.py)")
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
    processor = M.load_processor(args.processor or args.policy)
    tok = processor.tokenizer
    pad_id = tok.convert_tokens_to_ids("<|endoftext|>")
    mode = args.disc_segments
    P, G = args.prompts, args.group_size
    if args.temperature <= 0:
        raise SystemExit(f"--temperature {args.temperature}: the game samples its rollouts, the temperature must be > 0")
    if P * G % world:
        raise SystemExit(f"--prompts x --group-size ({P} x {G}) must be divisible by the world size {world} (each rank "
                         f"rolls out the same number of sequences)")
    R = P * G // world  # rollouts per rank: rows [rank R, (rank + 1) R) of the step's P x G; with world > P a group spans ranks

    disc, framing, E = setup_discriminator(args, processor, device)
    hf = M.load_policy(args.policy, processor, device, seed=args.seed, trust_remote_code=args.trust_remote_code)
    infer = engine.make_inference_copy(hf, device)  # the generation copy, refreshed from the trained weights every step
    prompts, skipped = data.read_examples(args.data, "prompt", skip_bad=args.skip_bad, require=("teacher_caption",
                                          "teacher_cot"), image_root=args.image_root, system=data.system_prompt(args.system_prompt))
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
    p_off, d_off = (M.Offload(policy, opt_p), M.Offload(disc, opt_d)) if args.offload else (None, None)

    def on_gpu(*offs):  # --offload: bring these back (and wait for them)
        for o in offs:
            if o is not None and not o.on_device:
                o.back()
            if o is not None:
                o.wait()

    def swap(leave, come):  # --offload: `leave` to the host, `come` back; the copies run beside what follows
        if leave is not None:
            leave.out()
            if not come.on_device:
                come.back()

    cfg = rl.UpdateConfig("grpo", args.clip_low, args.clip_high, args.clip_c, args.mini_batches, args.epochs,
                          args.micro_batch, args.micro_tokens, args.grad_clip, args.kl_coef, args.pack)
    M.print0(f"world {world} | {P} prompts x {G} rollouts per step ({R} per rank) | {args.steps} steps | "
             f"disc {args.disc} experts {E or 1} segments {mode} routing {args.disc_routing} text-only {args.disc_text_only} | "
             f"alpha {args.alpha} format-penalty {args.format_penalty} | lr {args.lr} / {args.disc_lr} | {len(prompts)} prompts "
             f"({n_long} over-long dropped)")

    ckpt_dir = os.path.join(args.out, "ckpt")
    start, pos, bad_in_row, n_skipped = 0, 0, 0, 0
    if (last := M.latest_checkpoint(ckpt_dir)) is not None:
        meta = M.load_checkpoint(last, {"policy": (policy, opt_p), "disc": (disc, opt_d)})
        start, pos, n_skipped = meta["step"], meta["pos"], meta["skipped"]
        M.print0(f"resumed from {last} at step {start}")
    log = M.metrics_logger(args.out, start, args)

    for step in range(start, args.steps + 1):
        last_step = step == args.steps
        if step > start and (last_step or (args.save_every and step % args.save_every == 0)):
            on_gpu(p_off, d_off)
            M.save_checkpoint(ckpt_dir, step, {"policy": (policy, opt_p), "disc": (disc, opt_d)},
                              {"pos": pos, "skipped": n_skipped})
        if last_step:
            break

        # ---- rollouts: this rank's rows of the step's P x G ------------------------------------------------------
        t0 = time.time()
        engine.sync_weights(policy, infer)
        swap(p_off, d_off)  # the rollouts need only the inference copy; the discriminator scores them next
        torch.manual_seed(args.seed * 100003 + step * 101 + rank)
        first = rank * R // G  # this rank's prompts: those of its rows
        mine = [prompts[i] for i in data.stream_indices(len(prompts), args.seed, pos, P)[first:(rank * R + R - 1) // G + 1]]
        pos += P
        enc = [data.render_chat(processor, ex, None, args.max_pixels) for ex in mine]
        row_prompt = [(rank * R + j) // G - first for j in range(R)]  # (R,) each row's prompt in `mine`
        with M.oom_guard("the rollouts", f"{R} sequences per rank, --gen-batch {args.gen_batch}, up to "
                         f"{args.max_new_tokens} new tokens", "a lower --gen-batch or --max-new-tokens"):
            outs = engine.generate(infer, [enc[k] for k in row_prompt], tok, device, args.max_new_tokens, args.temperature,
                                   1.0, args.gen_batch, args.hf_generate)
        rollouts = [Rollout(k, o, segments_of(tok.decode(o, skip_special_tokens=True), mode), len(enc[k]["input_ids"]) + len(o))
                    for k, o in zip(row_prompt, outs)]
        valid = torch.tensor([r.segments is not None for r in rollouts])  # (R,)
        t_gen = time.time() - t0

        # ---- scores (no grad, before the discriminator's update) and advantages ------------------------------------
        t1 = time.time()
        on_gpu(d_off)
        disc.eval()
        nch = len(CHANNELS[mode])
        seqs = [Seq(ex, s, c) for ex in mine for s, c in zip(teacher_segments(ex, mode), CHANNELS[mode])]  # teachers,
        seqs += [Seq(mine[r.prompt], s, c) for r in rollouts if r.segments for s, c in zip(r.segments, CHANNELS[mode])]
        with torch.no_grad(), M.oom_guard("the discriminator's scoring", f"{len(seqs)} segments, --disc-micro "
                                          f"{framing.micro}", "a lower --disc-micro"):  # then every valid rollout, in one pass
            sc, _, _ = score_segments(disc, framing, seqs, device, Seq(mine[0], seqs[0].text, "whole"), clip=args.score_clip)
        sc = sc.cpu().view(-1, nch)  # (prompts here + valid rollouts, channels)
        teacher = sc[:len(mine)]  # (prompts here, channels)
        student = torch.full((R, nch), float("nan"))  # (R, channels), nan where invalid
        student[valid] = sc[len(mine):]
        # the group statistics need every rollout of the group: gather the step's P x G rows from all ranks, keep this rank's
        parts = [torch.empty(R, 3, device=device) for _ in range(world)]
        dist.all_gather(parts, torch.stack([student[:, 0], student[:, -1], valid.float()], 1).to(device))
        g = torch.cat(parts).cpu()  # (P * G, 3)
        adv = alignment_advantages(g[:, 0], g[:, 1], g[:, 2].bool(), G, args.alpha if mode == "split" else 1.0,
                                   args.format_penalty)[rank * R:(rank + 1) * R]
        t_score = time.time() - t1

        # ---- discriminator update: teacher demonstration vs each valid rollout of its prompt ---------------------
        t2 = time.time()
        dm = {"d_loss": float("nan"), "cap_acc": float("nan"), "cot_acc": float("nan"), "disc_grad_norm": float("nan"),
              "skipped": False}
        with M.oom_guard("the discriminator update", f"{len(seqs)} segments, --disc-micro {framing.micro}",
                         "a lower --disc-micro, --grad-ckpt, more GPUs"):
            for _ in range(args.disc_updates_per_step):
                dm = discriminator_step(disc, opt_d, framing, mine, rollouts, mode, device, score_reg=args.score_reg,
                                        score_clip=args.score_clip, grad_clip=args.grad_clip, micro_tokens=args.micro_tokens)
        swap(d_off, p_off)
        t_disc = time.time() - t2

        # ---- policy update: PPO clipped loss with the alignment advantages (REINFORCE when on-policy) -------------
        items = [data.join_response(enc[r.prompt], r.ids) for r in rollouts]
        up = {"grad_norm": float("nan"), "t_update": 0.0, "skipped": 0}
        on_gpu(p_off)
        if step >= args.disc_warmup_steps:
            longest = max((len(it["input_ids"]) for it in items), default=0)
            with M.oom_guard("the policy update", f"{len(items)} sequences on this rank, the longest {longest} tokens, "
                             f"--micro-batch {cfg.micro_batch} --micro-tokens {cfg.micro_tokens}",
                             "a lower --micro-batch or --micro-tokens, --grad-ckpt"):
                up = rl.update_policy(policy, opt_p, items, adv.tolist(), items[0], cfg, args.lr, pad_id, device, ref)
        n_skipped += up["skipped"] + dm["skipped"]
        bad_in_row = bad_in_row + 1 if up["skipped"] or dm["skipped"] else 0
        if bad_in_row >= args.max_bad_steps:
            raise SystemExit(f"{bad_in_row} non-finite updates in a row: stopping. Lower --lr or check the data.")

        # ---- log: scores before the update, per channel -----------------------------------------------------------
        fin = lambda x: (float(x[torch.isfinite(x)].sum()), int(torch.isfinite(x).sum()))  # noqa: E731
        tot = M.all_sum([*fin(teacher[:, 0]), *fin(teacher[:, -1]), *fin(student[:, 0]), *fin(student[:, -1]),
                         float(valid.sum()), R, float(sum(len(o) for o in outs))], device)
        mean = lambda a, b: a / b if b else float("nan")  # noqa: E731
        rec = {"step": step + 1, **{k: dm[k] for k in ("d_loss", "cap_acc", "cot_acc", "disc_grad_norm")},
               "teacher_cap": mean(tot[0], tot[1]), "teacher_cot": mean(tot[2], tot[3]),
               "student_cap": mean(tot[4], tot[5]), "student_cot": mean(tot[6], tot[7]), "valid": tot[8] / tot[9],
               "length": tot[10] / tot[9], "grad_norm": up["grad_norm"], "t_gen": t_gen, "t_score": t_score,
               "t_disc": t_disc, "t_policy": up["t_update"], "skipped_steps": n_skipped, "mem_gb": M.peak_mem_gb()}
        rec["gap_cap"], rec["gap_cot"] = rec["teacher_cap"] - rec["student_cap"], rec["teacher_cot"] - rec["student_cot"]
        log(rec)
        M.print0(f"step {step + 1:05d}/{args.steps:05d} | d_loss {rec['d_loss']:.4f} | cap_acc {rec['cap_acc']:.3f} | "
                 f"cot_acc {rec['cot_acc']:.3f} | T/S cap {rec['teacher_cap']:.2f}/{rec['student_cap']:.2f} cot "
                 f"{rec['teacher_cot']:.2f}/{rec['student_cot']:.2f} | gap {rec['gap_cap']:.2f}/{rec['gap_cot']:.2f} | "
                 f"valid {rec['valid']:.2f} | len {rec['length']:.0f} | gen {t_gen:.1f}s score {t_score:.1f}s disc "
                 f"{t_disc:.1f}s policy {up['t_update']:.1f}s" + (f" | mem {rec['mem_gb']:.1f}GB" if device.type == "cuda" else ""))

    on_gpu(p_off, d_off)
    M.save_hf(policy, processor, args.out, {"stage": "align", **vars(args), "skipped_steps": n_skipped,
                                            "dropped_long_prompts": n_long})
    os.makedirs(os.path.join(args.out, "disc"), exist_ok=True)
    save_framing(framing, os.path.join(args.out, "disc"))  # before save_hf, whose run_config.json marks the save complete
    M.save_hf(disc, processor, os.path.join(args.out, "disc"), {"stage": "align-disc", **vars(args)})
    M.print0(f"saved the policy to {args.out} and the discriminator to {os.path.join(args.out, 'disc')}")
    dist.destroy_process_group()
