"""rl.py's losses and advantages against independent, element-by-element implementations of the formulas."""

import math

import pytest
import torch

import rl


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


def test_dynamic_sampling_keeps_only_mixed_groups():
    r = torch.tensor([1.0, 1.0, 1.0, 0.2, 0.0, 0.0, 0.2, 0.2, 0.2, 0.0, 1.0, 0.2])
    assert rl.keep_mixed_groups(r, 3).tolist() == [False, True, False, True]


@pytest.mark.parametrize("length,expected", [(0, 0.0), (4096, 0.0), (6144, -0.5), (8191, -(4095 / 4096)), (8192, -1.0),
                                             (4097, -1 / 4096)])
def test_overlong_penalty_at_the_buffer_edges(length, expected):
    assert rl.overlong_penalty(length, 8192, 4096, 1.0) == pytest.approx(expected)
    assert rl.overlong_penalty(length, 8192, 4096, 0.5) == pytest.approx(expected * 0.5)
    assert math.isclose(rl.overlong_penalty(length, 8192, 0, 1.0), 0.0)
