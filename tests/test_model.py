"""model.py: log-probs against an independent computation, generation, FSDP2 wrapping, HF save/load round-trip."""

import os

import pytest
import torch
import torch.distributed as dist

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


def test_greedy_generation_is_deterministic(world, processor):
    hf = M.load_policy("tiny", processor, torch.device("cpu"), seed=1)
    infer = M.make_inference_copy(hf, torch.device("cpu"))
    exs, _ = data.read_examples(os.path.join(world[0], "eval.parquet"), "prompt")
    prompts = [data.render_chat(processor, ex) for ex in exs[:3]]
    a = M.generate(infer, prompts, processor.tokenizer, "cpu", max_new_tokens=12, temperature=0)
    b = M.generate(infer, prompts, processor.tokenizer, "cpu", max_new_tokens=12, temperature=0, batch_size=1)
    assert a == b  # batching and left padding do not change greedy tokens
    assert all(len(r) == 12 for r in a)  # a random model does not stop early


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

        def forward(self, h):
            B = h.shape[0]
            logits = torch.zeros(B, h.shape[1], len(tok))
            for i in range(B):
                logits[i, :, eos if self.calls > i else 100] = 10.0
            self.calls += 1
            return logits

    infer.lm_head = Scripted()
    exs, _ = data.read_examples(os.path.join(world[0], "eval.parquet"), "prompt")
    prompts = [data.render_chat(processor, ex) for ex in exs[:3]]
    out = M.generate(infer, prompts, tok, "cpu", max_new_tokens=10, temperature=0)
    assert out == [[100, eos], [100, 100, eos], [100, 100, 100, eos]]
    # the training item built from a rollout supervises exactly the generated tokens
    item = M.join_response(prompts[1], out[1])
    assert (item["labels"] != -100).sum() == 3 and item["labels"][-1] == eos
    assert torch.equal(item["input_ids"][:len(prompts[1]["input_ids"])], prompts[1]["input_ids"])


def test_save_then_from_pretrained_gives_identical_logits(dist1, processor, items, tmp_path):
    from transformers import AutoModelForImageTextToText
    hf = M.load_policy("tiny", processor, dist1, seed=2)
    # the saved weights are bf16: the reference is the same model with its weights rounded to bf16
    ref = M.load_policy("tiny", processor, dist1, seed=2)
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
