"""
Stage 3 of PRISM: RL with verifiable rewards. GRPO, DAPO and GSPO side by side; the losses are inline below.

    python rl.py --policy runs/x/align --algo grpo --data data/shapes/rl.parquet --out runs/x/rl
    torchrun --nproc_per_node 8 rl.py --policy runs/x/align --algo dapo --data rl.parquet --out runs/x/rl-dapo

Reward = verify.reward: 0.2 for the format plus 0.8 for a matching answer (ground truth or an equivalent answer).
Advantage = (r - mean_group) / (std_group + 1e-6) over the G rollouts of a prompt; each prompt's group lives on one rank.
With --mini-batches 1 --epochs 1 (the release) the update is exactly on-policy (ratio 1); more make the clip ranges act.
Re-running the same command resumes from OUT/ckpt. Output: OUT is a plain Hugging Face directory (+ metrics.jsonl).
"""

import argparse
import math
import os
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist

import data
import engine
import model as M
import verify

# per-algorithm defaults from the release: clip low / high, dual-clip c, weight decay, lr warm-up
ALGOS = {
    "grpo": dict(clip_low=0.2, clip_high=0.2, clip_c=3.0, weight_decay=0.01, warmup_steps=0, warmup_ratio=0.0),
    "dapo": dict(clip_low=0.2, clip_high=0.28, clip_c=10.0, weight_decay=0.1, warmup_steps=10, warmup_ratio=0.0),
    "gspo": dict(clip_low=3e-4, clip_high=4e-4, clip_c=None, weight_decay=0.1, warmup_steps=0, warmup_ratio=0.05),
}


def group_advantages(rewards, group_size, eps=1e-6):
    """GRPO group normalisation: (r - mean) / (std + eps) over each group of `group_size` contiguous rows (unbiased std).
    A group of one has mean 0 and std 1 (its advantage is its reward). (B,) -> (B,)"""
    r = rewards.view(-1, group_size).float()
    if group_size == 1:
        return r.view(-1).clone()
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)


def ppo_terms(logp, old_logp, advantages, mask, *, algo, clip_low, clip_high, clip_c=None):
    """The clipped surrogate per token, and where its clips bind (verl's pg_clipfrac and pg_clipfrac_lower).
    logp, old_logp, mask: (B, T); advantages: (B,). Returns (loss (B, T), clipped (B, T) bool: the clipped branch is the
    larger one, lower (B, T) bool: the dual clip bounds a negative-advantage token). Log-ratios are clamped as verl
    v0.6.1 clamps them: per token to +-20 (GRPO/DAPO), the sequence ratio to at most 10 (GSPO)."""
    mask = mask.float()
    A = advantages[:, None].float()  # (B, 1), broadcast to every token of the response
    if algo == "gspo":
        # sequence ratio s_i = exp(mean_t (logp - old_logp)); its value is used on every token while the gradient flows
        # through each token's own logp (GSPO-token): d/dθ = s_i * ∇logp_t
        seq = ((logp - old_logp) * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B,)
        ratio = torch.exp((logp - logp.detach() + seq.detach()[:, None]).clamp(max=10.0))
    else:
        ratio = torch.exp((logp - old_logp).clamp(-20.0, 20.0))  # (B, T)
    plain, clipped = -A * ratio, -A * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss = torch.maximum(plain, clipped)
    lower = torch.zeros_like(mask, dtype=torch.bool)
    if clip_c is not None and algo != "gspo":  # dual-clip: for A < 0, bound the loss by -A * c
        lower = (loss > -A * clip_c) & (A < 0)
        loss = torch.where(A < 0, torch.minimum(loss, -A * clip_c), loss)
    return loss, (clipped > plain).detach(), lower.detach()


def policy_loss(logp, old_logp, advantages, mask, *, algo, clip_low, clip_high, clip_c=None):
    """PPO-style clipped surrogate for GRPO / DAPO (per-token ratio, token-mean) and GSPO (sequence ratio, seq-mean-token-mean
    over the rows that have a token). logp, old_logp, mask: (B, T) over response tokens; advantages: (B,). Aggregation is
    local to the given tensors."""
    loss = ppo_terms(logp, old_logp, advantages, mask, algo=algo, clip_low=clip_low, clip_high=clip_high, clip_c=clip_c)[0]
    mask = mask.float()
    if algo == "gspo":  # seq-mean-token-mean; a row without tokens is not a sequence (as verl's agg_loss)
        rows = mask.sum(1)
        return ((loss * mask).sum(1) / rows.clamp(min=1)).sum() / (rows > 0).sum().clamp(min=1)
    return (loss * mask).sum() / mask.sum().clamp(min=1)  # token-mean


def k3(logp_q, logp_p):
    """The k3 estimator of KL(p || q) per token from samples of p (Schulman): r = q / p, k3 = r - 1 - log r, with verl's
    clamps (log r to +-20, k3 to at most 10). (B, T)"""
    d = (logp_q - logp_p).clamp(-20.0, 20.0)
    return (torch.exp(d) - d - 1).clamp(max=10.0)


def overlong_penalty(length, max_len, buffer, factor):
    """DAPO soft overlong punishment: 0 up to max_len - buffer, then linearly down to -factor at max_len."""
    return min(0.0, -(length - (max_len - buffer)) / buffer * factor) if buffer > 0 else 0.0


def keep_mixed_groups(accs, group_size):
    """DAPO dynamic sampling (the release's filter_groups.metric=acc): which groups have accuracies that are not all
    equal; a group of one is kept. (B,) -> (B // G,) bool"""
    r = accs.view(-1, group_size).float()
    return (r.max(1).values - r.min(1).values > 1e-9) | (group_size == 1)


def micro_groups(lengths, max_seqs, max_tokens=0):
    """Indices of sequences of these lengths in micro-batches: sorted by length, so a micro-batch pads little, each at
    most `max_seqs` sequences and, when max_tokens > 0, at most `max_tokens` padded tokens (a longer sequence goes alone)."""
    groups, cur = [], []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if cur and (len(cur) == max_seqs or (max_tokens and lengths[i] * (len(cur) + 1) > max_tokens)):
            groups.append(cur)
            cur = []
        cur.append(i)
    return groups + [cur] * bool(cur)


@dataclass
class UpdateConfig:
    """The policy update's hyper-parameters (rl.py and align.py build one from their flags)."""
    algo: str = "grpo"  # grpo | dapo | gspo: the ratio and the aggregation of policy_loss
    clip_low: float = 0.2
    clip_high: float = 0.2
    clip_c: float | None = 3.0  # dual-clip constant for A < 0 (None: off)
    mini_batches: int = 1  # optimizer steps per epoch over the rollout batch (1 and epochs 1: on-policy, ratio 1)
    epochs: int = 1
    micro_batch: int = 8  # at most this many sequences per forward/backward per rank
    micro_tokens: int = 0  # and at most this many padded tokens (0: no cap)
    grad_clip: float = 1.0
    kl_coef: float = 0.0  # k3 KL to a frozen reference (needs `ref`)
    pack: bool = False  # each micro-batch packed into one row (data.collate(packed=True))


def update_policy(policy, opt, items, adv, placeholder, cfg, lr, pad_id, device, ref=None):
    """The policy update on one rollout batch (also align.py's): `cfg.mini_batches` optimizer steps per epoch, each over
    this rank's share of the sequences, in length-sorted micro-batches (micro_groups). items: join_response dicts; adv: one
    advantage each. Every rank runs the same number of forwards (FSDP); a rank short of micro-batches runs `placeholder`
    with no supervised token. Returns the step's statistics: loss, grad norm, clip fractions (verl's pg_clipfrac and
    pg_clipfrac_lower), the policy's entropy over response tokens (first epoch), and when the items carry the rollout's
    log-probs the mean k3 between the rollout's and the update's log-probs of the sampled tokens (before any step)."""
    ph = {k: v for k, v in placeholder.items() if k != "rollout_logprobs"}
    ph["labels"] = torch.full_like(ph["input_ids"], -100)  # no loss, no gradient
    per_mb = math.ceil(len(items) / cfg.mini_batches)
    mbs = [(items[i * per_mb:(i + 1) * per_mb], adv[i * per_mb:(i + 1) * per_mb]) for i in range(cfg.mini_batches)]
    groups = [micro_groups([len(it["input_ids"]) for it in mb_items], cfg.micro_batch, cfg.micro_tokens) for mb_items, _ in mbs]
    n_micro = [max(M.all_max(len(g), device), 1) for g in groups]  # the ranks agree on each mini-batch's forward count

    def micro(j):
        (mb_items, mb_adv), g = mbs[j], groups[j]
        for i in range(n_micro[j]):
            yield ((data.collate([mb_items[k] for k in g[i]], pad_id, packed=cfg.pack), torch.tensor([mb_adv[k] for k in g[i]]))
                   if i < len(g) else (data.collate([ph], pad_id, packed=cfg.pack), torch.zeros(1)))

    # old log-probs: only off-policy updates need them (with one mini-batch and one epoch, old = current, ratio 1)
    t0 = time.time()
    on_policy = cfg.mini_batches == 1 and cfg.epochs == 1
    old, refs = {}, {}
    if not on_policy or ref is not None:
        with torch.no_grad():
            for j in range(len(mbs)):
                for i, (b, _) in enumerate(micro(j)):
                    if not on_policy:
                        old[j, i] = policy(b)
                    if ref is not None:
                        refs[j, i] = ref(b)
    t_lp = time.time() - t0

    t1 = time.time()
    sums = torch.zeros(6, dtype=torch.float64)  # tokens, clipped, lower-clipped, entropy, mismatch k3, tokens with a rollout lp
    gnorms, losses, skipped = [], [], 0
    for epoch in range(cfg.epochs):
        for j, (mb_items, _) in enumerate(mbs):
            # THE GLOBAL NORMALISERS (the gradient contract of model.shard): supervised tokens (GRPO/DAPO: token-mean) and
            # sequences (GSPO: seq-mean) of this mini-batch over ALL ranks; FSDP sums the gradients, it does not average
            n_tok = sum(int((it["labels"] != -100).sum()) for it in mb_items)
            n_seq = sum(int((it["labels"] != -100).any()) for it in mb_items)
            denom_tok, denom_seq = (max(x, 1) for x in M.all_sum([n_tok, n_seq], device))
            loss_sum = 0.0
            for i, (b, a) in enumerate(micro(j)):
                logp, ent = policy(b, entropy=True)  # (B, T) response-token log-probs and entropies, 0 elsewhere
                mask = (b["labels"] != -100).to(device)
                old_lp = old[j, i] if not on_policy else logp.detach()
                terms, clipped, lower = ppo_terms(logp, old_lp, a.to(device), mask, algo=cfg.algo, clip_low=cfg.clip_low,
                                                  clip_high=cfg.clip_high, clip_c=cfg.clip_c)
                rows = mask.sum(1).clamp(min=1)
                if cfg.algo == "gspo":  # this micro-batch's share of the global seq-mean-token-mean
                    loss = ((terms * mask).sum(1) / rows).sum() / denom_seq
                else:  # ... of the global token-mean
                    loss = (terms * mask).sum() / denom_tok
                if ref is not None:  # k3 KL(pi || ref), aggregated as the policy loss is (verl: the same loss_agg_mode)
                    kl = k3(refs[j, i], logp) * mask
                    loss = loss + cfg.kl_coef * (kl.sum(1) / rows).sum() / denom_seq if cfg.algo == "gspo" else \
                        loss + cfg.kl_coef * kl.sum() / denom_tok
                loss.backward()
                loss_sum += loss.item()
                with torch.no_grad():
                    sums[:3] += torch.tensor([mask.sum(), (clipped & mask).sum(), (lower & mask).sum()], dtype=torch.float64)
                    if epoch == 0:
                        sums[3] += float((ent * mask).sum())
                    if epoch == 0 and "rollout_logprobs" in b:  # old_lp: the rollout policy's weights, before any step
                        sums[4] += float((k3(old_lp, b["rollout_logprobs"].to(device)) * mask).sum())
                        sums[5] += float(mask.sum())
            loss_sum = M.all_sum(loss_sum, device)
            gnorm = M.clip_grad(policy, cfg.grad_clip)
            if not math.isfinite(gnorm) or not math.isfinite(loss_sum):  # global values: every rank agrees
                opt.zero_grad(set_to_none=True)
                skipped += 1
                M.print0(f"non-finite loss/grad norm ({loss_sum}, {gnorm}): optimizer step skipped")
                continue
            for g in opt.param_groups:
                g["lr"] = lr
            opt.step()
            opt.zero_grad(set_to_none=True)
            gnorms.append(gnorm)
            losses.append(loss_sum)
    n, clip_n, lower_n, ent_sum, k3_sum, k3_n = M.all_sum(sums.tolist(), device)
    first_epoch = n / cfg.epochs  # the tokens of one pass (entropy is summed over the first epoch only)
    return {"loss": sum(losses) / max(len(losses), 1), "grad_norm": sum(gnorms) / max(len(gnorms), 1),
            "clip_frac": clip_n / max(n, 1), "clip_frac_lower": lower_n / max(n, 1), "entropy": ent_sum / max(first_epoch, 1),
            "rollout_k3": k3_sum / k3_n if k3_n else float("nan"), "t_logprobs": t_lp, "t_update": time.time() - t1,
            "skipped": skipped}


class Group(NamedTuple):
    """One prompt's G rollouts and their rewards (GRPO-Zero's Episode, per group)."""
    example: data.Example
    prompt: dict  # render_chat encoding of the prompt
    responses: list  # G lists of token ids
    logprobs: list  # G lists: each sampled token's log-prob under the rollout's sampling distribution
    rewards: torch.Tensor  # (G,) verify.reward scores (+ DAPO's overlong penalty)
    accs: list  # (G,) answer correct
    formats: list  # (G,) format-valid
    truncated: list  # (G,) cut at --max-new-tokens (no end-of-turn token)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # model
    p.add_argument("--policy", required=True, help="the policy HF directory (SFT or alignment output)")
    p.add_argument("--processor", default=None, help="processor directory (default: the --policy directory)")
    p.add_argument("--algo", default="grpo", choices=list(ALGOS), help="grpo | dapo | gspo")
    p.add_argument("--freeze-vision", action="store_true", help="the vision tower gets no gradient")
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing in every block")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder block of the policy (4B on GPUs: "
                   "+25-33%% training tokens/s, bench/results; the first steps compile)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the --policy directory")
    # data
    p.add_argument("--data", required=True, help="RL parquet/JSONL: prompt, images, reward_model.ground_truth")
    p.add_argument("--eval-data", nargs="*", default=[], help="held-out parquet files for periodic eval.py evaluation")
    p.add_argument("--max-pixels", type=int, default=560 * 560, help="images are downscaled to at most this many pixels")
    p.add_argument("--max-prompt-len", type=int, default=2048, help="drop (and count) prompts longer than this, images included")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of stopping at the first")
    p.add_argument("--image-root", default=None, help="relative image paths resolve against this folder (the release's "
                       "IMAGE_BASE_PATH), else against the data file's folder")
    p.add_argument("--system-prompt", default=None, help="a text file: the system prompt of records that carry none "
                       "(default: data.SYSTEM_PROMPT)")
    # rollouts
    p.add_argument("--prompts", type=int, default=32, help="prompts per step (global); each has --group-size rollouts")
    p.add_argument("--group-size", type=int, default=16, help="rollouts per prompt (G)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0; the update's log-probs use it too)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling")
    p.add_argument("--max-new-tokens", type=int, default=8192, help="response length limit in tokens")
    p.add_argument("--gen-batch", type=int, default=64, help="sequences per generation call")
    p.add_argument("--hf-generate", action="store_true", help="roll out with Hugging Face generate() (dynamic cache), the "
                   "readable reference path, instead of the static-cache decode loop (compiled with CUDA graphs on GPUs)")
    # optimisation
    p.add_argument("--steps", type=int, default=1500, help="RL steps")
    p.add_argument("--lr", type=float, default=1e-6, help="learning rate (constant after the warm-up)")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default: per algorithm)")
    p.add_argument("--warmup-steps", type=int, default=None, help="linear lr warm-up steps (default: per algorithm)")
    p.add_argument("--mini-batches", type=int, default=1, help="optimizer steps per rollout batch (1 = on-policy)")
    p.add_argument("--epochs", type=int, default=1, help="passes over each rollout batch")
    p.add_argument("--micro-batch", type=int, default=8, help="at most this many sequences per forward/backward per rank")
    p.add_argument("--micro-tokens", type=int, default=16384, help="and at most this many padded tokens (0: no cap), so "
                   "the activation memory stays bounded at long responses; sequences are sorted by length into micro-batches")
    p.add_argument("--pack", action="store_true", help="each micro-batch's sequences in one row, no FLOPs on padding "
                   "(varlen flash attention on GPUs); the same log-probs as padded batches (tests/test_model.py)")
    p.add_argument("--clip-low", type=float, default=None, help="ratio clip below 1 (default: per algorithm)")
    p.add_argument("--clip-high", type=float, default=None, help="ratio clip above 1 (default: per algorithm)")
    p.add_argument("--clip-c", type=float, default=None, help="dual-clip constant for A < 0 (default: per algorithm)")
    p.add_argument("--kl-coef", type=float, default=0.0, help="k3 KL to a frozen reference (loaded only when > 0)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="clip the global grad norm to this")
    p.add_argument("--dapo-tries", type=int, default=10, help="DAPO: generation batches to try when filling the step")
    p.add_argument("--dapo-gen-mult", type=int, default=3, help="DAPO: a refill generates this many times --prompts")
    p.add_argument("--overlong-buffer", type=int, default=None, help="DAPO: soft overlong buffer (default: half the length)")
    p.add_argument("--overlong-factor", type=float, default=1.0, help="DAPO: overlong penalty at the length limit")
    p.add_argument("--seed", type=int, default=0, help="seed for data order and sampling")
    p.add_argument("--max-bad-steps", type=int, default=5, help="stop after this many non-finite steps in a row")
    # eval / checkpoint / logging
    p.add_argument("--out", required=True, help="output directory: the HF model, metrics.jsonl, ckpt/")
    p.add_argument("--eval-every", type=int, default=50, help="eval.py evaluation every N steps (0: only at the end)")
    p.add_argument("--eval-limit", type=int, default=0, help="evaluate only the first N examples of each file (0: all)")
    p.add_argument("--save-every", type=int, default=50, help="resume checkpoint every N steps (0: only at the end)")
    p.add_argument("--wandb", default=None, help="wandb project name (off when unset)")
    args = p.parse_args()
    algo = ALGOS[args.algo]
    pick = lambda flag, key: algo[key] if flag is None else flag  # noqa: E731  a flag, else the algorithm's default
    cfg = UpdateConfig(args.algo, pick(args.clip_low, "clip_low"), pick(args.clip_high, "clip_high"),
                       pick(args.clip_c, "clip_c"), args.mini_batches, args.epochs, args.micro_batch, args.micro_tokens,
                       args.grad_clip, args.kl_coef, args.pack)
    wd = pick(args.weight_decay, "weight_decay")
    warmup = args.warmup_steps if args.warmup_steps is not None else algo["warmup_steps"] or int(algo["warmup_ratio"] * args.steps)
    buffer = args.overlong_buffer if args.overlong_buffer is not None else args.max_new_tokens // 2

    import eval as evaluation  # eval.py's evaluate(), the same function `python eval.py` runs
    rank, world, device = M.init_dist()
    M.seed_all(args.seed)
    os.makedirs(args.out, exist_ok=True)
    processor = M.load_processor(args.processor or args.policy)
    tok = processor.tokenizer
    pad_id, eos = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")
    P, G = args.prompts, args.group_size
    if args.temperature <= 0:
        raise SystemExit(f"--temperature {args.temperature}: RL samples its rollouts, the temperature must be > 0")
    if P % world:
        raise SystemExit(f"--prompts {P} must be divisible by the world size {world} (each prompt's group lives on one rank)")
    if P * G % (world * args.mini_batches):
        raise SystemExit(f"--prompts x --group-size ({P * G}) must split into {world} ranks x {args.mini_batches} mini-batches")
    P_rank = P // world

    read = lambda f: data.read_examples(f, "prompt", skip_bad=args.skip_bad, image_root=args.image_root,  # noqa: E731
                                        system=data.system_prompt(args.system_prompt))
    prompts, skipped = read(args.data)
    if skipped:
        M.print0(f"skipped {len(skipped)} bad records of {args.data} (first: {skipped[0]})")
    prompts, n_long = data.drop_long_prompts(processor, prompts, args.max_prompt_len, args.max_pixels)
    if not prompts:
        raise SystemExit(f"{args.data}: every prompt is longer than --max-prompt-len {args.max_prompt_len}")
    evals = {os.path.basename(f).rsplit(".", 1)[0]: read(f)[0]
             for f in args.eval_data}
    evals = {k: v[:args.eval_limit] if args.eval_limit else v for k, v in evals.items()}

    hf = M.load_policy(args.policy, processor, device, seed=args.seed, trust_remote_code=args.trust_remote_code)
    infer = engine.make_inference_copy(hf, device)  # the generation copy, refreshed from the trained weights every step
    ref = None
    if args.kl_coef > 0:  # a frozen reference only when the KL term is on
        ref = M.shard(M.LogProbs(M.load_policy(args.policy, processor, device), args.temperature), device)
        ref.requires_grad_(False)
    policy = M.shard(M.LogProbs(hf, args.temperature), device, args.freeze_vision, args.grad_ckpt, args.compile)
    opt = M.make_optimizer(policy, args.lr, wd)
    M.print0(f"world {world} | {args.algo}: clip {cfg.clip_low}/{cfg.clip_high} dual-clip {cfg.clip_c} wd {wd} warm-up "
             f"{warmup} | {P} prompts x {G} rollouts = {P * G} sequences/step ({P_rank * G} per rank) | {args.mini_batches} "
             f"mini-batches x {args.epochs} epochs | kl {args.kl_coef} | {len(prompts)} prompts ({n_long} over-long dropped), "
             f"{args.steps} steps")

    def rollout(pos, n_prompts):
        """G responses for each of this rank's prompts at stream positions [pos, pos + n_prompts * world): a Group each."""
        mine = [prompts[i] for i in data.stream_indices(len(prompts), args.seed, pos + rank * n_prompts, n_prompts)]
        enc = [data.render_chat(processor, ex, None, args.max_pixels) for ex in mine]
        outs, lps = engine.generate(infer, [e for e in enc for _ in range(G)], tok, device, args.max_new_tokens,
                                    args.temperature, args.top_p, args.gen_batch, args.hf_generate, logprobs=True)
        groups = []
        for i, (ex, e) in enumerate(zip(mine, enc)):
            resp = outs[i * G:(i + 1) * G]
            rs = [verify.reward(tok.decode(r, skip_special_tokens=True), ex.answer, ex.equivalents) for r in resp]
            score = torch.tensor([r["score"] for r in rs])
            if args.algo == "dapo":  # soft overlong punishment on the reward
                score += torch.tensor([overlong_penalty(len(r), args.max_new_tokens, buffer, args.overlong_factor)
                                       for r in resp])
            groups.append(Group(ex, e, resp, lps[i * G:(i + 1) * G], score, [r["acc"] for r in rs], [r["format"] for r in rs],
                                [r[-1] != eos for r in resp]))
        return groups

    def dapo_fill(groups, pos):
        """DAPO dynamic sampling: keep the groups whose accuracies differ (a group of one is kept); refill from new
        generation batches until the step holds P groups over all ranks (or the tries run out). Counts are all-reduced, so
        every rank decides the same. Returns (this rank's kept groups, every group generated, the stream position, the share
        of groups kept)."""
        mixed = lambda gs: [g for g in gs if keep_mixed_groups(torch.tensor(g.accs), G)[0]]  # noqa: E731
        kept, generated = mixed(groups), list(groups)
        for _ in range(args.dapo_tries - 1):
            if M.all_sum(len(kept), device) >= P:
                break
            more = rollout(pos, P_rank * args.dapo_gen_mult)
            pos += P * args.dapo_gen_mult
            generated += more
            kept += mixed(more)
        counts = [0] * world
        dist.all_gather_object(counts, len(kept))
        quota = max(0, min(len(kept), P - sum(counts[:rank])))  # fill P groups in rank order
        return kept[:quota], generated, pos, sum(counts) / M.all_sum(len(generated), device)

    def lr_at(step):
        return args.lr * min(1.0, (step + 1) / warmup) if warmup else args.lr

    ckpt_dir = os.path.join(args.out, "ckpt")
    start, pos, bad_in_row, n_skipped_steps = 0, 0, 0, 0
    if (last := M.latest_checkpoint(ckpt_dir)) is not None:
        meta = M.load_checkpoint(last, {"policy": (policy, opt)})
        start, pos, n_skipped_steps = meta["step"], meta["pos"], meta["skipped_steps"]
        M.print0(f"resumed from {last} at step {start}")
    log = M.metrics_logger(args.out, start, args)

    for step in range(start, args.steps + 1):
        last_step = step == args.steps
        engine.sync_weights(policy, infer)  # gather the trained weights once for this step's rollouts (and eval)
        if evals and (last_step or (args.eval_every and step % args.eval_every == 0)):
            for name, exs in evals.items():
                r = evaluation.evaluate(infer, processor, exs, device, max_new_tokens=args.max_new_tokens,
                                        max_pixels=args.max_pixels, desc=f"eval {name}", hf=args.hf_generate)
                M.print0(f"step {step:05d}/{args.steps:05d} | eval {name} | acc {r['acc']:.3f} | format {r['format']:.3f} | "
                         f"len {r['length']:.1f}")
                log({"step": step, "eval": True, f"eval_{name}_acc": r["acc"], f"eval_{name}_format": r["format"],
                     f"eval_{name}_length": r["length"]})
        if step > start and (last_step or (args.save_every and step % args.save_every == 0)):
            M.save_checkpoint(ckpt_dir, step, {"policy": (policy, opt)}, {"pos": pos, "skipped_steps": n_skipped_steps})
        if last_step:
            break

        # ---- rollouts: G per prompt, each group whole on this rank -------------------------------------------------
        t0 = time.time()
        torch.manual_seed(args.seed * 100003 + step * 101 + rank)  # sampling noise: a function of (seed, step, rank)
        with M.oom_guard("the rollouts", f"{P_rank * G} sequences per rank, --gen-batch {args.gen_batch}, up to "
                         f"{args.max_prompt_len} + {args.max_new_tokens} tokens", "a lower --gen-batch or --max-new-tokens"):
            generated = groups = rollout(pos, P_rank)
            pos += P
            kept_ratio = 1.0
            if args.algo == "dapo":
                groups, generated, pos, kept_ratio = dapo_fill(groups, pos)
        t_gen = time.time() - t0

        # ---- advantages: group normalisation of the rewards, broadcast to every response token --------------------
        items, adv = [], []
        for g in groups:
            for r, lp, a in zip(g.responses, g.logprobs, group_advantages(g.rewards, G)):
                items.append(data.join_response(g.prompt, r, lp))
                adv.append(float(a))
        if M.all_sum(len(items), device) == 0:  # nothing to learn from anywhere (DAPO found no mixed group)
            M.print0(f"step {step + 1:05d}/{args.steps:05d} | no group with mixed rewards: update skipped")
            n_skipped_steps += 1
            continue

        # ---- policy update ---------------------------------------------------------------------------------------
        placeholder = items[0] if items else data.join_response(data.render_chat(processor, prompts[0]), [pad_id])
        longest = max((len(it["input_ids"]) for it in items), default=0)
        with M.oom_guard("the policy update", f"{len(items)} sequences on this rank, the longest {longest} tokens, "
                         f"--micro-batch {cfg.micro_batch} --micro-tokens {cfg.micro_tokens}",
                         "a lower --micro-batch or --micro-tokens, --grad-ckpt, more GPUs"):
            up = update_policy(policy, opt, items, adv, placeholder, cfg, lr_at(step), pad_id, device, ref)
        n_skipped_steps += up["skipped"]
        bad_in_row = bad_in_row + up["skipped"] if up["skipped"] else 0
        if bad_in_row >= args.max_bad_steps:
            raise SystemExit(f"{bad_in_row} non-finite updates in a row: stopping. Lower --lr or check the data.")

        # ---- log: statistics over every generated rollout (DAPO: the filtered-out groups too) -----------------------
        stats = [(s, acc, fmt, len(r), cut) for g in generated
                 for s, acc, fmt, r, cut in zip(g.rewards.tolist(), g.accs, g.formats, g.responses, g.truncated)]
        s = torch.tensor(stats, dtype=torch.float64) if stats else torch.zeros(0, 5, dtype=torch.float64)
        flat = [float(g.rewards.max() - g.rewards.min() <= 1e-9) for g in generated]  # groups with zero reward variance
        tot = M.all_sum([*s.sum(0).tolist(), len(s), sum(flat), len(flat)], device)
        n, len_max = max(tot[5], 1), M.all_max(int(s[:, 3].max()) if len(s) else 0, device)
        rec = {"step": step + 1, "reward": tot[0] / n, "acc": tot[1] / n, "format": tot[2] / n, "len_mean": tot[3] / n,
               "len_max": len_max, "truncated": tot[4] / n, "zero_var_groups": tot[6] / max(tot[7], 1),
               "kept_ratio": kept_ratio, "t_gen": t_gen, **up, "lr": lr_at(step), "skipped_steps": n_skipped_steps,
               "mem_gb": M.peak_mem_gb()}
        log(rec)
        M.print0(f"step {step + 1:05d}/{args.steps:05d} | reward {rec['reward']:.3f} | acc {rec['acc']:.3f} | "
                 f"format {rec['format']:.3f} | len {rec['len_mean']:.0f}/{rec['len_max']:.0f} | cut {rec['truncated']:.2f} | "
                 f"flat {rec['zero_var_groups']:.2f} | kept {kept_ratio:.2f} | ent {up['entropy']:.3f} | "
                 f"k3 {up['rollout_k3']:.1e} | clip {rec['clip_frac']:.3f} | gnorm {rec['grad_norm']:.3f} | "
                 f"gen {t_gen:.1f}s lp {up['t_logprobs']:.1f}s upd {up['t_update']:.1f}s" +
                 (f" | mem {rec['mem_gb']:.1f}GB" if device.type == "cuda" else ""))

    M.save_hf(policy, processor, args.out, {"stage": f"rl-{args.algo}", **vars(args), "skipped_steps": n_skipped_steps,
                                            "dropped_long_prompts": n_long})
    M.print0(f"saved {args.out}")
    dist.destroy_process_group()
