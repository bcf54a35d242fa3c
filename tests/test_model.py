"""model.py: log-probs against an independent computation, FSDP2 wrapping, HF save/load round-trip, what it refuses."""

import json
import os
import pickle
import shutil

import pytest
import torch

import data
import model as M
from helpers import ROOT


@pytest.fixture(scope="module")


def items(world, processor):
    exs, _ = data.read_examples(os.path.join(world[0], "sft.jsonl"), "sft")
    return [data.render_chat(processor, ex, ex.response) for ex in exs[:4]]


def reference_logprobs(hf, batch, temperature=1.0):
    """Independent: the HF forward's full logits / T, log_softmax over the vocabulary, next-token gather."""
    logits = hf(**M.model_inputs(batch, "cpu")).logits.float() / temperature  # (B, T, V)
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    out = torch.zeros(batch["input_ids"].shape)
    out[:, 1:] = lp
    return out * (batch["labels"] != -100)


def test_token_logprobs_match_full_logits(processor, items):
    torch.manual_seed(0)
    hf = M.load_policy("tiny", processor, torch.device("cpu"))
    b = data.collate(items, pad_id=0)
    ref = reference_logprobs(hf, b)  # the masked forward
    # ours runs unmasked (right padding: causal attention suffices); a left-padded batch keeps its mask
    assert "attention_mask" not in M.trunk_inputs(b, "cpu") and len(set(b["attention_mask"].sum(1).tolist())) > 1
    assert "attention_mask" in M.trunk_inputs(data.collate(items, pad_id=0, left=True), "cpu")
    for chunk in (7, 4096):  # chunked and unchunked vocabulary projection agree
        got = M.token_logprobs(hf, b, "cpu", chunk=chunk)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # at a sampling temperature: the log-probs of softmax(logits / T), the distribution the rollouts came from
    hot = M.LogProbs(hf, temperature=0.7)(b, chunk=7)
    torch.testing.assert_close(hot, reference_logprobs(hf, b, 0.7), atol=1e-5, rtol=1e-5)
    assert (hot - got).abs().max() > 1e-2
    # padding does not change a sequence's log-probs: each item alone gives the same values
    for i, it in enumerate(items):
        alone = M.token_logprobs(hf, data.collate([it], 0), "cpu")[0]
        torch.testing.assert_close(alone, got[i, :len(alone)], atol=1e-5, rtol=1e-5)


def test_chunked_logprob_gradients_match(processor, items):
    hf = M.load_policy("tiny", processor, torch.device("cpu"))
    b = data.collate(items[:2], pad_id=0)
    grads = []
    for fn in (lambda: reference_logprobs(hf, b), lambda: M.token_logprobs(hf, b, "cpu", chunk=5)):
        hf.zero_grad()
        fn().sum().backward()
        grads.append({n: p.grad.clone() for n, p in hf.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-5, rtol=1e-4)


def test_fsdp_wrapped_logprobs_equal_plain(dist1, processor, items):
    hf = M.load_policy("tiny", processor, dist1, seed=3)
    b = data.collate(items, pad_id=0)
    plain = M.token_logprobs(hf, b, "cpu")
    wrapped = M.shard(M.LogProbs(hf), dist1)
    torch.testing.assert_close(wrapped(b), plain, atol=1e-6, rtol=1e-6)


def test_compiled_blocks_give_the_same_logprobs_and_gradients(dist1, processor, items):
    # shard(compile=True) compiles each decoder block (the stages' --compile): same values as the eager blocks
    b = data.collate(items[:2], pad_id=0)
    out = []
    for compile_ in (False, True):
        policy = M.shard(M.LogProbs(M.load_policy("tiny", processor, dist1, seed=4)), dist1, compile=compile_)
        lp = policy(b)
        lp.sum().backward()
        out.append((lp.detach(), {n: p.grad.full_tensor() for n, p in policy.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(out[1][0], out[0][0], atol=1e-5, rtol=1e-5)
    assert out[0][1].keys() == out[1][1].keys() and len(out[0][1]) > 10
    for n in out[0][1]:
        torch.testing.assert_close(out[1][1][n], out[0][1][n], atol=1e-5, rtol=1e-4)


def test_save_then_from_pretrained_gives_identical_logits(dist1, processor, items, tmp_path, tiny_name):
    from transformers import AutoModelForImageTextToText
    hf = M.load_policy(tiny_name, processor, dist1, seed=2)
    # the saved weights are bf16: the reference is the same model with its weights rounded to bf16
    ref = M.load_policy(tiny_name, processor, dist1, seed=2)
    with torch.no_grad():
        for p_ in ref.parameters():
            p_.copy_(p_.to(torch.bfloat16).float())
    wrapped = M.shard(M.LogProbs(hf), dist1)
    M.save_hf(wrapped, processor, str(tmp_path), {"stage": "test"})
    loaded = AutoModelForImageTextToText.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert type(loaded).__name__ == "Qwen3VLForConditionalGeneration"
    b = data.collate(items, pad_id=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**M.model_inputs(b, "cpu")).logits, ref(**M.model_inputs(b, "cpu")).logits,
                                   atol=0, rtol=0)
    assert os.path.isfile(tmp_path / "run_config.json") and os.path.isfile(tmp_path / "chat_template.jinja")

# -----------------------------------------------------------------------------
# refused: a wrong model, pickled weights


def test_wrong_models_are_refused(tiny_dirs, tmp_path, processor):
    policy, _ = tiny_dirs
    # a policy directory that is not Qwen3-VL
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 1000, "hidden_size": 64,
                                                   "num_hidden_layers": 1, "num_attention_heads": 2}))
    with pytest.raises(SystemExit, match="must be a dense Qwen3-VL"):
        M.load_policy(str(llama), processor, torch.device("cpu"))
    # a model whose vocabulary is smaller than the tokenizer
    cfg = M.Qwen3VLForConditionalGeneration.config_class.from_pretrained(policy)
    cfg.text_config.vocab_size = len(processor.tokenizer) - 1
    with pytest.raises(SystemExit, match="model and processor do not match"):
        M.check_vocab(cfg, processor, "x")


class Boom:
    """Unpickling this runs os.system: a crafted checkpoint."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_crafted_pickles_are_refused(tiny_dirs, tmp_path, processor):
    marker = tmp_path / "pwned"
    # a policy directory holding a pickled pytorch_model.bin instead of safetensors
    bad = tmp_path / "policy"
    shutil.copytree(tiny_dirs[0], bad)
    os.remove(bad / "model.safetensors")
    with open(bad / "pytorch_model.bin", "wb") as f:
        pickle.dump(Boom(marker), f)
    with pytest.raises(Exception, match="safetensors"):
        M.load_policy(str(bad), processor, torch.device("cpu"))
    # a resume checkpoint whose RNG file is a crafted pickle: torch.load(weights_only=True) refuses it
    rng = tmp_path / "rng_0.pt"
    with open(rng, "wb") as f:
        pickle.dump(Boom(marker), f)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(rng, weights_only=True)
    assert not marker.exists()
    # and no torch.load in the code base without weights_only=True
    for name in ("model.py", "engine.py", "sft.py", "warmup.py", "align.py", "rl.py", "eval.py", "data.py", "bench.py"):
        src = open(os.path.join(ROOT, name)).read()
        assert src.count("torch.load(") == src.count("weights_only=True"), name


def test_rope_positions_equal_transformers_get_rope_index(processor, tmp_path):
    """The host M-RoPE positions against transformers' own: rows of one image, of two images of different sizes (text
    between and after them), and without images, padded on the right (training) and on the left (generation)."""
    import numpy as np
    from PIL import Image
    for i, (w, h) in enumerate([(64, 64), (96, 32), (32, 80)]):
        Image.fromarray(np.random.RandomState(i).randint(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    exs = [data.Example(question="<image> how many?", images=[str(tmp_path / "0.png")], where="a"),
           data.Example(question="first <image> then <image> which?", images=[str(tmp_path / "1.png"),
                        str(tmp_path / "2.png")], where="b"),
           data.Example(question="no image here at all, just text", images=[], where="c")]
    items = [data.render_chat(processor, ex, "a reply of some length") for ex in exs]
    t = M.load_policy("tiny", processor, torch.device("cpu")).model
    for left in (False, True):
        b = data.collate(items, pad_id=0, left=left)
        ref, _ = t.get_rope_index(b["input_ids"], mm_token_type_ids=b["mm_token_type_ids"],
                                  image_grid_thw=b["image_grid_thw"], attention_mask=b["attention_mask"])
        got = M.rope_positions(t, b)
        assert got.shape == ref.shape == (3, 3, b["input_ids"].shape[1])
        assert torch.equal(got, ref)
        assert len(set(got[1, 1].tolist())) < b["attention_mask"][1].sum()  # the image rows share positions


def test_stacked_vision_attention_equals_the_per_image_path(processor, monkeypatch):
    """The vision tower over images of three sizes (and of one): one attention call per image size gives transformers'
    per-image attention, forward and backward."""
    import numpy as np
    from PIL import Image
    hf = M.load_policy("tiny", processor, torch.device("cpu"), seed=0)
    imgs = [Image.fromarray(np.random.RandomState(i).randint(0, 255, (32 * (1 + i % 3), 64, 3), dtype=np.uint8))
            for i in range(5)]
    enc = processor.image_processor(images=imgs, return_tensors="pt")
    assert len(set(enc["image_grid_thw"].prod(1).tolist())) == 3
    one = processor.image_processor(images=imgs[:1] * 3, return_tensors="pt")  # three images of one size
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionAttention
    for e in (enc, one):
        outs = []
        for forward in (M.stacked_vision_attention, Qwen3VLVisionAttention._transformers_forward):
            monkeypatch.setattr(Qwen3VLVisionAttention, "forward", forward)
            hf.zero_grad()
            out = hf.model.visual(e["pixel_values"], grid_thw=e["image_grid_thw"]).pooler_output
            (out ** 2).sum().backward()
            outs.append((out.detach(), hf.model.visual.blocks[0].attn.qkv.weight.grad.clone()))
        torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-5, rtol=1e-4)


def test_oom_guard_names_the_phase_and_lets_other_errors_through(dist1, capsys):
    for err in (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB"),
                RuntimeError("NCCL error: unhandled cuda error, NCCL version 2.27: Failed to CUDA calloc async 4 bytes")):
        with pytest.raises(SystemExit) as e, M.oom_guard("the policy update", "64 sequences", "a lower --micro-batch"):
            raise err
        assert e.value.code == 1
        assert "rank 0: rank 0 ran out of memory in the policy update (64 sequences; " in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="shape mismatch"), M.oom_guard("x", "y", "z"):
        raise RuntimeError("shape mismatch")


def test_offload_round_trips_weights_and_optimizer_state_exactly(dist1, processor, items):
    """Offload.out frees a sharded policy's storages and its AdamW state; back restores them bit for bit, and the run
    goes on exactly as one that never offloaded (two more steps, weights and state compared)."""
    b = data.collate(items[:2], pad_id=0)

    def run(offload):
        policy = M.shard(M.LogProbs(M.load_policy("tiny", processor, dist1, seed=6)), dist1)
        opt = M.make_optimizer(policy, 1e-3, 0.1)
        off = None
        for step in range(3):
            policy(b).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if offload and step < 2:
                off = off or M.Offload(policy, opt)
                before = [p.detach().clone() for p in policy.parameters()] + \
                    [v.clone() for st in opt.state.values() for v in st.values()]
                off.out()
                assert all(st.nbytes() == 0 for st in off.storages)  # the memory is given back
                off.back()
                off.wait()
                after = list(policy.parameters()) + [v for st in opt.state.values() for v in st.values()]
                assert len(after) == len(before) and all(torch.equal(x, y) for x, y in zip(after, before))
        state = [v.full_tensor() if hasattr(v, "full_tensor") else v for st in opt.state.values() for v in st.values()]
        return {n: p.full_tensor() for n, p in policy.named_parameters()}, state, off

    (w0, s0, _), (w1, s1, off) = run(False), run(True)
    n_params = sum(1 for _ in w0)
    # every shard, both Adam moments and the step count of each (CPU AdamW's state)
    assert len(off.storages) == 4 * n_params, (len(off.storages), n_params)
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    assert len(s0) == len(s1) and all(torch.equal(x, y) for x, y in zip(s0, s1))


def test_packed_rows_give_the_padded_batchs_logprobs_and_gradients(processor, items, tmp_path):
    """collate(packed=True): sequences one after another in one row, each with its own M-RoPE positions (images at
    their grid positions, counted from the sequence's start) and attending to itself only. The per-token log-probs,
    entropies and gradients equal those of the padded batch, with images of different sizes, a prompt with two images
    and one without any (the classic failure of packed VLM training: positions or attention leaking across sequences)."""
    from PIL import Image
    for name, col, size in (("r.png", (200, 10, 10), (64, 32)), ("b.png", (10, 10, 200), (32, 96))):
        Image.new("RGB", size, col).save(tmp_path / name)
    two = data.Example(question="<image> left, <image> right: which is red?", images=[str(tmp_path / "r.png"),
                       str(tmp_path / "b.png")], where="two")
    none = data.Example(question="no image here: what is 2 + 3?", images=[], where="none")
    seqs = [items[0], data.render_chat(processor, two, "<answer>left</answer>"), items[1],
            data.render_chat(processor, none, "<answer>5</answer>"), items[2]]
    torch.manual_seed(0)
    hf = M.load_policy("tiny", processor, torch.device("cpu"), seed=3)
    out = []
    for packed in (False, True):
        b = data.collate(seqs, pad_id=0, packed=packed)
        hf.zero_grad()
        lp, ent = M.token_logprobs(hf, b, "cpu", entropy=True)
        (lp.sum() + 0.1 * (lp * lp).sum()).backward()
        out.append((lp.detach(), ent, {n: p.grad.clone() for n, p in hf.named_parameters() if p.grad is not None}))
    row = data.collate(seqs, 0, packed=True)["packed"]
    assert row["input_ids"].shape == (1, sum(len(s["input_ids"]) for s in seqs)) and row["cu_seqlens"].tolist()[-1] == \
        row["input_ids"].shape[1]
    assert (out[0][0] != 0).sum() > 50  # the supervised tokens
    torch.testing.assert_close(out[1][0], out[0][0], atol=2e-5, rtol=0)
    torch.testing.assert_close(out[1][1], out[0][1], atol=2e-5, rtol=0)
    assert out[0][2].keys() == out[1][2].keys() and len(out[0][2]) > 10
    for n in out[0][2]:
        torch.testing.assert_close(out[1][2][n], out[0][2][n], atol=1e-4, rtol=1e-4, msg=n)
    # the reference is independent of the packed path: each sequence alone through the HF forward
    for i, s in enumerate(seqs):
        alone = reference_logprobs(hf, data.collate([s], 0))[0]
        torch.testing.assert_close(out[1][0][i, :len(alone)], alone, atol=2e-5, rtol=0)


@pytest.mark.parametrize("release", ["is_causal", "window"])
def test_varlen_adapter_gives_causal_attention_per_segment_for_both_signatures(monkeypatch, release):
    """model.varlen_causal calls torch's varlen_attn, whose signature changed (is_causal, no scale, no GQA at first; then
    a causal window, scale and enable_gqa). With a stand-in of each signature that runs SDPA per segment, the adapter's
    output is causal attention within each segment at the given scale, with grouped-query heads (against SDPA)."""
    import torch.nn.attention.varlen as V
    import torch.nn.functional as F

    def per_segment(q, k, v, cu, causal, scale=None, gqa=False):
        return torch.cat([F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1),
                                                         v[s:e].transpose(0, 1), is_causal=causal, scale=scale,
                                                         enable_gqa=gqa).transpose(0, 1)
                          for s, e in zip(cu.tolist(), cu.tolist()[1:])])

    if release == "is_causal":
        def fake(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
            return per_segment(q, k, v, cu_q, is_causal)
    else:
        def fake(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1),
                 enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
            return per_segment(q, k, v, cu_q, window_size == (-1, 0), scale, enable_gqa)
    monkeypatch.setattr(V, "varlen_attn", fake)
    M._varlen_params.cache_clear()  # the adapter reads the signature once per process
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(20, 4, 16, generator=g), torch.randn(20, 2, 16, generator=g), torch.randn(20, 2, 16, generator=g)
    cu = torch.tensor([0, 7, 20], dtype=torch.int32)
    want = per_segment(q, k, v, cu, True, 0.3, True)
    torch.testing.assert_close(M.varlen_causal(q, k, v, cu, 13, 0.3), want, atol=1e-6, rtol=1e-5)
    M._varlen_params.cache_clear()
