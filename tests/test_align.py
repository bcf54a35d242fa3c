"""align.py: the advantage and the discriminator loss against hand-worked values; the policy update at ratio 1 is
REINFORCE; the discriminator (upcycling, released layout, segment framing, hard routing, text-only); the game under torchrun."""

import json
import math
import os
import shutil

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import save_file

import align
import data
import model as M
import rl
from helpers import MIXED, align_args, assert_same_params, check_two_equal_one_and_resume, checkpoint_params, last_checkpoint, \
    metrics, run

# -----------------------------------------------------------------------------
# advantages and the discriminator loss


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


def test_discriminator_loss_values_and_grads():
    g = torch.Generator().manual_seed(0)
    sc = [(3 * torch.randn(6, generator=g, dtype=torch.float64)).requires_grad_(True) for _ in range(4)]
    with torch.no_grad():
        sc[0][0], sc[1][2] = 14.0, -12.0  # beyond the clip: clamped, no gradient
    valid = torch.tensor([True, False, True, True, False, True])
    loss, m = align.discriminator_loss(*sc, valid, score_reg=1e-3, clip=10.0)
    grads = torch.autograd.grad(loss, sc)
    # independent: python floats, the clamp, log(1 + exp(-x)) and its derivative by hand
    tc, s_c, tt, st = [[max(-10.0, min(10.0, v)) for v in x.detach().tolist()] for x in sc]
    rows = [i for i in range(6) if valid[i]]
    sp = lambda x: math.log1p(math.exp(-x))  # noqa: E731  -log sigmoid(x)
    n, B = len(rows), 6
    want = sum(sp(tc[i] - s_c[i]) + sp(tt[i] - st[i]) for i in rows) / n
    # the regulariser: teacher scores over every row, student scores over the valid rows, mean over the four sets
    want += 1e-3 * (sum(x ** 2 for x in tc) / B + sum(s_c[i] ** 2 for i in rows) / n + sum(x ** 2 for x in tt) / B
                    + sum(st[i] ** 2 for i in rows) / n) / 4
    assert loss.item() == pytest.approx(want, rel=1e-12)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert grads[0][0] == 0 and grads[1][2] == 0  # clamped scores get no gradient
    for i in range(6):
        if not valid[i]:  # the teacher's regulariser still reaches an invalid row; the student's scores are ignored
            assert grads[0][i].item() == pytest.approx(2e-3 * tc[i] / (4 * B)) and grads[1][i] == 0 and grads[3][i] == 0
            continue
        if i != 0:
            assert grads[0][i].item() == pytest.approx(-(1 - sig(tc[i] - s_c[i])) / n + 2e-3 * tc[i] / (4 * B))
        if i != 2:
            assert grads[1][i].item() == pytest.approx((1 - sig(tc[i] - s_c[i])) / n + 2e-3 * s_c[i] / (4 * n))
        assert grads[3][i].item() == pytest.approx((1 - sig(tt[i] - st[i])) / n + 2e-3 * st[i] / (4 * n))
    assert m["pairs"] == 4 and m["cap_acc"] == pytest.approx(sum(tc[i] > s_c[i] for i in rows) / n)


def test_discriminator_loss_fallback():
    tcap, tcot = torch.tensor([1.0, 3.0], requires_grad=True), torch.tensor([-2.0, 0.0], requires_grad=True)
    loss, m = align.discriminator_loss(tcap, tcap * 0, tcot, tcot * 0, torch.zeros(2, dtype=torch.bool))
    want = 0.01 * (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(1.0)))  # means 2 and -1
    want += 1e-3 * ((1 + 9) / 2 + (4 + 0) / 2) / 4  # the regulariser's teacher terms, as the release adds them
    assert loss.item() == pytest.approx(want) and m["pairs"] == 0
    loss.backward()
    assert tcap.grad.abs().sum() > 0 and tcot.grad.abs().sum() > 0


def test_discriminator_step_is_the_loss_over_the_whole_batch(dist1, world, processor, dense):
    """discriminator_step's micro-batched pieces (teacher scored once per prompt, students one pair per forward, a
    detached teacher copy) give the gradient of discriminator_loss over the whole batch scored in one pass: two prompts,
    five rollouts, two of them invalid, scores scaled so that some pass the clip."""
    exs, _ = data.read_examples(os.path.join(world[0], "align.parquet"), "prompt")
    prompts = exs[:2]
    segs = lambda k: (exs[k].teacher_caption.replace("row", "a row"), exs[k].teacher_cot[:40])  # noqa: E731  a student
    rollouts = [align.Rollout(0, [1], segs(2), 30), align.Rollout(0, [1], None, 20), align.Rollout(0, [1], segs(3), 40),
                align.Rollout(1, [1], segs(4), 10), align.Rollout(1, [1], None, 50)]
    discs = []
    for _ in range(2):
        d = M.Discriminator(dense.config)
        d.model.load_state_dict(dense.model.state_dict())
        torch.manual_seed(3)
        torch.nn.init.normal_(d.score.weight, std=40.0)  # large scores: some beyond +-10
        d.dropout.p = 0.0
        discs.append(d)
    framing = align.Framing(processor, max_pixels=10 ** 6, micro=2)  # one pair (two sequences) per forward
    # reference: every segment in one pass, the loss formula, one backward
    ref = discs[0]
    seq = lambda ex, s, c: align.Seq(ex, s, c)  # noqa: E731
    whole = align.Framing(processor, max_pixels=10 ** 6, micro=64)
    t = align.score_segments(ref, whole, [seq(ex, s, c) for ex in prompts for s, c in
                             zip(align.teacher_segments(ex, "split"), ("cap", "cot"))], "cpu", None, grad=True)[0].view(2, 2)
    st = align.score_segments(ref, whole, [seq(prompts[r.prompt], s, c) for r in rollouts
                              if r.segments for s, c in zip(r.segments, ("cap", "cot"))], "cpu", None, grad=True)[0].view(3, 2)
    assert (t.abs() > 10).any() or (st.abs() > 10).any()  # the clip acts somewhere
    student = torch.zeros(5, 2, dtype=st.dtype)
    student[[0, 2, 3]] = st
    trow = t[[r.prompt for r in rollouts]]
    valid = torch.tensor([r.segments is not None for r in rollouts])
    loss, _ = align.discriminator_loss(trow[:, 0], student[:, 0], trow[:, 1], student[:, 1], valid, 1e-3, 10.0)
    loss.backward()
    want = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}
    d = discs[1]
    before = {n: p.detach().clone() for n, p in d.named_parameters()}
    m = align.discriminator_step(d, torch.optim.SGD(d.parameters(), lr=1.0), framing, prompts, rollouts, "split", dist1,
                                 score_reg=1e-3, score_clip=10.0, grad_clip=1e9, micro_tokens=0)
    assert m["d_loss"] == pytest.approx(loss.item(), rel=1e-5)
    for n, p in d.named_parameters():
        torch.testing.assert_close(before[n] - p.detach(), want.get(n, torch.zeros_like(p)), atol=1e-6, rtol=1e-4, msg=n)


@pytest.mark.parametrize("micro_batch,token_cap", [(3, 0), (1, 0), (4, 2)])


def test_on_policy_update_is_reinforce(dist1, world, processor, micro_batch, token_cap):
    # any micro-batching (length-sorted, capped by sequences or by padded tokens) gives the same update
    exs, _ = data.read_examples(os.path.join(world[0], "eval.parquet"), "prompt")
    g = torch.Generator().manual_seed(0)
    items = [data.join_response(data.render_chat(processor, ex), torch.randint(20, 300, (n,), generator=g).tolist())
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
    cfg = rl.UpdateConfig("grpo", 0.2, 0.2, 3.0, micro_batch=micro_batch, grad_clip=1e9,
                          micro_tokens=token_cap * max(len(it["input_ids"]) for it in items))
    rl.update_policy(policy, opt, items, adv, items[0], cfg, 1.0, 0, dist1)
    for n, p in policy.named_parameters():
        n = n.removeprefix("hf.")
        torch.testing.assert_close(before[n] - p.detach().full_tensor(), want[n], atol=2e-6, rtol=1e-4)

# -----------------------------------------------------------------------------
# the discriminator and its framing


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


def test_a_built_in_discriminator_is_upcycled_on_the_device_its_policy_was_built_on(processor):
    """load_policy builds a built-in config on the run's device (a GPU): the upcycled experts, routers and the
    discriminator are made there too (a GPU run once failed mixing them with host tensors). The meta device stands in for
    the GPU: a host tensor anywhere raises."""
    disc = M.load_discriminator("upcycle:tiny", processor, torch.device("meta"), experts=4, noise=0.01)
    assert {p.device.type for p in disc.parameters()} == {"meta"}
    cpu = M.load_discriminator("upcycle:tiny", processor, torch.device("cpu"), experts=4, noise=0.01)
    assert cpu.score.weight.std() > 0.01 and torch.isfinite(torch.cat([p.flatten() for p in cpu.parameters()])).all()


def test_released_layout_loads_and_scores_at_the_last_token(dist1, world, processor, dense, tmp_path):
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
        seqs = [align.Seq(exs[0], segs[0], "cap"), align.Seq(exs[1], segs[1], "cot")]
        got, _, _ = align.score_segments(disc, align.Framing(processor, max_pixels=10 ** 6), seqs, "cpu", seqs[0])
        for i in range(2):  # manual: one example, no padding, head at the final token (the newline after <|im_end|>)
            it = data.render_segment(processor, exs[i], segs[i], max_pixels=10 ** 6)
            assert processor.tokenizer.convert_ids_to_tokens(int(it["input_ids"][-2])) == "<|im_end|>"
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


def release_checkpoint(trunk, path, head, bias=False):  # trunk: a Qwen3VL(Moe)ForConditionalGeneration
    """A discriminator directory in the release's warm-up layout, written by hand as transformers 4.57 saves it (bf16):
    the trunk's tensors with the experts in 4.57's orientation (gate_up_proj (E, H, 2I), down_proj (E, I, H); the tiny
    config has H = 128 != 2I = 768, so a missed or wrong transpose cannot pass), a 4.57-style config.json (rope_scaling,
    dtype), and the head merged as v_head.1.* ("merged"), only in value_head.pt as v_head.summary.* ("pt"), or nowhere.
    Returns (the stored trunk tensors in this transformers' orientation, the head's tensors)."""
    os.makedirs(path, exist_ok=True)
    ours = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in trunk.state_dict().items() if k.startswith("model.")}
    sd = {k: v.transpose(1, 2).contiguous() if k.endswith(("experts.gate_up_proj", "experts.down_proj")) else v
          for k, v in ours.items()}
    g = torch.Generator().manual_seed(11)
    h = {"weight": (torch.randn(1, 128, generator=g) * 0.1).to(torch.bfloat16)}
    if bias:
        h["bias"] = torch.randn(1, generator=g).to(torch.bfloat16)
    if head == "merged":
        sd.update({f"v_head.1.{k}": v for k, v in h.items()})
    if head == "pt":
        torch.save({f"v_head.summary.{k}": v for k, v in h.items()}, os.path.join(path, "value_head.pt"))
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    cfg = trunk.config.to_dict()
    tc = cfg["text_config"]
    rope = tc.pop("rope_parameters")
    tc["rope_theta"], tc["rope_scaling"] = rope.pop("rope_theta"), rope  # 4.57 names them so
    cfg.update(architectures=[type(trunk).__name__], dtype="bfloat16",
               transformers_version="4.57.0")
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    return ours, h


@pytest.mark.parametrize("head", ["merged", "pt"])
def test_release_layouts_load_with_their_trained_head(dist1, processor, dense, tmp_path, head):
    moe = M.upcycle(dense, 4, 2, 0.01)
    ours, h = release_checkpoint(moe, str(tmp_path), head)
    disc = M.load_discriminator(str(tmp_path), processor, torch.device("cpu"))
    torch.testing.assert_close(disc.score.weight, h["weight"].float(), atol=0, rtol=0)
    assert disc.score.bias is None and disc.head_source.startswith("v_head.")
    got = disc.model.state_dict()
    assert len(ours) > 50 and sum(".experts." in k or ".mlp.gate." in k for k in ours) == 3 * 4  # 4 layers x 3 tensors
    for k, v in ours.items():  # every expert and router tensor (and every other one) equals its source
        torch.testing.assert_close(got[k.removeprefix("model.")], v.float(), atol=0, rtol=0, msg=k)


def test_a_checkpoint_without_a_score_head_is_refused(dist1, processor, dense, tmp_path):
    release_checkpoint(M.upcycle(dense, 4, 2, 0.01), str(tmp_path), None)
    with pytest.raises(SystemExit, match=r"no score head: .*model\.language_model\.\* .*--disc-fresh-head"):
        M.load_discriminator(str(tmp_path), processor, torch.device("cpu"))
    assert M.load_discriminator(str(tmp_path), processor, torch.device("cpu"), fresh_head=True).head_source is None


def test_the_dense_release_head_has_a_bias(dist1, processor, dense, tmp_path):
    _, h = release_checkpoint(dense, str(tmp_path), "pt", bias=True)  # moe/dense_model/value_head.py
    disc = M.load_discriminator(str(tmp_path), processor, torch.device("cpu"))
    torch.testing.assert_close(disc.score.bias, h["bias"].float(), atol=0, rtol=0)
    torch.testing.assert_close(disc.score.weight, h["weight"].float(), atol=0, rtol=0)


def test_export_to_the_release_layout_round_trips(dist1, processor, dense, tmp_path):
    disc = M.Discriminator(M.upcycle(dense, 4, 2, 0.01).config)
    disc.model.load_state_dict(M.upcycle(dense, 4, 2, 0.01).model.state_dict())
    M.export_release(disc, processor, str(tmp_path))
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "v_head.1.weight" in f.keys() and "score.weight" not in f.keys()
        assert tuple(f.get_tensor("model.language_model.layers.0.mlp.experts.gate_up_proj").shape) == (4, 128, 768)  # 4.57's
    assert set(torch.load(tmp_path / "value_head.pt", weights_only=True)) == {"v_head.summary.weight"}
    again = M.load_discriminator(str(tmp_path), processor, torch.device("cpu"))
    for (n, p), (_, q) in zip(disc.state_dict().items(), again.state_dict().items()):
        torch.testing.assert_close(q, p.to(torch.bfloat16).float(), atol=0, rtol=0, msg=n)


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


def test_hard_routing_obeys_the_segment_mask(dist1, world, processor, dense):
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
    seqs = [align.Seq(exs[0], segs[0], "cap"), align.Seq(exs[0], segs[1], "cot")]
    with torch.no_grad():
        align.score_segments(disc, align.Framing(processor, max_pixels=10 ** 6, routing=True), seqs, "cpu", seqs[0])
    T = max(len(data.render_segment(processor, exs[0], s, max_pixels=10 ** 6)["input_ids"]) for s in segs)
    for idx in chosen:  # (B*T, k): row-major over (sequence, token)
        assert (idx[:T] < 2).all() and (idx[T:] >= 2).all()
    chosen.clear()
    with torch.no_grad():  # learned routing (no mask) uses both halves somewhere
        align.score_segments(disc, align.Framing(processor, max_pixels=10 ** 6), seqs, "cpu", seqs[0])
    allidx = torch.cat(chosen)
    assert (allidx < 2).any() and (allidx >= 2).any()


def test_text_only_passes_no_pixels(dist1, world, processor, dense):
    disc = M.Discriminator(M.upcycle(dense, 2, 1, 0.0).config).eval()
    calls = []
    disc.model.visual.register_forward_hook(lambda *a: calls.append(1))
    exs, _ = data.read_examples(os.path.join(world[0], "align.parquet"), "prompt")
    seg = exs[0].teacher_caption
    with torch.no_grad():
        seqs = [align.Seq(exs[0], seg, "cap")]
        align.score_segments(disc, align.Framing(processor, max_pixels=10 ** 6, text_only=True), seqs, "cpu", seqs[0])
        assert calls == []
        align.score_segments(disc, align.Framing(processor, max_pixels=10 ** 6), seqs, "cpu", seqs[0])
        assert calls == [1]
    it = data.render_segment(processor, exs[0], seg, with_images=False)
    assert "pixel_values" not in it and processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") not in it["input_ids"]

# -----------------------------------------------------------------------------
# the game under torchrun: 2 processes == 1, kill + resume, invalid ranks, faults


def test_two_processes_equal_one_and_kill_resume_is_bitwise(world, tiny_dirs, tmp_path):
    # the discriminator too: Adam moves even a rounding-level gradient by up to ~lr (1e-4) per step, hence its 3e-5 over
    # 4 steps (the resumed run must still equal the uninterrupted one bitwise)
    check_two_equal_one_and_resume("align.py", lambda out: align_args(world, *tiny_dirs, out), tmp_path,
                                   {"policy.model.": 2e-6, "disc.": 3e-5})


def test_a_group_split_over_two_processes_equals_one_process(world, tiny_dirs, tmp_path):
    """align.py with fewer prompts than processes (the paper's 4 prompts on 8 GPUs): one prompt's 4 rollouts over 2 ranks.
    The advantage gathers the group's scores from both; weights and logged scores equal the 1-process run's."""
    policy, disc = tiny_dirs
    env = {**MIXED, "PATCH_NO_DROPOUT": "1", "PATCH_GROUP": "4"}
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    for out, n in ((one, 1), (two, 2)):
        run("align.py", *align_args(world, policy, disc, out, prompts=1, steps=2, save_every=0), nproc=n, env=env)
    # 3e-5 for both models (a third of one step's lr): the rounding-level score differences of the split group pass through
    # the group normalisation into the advantages, and Adam moves a rounding-level gradient change by up to ~lr per step;
    # the logged scores and losses below are the sharper check
    for prefix in ("policy.model.", "disc."):
        assert_same_params(checkpoint_params(last_checkpoint(one), prefix), checkpoint_params(last_checkpoint(two), prefix),
                           atol=3e-5)
    m1, m2 = ([m for m in metrics(o) if "valid" in m] for o in (one, two))
    assert [m["valid"] for m in m1] == [m["valid"] for m in m2] == [0.5, 0.5]  # 2 of the 4 scripted rollouts are valid
    for a, b in zip(m1, m2):
        for k in ("student_cap", "student_cot", "teacher_cap", "d_loss"):
            assert abs(a[k] - b[k]) < 1e-4, k


def test_align_micro_batches_by_tokens_equal_one_micro_batch(world, tiny_dirs, tmp_path):
    """--micro-tokens caps the discriminator's update micro-batches too (the OOM of the 4-H100 alignment step): a cap of
    one token puts every pair (and every policy sequence) in its own forward; weights and scores equal the uncapped run's."""
    policy, disc = tiny_dirs
    env = {**MIXED, "PATCH_NO_DROPOUT": "1"}
    outs = [str(tmp_path / n) for n in ("whole", "capped")]
    for out, cap in zip(outs, (0, 1)):
        run("align.py", *align_args(world, policy, disc, out, steps=2, save_every=0, disc_micro=16, micro_tokens=cap),
            env=env)
    # 1e-5: a handful of the 2M weights move by a few 1e-6 (Adam's first steps turn rounding-level gradient differences
    # of the re-ordered sums into up to ~lr); the logged scores and losses below are the sharper check
    for prefix in ("policy.model.", "disc."):
        assert_same_params(*(checkpoint_params(last_checkpoint(o), prefix) for o in outs), atol=1e-5)
    m1, m2 = ([m for m in metrics(o) if "valid" in m] for o in outs)
    assert [m["valid"] for m in m1] == [m["valid"] for m in m2] and m1[0]["valid"] > 0
    for a, b in zip(m1, m2):
        for k in ("student_cap", "student_cot", "d_loss", "cap_acc"):
            assert abs(a[k] - b[k]) < 1e-4, k


def test_offload_leaves_the_game_bitwise_the_same(world, tiny_dirs, tmp_path):
    """align.py --offload (each model's shards and optimizer state on the host while the other one works, brought back for
    the checkpoint at step 2 and the final save): the same checkpoints and logged scores as the run without it."""
    policy, disc = tiny_dirs
    outs = [str(tmp_path / n) for n in ("plain", "offload")]
    for out, flag in zip(outs, ([], ["--offload"])):
        run("align.py", *align_args(world, policy, disc, out, steps=3, save_every=2), *flag, env={"PATCH_NO_DROPOUT": "1"})
    for prefix in ("policy.model.", "disc."):
        assert_same_params(*(checkpoint_params(last_checkpoint(o), prefix) for o in outs), atol=0)
    m1, m2 = (metrics(o) for o in outs)
    same = lambda x, y: x == y or (x != x and y != y)  # noqa: E731 (nan: a metric with nothing to measure)
    assert len(m1) == len(m2) == 3 and all(same(a[k], b[k]) for a, b in zip(m1, m2) for k in a if not k.startswith("t_"))


@pytest.mark.parametrize("mode", ["rank0-valid", "none-valid"])


def test_two_process_game_with_invalid_ranks(world, tiny_dirs, tmp_path, mode):
    out = str(tmp_path / "align")
    run("align.py", *align_args(world, *tiny_dirs, out, group_size=3, steps=2, save_every=0), nproc=2,
        env={"PATCH_GENERATE": mode})
    recs = [m for m in metrics(out) if "valid" in m]
    assert len(recs) == 2
    for m in recs:
        assert m["valid"] == (0.5 if mode == "rank0-valid" else 0.0)
        assert math.isfinite(m["d_loss"])
        if mode == "none-valid":  # the fallback loss ran: no pair accuracy
            assert math.isnan(m["cap_acc"])
    assert os.path.isfile(os.path.join(out, "disc", "model.safetensors"))
    assert os.path.isfile(os.path.join(out, "model.safetensors"))


def test_align_nan_in_the_discriminator_update_is_skipped_and_counted(world, tiny_dirs, tmp_path):
    out = str(tmp_path / "align")
    run("align.py", *align_args(world, *tiny_dirs, out, steps=2, save_every=0), nproc=2,
        env={**MIXED, "PATCH_NAN": "1:1"})  # the first clip_grad of the game: step 1's discriminator update
    recs = [m for m in metrics(out) if "valid" in m]
    assert [m["skipped_steps"] for m in recs] == [1, 1]
    assert json.load(open(os.path.join(out, "run_config.json")))["skipped_steps"] == 1


def test_wrong_configurations_are_refused(world, tiny_dirs, tmp_path):
    policy, disc = tiny_dirs
    # a discriminator whose image processor differs from the policy's
    other = tmp_path / "disc"
    shutil.copytree(disc, other)
    p = M.load_processor(str(other))
    p.image_processor.image_mean = [0.0, 0.0, 0.0]
    p.save_pretrained(str(other))
    r = run("align.py", *align_args(world, policy, str(other), str(tmp_path / "a")), check=False, timeout=120)
    assert r.returncode != 0 and "tokenizer or image processor differs from the policy's" in r.stdout + r.stderr
    # a world size that does not divide the step's rollouts
    r = run("align.py", *align_args(world, policy, disc, str(tmp_path / "a3"), prompts=1, group_size=3), nproc=2, check=False,
            timeout=120)
    assert r.returncode != 0 and "--prompts x --group-size (1 x 3) must be divisible by the world size 2" in r.stdout + r.stderr


def test_segments_are_framed_as_the_release_warmup_frames_them(dist1, world, processor, dense, tmp_path):
    """render_segment's ids equal processor.apply_chat_template(system, user [image, question], assistant = segment,
    add_generation_prompt=False) tokenised whole (the release's _build_messages); the text ends with <|im_end|> and the
    template's newline, and the score is read at that newline. A discriminator in the release's layout (its head as
    v_head.1.weight) is framed with the release's system prompt and 560-px images; ours with framing.json."""
    exs, _ = data.read_examples(os.path.join(world[0], "align.parquet"), "prompt")
    ex, seg = exs[0], exs[0].teacher_caption
    big = data.Example(question=ex.question, images=[data.load_image(ex.images[0], "x", 10 ** 6).resize((700, 350))],
                       where="x")
    with open(tmp_path / "big.png", "wb") as f:
        big.images[0].save(f)
    big.images = [str(tmp_path / "big.png")]
    it = data.render_segment(processor, big, seg, data.RELEASE_WARMUP_SYSTEM_PROMPT, 560 * 560, 560)
    img = data.load_image(big.images[0], "x", 10 ** 9)
    assert img.size == (700, 350)
    small = img.resize((560, 280), resample=3)  # LANCZOS, the longer side capped at 560, sizes floored
    messages = [{"role": "system", "content": data.RELEASE_WARMUP_SYSTEM_PROMPT},
                {"role": "user", "content": [{"type": "image", "image": small},
                                             {"type": "text", "text": ex.question.split("<image>")[1]}]},
                {"role": "assistant", "content": seg}]
    want = processor.apply_chat_template(messages, add_generation_prompt=False, tokenize=True, return_dict=True)
    assert it["input_ids"].tolist() == list(want["input_ids"][0])
    assert torch.equal(it["image_grid_thw"], torch.as_tensor(want["image_grid_thw"]))
    tok = processor.tokenizer
    assert tok.convert_ids_to_tokens(it["input_ids"][-2:].tolist()) == ["<|im_end|>", tok.convert_ids_to_tokens(tok("\n")["input_ids"])[0]]
    # the framing follows the discriminator: the release's for its layout, framing.json for ours
    _ = release_checkpoint(M.upcycle(dense, 4, 2, 0.01), str(tmp_path / "rel"), "merged")
    args = type("A", (), dict(disc=str(tmp_path / "rel"), disc_experts=4, disc_top_k=2, disc_noise=0.01, seed=0,
                              trust_remote_code=False, disc_fresh_head=False, disc_routing="learned", max_pixels=10 ** 6,
                              disc_text_only=False, disc_micro=4, grad_ckpt=False))
    _, f, _ = align.setup_discriminator(args, processor, torch.device("cpu"))
    assert (f.system, f.max_pixels, f.max_side) == (data.RELEASE_WARMUP_SYSTEM_PROMPT, 560 * 560, 560)
    align.save_framing(align.Framing(processor, "mine", 1234, None), str(tmp_path / "rel"))
    _, f, _ = align.setup_discriminator(args, processor, torch.device("cpu"))
    assert (f.system, f.max_pixels, f.max_side) == ("mine", 1234, None)
