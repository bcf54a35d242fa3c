"""The miniature reproduction's tables from results/repro.sh's run directories (markdown on stdout).

    python results/summarize.py results/runs > results/README.md

Per seed and algorithm: held-out and hard accuracy of SFT -> RL and of SFT -> PRISM -> RL (greedy, eval.py), and the
difference aligned - plain; then mean and sample standard deviation over the seeds; then the discriminator ablations."""

import json
import os
import statistics
import sys

run_root = sys.argv[1]
ALGOS = ("grpo", "dapo", "gspo")
seeds = sorted((d for d in os.listdir(run_root) if d.startswith("s") and d[1:].isdigit()), key=lambda d: int(d[1:]))


def acc(run, stage):
    """(held-out, hard) greedy accuracy of RUN/STAGE, or None when it was not evaluated."""
    path = os.path.join(run_root, run, stage, "eval.json")
    if not os.path.isfile(path):
        return None
    r = json.load(open(path))["results"]
    return r["eval"]["acc"], r["eval_hard"]["acc"]


def mean_sd(xs):
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"


print("# Miniature reproduction: SFT -> RL vs SFT -> PRISM -> RL on the synthetic world\n")
print(f"Runs: `bash results/repro.sh` (run directories under `{run_root}`, one per seed). Accuracy is greedy decoding on the"
      " held-out split and the hard split (more objects, conjunctive questions), scored by verify.py.\n")
print("## Per seed\n")
print("| seed | algo | SFT | SFT -> RL | SFT -> PRISM | SFT -> PRISM -> RL | aligned - plain |")
print("|---|---|---|---|---|---|---|")
diffs = {a: [] for a in ALGOS}
arms = {(a, arm): [] for a in ALGOS for arm in ("sft", "align")}
for s in seeds:
    for a in ALGOS:
        sft, align, plain, aligned = (acc(s, st) for st in ("sft", "align", f"sft-rl-{a}", f"align-rl-{a}"))
        if plain is None or aligned is None:
            continue
        arms[a, "sft"].append(plain)
        arms[a, "align"].append(aligned)
        diffs[a].append((aligned[0] - plain[0], aligned[1] - plain[1]))
        cell = lambda x: f"{x[0]:.3f} / {x[1]:.3f}" if x else "-"  # noqa: E731
        print(f"| {s[1:]} | {a} | {cell(sft)} | {cell(plain)} | {cell(align)} | {cell(aligned)} | "
              f"{aligned[0] - plain[0]:+.3f} / {aligned[1] - plain[1]:+.3f} |")
print("\n(cells: held-out / hard)\n")
print("## Summary (mean ± sd over seeds)\n")
print("| algo | seeds | SFT -> RL held-out | SFT -> PRISM -> RL held-out | difference | SFT -> RL hard | "
      "SFT -> PRISM -> RL hard | difference |")
print("|---|---|---|---|---|---|---|---|")
for a in ALGOS:
    if not diffs[a]:
        continue
    p, q, d = arms[a, "sft"], arms[a, "align"], diffs[a]
    print(f"| {a} | {len(d)} | {mean_sd([x[0] for x in p])} | {mean_sd([x[0] for x in q])} | {mean_sd([x[0] for x in d])} | "
          f"{mean_sd([x[1] for x in p])} | {mean_sd([x[1] for x in q])} | {mean_sd([x[1] for x in d])} |")
abl = [d for d in sorted(os.listdir(run_root)) if "-" in d and d.split("-")[0] in seeds and os.path.isdir(os.path.join(run_root, d))]
if abl:
    print("\n## Discriminator ablations (GRPO; the same SFT policy and seed as the full discriminator's row)\n")
    print("| discriminator | seed | SFT -> PRISM held-out / hard | SFT -> PRISM -> RL held-out / hard |")
    print("|---|---|---|---|")
    names = {"dense": "dense (1 expert)", "text": "text-only (no image)"}
    for d in [abl[0].split("-")[0]] + abl:  # the full discriminator's run of that seed first
        seed, _, kind = d.partition("-")
        name = names.get(kind, "full (4 experts, image + text)")
        al, rl = acc(d, "align"), acc(d, "align-rl-grpo")
        if al and rl:
            print(f"| {name} | {seed[1:]} | {al[0]:.3f} / {al[1]:.3f} | {rl[0]:.3f} / {rl[1]:.3f} |")
