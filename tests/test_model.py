"""model.py: log-probs against an independent computation, generation, FSDP2 wrapping, HF save/load round-trip."""

import os

import pytest
import torch
import torch.distributed as dist
from transformers import StaticCache

import data
import model as M


@pytest.fixture(scope="module")
def dist1():
    if not dist.is_initialized():
        M.init_dist()
    return torch.device("cpu")


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
    ref = reference_logprobs(hf, b)
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


@pytest.fixture(params=["tiny", "tiny-untied"])
def tiny_name(request, monkeypatch):
    """The tiny config with the output layer tied to the embeddings (as the 2B and 4B) and untied (as the 8B)."""
    monkeypatch.setitem(M.CONFIGS, "tiny-untied", dict(M.CONFIGS["tiny"], tied=False))
    return request.param


def test_greedy_generation_is_deterministic_and_the_static_path_equals_hf(world, processor, tiny_name):
    hf = M.load_policy(tiny_name, processor, torch.device("cpu"), seed=1)
    assert (hf.lm_head.weight is hf.model.language_model.embed_tokens.weight) == (tiny_name == "tiny")
    infer = M.make_inference_copy(hf, torch.device("cpu"))
    exs, _ = data.read_examples(os.path.join(world[0], "eval.parquet"), "prompt")
    text_only = data.Example(question="How many shapes are there? Answer with a number.", images=[], where="t")
    prompts = [data.render_chat(processor, ex) for ex in exs[:3]] + [data.render_chat(processor, text_only)]
    assert len({len(p["input_ids"]) for p in prompts}) > 1  # left padding in the batch
    a = M.generate(infer, prompts, processor.tokenizer, "cpu", max_new_tokens=12, temperature=0, hf=True)
    b = M.generate(infer, prompts, processor.tokenizer, "cpu", max_new_tokens=12, temperature=0, batch_size=1, hf=True)
    assert a == b  # batching and left padding do not change greedy tokens
    assert all(len(r) == 12 for r in a)  # a random model does not stop early
    # the static-cache decode loop: the same greedy tokens (M-RoPE positions of images, padding, a text-only row)
    for bs in (4, 1):
        assert M.generate(infer, prompts, processor.tokenizer, "cpu", 12, temperature=0, batch_size=bs) == a
    # ... and a text-only batch after an image batch (no stale rope deltas)
    assert M.generate(infer, prompts[3:], processor.tokenizer, "cpu", 12, temperature=0) == a[3:]


def test_static_sampling_respects_top_p_and_banned_tokens():
    torch.manual_seed(0)
    logits = torch.randn(4000, 6)
    banned = torch.tensor([False, False, True, False, False, False])
    draws = M.sample(logits, 1.0, 1.0, banned)
    assert not (draws == 2).any()
    # frequencies follow softmax(logits) over the allowed tokens (the Gumbel-max trick), row by row in expectation
    p = logits.masked_fill(banned, float("-inf")).softmax(-1).mean(0)
    freq = torch.bincount(draws, minlength=6).float() / len(draws)
    torch.testing.assert_close(freq, p, atol=0.02, rtol=0)
    # top_p keeps the smallest head reaching p: with p tiny, only the argmax survives
    assert M.sample(logits, 1.0, 1e-6, banned).equal(M.sample(logits, 0, 1.0, banned))


def test_gqa_decode_attention_equals_sdpa_with_repeated_heads():
    # one query token per row, 8 query heads over 2 K/V heads, left padding and unwritten cache slots masked
    torch.manual_seed(0)
    B, H, Hkv, n, D = 3, 8, 2, 10, 16
    q, k, v = torch.randn(B, H, 1, D), torch.randn(B, Hkv, n, D), torch.randn(B, Hkv, n, D)
    mask = torch.ones(B, 1, 1, n, dtype=torch.bool)
    mask[0, ..., :3] = False  # row 0: three slots of left padding
    mask[:, ..., 7:] = False  # slots not written yet
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = H // Hkv, True, False
    out, _ = M.gqa_decode_attention(module, q, k, v, mask, scaling=0.25)
    ref = torch.softmax((q @ k.repeat_interleave(H // Hkv, 1).transpose(-1, -2) * 0.25).masked_fill(~mask, float("-inf")), -1) \
        @ v.repeat_interleave(H // Hkv, 1)  # (B, H, 1, D): query head h reads K/V head h // (H / Hkv)
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_kv_cache_bytes_is_the_static_cache_allocation(processor):
    """The memory check before a GPU rollout counts what StaticCache allocates (tiny and the 4B's 147 kB per slot)."""
    for name, dtype in (("tiny", torch.float32), ("4b", torch.bfloat16)):
        cfg = M.build_config(name, processor.tokenizer)
        tc = cfg.text_config
        cache = StaticCache(config=cfg, max_cache_len=7)
        with torch.device("meta"):  # shapes only: no memory for the 4B
            cache.early_initialization(3, tc.num_key_value_heads, tc.head_dim, dtype, torch.device("meta"))
        real = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        assert M.kv_cache_bytes(tc, 3, 7, dtype) == real
    assert M.kv_cache_bytes(M.build_config("4b", processor.tokenizer).text_config, 1, 1, torch.bfloat16) == 147456


def test_a_rollout_whose_kv_cache_cannot_fit_stops_with_the_flags_to_change(monkeypatch, processor):
    """On a GPU decode() compares the cache with the free memory before allocating anything (faked here: 0.1 GB free)."""
    cfg = M.build_config("tiny", processor.tokenizer)
    infer = type("Infer", (), {"config": cfg, "dtype": torch.bfloat16})()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (10**8, 80 * 10**9))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: 0)
    batch = {"input_ids": torch.zeros(64, 2000, dtype=torch.long)}
    need = M.kv_cache_bytes(cfg.text_config, 64, 10240, torch.bfloat16)  # 2,000 + 8,192 slots rounded up to 256
    with pytest.raises(SystemExit, match=f"64 sequences x 10240 slots needs {need / 1e9:.1f} GB, 0.1 GB is free: lower --gen-batch"):
        M.decode(infer, batch, torch.device("cuda"), 8192, 0, 0, [])


def test_generation_stops_at_end_of_turn(world, processor):
    """A scripted output layer: row i emits token 100 for i + 1 steps, then <|im_end|>; generation must cut there."""
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    hf = M.load_policy("tiny", processor, torch.device("cpu"))
    infer = M.make_inference_copy(hf, torch.device("cpu"))

    class Scripted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def forward(self, h):  # (B, T, H) from generate(), (B, H) from the static loop
            logits = torch.zeros(*h.shape[:-1], len(tok))
            for i in range(h.shape[0]):
                logits[i, ..., eos if self.calls > i else 100] = 10.0
            self.calls += 1
            return logits

    exs, _ = data.read_examples(os.path.join(world[0], "eval.parquet"), "prompt")
    prompts = [data.render_chat(processor, ex) for ex in exs[:3]]
    for hf in (True, False):
        infer.lm_head = Scripted()
        out = M.generate(infer, prompts, tok, "cpu", max_new_tokens=10, temperature=0, hf=hf)
        assert out == [[100, eos], [100, 100, eos], [100, 100, 100, eos]]
    # the training item built from a rollout supervises exactly the generated tokens
    item = M.join_response(prompts[1], out[1])
    assert (item["labels"] != -100).sum() == 3 and item["labels"][-1] == eos
    assert torch.equal(item["input_ids"][:len(prompts[1]["input_ids"])], prompts[1]["input_ids"])


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
