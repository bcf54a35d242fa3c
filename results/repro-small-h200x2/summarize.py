"""The miniature reproduction's tables from results/repro.sh's run directories (markdown on stdout).

    python results/repro-small-h200x2/summarize.py runs/repro > summary.md
    mkdir -p runs/repro-h200x2 && tar xzf results/repro-small-h200x2/runs.tar.gz -C runs/repro-h200x2   # the recorded runs

Per seed and algorithm: held-out and hard accuracy of SFT -> RL and of SFT -> PRISM -> RL (greedy, eval.py), and the
difference aligned - plain; then mean and sample standard deviation over the seeds, the change RL made to its starting
policy in each arm, and the drift (W1 of the reasoning-step counts to the teacher's); then the discriminator ablations."""

import json
import os
import statistics
import sys

run_root = sys.argv[1]
ALGOS = ("grpo", "dapo", "gspo")
seeds = sorted((d for d in os.listdir(run_root) if d.startswith("s") and d[1:].isdigit()), key=lambda d: int(d[1:]))


def res(run, stage):
    """eval.py's results of RUN/STAGE: {"eval": {...}, "eval_hard": {...}}, or None when it was not evaluated."""
    path = os.path.join(run_root, run, stage, "eval.json")
    return json.load(open(path))["results"] if os.path.isfile(path) else None


def ms(xs, sign=""):
    return f"{statistics.mean(xs):{sign}.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"


print("# Miniature reproduction: SFT -> RL vs SFT -> PRISM -> RL on the synthetic world\n")
print(f"Runs: `bash results/repro-small-h200x2/repro.sh` (run directories under `{run_root}`, one per seed). Accuracy is greedy decoding on the"
      " held-out split and the hard split (more objects, conjunctive questions), scored by verify.py.\n")
print("## Per seed\n")
print("| seed | algo | SFT | SFT -> RL | SFT -> PRISM | SFT -> PRISM -> RL | aligned - plain |")
print("|---|---|---|---|---|---|---|")
rows = {a: [] for a in ALGOS}  # per algorithm, one dict per seed with every number the summary needs
for s in seeds:
    for a in ALGOS:
        sft, align, plain, aligned = (res(s, st) for st in ("sft", "align", f"sft-rl-{a}", f"align-rl-{a}"))
        if not (sft and align and plain and aligned):
            continue
        acc = {k: (r["eval"]["acc"], r["eval_hard"]["acc"]) for k, r in
               (("sft", sft), ("align", align), ("plain", plain), ("aligned", aligned))}
        rows[a].append(dict(acc, w1_plain=plain["eval"]["w1_reasoning_steps"], w1_aligned=aligned["eval"]["w1_reasoning_steps"]))
        cell = lambda x: f"{x[0]:.3f} / {x[1]:.3f}"  # noqa: E731
        d = [acc["aligned"][i] - acc["plain"][i] for i in (0, 1)]
        print(f"| {s[1:]} | {a} | {cell(acc['sft'])} | {cell(acc['plain'])} | {cell(acc['align'])} | {cell(acc['aligned'])} "
              f"| {d[0]:+.3f} / {d[1]:+.3f} |")
print("\n(cells: held-out / hard)\n")
print("## Summary (mean ± sd over seeds)\n")
print("| algo | seeds | SFT -> RL | SFT -> PRISM -> RL | aligned - plain | aligned wins | RL's change, plain arm | "
      "RL's change, aligned arm | W1 steps plain / aligned |")
print("|---|---|---|---|---|---|---|---|---|")
pooled = []
for split, i in (("held-out", 0), ("hard", 1)):
    for a in ALGOS:
        r = rows[a]
        if not r:
            continue
        d = [x["aligned"][i] - x["plain"][i] for x in r]
        pooled += [(split, x) for x in d]
        w1 = f"{statistics.mean(x['w1_plain'] for x in r):.2f} / {statistics.mean(x['w1_aligned'] for x in r):.2f}"
        print(f"| {a} ({split}) | {len(r)} | {ms([x['plain'][i] for x in r])} | {ms([x['aligned'][i] for x in r])} | "
              f"{ms(d, '+')} | {sum(x > 0 for x in d)}/{len(d)} | {ms([x['plain'][i] - x['sft'][i] for x in r], '+')} | "
              f"{ms([x['aligned'][i] - x['align'][i] for x in r], '+')} | {w1 if i == 0 else ''} |")
for split in ("held-out", "hard"):
    d = [x for sp, x in pooled if sp == split]
    if d:
        print(f"\nAll algorithms and seeds pooled, {split}: aligned - plain = {ms(d, '+')} over {len(d)} pairs, "
              f"aligned higher in {sum(x > 0 for x in d)}, equal in {sum(x == 0 for x in d)}.")
abl = [d for d in sorted(os.listdir(run_root)) if "-" in d and d.split("-")[0] in seeds and os.path.isdir(os.path.join(run_root, d))]
if abl:
    print("\n## Discriminator ablations (GRPO; the same SFT policy and seed as the full discriminator's row)\n")
    print("| discriminator | seed | SFT -> PRISM held-out / hard | SFT -> PRISM -> RL held-out / hard |")
    print("|---|---|---|---|")
    names = {"dense": "dense (1 expert)", "text": "text-only (no image)"}
    for d in [abl[0].split("-")[0]] + abl:  # the full discriminator's run of that seed first
        seed, _, kind = d.partition("-")
        name = names.get(kind, "full (4 experts, image + text)")
        al, rl = res(d, "align"), res(d, "align-rl-grpo")
        if al and rl:
            print(f"| {name} | {seed[1:]} | {al['eval']['acc']:.3f} / {al['eval_hard']['acc']:.3f} | "
                  f"{rl['eval']['acc']:.3f} / {rl['eval_hard']['acc']:.3f} |")
