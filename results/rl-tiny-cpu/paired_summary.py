"""Paired comparison of each RL output with its SFT start on the same 200 held-out prompts (paired-*.json from
paired_eval.py): per-prompt mean of 8 samples at T 0.7, and greedy; mean difference with a bootstrap 95% interval."""
import json
import random

d = {n: json.load(open(f"paired-{n}.json")) for n in ("sft", "grpo", "dapo", "gspo")}
per_prompt = lambda s: [sum(x) / len(x) for x in s]  # noqa: E731
base, rng = per_prompt(d["sft"]["samples"]), random.Random(0)
for n in ("grpo", "dapo", "gspo"):
    for what, a, b in (("mean@8", per_prompt(d[n]["samples"]), base), ("greedy", d[n]["greedy"], d["sft"]["greedy"])):
        diff = [x - y for x, y in zip(a, b)]
        boots = sorted(sum(rng.choice(diff) for _ in diff) / len(diff) for _ in range(4000))
        print(f"{n} {what}: {sum(a) / len(a):.4f} vs SFT {sum(b) / len(b):.4f}, difference {sum(diff) / len(diff):+.4f}, "
              f"95% interval [{boots[100]:+.4f}, {boots[3899]:+.4f}]")
