"""align.py's advantage and discriminator loss against hand-worked values; the policy update at ratio 1 is REINFORCE;
the discriminator: upcycling, released layout, segment framing, hard routing, text-only."""

import json
import math
import os

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file

import align
import data
import model as M
import rl


@pytest.fixture(scope="module")
def dist1():
    if not dist.is_initialized():
        M.init_dist()
    return torch.device("cpu")


# -----------------------------------------------------------------------------
# advantages

def gn(xs):
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return [(x - m) / (sd + 1e-6) for x in xs]


def test_alignment_advantages_hand_worked():
    nan = float("nan")
    cap = torch.tensor([1.0, 3.0, nan, 2.0, 5.0, 5.0, 5.0, 5.0])
    cot = torch.tensor([0.0, 0.0, 7.0, 1.0, 1.0, 2.0, 3.0, 4.0])  # row 2's cot score is ignored: the row is invalid
    valid = torch.tensor([True, True, False, True, False, False, False, False])
    a = align.alignment_advantages(cap, cot, valid, 4)
    # group 1: invalid replaced by (lowest valid score - 1) per channel: cap 1 - 1 = 0, cot 0 - 1 = -1
    want = [0.5 * c + 0.5 * t for c, t in zip(gn([1, 3, 0, 2]), gn([0, 0, -1, 1]))]
    want[2] -= 1.5  # the format penalty
    # group 2: nothing valid -> every score becomes 0 - 1, all equal -> GN 0, only the penalty is left
    want += [-1.5] * 4
    torch.testing.assert_close(a, torch.tensor(want), atol=1e-5, rtol=1e-5)


def test_alignment_advantages_alpha_group_of_one_and_nan():
    cap, cot = torch.tensor([2.0, 1.0, 0.0, 4.0]), torch.tensor([1.0, 5.0, 2.0, -2.0])
    valid = torch.ones(4, dtype=torch.bool)
    a1 = align.alignment_advantages(cap, cot, valid, 4, alpha=1.0)
    torch.testing.assert_close(a1, torch.tensor(gn([2, 1, 0, 4])), atol=1e-5, rtol=1e-5)
    a3 = align.alignment_advantages(cap, cot, valid, 4, alpha=0.3, format_penalty=0.0)
    want = [0.3 * c + 0.7 * t for c, t in zip(gn([2, 1, 0, 4]), gn([1, 5, 2, -2]))]
    torch.testing.assert_close(a3, torch.tensor(want), atol=1e-5, rtol=1e-5)
    # groups of one: mean 0, std 1, so the advantage is the (replaced) score itself
    one = align.alignment_advantages(torch.tensor([3.0, 9.0]), torch.tensor([1.0, 9.0]), torch.tensor([True, False]), 1)
    torch.testing.assert_close(one, torch.tensor([2.0, -1.0 - 1.5]))
    # a NaN score on a valid row is replaced like an invalid one (no penalty) and does not poison the group
    cap_nan = torch.tensor([2.0, float("nan"), 0.0, 4.0])
    an = align.alignment_advantages(cap_nan, cot, valid, 4, alpha=1.0)
    assert torch.isfinite(an).all()
    torch.testing.assert_close(an, torch.tensor(gn([2, -1, 0, 4])), atol=1e-5, rtol=1e-5)


# -----------------------------------------------------------------------------
# discriminator loss

def test_discriminator_loss_values_and_grads():
    g = torch.Generator().manual_seed(0)
    sc = [torch.randn(6, generator=g, dtype=torch.float64).requires_grad_(True) for _ in range(4)]
    valid = torch.tensor([True, False, True, True, False, True])
    loss, m = align.discriminator_loss(*sc, valid, score_reg=1e-3)
    grads = torch.autograd.grad(loss, sc)
    # independent: python floats, log(1 + exp(-x)) and its derivative by hand
    tc, s_c, tt, st = [x.detach().tolist() for x in sc]
    rows = [i for i in range(6) if valid[i]]
    sp = lambda x: math.log1p(math.exp(-x))  # noqa: E731  -log sigmoid(x)
    n = len(rows)
    want = sum(sp(tc[i] - s_c[i]) + sp(tt[i] - st[i]) for i in rows) / n
    want += 1e-3 * sum(tc[i] ** 2 + s_c[i] ** 2 + tt[i] ** 2 + st[i] ** 2 for i in rows) / (4 * n)
    assert loss.item() == pytest.approx(want, rel=1e-12)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    for i in range(6):
        if not valid[i]:
            assert all(gr[i] == 0 for gr in grads)
            continue
        assert grads[0][i].item() == pytest.approx(-(1 - sig(tc[i] - s_c[i])) / n + 2e-3 * tc[i] / (4 * n))
        assert grads[1][i].item() == pytest.approx((1 - sig(tc[i] - s_c[i])) / n + 2e-3 * s_c[i] / (4 * n))
        assert grads[3][i].item() == pytest.approx((1 - sig(tt[i] - st[i])) / n + 2e-3 * st[i] / (4 * n))
    assert m["pairs"] == 4 and m["cap_acc"] == pytest.approx(sum(tc[i] > s_c[i] for i in rows) / n)
    # a global denominator divides the same sums
    loss2, _ = align.discriminator_loss(*sc, valid, score_reg=1e-3, denom=8)
    assert loss2.item() == pytest.approx(want * n / 8)


def test_discriminator_loss_fallback():
    tcap, tcot = torch.tensor([1.0, 3.0], requires_grad=True), torch.tensor([-2.0, 0.0], requires_grad=True)
    loss, m = align.discriminator_loss(tcap, tcap * 0, tcot, tcot * 0, torch.zeros(2, dtype=torch.bool))
    want = 0.01 * (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(1.0)))  # means 2 and -1
    assert loss.item() == pytest.approx(want) and m["pairs"] == 0
    loss.backward()
    assert tcap.grad.abs().sum() > 0 and tcot.grad.abs().sum() > 0


# -----------------------------------------------------------------------------
# the policy update with one mini-batch and one epoch is REINFORCE with the advantages

@pytest.mark.parametrize("micro_batch,token_cap", [(3, 0), (1, 0), (4, 2)])
def test_on_policy_update_is_reinforce(dist1, world, processor, micro_batch, token_cap):
    # any micro-batching (length-sorted, capped by sequences or by padded tokens) gives the same update
    exs, _ = data.read_examples(os.path.join(world[0], "eval.parquet"), "prompt")
    g = torch.Generator().manual_seed(0)
    items = [M.join_response(data.render_chat(processor, ex), torch.randint(20, 300, (n,), generator=g).tolist())
             for ex, n in zip(exs[:4], (5, 9, 3, 7))]
    adv = [1.3, -0.4, 0.0, -2.1]
    ref = M.load_policy("tiny", processor, dist1, seed=5)
    # independent: -(sum_i A_i sum_t logp_it) / N_tokens through the full-vocabulary logits of an unsharded copy
    b = data.collate(items, 0)
    logits = ref(**M.model_inputs(b, "cpu")).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, b["input_ids"][:, 1:, None]).squeeze(-1)
    mask = (b["labels"][:, 1:] != -100).float()
    (-(torch.tensor(adv)[:, None] * lp * mask).sum() / mask.sum()).backward()
    want = {n: p.grad.clone() for n, p in ref.named_parameters()}
    policy = M.shard(M.LogProbs(M.load_policy("tiny", processor, dist1, seed=5)), dist1)
    before = {n.removeprefix("hf."): p.detach().full_tensor().clone() for n, p in policy.named_parameters()}
    opt = torch.optim.SGD(policy.parameters(), lr=1.0)  # one SGD step of lr 1: the parameter change is minus the gradient
    rl.update_policy(policy, opt, items, adv, items[0], 0, dist1, algo="grpo", clip_low=0.2, clip_high=0.2, clip_c=3.0,
                     mini_batches=1, epochs=1, micro_batch=micro_batch, grad_clip=1e9, lr=1.0,
                     micro_tokens=token_cap * max(len(it["input_ids"]) for it in items))
    for n, p in policy.named_parameters():
        n = n.removeprefix("hf.")
        torch.testing.assert_close(before[n] - p.detach().full_tensor(), want[n], atol=2e-6, rtol=1e-4)


# -----------------------------------------------------------------------------
# the discriminator

@pytest.fixture(scope="module")
def dense(world, processor):
    return M.load_policy("tiny", processor, torch.device("cpu"), seed=7).eval()


def test_upcycling_with_zero_noise_reproduces_the_dense_logits(world, processor, dense):
    exs, _ = data.read_examples(os.path.join(world[0], "align.parquet"), "prompt")
    b = data.collate([data.render_chat(processor, ex, ex.teacher_caption) for ex in exs[:3]], 0)
    moe = M.upcycle(dense, num_experts=4, top_k=2, noise_std=0.0).eval()
    assert type(moe).__name__ == "Qwen3VLMoeForConditionalGeneration"
    with torch.no_grad():
        a, c = dense(**M.model_inputs(b, "cpu")).logits, moe(**M.model_inputs(b, "cpu")).logits
    torch.testing.assert_close(c, a, atol=2e-5, rtol=1e-5)
    noisy = M.upcycle(dense, num_experts=4, top_k=2, noise_std=0.01).eval()
    with torch.no_grad():
        assert (noisy(**M.model_inputs(b, "cpu")).logits - a).abs().max() > 1e-3  # the noise is really there
    e = noisy.model.language_model.layers[0].mlp.experts.gate_up_proj
    assert not torch.equal(e[0], e[1])


def test_released_layout_loads_and_scores_at_the_last_token(world, processor, dense, tmp_path):
    """A tiny MoE discriminator written by hand in the released layout (model.* + score.weight, architectures
    Qwen3VLMoeForTokenClassification) loads with Discriminator.from_pretrained; its score is the head at the segment's
    end-of-turn token, the same batched-and-padded as alone."""
    moe = M.upcycle(dense, 4, 2, 0.01)
    torch.manual_seed(0)
    sd = {f"model.{k.removeprefix('model.')}": v.contiguous() for k, v in moe.state_dict().items() if k.startswith("model.")}
    sd["score.weight"] = torch.randn(1, 128) * 0.1
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    cfg = moe.config.to_dict()
    cfg["architectures"] = ["Qwen3VLMoeForTokenClassification"]
    cfg["num_labels"] = 1
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    disc = M.Discriminator.from_pretrained(str(tmp_path)).eval()
    torch.testing.assert_close(disc.score.weight, sd["score.weight"])
    exs, _ = data.read_examples(os.path.join(world[0], "align.parquet"), "prompt")
    segs = [exs[0].teacher_caption, exs[1].teacher_cot]
    with torch.no_grad():
        got, _, _ = align.score_segments(disc, processor, exs[:2], segs, ["cap", "cot"], "cpu", pad=(exs[0], segs[0]),
                                         max_pixels=10 ** 6)
        for i in range(2):  # manual: one example, no padding, head at the final (<|im_end|>) token
            it = data.render_chat(processor, exs[i], segs[i])
            assert processor.tokenizer.convert_ids_to_tokens(int(it["input_ids"][-1])) == "<|im_end|>"
            h = disc.model(**M.model_inputs(data.collate([it], 0), "cpu")).last_hidden_state[0, -1]
            assert got[i].item() == pytest.approx((h @ sd["score.weight"][0]).item(), abs=1e-5)
    # and a model saved by save_hf loads back identically
    out = tmp_path / "again"
    out.mkdir()
    if not dist.is_initialized():
        M.init_dist()
    M.save_hf(disc, processor, str(out), {})
    again = M.load_discriminator(str(out), processor, torch.device("cpu")).eval()
    for (n, p), (_, q) in zip(disc.state_dict().items(), again.state_dict().items()):
        torch.testing.assert_close(q, p.to(torch.bfloat16).float(), msg=n)


def test_dense_discriminator_round_trips(processor, dense, tmp_path):
    """The 1-expert ablation: a Discriminator over a dense Qwen3-VL trunk saves and loads back (a dense trunk has no
    experts implementation to set)."""
    disc = M.Discriminator(dense.config)
    disc.model.load_state_dict(dense.model.state_dict())
    if not dist.is_initialized():
        M.init_dist()
    M.save_hf(disc, processor, str(tmp_path), {})
    again = M.load_discriminator(str(tmp_path), processor, torch.device("cpu"))
    assert type(again.model).__name__ == "Qwen3VLModel"
    for (n, p), (_, q) in zip(disc.state_dict().items(), again.state_dict().items()):
        torch.testing.assert_close(q, p.to(torch.bfloat16).float(), msg=n)


def test_hard_routing_obeys_the_segment_mask(world, processor, dense):
    moe = M.upcycle(dense, 4, 2, 0.01)
    disc = M.Discriminator(moe.config)
    disc.model.load_state_dict(moe.model.state_dict())
    disc.eval()
    chosen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: chosen.append(out[2].clone()))
             for m in disc.modules() if isinstance(m, M.MaskedRouter)]
    assert len(hooks) == 4
    exs, _ = data.read_examples(os.path.join(world[0], "align.parquet"), "prompt")
    segs = [exs[0].teacher_caption, exs[0].teacher_cot]
    with torch.no_grad():
        align.score_segments(disc, processor, [exs[0]] * 2, segs, ["cap", "cot"], "cpu", pad=(exs[0], segs[0]),
                             max_pixels=10 ** 6, routing=True)
    T = max(len(data.render_chat(processor, exs[0], s)["input_ids"]) for s in segs)
    for idx in chosen:  # (B*T, k): row-major over (sequence, token)
        assert (idx[:T] < 2).all() and (idx[T:] >= 2).all()
    chosen.clear()
    with torch.no_grad():  # learned routing (no mask) uses both halves somewhere
        align.score_segments(disc, processor, [exs[0]] * 2, segs, ["cap", "cot"], "cpu", pad=(exs[0], segs[0]),
                             max_pixels=10 ** 6)
    allidx = torch.cat(chosen)
    assert (allidx < 2).any() and (allidx >= 2).any()


def test_text_only_passes_no_pixels(world, processor, dense):
    disc = M.Discriminator(M.upcycle(dense, 2, 1, 0.0).config).eval()
    calls = []
    disc.model.visual.register_forward_hook(lambda *a: calls.append(1))
    exs, _ = data.read_examples(os.path.join(world[0], "align.parquet"), "prompt")
    seg = exs[0].teacher_caption
    with torch.no_grad():
        align.score_segments(disc, processor, [exs[0]], [seg], ["cap"], "cpu", pad=(exs[0], seg), max_pixels=10 ** 6,
                             text_only=True)
        assert calls == []
        align.score_segments(disc, processor, [exs[0]], [seg], ["cap"], "cpu", pad=(exs[0], seg), max_pixels=10 ** 6)
        assert calls == [1]
    it = data.render_chat(processor, exs[0], seg, with_images=False)
    assert "pixel_values" not in it and processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") not in it["input_ids"]


# -----------------------------------------------------------------------------
# the game under data parallelism: ranks whose rollouts are all invalid must not hang the others

@pytest.mark.parametrize("mode", ["rank0-valid", "none-valid"])
def test_two_process_game_with_invalid_ranks(world, tiny_dirs, tmp_path, mode):
    from helpers import ENV, ROOT, metrics
    import subprocess
    import sys
    policy, disc = tiny_dirs
    out = str(tmp_path / "align")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "patched.py"), "align.py", "--policy", policy, "--disc", disc,
           "--data", os.path.join(world[0], "align.parquet"), "--out", out, "--prompts", "2", "--group-size", "3",
           "--steps", "2", "--max-new-tokens", "16", "--lr", "1e-4", "--disc-lr", "1e-4", "--disc-micro", "4",
           "--micro-batch", "2"]
    r = subprocess.run(cmd, cwd=ROOT, env={**ENV, "PATCH_GENERATE": mode}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    recs = [m for m in metrics(out) if "valid" in m]
    assert len(recs) == 2
    for m in recs:
        assert m["valid"] == (0.5 if mode == "rank0-valid" else 0.0)
        assert math.isfinite(m["d_loss"])
        if mode == "none-valid":  # the fallback loss ran: no pair accuracy
            assert math.isnan(m["cap_acc"])
    assert os.path.isfile(os.path.join(out, "disc", "model.safetensors"))
    assert os.path.isfile(os.path.join(out, "model.safetensors"))


def test_warmup_reaches_held_out_pair_accuracy(tmp_path):
    """python model.py init + align.py --warmup-only --disc upcycle:... on the synthetic warm-up pairs: the discriminator
    ranks the teacher above the broad-style student on >= 90% of held-out pairs, in both channels."""
    from helpers import script
    world = str(tmp_path / "w")
    data.make_synthetic(world, seed=3, n_sft=8, n_align=8, n_rl=8, n_eval=8, n_hard=8, n_warmup=128)
    script("model.py", "init", "--config", "tiny", "--processor", world + "/processor", "--out", str(tmp_path / "p"))
    out = str(tmp_path / "disc")
    script("align.py", "--warmup-only", "--disc", f"upcycle:{tmp_path / 'p'}", "--warmup-data", world + "/warmup.jsonl",
           "--out", out, "--warmup-batch", "16", "--warmup-epochs", "1", "--warmup-val", "32", "--warmup-lr", "1e-3",
           "--disc-micro", "64")
    val = json.load(open(os.path.join(out, "run_config.json")))["val"]
    assert val["cap_acc"] >= 0.9 and val["cot_acc"] >= 0.9, val
    assert M.Discriminator.from_pretrained(out).config.text_config.num_experts == 4
