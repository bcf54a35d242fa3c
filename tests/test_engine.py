"""engine.py: the decode loop against Hugging Face generate(), sampling, the GQA decode attention, the KV-cache check."""

import os

import pytest
import torch
from transformers import StaticCache

import data
import engine
import model as M


def test_greedy_generation_is_deterministic_and_the_static_path_equals_hf(world, processor, tiny_name):
    hf = M.load_policy(tiny_name, processor, torch.device("cpu"), seed=1)
    assert (hf.lm_head.weight is hf.model.language_model.embed_tokens.weight) == (tiny_name == "tiny")
    infer = engine.make_inference_copy(hf, torch.device("cpu"))
    exs, _ = data.read_examples(os.path.join(world[0], "eval.parquet"), "prompt")
    text_only = data.Example(question="How many shapes are there? Answer with a number.", images=[], where="t")
    prompts = [data.render_chat(processor, ex) for ex in exs[:3]] + [data.render_chat(processor, text_only)]
    assert len({len(p["input_ids"]) for p in prompts}) > 1  # left padding in the batch
    a = engine.generate(infer, prompts, processor.tokenizer, "cpu", max_new_tokens=12, temperature=0, hf=True)
    b = engine.generate(infer, prompts, processor.tokenizer, "cpu", max_new_tokens=12, temperature=0, batch_size=1, hf=True)
    assert a == b  # batching and left padding do not change greedy tokens
    assert all(len(r) == 12 for r in a)  # a random model does not stop early
    # the static-cache decode loop: the same greedy tokens (M-RoPE positions of images, padding, a text-only row)
    for bs in (4, 1):
        assert engine.generate(infer, prompts, processor.tokenizer, "cpu", 12, temperature=0, batch_size=bs) == a
    # ... and a text-only batch after an image batch (no stale rope deltas)
    assert engine.generate(infer, prompts[3:], processor.tokenizer, "cpu", 12, temperature=0) == a[3:]


def test_static_sampling_respects_top_p_and_banned_tokens():
    torch.manual_seed(0)
    logits = torch.randn(4000, 6)
    banned = torch.tensor([False, False, True, False, False, False])
    draws, lp = engine.sample(logits, 1.0, 1.0, banned)
    assert not (draws == 2).any()
    # frequencies follow softmax(logits) over the allowed tokens (the Gumbel-max trick), row by row in expectation
    p = logits.masked_fill(banned, float("-inf")).softmax(-1).mean(0)
    freq = torch.bincount(draws, minlength=6).float() / len(draws)
    torch.testing.assert_close(freq, p, atol=0.02, rtol=0)
    # top_p keeps the smallest head reaching p: with p tiny, only the argmax survives
    assert engine.sample(logits, 1.0, 1e-6, banned)[0].equal(engine.sample(logits, 0, 1.0, banned)[0])
    # the returned log-probs are those of the drawn tokens under the (banned-masked) softmax
    torch.testing.assert_close(lp, logits.masked_fill(banned, float("-inf")).log_softmax(-1).gather(-1, draws[:, None])[:, 0])


def test_kv_cache_bytes_is_the_static_cache_allocation(processor):
    """The memory check before a GPU rollout counts what StaticCache allocates (tiny and the 4B's 147 kB per slot)."""
    for name, dtype in (("tiny", torch.float32), ("4b", torch.bfloat16)):
        cfg = M.build_config(name, processor.tokenizer)
        tc = cfg.text_config
        cache = StaticCache(config=cfg, max_cache_len=7)
        with torch.device("meta"):  # shapes only: no memory for the 4B
            cache.early_initialization(3, tc.num_key_value_heads, tc.head_dim, dtype, torch.device("meta"))
        real = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
        assert engine.kv_cache_bytes(tc, 3, 7, dtype) == real
    assert engine.kv_cache_bytes(M.build_config("4b", processor.tokenizer).text_config, 1, 1, torch.bfloat16) == 147456


def test_a_rollout_whose_kv_cache_cannot_fit_stops_with_the_flags_to_change(monkeypatch, processor):
    """On a GPU decode() compares the cache with the free memory before allocating anything (faked here: 0.1 GB free)."""
    cfg = M.build_config("tiny", processor.tokenizer)
    infer = type("Infer", (), {"config": cfg, "dtype": torch.bfloat16})()
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (10**8, 80 * 10**9))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: 0)
    batch = {"input_ids": torch.zeros(64, 2000, dtype=torch.long)}
    need = engine.kv_cache_bytes(cfg.text_config, 64, 10240, torch.bfloat16)  # 2,000 + 8,192 slots rounded up to 256
    with pytest.raises(SystemExit, match=f"64 sequences x 10240 slots needs {need / 1e9:.1f} GB, 0.1 GB is free: lower --gen-batch"):
        engine.decode(infer, batch, torch.device("cuda"), 8192, 0, 0, [])


def test_generation_stops_at_end_of_turn(world, processor):
    """A scripted output layer: row i emits token 100 for i + 1 steps, then <|im_end|>; generation must cut there."""
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    hf = M.load_policy("tiny", processor, torch.device("cpu"))
    infer = engine.make_inference_copy(hf, torch.device("cpu"))

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
        out = engine.generate(infer, prompts, tok, "cpu", max_new_tokens=10, temperature=0, hf=hf)
        assert out == [[100, eos], [100, 100, eos], [100, 100, 100, eos]]
    # the training item built from a rollout supervises exactly the generated tokens
    item = data.join_response(prompts[1], out[1])
    assert (item["labels"] != -100).sum() == 3 and item["labels"][-1] == eos
    assert torch.equal(item["input_ids"][:len(prompts[1]["input_ids"])], prompts[1]["input_ids"])


@pytest.mark.parametrize("hf", [False, True])


def test_sampled_tokens_carry_their_log_probs_and_the_sampler_draws_from_the_policy(world, processor, hf):
    """generate(logprobs=True) returns each sampled token's log-prob under the distribution it was drawn from (the
    teacher-forced softmax at the temperature, special tokens other than <|im_end|> removed), and the draws follow that
    distribution: the mean of -log p(y) over the sampled tokens equals the mean entropy within 4 standard errors."""
    tok = processor.tokenizer
    infer = engine.make_inference_copy(M.load_policy("tiny", processor, torch.device("cpu"), seed=1), torch.device("cpu"))
    exs, _ = data.read_examples(os.path.join(world[0], "eval.parquet"), "prompt")
    prompts = [data.render_chat(processor, ex) for ex in exs[:4]] * 6
    torch.manual_seed(0)
    outs, lps = engine.generate(infer, prompts, tok, "cpu", 24, temperature=0.8, hf=hf, logprobs=True)
    assert [len(o) for o in outs] == [len(lp) for lp in lps]
    b = data.collate([data.join_response(p, o) for p, o in zip(prompts, outs)], 0)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    banned = [i for i, t in tok.added_tokens_decoder.items() if t.special and i != eos]
    with torch.no_grad():
        logits = infer(**M.model_inputs(b, "cpu")).logits.float()[:, :-1] / 0.8
    logits[..., banned] = float("-inf")
    logq = torch.log_softmax(logits, -1)
    mask = b["labels"][:, 1:] != -100
    want = logq.gather(-1, b["input_ids"][:, 1:, None]).squeeze(-1)[mask]
    torch.testing.assert_close(torch.tensor(sum(lps, [])), want, atol=2e-4, rtol=1e-4)
    ent = -(logq.exp() * logq.clamp(min=-1e9)).sum(-1)[mask]
    diff = -want - ent
    assert abs(diff.mean()) < 4 * diff.std() / len(diff) ** 0.5, (diff.mean(), diff.std(), len(diff))
