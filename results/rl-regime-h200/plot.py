"""curves.png from raw.tar.gz (extracted to R): greedy held-out / hard accuracy per RL run against the SFT start, and
the rollouts' format-valid share over the first 30 steps.    tar xzf raw.tar.gz -C /tmp && python plot.py /tmp/res"""
import json
import os
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

R = sys.argv[1] if len(sys.argv) > 1 else "res"
sft = json.load(open(f"{R}/eval_sft.json"))["results"]
runs = [("g1e5", "lr 1e-5, 32x8"), ("g3e5", "lr 3e-5, 32x8"), ("g3e5b64", "lr 3e-5, 64x8"), ("g1e4", "lr 1e-4, 32x8"),
        ("g1e4kl", "lr 1e-4, 32x8, KL 0.5"), ("g1e4plc", "lr 1e-4, placebo"), ("g1e4b64", "lr 1e-4, 64x8")]
fig, ax = plt.subplots(1, 3, figsize=(14, 3.8))
for k, (split, title) in enumerate([("eval", "greedy held-out accuracy"), ("eval_hard", "greedy hard accuracy")]):
    for c, (n, label) in enumerate(runs):
        p = f"{R}/{n}_evalpp.jsonl"
        if os.path.exists(p):
            pts = sorted((e["step"], e["acc"]) for e in map(json.loads, open(p)) if e["name"] == split)
            ax[k].plot([0] + [s for s, _ in pts], [sft[split]["acc"]] + [a for _, a in pts], marker="o", color=f"C{c}",
                       label=label)
    ax[k].axhline(sft[split]["acc"], color="k", ls="--", lw=1)
    ax[k].set_title(title + " (1,000 prompts)")
    ax[k].set_xlabel("RL step")
for c, (n, label) in enumerate(runs):
    m = [r for r in map(json.loads, open(f"{R}/{n}_metrics.jsonl")) if "reward" in r][:30]
    ax[2].plot([r["step"] for r in m], [r["format"] for r in m], color=f"C{c}", label=label)
ax[2].set_title("rollout format-valid share, first 30 steps")
ax[2].set_xlabel("RL step")
ax[2].legend(fontsize=7)
fig.tight_layout()
fig.savefig("curves.png", dpi=100)
