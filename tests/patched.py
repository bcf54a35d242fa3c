"""Run a stage script with faults or a scripted policy patched in (tests only), then exec the script as __main__.

    PATCH_GENERATE=mixed PATCH_NAN=1:2 python tests/patched.py rl.py --policy ...

PATCH_GENERATE replaces engine.generate:
  rank0-valid  rank 0 answers every prompt with a format-valid response, every other rank with text that is never valid
               (and of uneven lengths);
  none-valid   no rank ever produces a valid response;
  mixed        a function of the prompt and the sample's index k within its group only (so 1 and 2 processes generate the
               same batch): even k a valid response answering str(k) (with k + 1 reasoning lines), odd k invalid text.
               With PATCH_GROUP=G, k is the global row index (rank x rows per rank + i) mod G: for groups split over ranks.
PATCH_OOM=RANK:WHERE raises a CUDA out-of-memory on that rank in engine.generate (WHERE generate) or in model.token_logprobs
(WHERE logprobs: every training forward).
PATCH_NO_DROPOUT=1 turns dropout off (the discriminator's score dropout: 1 and 2 processes draw different masks).
PATCH_NAN=RANK:CALLS poisons one gradient with NaN on that rank just before the given (1-based, comma-separated, or "all")
calls of model.clip_grad, i.e. a non-finite gradient on one rank of a data-parallel step."""

import os
import runpy
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import engine  # noqa: E402
import model as M  # noqa: E402

VALID = "<caption>\n- row 1, column 1: red circle\n</caption>\n<think>\nI look.\n</think>\n<answer>1</answer>"
RANK = int(os.environ.get("RANK", 0))


def scripted_generate(infer, prompts, tokenizer, device, max_new_tokens, temperature=1.0, top_p=1.0, batch_size=64,
                      hf=False, logprobs=False):
    out = scripted(prompts, tokenizer)
    return (out, [[-1.0] * len(o) for o in out]) if logprobs else out  # placeholder log-probs: no sampler here


def scripted(prompts, tokenizer):
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]  # noqa: E731
    mode = os.environ["PATCH_GENERATE"]
    if mode == "rank0-valid" and RANK == 0:
        return [ids(VALID) for _ in prompts]
    bad = tokenizer("no blocks at all, just words", add_special_tokens=False)["input_ids"]
    if mode != "mixed":
        return [bad[:3 + i % 5] + [eos] for i in range(len(prompts))]
    out, k = [], 0
    for i, p in enumerate(prompts):
        # index within the group: a group's rows are one rendered prompt repeated (two groups of equal prompts are not)
        k = k + 1 if i and p is prompts[i - 1] else 0
        if os.environ.get("PATCH_GROUP"):  # a group spread over ranks: the index within it, from the global row
            k = (RANK * len(prompts) + i) % int(os.environ["PATCH_GROUP"])
        steps = "\n".join(f"step {j}" for j in range(k + 1))
        out.append(ids(f"<caption>\n- row 1, column {k % 3 + 1}: red circle\n</caption>\n<think>\n{steps}\n</think>\n"
                       f"<answer>{k}</answer>") if k % 2 == 0 else bad[:2 + k] + [eos])
    return out


if os.environ.get("PATCH_GENERATE"):
    engine.generate = scripted_generate

if os.environ.get("PATCH_OOM"):  # a CUDA out-of-memory on one rank: in the rollouts (generate) or the update (logprobs)
    import torch
    oom_rank, oom_where = os.environ["PATCH_OOM"].split(":")

    def out_of_memory(real):
        def f(*a, **k):
            if RANK == int(oom_rank):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by tests/patched.py)")
            return real(*a, **k)
        return f
    if oom_where == "generate":
        engine.generate = out_of_memory(engine.generate)
    else:
        M.token_logprobs = out_of_memory(M.token_logprobs)

if os.environ.get("PATCH_NO_DROPOUT"):  # the discriminator's score dropout draws from each rank's own RNG stream
    import torch
    torch.nn.Dropout.forward = lambda self, x: x

if os.environ.get("PATCH_NAN"):
    nan_rank, nan_calls = os.environ["PATCH_NAN"].split(":")
    real_clip_grad, n_calls = M.clip_grad, [0]

    def clip_grad(model, max_norm):
        n_calls[0] += 1
        if RANK == int(nan_rank) and (nan_calls == "all" or n_calls[0] in map(int, nan_calls.split(","))):
            local = (g.to_local() if hasattr(g, "to_local") else g for g in (p.grad for p in model.parameters()) if g is not None)
            next(g for g in local if g.numel()).view(-1)[0] = float("nan")
        return real_clip_grad(model, max_norm)
    M.clip_grad = clip_grad

sys.argv = sys.argv[1:]
runpy.run_path(os.path.join(ROOT, sys.argv[0]), run_name="__main__")
