"""The comparison's tables and figures from the seeds' archives (chain.sh's s<SEED>.tar.gz).

    python results/comparison-h200/summarize.py OUT_DIR s0.tar.gz s1.tar.gz ...

Writes OUT_DIR/summary.md (per-seed accuracies; paired differences pooled over seeds with a hierarchical bootstrap:
seeds resampled, then prompts within each seed, since every seed has its own data, SFT and alignment; drift and style
per stage) and OUT_DIR/curves.png (reward, entropy and length of both RL arms; the alignment score gap per channel).
"""
import io
import json
import os
import re
import sys
import tarfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from verify import extract_answer  # noqa: E402

ALGOS = ("grpo", "dapo", "gspo")
STAGES = [("sft", "SFT"), ("align", "SFT + align")] + [(f"{a}-rl-{x}", f"{'SFT' if a == 'sft' else 'SFT + align'} + "
                                                        f"{x.upper()}") for x in ALGOS for a in ("sft", "align")]
ABLATIONS = {"align-dense-rl-grpo": "dense discriminator", "align-text-rl-grpo": "text-only discriminator",
             "align-gad-rl-grpo": "whole-response scoring (GAD)", "align-route-rl-grpo": "hard segment routing",
             "sft2-rl-grpo": "no alignment, extra SFT"}
SPLITS = (("eval", "held-out"), ("eval_hard", "hard"))


def load(path):
    """{stage: {"eval": eval.json results, "metrics": [rows]}} of one seed's archive."""
    out = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            stage, _, name = m.name.removeprefix("./").partition("/")
            if name == "eval.json":
                out.setdefault(stage, {})["eval"] = json.load(tar.extractfile(m))["results"]
            elif name == "metrics.jsonl":
                rows = [json.loads(ln) for ln in io.TextIOWrapper(tar.extractfile(m), encoding="utf-8") if ln.strip()]
                out.setdefault(stage, {})["metrics"] = [r for r in rows if not r.get("eval")]
    return out


def value(p, kind):  # a prompt's accuracy: greedy, or the mean of its sampled responses
    if kind == "greedy":
        return p["acc"]
    return sum(p["sample_acc"]) / len(p["sample_acc"]) if p.get("sample_acc") else None


def per_prompt_diff(seed, x, y, split, kind):
    """y - x per prompt (paired by "where") in one seed; None when either stage lacks the evaluation."""
    try:
        a = {p["where"]: value(p, kind) for p in seed[x]["eval"][split]["per_prompt"]}
        b = seed[y]["eval"][split]["per_prompt"]
    except KeyError:
        return None
    d = [value(p, kind) - a[p["where"]] for p in b if a.get(p["where"]) is not None and value(p, kind) is not None]
    return np.array(d) if d else None


def hierarchical(diffs, n_boot=2000, seed=0):
    """Mean over seeds of the per-seed mean difference, and its 95% interval from a two-level bootstrap (seeds with
    replacement, then prompts with replacement within each drawn seed). diffs: [per-prompt array per seed]."""
    rng = np.random.default_rng(seed)
    est = float(np.mean([d.mean() for d in diffs]))
    boots = np.empty(n_boot)
    for b in range(n_boot):
        picks = rng.integers(len(diffs), size=len(diffs))
        boots[b] = np.mean([diffs[i][rng.integers(len(diffs[i]), size=len(diffs[i]))].mean() for i in picks])
    return est, float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))


def cell(diffs):
    if not diffs:
        return "-"
    est, lo, hi = hierarchical(diffs)
    return f"{est:+.3f} [{lo:+.3f}, {hi:+.3f}] ({len(diffs)})"


def main(out_dir, paths):
    seeds = {int(re.search(r"s(\d+)", os.path.basename(p))[1]): load(p) for p in paths}
    kinds = ["greedy"] + ["mean@8"] * any("sample_acc" in p and p["sample_acc"] for s in seeds.values() for st in s.values()
                                          for r in st.get("eval", {}).values() for p in r["per_prompt"][:1])
    lines = ["# The comparison, pooled over seeds", "", f"Seeds: {', '.join(map(str, sorted(seeds)))}. Accuracy on "
             "1,000 held-out and 1,000 hard prompts per seed; mean@8 = mean accuracy of 8 responses sampled at T 1.", ""]
    # per-seed accuracies
    cols = [f"{k} {s}" for k in kinds for _, s in SPLITS]
    lines += ["| seed | stage | " + " | ".join(cols) + " |", "|---" * (2 + len(cols)) + "|"]
    for s in sorted(seeds):
        for stage, label in STAGES + list(ABLATIONS.items()):
            ev = seeds[s].get(stage, {}).get("eval")
            if ev:
                vals = [ev.get(split, {}).get("acc" if k == "greedy" else "mean@8") for k in kinds for split, _ in SPLITS]
                lines.append(f"| {s} | {label if stage in dict(STAGES) else 'ablation: ' + label} | "
                             + " | ".join(f"{v:.3f}" if isinstance(v, float) else "-" for v in vals) + " |")
    # paired differences, pooled over seeds
    pairs = [(f"sft-rl-{x}", f"align-rl-{x}", f"{x.upper()}: aligned arm - SFT arm") for x in ALGOS]
    pairs += [("sft", f"sft-rl-{x}", f"{x.upper()}: RL from SFT - SFT") for x in ALGOS]
    pairs += [("align", f"align-rl-{x}", f"{x.upper()}: RL from aligned - aligned") for x in ALGOS]
    pairs += [("sft", "align", "alignment - SFT")]
    pairs += [("align-rl-grpo", a, f"ablation {label} - aligned arm (GRPO)") for a, label in ABLATIONS.items()]
    lines += ["", "Paired differences (per prompt within a seed), mean over seeds [hierarchical bootstrap 95%] (seeds):",
              "", "| difference | " + " | ".join(cols) + " |", "|---" * (1 + len(cols)) + "|"]

    def diffs(x, y, split, kind):
        return [d for d in (per_prompt_diff(seeds[s], x, y, split, kind) for s in sorted(seeds)) if d is not None]

    for x, y, label in pairs:
        row = [cell(diffs(x, y, split, k)) for k in kinds for split, _ in SPLITS]
        if any(c != "-" for c in row):
            lines.append(f"| {label} | " + " | ".join(row) + " |")
    pooled = []  # the paper's headline: the arm difference averaged over the three algorithms, prompt by prompt
    for k in kinds:
        for split, _ in SPLITS:
            per_seed = []
            for s in sorted(seeds):
                ds = [per_prompt_diff(seeds[s], f"sft-rl-{x}", f"align-rl-{x}", split, k) for x in ALGOS]
                if all(d is not None and len(d) == len(ds[0]) for d in ds):
                    per_seed.append(np.mean(ds, axis=0))
            pooled.append(cell(per_seed))
    lines.append("| **all three algorithms: aligned arm - SFT arm** | " + " | ".join(pooled) + " |")
    # drift and style per stage, averaged over seeds
    lines += ["", "Drift and style of the greedy responses (held-out), mean over seeds: W1 to the teacher's distribution "
              "of caption items and reasoning steps; share of teacher-style captions; caption exact.", "",
              "| stage | W1 caption items | W1 reasoning steps | teacher-style share | caption exact |", "|---|---|---|---|---|"]
    for stage, label in STAGES + list(ABLATIONS.items()):
        evs = [seeds[s][stage]["eval"]["eval"] for s in seeds if "eval" in seeds[s].get(stage, {})]
        if evs:
            m = lambda k: np.mean([e[k] for e in evs]) if all(k in e for e in evs) else float("nan")  # noqa: E731
            share = np.mean([e.get("style_share", {}).get("teacher", float("nan")) for e in evs])
            lines.append(f"| {label} | {m('w1_caption_items'):.3f} | {m('w1_reasoning_steps'):.3f} | {share:.3f} | "
                         f"{m('caption_exact'):.3f} |")
    # per question type: accuracy, and how often the stage gives its commonest answer of that type (a policy that
    # answers one value whatever the scene shows has a high share and an accuracy near 1 / the type's answer count)
    per_stage = {stage: [seeds[s][stage]["eval"]["eval"]["per_prompt"] for s in seeds if "eval" in seeds[s].get(stage, {})]
           for stage, _ in STAGES + list(ABLATIONS.items())}
    kinds_seen = sorted({p["kind"] for rows in per_stage.values() for r in rows for p in r if "text" in p})
    if kinds_seen:
        lines += ["", "Per question type (held-out, greedy), mean over seeds: accuracy / share of the stage's commonest "
                  "answer of that type.", "", "| stage | " + " | ".join(kinds_seen) + " |", "|---" * (1 + len(kinds_seen)) + "|"]
        for stage, label in STAGES + list(ABLATIONS.items()):
            cells = []
            for k in kinds_seen:
                per_seed = []
                for rows in per_stage[stage]:
                    ps = [p for p in rows if p["kind"] == k and "text" in p]
                    answers = [extract_answer(p["text"]) for p in ps]
                    if ps:
                        per_seed.append((np.mean([p["acc"] for p in ps]),
                                         max(answers.count(a) for a in set(answers)) / len(answers)))
                cells.append(f"{np.mean([a for a, _ in per_seed]):.2f} / {np.mean([c for _, c in per_seed]):.2f}"
                             if per_seed else "-")
            if any(c != "-" for c in cells):
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "![curves](curves.png)"]
    os.makedirs(out_dir, exist_ok=True)
    open(os.path.join(out_dir, "summary.md"), "w").write("\n".join(lines) + "\n")
    plot(seeds, os.path.join(out_dir, "curves.png"))
    print("\n".join(lines))


def plot(seeds, path):
    """Training-rollout accuracy, entropy and length of both RL arms per algorithm (mean over seeds, 10-step means),
    and the alignment game's score gap (teacher - student) per channel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 4, figsize=(18, 3.8))

    def mean_curve(stage, key):
        runs = [[r[key] for r in seeds[s][stage]["metrics"] if key in r] for s in seeds if seeds[s].get(stage, {}).get("metrics")]
        if not runs:
            return None
        n = min(map(len, runs))
        y = np.mean([r[:n] for r in runs], axis=0)
        return np.convolve(y, np.ones(10) / 10, mode="valid") if n >= 10 else y

    for x, colour in zip(ALGOS, ("C0", "C1", "C2")):
        for arm, style in (("sft", "--"), ("align", "-")):
            for a, key in zip(ax[:3], ("acc", "entropy", "len_mean")):
                y = mean_curve(f"{arm}-rl-{x}", key)
                if y is not None:
                    a.plot(y, style, color=colour, label=f"{x.upper()} from {'SFT' if arm == 'sft' else 'aligned'}")
    for a, t in zip(ax[:3], ("training-rollout accuracy", "entropy", "response length (tokens)")):
        a.set_title(t)
        a.set_xlabel("RL step")
    ax[0].legend(fontsize=7)
    for key, label in (("gap_cap", "perception (caption)"), ("gap_cot", "reasoning")):
        y = mean_curve("align", key)
        if y is not None:
            ax[3].plot(y, label=label)
    ax[3].set_title("alignment: score gap teacher - student")
    ax[3].set_xlabel("alignment step")
    ax[3].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2:])
