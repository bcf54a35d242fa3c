"""rl.py: the losses and advantages against independent, element-by-element implementations of the formulas;
the stage under torchrun (2 processes == 1, kill -9 + resume bitwise, a NaN on one rank, a rank without images), bad input."""

import math
import os

import pytest
import torch

import data
import model as M
import rl
from helpers import MIXED, check_two_equal_one_and_resume, metrics, rl_args, run


def reference_loss(logp, old, adv, mask, algo, lo, hi, c):
    """The formulas of PRISM_NOTES.md written token by token with Python control flow (differentiable in logp)."""
    B, T = logp.shape
    per_seq = []
    tok_terms = []
    for i in range(B):
        n = int(mask[i].sum())
        if algo == "gspo":
            s = sum(logp[i, t] - old[i, t] for t in range(T) if mask[i, t]) / max(n, 1)
        terms = []
        for t in range(T):
            if not mask[i, t]:
                continue
            if algo == "gspo":  # value exp(s_i), gradient through the token's own logp
                r = torch.exp(logp[i, t] - logp[i, t].detach() + s.detach())
            else:
                r = torch.exp(logp[i, t] - old[i, t])
            a = adv[i]
            l1, l2 = -a * r, -a * torch.clamp(r, 1 - lo, 1 + hi)
            loss = torch.maximum(l1, l2)
            if c is not None and a < 0:
                loss = torch.minimum(loss, -a * c)
            terms.append(loss)
        tok_terms += terms
        per_seq.append(sum(terms) / max(n, 1) if terms else torch.zeros(()))
    if algo == "gspo":
        return sum(per_seq) / B
    return sum(tok_terms) / max(len(tok_terms), 1)


def random_case(seed, B=6, T=9):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 3
    logp = (old + torch.randn(B, T, generator=g)).requires_grad_(True)  # ratios well outside every clip range
    lengths = [T, 1, 4, 7, 2, T - 1][:B]  # uneven response lengths
    mask = torch.zeros(B, T, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    adv = torch.tensor([1.5, -2.0, 0.7, -0.3, 0.0, -1.1])[:B]  # both signs
    return logp, old, adv, mask


@pytest.mark.parametrize("algo", ["grpo", "dapo", "gspo"])


@pytest.mark.parametrize("seed", [0, 1, 2])


def test_policy_loss_matches_formula(algo, seed):
    cfg = rl.ALGOS[algo]
    lo, hi, c = cfg["clip_low"], cfg["clip_high"], cfg["clip_c"]
    if algo == "gspo":  # widen GSPO's tiny range so that some sequences are clipped and some are not
        lo, hi = 0.05, 0.08
    logp, old, adv, mask = random_case(seed)
    got = rl.policy_loss(logp, old, adv, mask, algo=algo, clip_low=lo, clip_high=hi, clip_c=c)
    (g_got,) = torch.autograd.grad(got, logp)
    ref = reference_loss(logp, old, adv, mask, algo, lo, hi, c)
    (g_ref,) = torch.autograd.grad(ref, logp)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g_got, g_ref, atol=1e-6, rtol=1e-5)
    assert (g_got[~mask] == 0).all()


def test_clip_and_dual_clip_branches_are_hit():
    logp, old, adv, mask = random_case(0)
    r = torch.exp(logp - old).detach()
    A = adv[:, None].expand_as(r)
    assert ((r > 1.2) & (A > 0) & mask).any() and ((r < 0.8) & (A < 0) & mask).any()  # the clip acts
    assert ((r > 3.0) & (A < 0) & mask).any()  # the dual clip acts (GRPO's c = 3)


@pytest.mark.parametrize("algo", ["grpo", "dapo"])


def test_ratio_one_is_reinforce(algo):
    logp, _, adv, mask = random_case(3)
    cfg = rl.ALGOS[algo]
    loss = rl.policy_loss(logp, logp.detach(), adv, mask, algo=algo, clip_low=cfg["clip_low"], clip_high=cfg["clip_high"],
                          clip_c=cfg["clip_c"])
    (g,) = torch.autograd.grad(loss, logp)
    reinforce = -(adv[:, None] * logp * mask).sum() / mask.sum()
    (g_ref,) = torch.autograd.grad(reinforce, logp)
    torch.testing.assert_close(g, g_ref)


def test_gspo_gradient_reaches_every_token():
    logp, old, adv, mask = random_case(4)
    adv = torch.tensor([1.5, -2.0, 0.7, -0.3, 0.4, -1.1])
    loss = rl.policy_loss(logp, logp.detach(), adv, mask, algo="gspo", clip_low=3e-4, clip_high=4e-4)
    (g,) = torch.autograd.grad(loss, logp)
    assert (g[mask] != 0).all() and (g[~mask] == 0).all()
    # at ratio 1 each token's gradient is -A_i / (|y_i| * B)
    n = mask.sum(1, keepdim=True)
    torch.testing.assert_close(g[mask], (-adv[:, None] / n / len(adv)).expand_as(g)[mask])


def test_group_advantages_hand_worked():
    r = torch.tensor([1.0, 0.2, 0.2, 0.2, 1.0, 1.0, 1.0, 1.0])
    a = rl.group_advantages(r, 4)
    std = torch.tensor([1.0, 0.2, 0.2, 0.2]).std()  # unbiased: 0.4
    assert std.item() == pytest.approx(0.4)
    torch.testing.assert_close(a[:4], (torch.tensor([1.0, 0.2, 0.2, 0.2]) - 0.4) / (0.4 + 1e-6))
    assert (a[4:] == 0).all()  # identical rewards -> no signal
    torch.testing.assert_close(rl.group_advantages(torch.tensor([0.2, 1.0]), 1), torch.tensor([0.2, 1.0]))  # groups of one


def test_dynamic_sampling_keeps_groups_whose_accuracy_differs_and_groups_of_one():
    acc = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    assert rl.keep_mixed_groups(acc, 3).tolist() == [False, True, False, True]
    # rewards that differ only in the format term (0.0 invalid vs 0.2 valid, all wrong): the accuracies are equal, dropped
    rewards = torch.tensor([0.0, 0.2, 0.2])
    accs = torch.tensor([0.0, 0.0, 0.0])
    assert rl.keep_mixed_groups(rewards, 3).tolist() == [True] and rl.keep_mixed_groups(accs, 3).tolist() == [False]
    assert rl.keep_mixed_groups(torch.tensor([1.0, 0.0]), 1).tolist() == [True, True]  # groups of one are kept


def verl_vanilla(logp, old, adv, mask, lo, hi, c):
    """verl v0.6.1 compute_policy_loss_vanilla's metrics, transcribed (core_algos.py): (pg_clipfrac, pg_clipfrac_lower)."""
    neg_kl = torch.clamp(logp - old, min=-20.0, max=20.0)
    ratio = torch.exp(neg_kl)
    A = adv[:, None]
    l1, l2 = -A * ratio, -A * torch.clamp(ratio, 1 - lo, 1 + hi)
    c1 = torch.maximum(l1, l2)
    m = mask.float()
    frac = (torch.gt(l2, l1).float() * m).sum() / m.sum()
    lower = (torch.gt(c1, -A * c).float() * (A < 0).float() * m).sum() / m.sum()
    return frac, lower


def test_clip_fractions_are_verls():
    logp, old, adv, mask = random_case(0)
    for algo in ("grpo", "dapo"):
        cfg = rl.ALGOS[algo]
        _, clipped, lower = rl.ppo_terms(logp, old, adv, mask, algo=algo, clip_low=cfg["clip_low"],
                                         clip_high=cfg["clip_high"], clip_c=cfg["clip_c"])
        frac, low = verl_vanilla(logp.detach(), old, adv, mask, cfg["clip_low"], cfg["clip_high"], cfg["clip_c"])
        n = mask.sum()
        assert (clipped & mask).sum() / n == pytest.approx(frac.item()) and (lower & mask).sum() / n == pytest.approx(low.item())
        assert 0 < frac < 1 and (0 < low < 1 or algo == "dapo")  # both clips bind here (DAPO's c = 10: its dual clip not)
        # not the old "ratio outside the range" count, which ignores the sign of A
        outside = (((torch.exp(logp - old) < 1 - cfg["clip_low"]) | (torch.exp(logp - old) > 1 + cfg["clip_high"])) & mask)
        assert outside.sum() > (clipped & mask).sum()


def test_gspo_excludes_rows_without_tokens_and_clamps_the_sequence_ratio_at_10():
    logp, old, adv, mask = random_case(5)
    full = rl.policy_loss(logp, old, adv, mask, algo="gspo", clip_low=0.05, clip_high=0.08)
    mask2 = torch.cat([mask, torch.zeros(1, mask.shape[1], dtype=torch.bool)])  # one more row, no response token
    two = rl.policy_loss(torch.cat([logp, logp[:1]]), torch.cat([old, old[:1]]), torch.cat([adv, adv[:1]]), mask2,
                         algo="gspo", clip_low=0.05, clip_high=0.08)
    assert two.item() == pytest.approx(full.item())  # the empty row is not a sequence of the mean
    # a sequence log-ratio of 15: the ratio's value is capped at exp(10) and its tokens get no gradient (verl's clamp)
    lp = torch.zeros(1, 4, requires_grad=True)
    loss, _, _ = rl.ppo_terms(lp, torch.full((1, 4), -15.0), torch.tensor([-1.0]), torch.ones(1, 4, dtype=torch.bool),
                              algo="gspo", clip_low=1e9, clip_high=1e9)
    assert loss[0, 0].item() == pytest.approx(math.exp(10.0), rel=1e-6)
    loss.sum().backward()
    assert (lp.grad == 0).all()


def test_k3_is_the_kl_estimator_with_verls_clamps():
    q, p = torch.tensor([-1.0, -2.0, -0.5, 30.0]), torch.tensor([-1.5, -2.0, -3.0, 0.0])
    want = [math.exp(a - b) - (a - b) - 1 for a, b in zip(q.tolist()[:3], p.tolist()[:3])] + [10.0]  # log r = 30: clamped
    torch.testing.assert_close(rl.k3(q, p), torch.tensor(want))
    # its mean over samples of p estimates KL(p || q) (two categoricals: exact value against a large sample)
    g = torch.Generator().manual_seed(0)
    pp, qq = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.5, 0.3])
    x = torch.multinomial(pp, 200000, replacement=True, generator=g)
    kl = float((pp * (pp / qq).log()).sum())
    assert rl.k3(qq.log()[x], pp.log()[x]).mean().item() == pytest.approx(kl, abs=0.01)


@pytest.mark.parametrize("length,expected", [(0, 0.0), (4096, 0.0), (6144, -0.5), (8191, -(4095 / 4096)), (8192, -1.0),
                                             (4097, -1 / 4096)])


def test_overlong_penalty_at_the_buffer_edges(length, expected):
    assert rl.overlong_penalty(length, 8192, 4096, 1.0) == pytest.approx(expected)
    assert rl.overlong_penalty(length, 8192, 4096, 0.5) == pytest.approx(expected * 0.5)
    assert math.isclose(rl.overlong_penalty(length, 8192, 0, 1.0), 0.0)

# -----------------------------------------------------------------------------
# the stage under torchrun, faults, bad input


def test_two_processes_equal_one_and_kill_resume_is_bitwise(world, tiny_dirs, tmp_path):
    check_two_equal_one_and_resume("rl.py", lambda out: rl_args(world, tiny_dirs[0], out), tmp_path,
                                   {"policy.model.": 2e-6})


def test_rl_nan_on_one_rank_and_a_rank_without_images(world, tiny_dirs, tmp_path):
    """rl.py on 2 processes: rank 1's prompts have no image (the vision tower still runs in step on both ranks, no hang)
    and rank 1's gradient is NaN in step 1: the update is skipped on both ranks and counted."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = pq.read_table(os.path.join(world[0], "rl.parquet")).to_pylist()
    for pos in (1, 3):  # the stream positions rank 1 draws in steps 1 and 2 (2 prompts per step, one per rank)
        i = data.stream_indices(len(rows), 0, pos, 1)[0]
        rows[i]["images"] = []
        rows[i]["prompt"] = [{"role": "user", "content": "How many circles are there?"}]
    path = str(tmp_path / "rl.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    out = str(tmp_path / "rl")
    run("rl.py", *rl_args(world, tiny_dirs[0], out, data=path, steps=2, save_every=0), nproc=2,
        env={**MIXED, "PATCH_NAN": "1:1"}, timeout=240)
    recs = [m for m in metrics(out) if "grad_norm" in m]
    assert [m["skipped"] for m in recs] == [1, 0] and recs[-1]["skipped_steps"] == 1


@pytest.mark.parametrize("where,phase", [("logprobs", "the policy update"), ("generate", "the rollouts")])
def test_an_out_of_memory_on_one_rank_stops_both_with_the_phase_and_the_flags(world, tiny_dirs, tmp_path, where, phase):
    r = run("rl.py", *rl_args(world, tiny_dirs[0], str(tmp_path / "rl"), steps=2), nproc=2, check=False, timeout=240,
            env={**MIXED, "PATCH_OOM": f"1:{where}"})
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert f"rank 1: rank 1 ran out of memory in {phase} (" in out and "To fit: a lower --" in out
    assert f"rank 0: stopping, because rank 1 ran out of memory in {phase}" in out  # not left waiting in a collective


def test_a_world_size_that_does_not_divide_the_prompts_is_refused(world, tiny_dirs, tmp_path):
    r = run("rl.py", *rl_args(world, tiny_dirs[0], str(tmp_path / "r"), prompts=3), nproc=2, check=False, timeout=120)
    assert r.returncode != 0 and "--prompts 3 must be divisible by the world size 2" in r.stdout + r.stderr


def test_over_long_prompts_are_dropped_and_counted(world, processor, tiny_dirs, tmp_path):
    prompts, _ = data.read_examples(os.path.join(world[0], "rl.parquet"), "prompt")
    lengths = [len(data.render_chat(processor, ex)["input_ids"]) for ex in prompts]
    limit = sorted(lengths)[len(lengths) // 2]
    kept, n = data.drop_long_prompts(processor, prompts, limit)
    assert n == sum(x > limit for x in lengths) > 0 and kept == [ex for ex, x in zip(prompts, lengths) if x <= limit]
    # a limit no prompt fits: rl.py stops at start-up and says so
    r = run("rl.py", *rl_args(world, tiny_dirs[0], str(tmp_path / "r"), max_prompt_len=min(lengths) - 1), check=False,
            timeout=120)
    assert r.returncode != 0 and "every prompt is longer than --max-prompt-len" in r.stdout + r.stderr


@pytest.mark.parametrize("pack", [False, True])
def test_update_reports_entropy_and_the_rollout_mismatch(dist1, world, processor, pack):
    """update_policy's entropy (from the chunked log-prob pass) and its mean k3 between the rollout's and the update's
    log-probs, against the full-vocabulary softmax of an unsharded copy at the same temperature; padded and packed."""
    exs, _ = data.read_examples(os.path.join(world[0], "eval.parquet"), "prompt")
    g = torch.Generator().manual_seed(0)
    resp = [torch.randint(20, 300, (n,), generator=g).tolist() for n in (5, 9, 3, 7)]
    rollout_lp = [(-3 * torch.rand(len(r), generator=g)).tolist() for r in resp]
    items = [data.join_response(data.render_chat(processor, ex), r, lp) for ex, r, lp in zip(exs[:4], resp, rollout_lp)]
    b = data.collate(items, 0)
    assert torch.equal(b["rollout_logprobs"][b["labels"] != -100], torch.tensor(sum(rollout_lp, [])))
    ref = M.load_policy("tiny", processor, dist1, seed=5)
    with torch.no_grad():
        logq = torch.log_softmax(ref(**M.model_inputs(b, "cpu")).logits.float()[:, :-1] / 0.7, -1)
    lp = logq.gather(-1, b["input_ids"][:, 1:, None]).squeeze(-1)
    ent = -(logq.exp() * logq).sum(-1)
    mask = (b["labels"][:, 1:] != -100).float()
    d = lp - b["rollout_logprobs"][:, 1:]
    want_k3 = (((d.exp() - d - 1) * mask).sum() / mask.sum()).item()
    policy = M.shard(M.LogProbs(M.load_policy("tiny", processor, dist1, seed=5), temperature=0.7), dist1)
    cfg = rl.UpdateConfig("grpo", 0.2, 0.2, 3.0, micro_batch=2, pack=pack)
    up = rl.update_policy(policy, torch.optim.SGD(policy.parameters(), lr=0.0), items, [1.0, -1.0, 0.5, 0.0], items[0],
                          cfg, 0.0, 0, dist1)
    assert up["entropy"] == pytest.approx(((ent * mask).sum() / mask.sum()).item(), rel=1e-5)
    assert up["rollout_k3"] == pytest.approx(want_k3, rel=1e-5)
    assert up["clip_frac"] == 0 and up["clip_frac_lower"] == 0  # on-policy: ratio 1, no clip binds


def test_rl_logs_truncation_and_flat_groups(world, tiny_dirs, tmp_path):
    """The random-weight tiny policy never ends a response within 8 tokens nor writes the format: every rollout is cut and
    every group's rewards are all 0. tests/patched.py's scripted policy ends every response and mixes valid (0.2 / 1.0)
    with invalid (0.0) rows in every group: nothing cut, no flat group."""
    for env, cut, flat in (({}, 1.0, 1.0), (MIXED, 0.0, 0.0)):
        out = str(tmp_path / f"rl{cut}")
        run("rl.py", *rl_args(world, tiny_dirs[0], out, steps=1, save_every=0, max_new_tokens=8), env=env)
        rec = [m for m in metrics(out) if "truncated" in m][0]
        assert (rec["truncated"], rec["zero_var_groups"]) == (cut, flat)
        assert rec["entropy"] > 0 and math.isfinite(rec["rollout_k3"]) and "clip_frac_lower" in rec
