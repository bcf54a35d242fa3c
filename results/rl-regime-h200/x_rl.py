"""Runs rl.py unchanged in its own __main__ namespace, with two hooks (the repository's files are not modified):
  - the periodic evaluation (rl.py's `evaluation.evaluate`) is x_eval.evaluate_pp: 500-row decode batches, per-prompt
    results appended to OUT/evalpp.jsonl with the step and the weights' relative L2 distance to the start; with
    XRL_SKIP0=1 the step-0 evaluation is skipped (the SFT policy is evaluated once, separately);
  - XRL_PLACEBO=1: each group's advantages are randomly permuted among its rollouts (same magnitudes, no relation to
    the reward): a control for how much of the update's effect is noise.
    python x_rl.py <rl.py flags>
"""
import inspect
import json
import math
import os
import random
import sys

import torch

import eval as evaluation
import x_eval

HERE = os.path.dirname(os.path.abspath(__file__))
SKIP0 = os.environ.get("XRL_SKIP0") == "1"
PLACEBO = os.environ.get("XRL_PLACEBO") == "1"
_init = {}


def _param_drift(policy):
    num = den = 0.0
    with torch.no_grad():
        for name, p in policy.named_parameters():
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            if name not in _init:
                _init[name] = full.detach().clone()
            num += float((full.float() - _init[name].float()).pow(2).sum())
            den += float(_init[name].float().pow(2).sum())
    return math.sqrt(num / max(den, 1e-30))


def hooked_evaluate(infer, processor, examples, device, samples=0, temperature=1.0, max_new_tokens=512,
                    max_pixels=560 * 560, batch_size=64, desc="eval", hf=False):
    g = inspect.currentframe().f_back.f_globals
    step, out = g.get("step"), g["args"].out
    drift = _param_drift(g["policy"])
    if SKIP0 and step == 0:
        return {"acc": float("nan"), "format": float("nan"), "length": float("nan")}
    r = x_eval.evaluate_pp(infer, processor, examples, device, samples, temperature, max_new_tokens, max_pixels,
                           batch_size=500, hf=hf)
    with open(os.path.join(out, "evalpp.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, "name": desc.removeprefix("eval "), "param_drift": drift, **r}) + "\n")
    return r


evaluation.evaluate = hooked_evaluate


def placebo_advantages(rewards, group_size, eps=1e-6):
    a = _group_advantages(rewards, group_size, eps).view(-1, group_size)
    rng = random.Random(hash(tuple(rewards.tolist())) ^ 12345)
    return torch.stack([row[torch.tensor(rng.sample(range(group_size), group_size))] for row in a]).view(-1)


src_path = os.path.join(HERE, "rl.py")
src = open(src_path).read()
needle = "group_advantages(g.rewards, G)"
assert src.count(needle) == 1, "rl.py changed: the advantage call is not where the hook expects it"
if PLACEBO:
    src = src.replace(needle, "_xrl_adv(g.rewards, G)")
ns = {"__name__": "__main__", "__file__": src_path}
sys.argv = [src_path] + sys.argv[1:]
if PLACEBO:
    exec(compile(src.split('\nif __name__ == "__main__":')[0], src_path, "exec"), ns)  # the definitions first
    _group_advantages = ns["group_advantages"]
    ns["_xrl_adv"] = placebo_advantages
exec(compile(src, src_path, "exec"), ns)
