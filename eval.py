"""
Evaluation on held-out sets: accuracy (greedy, and pass/mean over k samples), format-valid rate, response length, and the
structural drift statistics of PRISM (bullet items per caption, reasoning steps per response) with their Wasserstein-1
distance to the supervision's distribution when the data holds teacher text.

    python eval.py --model runs/x/sft --data data/shapes/eval.parquet data/shapes/eval_hard.parquet --out runs/x/sft/eval.json
    torchrun --nproc_per_node 8 eval.py --model runs/x/rl --data mathvista_testmini.parquet --samples 8
    python eval.py --report runs/x          # runs/x/report.md from the stages' eval.json and metrics.jsonl

Data: any parquet/JSONL in the RL format (prompt, images, reward_model.ground_truth, optional extra_info.equivalent_answers).
"""

import argparse
import json
import os
import re
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import engine
import model as M
import verify


def caption_items(text):
    """Bullet items in the caption block ("- ", "* ", "• " or "1. " lines); 0 when there is no caption block."""
    m = re.search(r"<caption>(.*?)</caption>", text, re.DOTALL)
    return 0 if m is None else sum(bool(re.match(r"\s*(?:[-*•]|\d+[.)])\s+", ln)) for ln in m.group(1).splitlines())


def caption_lines(text):
    """The caption block's non-empty lines, stripped and sorted (an order-free reading of what it lists); None without
    a caption block."""
    m = re.search(r"<caption>(.*?)</caption>", text, re.DOTALL)
    return None if m is None else sorted(ln.strip() for ln in m.group(1).splitlines() if ln.strip())


def reasoning_steps(text):
    """Non-empty lines in the think block; 0 when there is no think block."""
    m = re.search(r"<think>(.*?)</think>", text, re.DOTALL)
    return 0 if m is None else sum(bool(ln.strip()) for ln in m.group(1).splitlines())


def wasserstein1(a, b):
    """W1 distance between two empirical distributions of numbers (the area between their CDFs)."""
    if not a or not b:
        return float("nan")
    xs = sorted(set(a) | set(b))
    cdf = lambda vals, x: sum(v <= x for v in vals) / len(vals)  # noqa: E731
    return sum(abs(cdf(a, x) - cdf(b, x)) * (x2 - x) for x, x2 in zip(xs, xs[1:]))


def drift(texts, teacher_texts):
    """Structure statistics of responses and, when teacher text exists, their W1 distance to the teacher's."""
    cap, cot = [caption_items(t) for t in texts], [reasoning_steps(t) for t in texts]
    out = {"caption_items": sum(cap) / max(len(cap), 1), "reasoning_steps": sum(cot) / max(len(cot), 1),
           "caption_hist": cap, "steps_hist": cot}
    if teacher_texts:
        tcap, tcot = [caption_items(t) for t in teacher_texts], [reasoning_steps(t) for t in teacher_texts]
        out.update(w1_caption_items=wasserstein1(cap, tcap), w1_reasoning_steps=wasserstein1(cot, tcot),
                   teacher_caption_hist=tcap, teacher_steps_hist=tcot)
    return out


def greedy(p):
    return p["acc"]


def sampled(p):  # mean accuracy of a prompt's sampled responses (None when it has none)
    return sum(p["sample_acc"]) / len(p["sample_acc"]) if p.get("sample_acc") else None


def paired_difference(a, b, n_boot=4000, seed=0, value=greedy):
    """Accuracy of run b minus run a on the prompts both evaluated (per_prompt records, paired by "where"; `value` reads
    a prompt's accuracy: greedy, or sampled for mean@k), with a paired bootstrap 95% interval (prompts resampled with
    replacement, the same draw for both runs). Returns (difference, low, high, prompts)."""
    acc_a = {p["where"]: value(p) for p in a}
    pairs = [(acc_a[p["where"]], value(p)) for p in b if acc_a.get(p["where"]) is not None and value(p) is not None]
    if not pairs:
        return float("nan"), float("nan"), float("nan"), 0
    d = torch.tensor([y - x for x, y in pairs], dtype=torch.float64)  # (n,) per-prompt differences
    idx = torch.randint(len(d), (n_boot, len(d)), generator=torch.Generator().manual_seed(seed))
    boots = d[idx].mean(1).sort().values  # (n_boot,)
    return d.mean().item(), boots[int(0.025 * n_boot)].item(), boots[int(0.975 * n_boot) - 1].item(), len(d)


@torch.no_grad()
def evaluate(infer, processor, examples, device, samples=0, temperature=1.0, max_new_tokens=512, max_pixels=560 * 560,
             batch_size=64, desc="eval", hf=False):
    """Greedy accuracy (+ mean and pass@k over `samples` sampled responses at `temperature` when samples > 0), format rate,
    mean length, drift statistics. Examples are split over ranks; the results are gathered so every rank returns the same."""
    rank, world = dist.get_rank(), dist.get_world_size()
    t0 = time.time()
    mine = examples[rank::world]
    tok = processor.tokenizer
    prompts = [data.render_chat(processor, ex, None, max_pixels) for ex in mine]
    rows = []
    for i in tqdm(range(0, len(mine), batch_size), desc=desc, disable=rank != 0, leave=False):
        chunk, pr = mine[i:i + batch_size], prompts[i:i + batch_size]
        with M.oom_guard("evaluation", f"{len(pr)} prompts x {1 + samples} responses of up to {max_new_tokens} tokens",
                         "a lower --batch-size or --max-new-tokens"):
            greedy = engine.generate(infer, pr, tok, device, max_new_tokens, temperature=0, batch_size=batch_size, hf=hf)
            sampled = engine.generate(infer, [q for q in pr for _ in range(samples)], tok, device, max_new_tokens,
                                      temperature, batch_size=batch_size, hf=hf) if samples else []
        for j, ex in enumerate(chunk):
            text = tok.decode(greedy[j], skip_special_tokens=True)
            r = verify.reward(text, ex.answer, ex.equivalents)
            s = [verify.reward(tok.decode(t, skip_special_tokens=True), ex.answer, ex.equivalents)["acc"]
                 for t in sampled[j * samples:(j + 1) * samples]]
            rows.append({"where": ex.where, "text": text, "acc": r["acc"], "format": r["format"], "len": len(greedy[j]),
                         "sample_acc": s, "teacher": (ex.teacher_caption + "\n" + ex.teacher_cot) if ex.teacher_caption
                         and ex.teacher_cot else None, "kind": ex.extra.get("kind"),
                         "caption_exact": None if not ex.teacher_caption else
                         float(caption_lines(text) == caption_lines(ex.teacher_caption)),
                         "style": data.response_style(text)})
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    rows = [r for g in gathered for r in g]
    n = len(rows)
    res = {"n": n, "acc": sum(r["acc"] for r in rows) / n, "format": sum(r["format"] for r in rows) / n,
           "length": sum(r["len"] for r in rows) / n}
    if samples:
        res[f"mean@{samples}"] = sum(sum(r["sample_acc"]) / samples for r in rows) / n
        res[f"pass@{samples}"] = sum(max(r["sample_acc"]) for r in rows) / n
    res.update(drift([r["text"] for r in rows], [r["teacher"] for r in rows if r["teacher"]]))
    exact = [r["caption_exact"] for r in rows if r["caption_exact"] is not None]
    if exact:  # perception: the greedy caption lists exactly what the teacher's does
        res["caption_exact"] = sum(exact) / len(exact)
    kinds = sorted({r["kind"] for r in rows if r["kind"]})
    if kinds:  # accuracy per question type (the data's extra_info.kind)
        res["acc_by_kind"] = {k: sum(r["acc"] for r in rows if r["kind"] == k) / sum(r["kind"] == k for r in rows)
                              for k in kinds}
    styles = sorted({r["style"] for r in rows})  # the synthetic world's two supervision styles (all "other" elsewhere)
    res["style_share"] = {s: sum(r["style"] == s for r in rows) / n for s in styles}
    res["acc_by_style"] = {s: sum(r["acc"] for r in rows if r["style"] == s) / sum(r["style"] == s for r in rows)
                           for s in styles}
    # per prompt, for paired comparisons between stages (the same prompts in the same order): greedy acc, its length,
    # the sampled accuracies, and the greedy response itself (a reader looks at what went wrong, prompt by prompt)
    res["per_prompt"] = [{k: r[k] for k in ("where", "acc", "len", "sample_acc", "kind", "caption_exact", "style", "text")}
                       for r in rows]
    res["t_generate"] = time.time() - t0  # rendering, generation and scoring of this file (seconds)
    return res


def table(results):
    """A markdown table, one row per (name, dataset)."""
    cols = ["acc", "format", "length", "caption_items", "reasoning_steps", "w1_caption_items", "w1_reasoning_steps"]
    extra = sorted({k for r in results.values() for k in r if "@" in k})
    lines = ["| model / data | " + " | ".join(cols + extra) + " |", "|---" * (len(cols + extra) + 1) + "|"]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[c]:.3f}" if isinstance(r.get(c), float) else "-" for c in cols + extra)
                     + " |")
    return "\n".join(lines)


ABLATIONS = {"dense": "dense discriminator", "text": "text-only discriminator", "gad": "whole-response scoring (GAD)",
             "route": "hard segment routing", "sft2": "no alignment, extra SFT"}  # run.sh's ABLATIONS


def write_report(run):
    """RUN/report.md: one row per stage found under RUN (base, SFT, SFT + align, SFT + RL, SFT + align + RL), with accuracy
    on the held-out and hard splits, format rate, length and drift distances; PNG figures beside it."""
    stages = [("base", "base"), ("sft", "SFT"), ("align", "SFT + align (PRISM)")]
    runs = [n for n in os.listdir(run) if "-rl-" in n and os.path.isdir(os.path.join(run, n))]
    for algo in sorted({n.split("-rl-")[1] for n in runs}):  # every RL algorithm run, both arms
        stages += [(f"sft-rl-{algo}", f"SFT + RL ({algo})"), (f"align-rl-{algo}", f"SFT + align + RL ({algo})")]
    for n in sorted(runs):  # run.sh's ABLATIONS: align-NAME-rl-ALGO (another discriminator), sft2-rl-ALGO (extra SFT)
        start, algo = n.split("-rl-")
        if start.startswith("align-") or start == "sft2":
            stages.append((n, f"ablation {ABLATIONS.get(start.removeprefix('align-'), start)} + RL ({algo})"))
    res = {}
    for d, label in stages:
        path = os.path.join(run, d, "eval.json")
        if os.path.isfile(path):
            res[label] = (d, json.load(open(path))["results"])
    if not res:
        raise SystemExit(f"{run}: no stage has an eval.json (run eval.py on the stage outputs first)")
    f = lambda r, k: f"{r[k]:.3f}" if isinstance(r.get(k), float) else "-"  # noqa: E731
    at_k = sorted({k for _, r in res.values() for s in r.values() for k in s if k.startswith(("mean@", "pass@"))})
    lines = [f"# PRISM run report: `{run}`", "",
             "Accuracy is greedy decoding scored by verify.py (mean@k / pass@k: over k responses sampled at T 1); W1 = "
             "Wasserstein-1 distance of the structure statistics (bullet items per caption, reasoning steps per response) "
             "to the teacher demonstrations' distribution "
             "(lower = closer to the supervision).", "",
             "| stage | acc (held-out) | acc (hard) | " + "".join(f"{k} ({s}) | " for k in at_k for s in ("held-out", "hard"))
             + "format-valid | mean length (tokens) | W1 caption items | W1 reasoning steps |", "|---" * (7 + 2 * len(at_k)) + "|"]
    for label, (_, r) in res.items():
        e, h = r.get("eval", {}), r.get("eval_hard", {})
        lines.append(f"| {label} | {f(e, 'acc')} | {f(h, 'acc')} | " + "".join(f"{f(x, k)} | " for k in at_k for x in (e, h))
                     + f"{f(e, 'format')} | {f(e, 'length')} | {f(e, 'w1_caption_items')} | {f(e, 'w1_reasoning_steps')} |")
    kinds = sorted({k for _, r in res.values() for s in r.values() for k in s.get("acc_by_kind", {})})
    if kinds:  # perception and reasoning apart: captions read right, and accuracy per question type (both splits pooled)
        lines += ["", "Caption exact = the greedy caption lists exactly the teacher caption's lines (the objects read "
                  "right); accuracy per question type over the held-out and hard prompts together.", "",
                  "| stage | caption exact (held-out) | caption exact (hard) | " + " | ".join(kinds) + " |",
                  "|---" * (len(kinds) + 3) + "|"]
        for label, (_, r) in res.items():
            pp = [p for s in r.values() for p in s.get("per_prompt", [])]
            by = [sum(p["acc"] for p in pp if p["kind"] == k) / max(1, sum(p["kind"] == k for p in pp)) for k in kinds]
            lines.append(f"| {label} | {f(r.get('eval', {}), 'caption_exact')} | {f(r.get('eval_hard', {}), 'caption_exact')} | "
                         + " | ".join(f"{v:.3f}" for v in by) + " |")
    styles = [s for s in ("teacher", "broad") if any(s in r2.get("style_share", {}) for _, r in res.values()
                                                     for r2 in r.values())]
    if styles:  # the synthetic world's supervision styles: how often each stage writes each, and what each is worth
        lines += ["", "Response style of the greedy captions (teacher = every object by its cell; broad = the one-line "
                  "grid summary) and the accuracy within each style, over the held-out and hard prompts together.", "",
                  "| stage | " + " | ".join(f"{s}-style share" for s in styles) + " | "
                  + " | ".join(f"acc in {s} style" for s in styles) + " |", "|---" * (1 + 2 * len(styles)) + "|"]
        for label, (_, r) in res.items():
            pp = [p for s in r.values() for p in s.get("per_prompt", []) if "style" in p]
            n = {s: sum(p["style"] == s for p in pp) for s in styles}
            share = [f"{n[s] / len(pp):.3f}" if pp else "-" for s in styles]
            acc = [f"{sum(p['acc'] for p in pp if p['style'] == s) / n[s]:.3f} ({n[s]})" if n[s] else "-" for s in styles]
            lines.append(f"| {label} | " + " | ".join(share + acc) + " |")
    pairs = []  # (a, b) for b - a: what each RL arm gained over its start, and the paper's comparison of the two arms
    for algo in sorted({d.split("-rl-")[1] for d, _ in res.values() if "-rl-" in d}):
        rl, arl = f"SFT + RL ({algo})", f"SFT + align + RL ({algo})"
        pairs += [("SFT", rl), ("SFT + align (PRISM)", arl), (rl, arl)]
        pairs += [(arl, label) for label, (d, _) in res.items() if label.startswith("ablation") and d.endswith(f"-rl-{algo}")]
    rows, values = [], [("greedy", greedy)] + [("mean@k", sampled)] * any(k.startswith("mean@") for k in at_k)
    for x, y in pairs:
        if x in res and y in res:
            cells = []
            for _, value in values:
                for split in ("eval", "eval_hard"):
                    diff, lo, hi, n = paired_difference(res[x][1].get(split, {}).get("per_prompt", []),
                                                        res[y][1].get(split, {}).get("per_prompt", []), value=value)
                    cells.append(f"{diff:+.3f} [{lo:+.3f}, {hi:+.3f}] ({n})" if n else "-")
            rows.append(f"| {y} - {x} | " + " | ".join(cells) + " |")
    if rows:  # what RL and the alignment stage changed, prompt by prompt
        lines += ["", "Accuracy differences on the same prompts, with paired bootstrap 95% intervals (prompts):", "",
                  "| difference | " + " | ".join(f"{v} {s}" for v, _ in values for s in ("held-out", "hard")) + " |",
                  "|---" * (1 + 2 * len(values)) + "|", *rows]
    cur = os.path.join(run, "curated", "summary.json")
    if os.path.isfile(cur) and os.path.isfile(os.path.join(run, "curated", "run_config.json")):  # curate.py's set
        s, c = json.load(open(cur)), json.load(open(os.path.join(run, "curated", "run_config.json")))
        drops = ", ".join(f"{k} {v}" for k, v in s["drops_by_reason"].items() if v) or "none"
        lines += ["", f"Alignment set (curate.py): of {s['usable']} pool problems, {s['kept']} were unsolved by the SFT "
                  f"policy (pass rate <= {c['max_pass']} over {c['samples']} samples at T {c['temperature']}); the teacher "
                  f"({c['teacher_model']}) answered {s['sent_to_teacher']} of them and {s['demonstrations']} demonstrations "
                  f"verified (dropped: {drops}); {s['teacher_calls']} teacher calls made, {s['teacher_cached']} cached, "
                  f"{s['teacher_failed']} failed after retries (retried: {s['retries_by_reason'] or 'none'})."]
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figs = []

    def curve(ax, xs, ys, label, k=5):  # the raw per-step values faint, their trailing k-step mean on top
        line, = ax.plot(xs, ys, alpha=0.25)
        ax.plot(xs, [sum(ys[max(0, i - k + 1):i + 1]) / len(ys[max(0, i - k + 1):i + 1]) for i in range(len(ys))],
                color=line.get_color(), label=label)
    # RL curves, both arms
    arms = [(d, label) for label, (d, _) in res.items() if "-rl-" in d]
    if arms:
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
        for d, label in arms:
            m = [json.loads(x) for x in open(os.path.join(run, d, "metrics.jsonl")) if '"reward"' in x]
            curve(ax[0], [x["step"] for x in m], [x["reward"] for x in m], label)
            curve(ax[1], [x["step"] for x in m], [x["acc"] for x in m], label)
        ax[0].set(title="RL reward (training rollouts; 5-step mean)", xlabel="step")
        ax[1].set(title="RL accuracy (training rollouts; 5-step mean)", xlabel="step")
        ax[0].legend()
        figs.append(("rl_curves.png", fig))
    # the alignment score gap per channel (the paper's training-curve figure)
    mpath = os.path.join(run, "align", "metrics.jsonl")
    if os.path.isfile(mpath):
        m = [json.loads(x) for x in open(mpath) if '"gap_cap"' in x]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        curve(ax, [x["step"] for x in m], [x["gap_cap"] for x in m], "perception (caption)", k=3)
        curve(ax, [x["step"] for x in m], [x["gap_cot"] for x in m], "reasoning", k=3)
        ax.set(title="score gap: teacher - policy (3-step mean)", xlabel="alignment step")
        ax.legend()
        figs.append(("align_gap.png", fig))
    # drift histograms per trained stage, with the teacher's distribution (black, dashed)
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
    series = [(label, r.get("eval", {})) for label, (_, r) in res.items() if label != "base"]
    teacher = next((e for _, e in series if "teacher_caption_hist" in e), None)
    if teacher:
        series.append(("teacher", {"caption_hist": teacher["teacher_caption_hist"],
                                   "steps_hist": teacher["teacher_steps_hist"]}))
    for label, e in series:
        for a, key in zip(ax, ("caption_hist", "steps_hist")):
            vals = e.get(key) or []
            if vals:
                xs = sorted(set(vals))
                style = dict(color="black", linestyle="--", linewidth=2) if label == "teacher" else {}
                a.plot(xs, [vals.count(x) / len(vals) for x in xs], marker="o", label=label, **style)
    ax[0].set(title="bullet items per caption", ylabel="share of responses")
    ax[1].set(title="reasoning steps per response")
    ax[0].legend(fontsize=7)
    figs.append(("drift.png", fig))
    lines.append("")
    for name, fig in figs:
        fig.tight_layout()
        fig.savefig(os.path.join(run, name), dpi=100)
        plt.close(fig)
        lines.append(f"![{name}]({name})")
    with open(os.path.join(run, "report.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return "\n".join(lines)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="an HF directory (a stage output), or a built-in config name for an untrained baseline")
    p.add_argument("--processor", default=None, help="processor directory (default: the --model directory)")
    p.add_argument("--data", nargs="+", default=[], help="parquet/JSONL files in the RL format")
    p.add_argument("--out", default=None, help="write the metrics JSON here (default: MODEL/eval.json)")
    p.add_argument("--samples", type=int, default=0, help="also sample k responses per prompt (mean@k and pass@k)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature for --samples")
    p.add_argument("--max-new-tokens", type=int, default=512, help="response length limit in tokens")
    p.add_argument("--max-pixels", type=int, default=560 * 560, help="images are downscaled to at most this many pixels")
    p.add_argument("--batch-size", type=int, default=64, help="prompts per generation batch")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N examples of each file (0: all)")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of stopping at the first")
    p.add_argument("--image-root", default=None, help="relative image paths resolve against this folder (the release's "
                       "IMAGE_BASE_PATH), else against the data file's folder")
    p.add_argument("--system-prompt", default=None, help="a text file: the system prompt of records that carry none "
                       "(default: data.SYSTEM_PROMPT)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--hf-generate", action="store_true", help="decode with Hugging Face generate() (dynamic cache), the "
                   "readable reference path, instead of the static-cache decode loop (compiled with CUDA graphs on GPUs)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the --model directory")
    p.add_argument("--report", default=None, help="RUN_DIR: write RUN_DIR/report.md from its stages' eval.json and metrics")
    args = p.parse_args()
    if args.report:
        print(write_report(args.report))
        raise SystemExit(0)

    if not args.model or not args.data:
        p.error("--model and --data are required (or --report RUN_DIR)")
    rank, world, device = M.init_dist()
    M.seed_all(args.seed + rank)
    processor = M.load_processor(args.processor or args.model)
    hf = M.load_policy(args.model, processor, device, seed=args.seed, trust_remote_code=args.trust_remote_code)
    infer = engine.make_inference_copy(hf, device)
    del hf
    results = {}
    for path in args.data:
        exs, skipped = data.read_examples(path, "prompt", skip_bad=args.skip_bad, image_root=args.image_root,
                                          system=data.system_prompt(args.system_prompt))
        if skipped:
            M.print0(f"skipped {len(skipped)} bad records of {path} (first: {skipped[0]})")
        exs = exs[:args.limit] if args.limit else exs
        name = os.path.basename(path).rsplit(".", 1)[0]
        results[name] = evaluate(infer, processor, exs, device, args.samples, args.temperature, args.max_new_tokens,
                                 args.max_pixels, args.batch_size, desc=name, hf=args.hf_generate)
        results[name]["skipped"] = len(skipped)
    if rank == 0:
        out = args.out or os.path.join(args.model, "eval.json")
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump({"model": args.model, "results": results}, f, indent=1)
        print(table({f"{args.model} / {k}": v for k, v in results.items()}))
        for k, v in results.items():
            print(f"\n{k}, first response:\n{v['per_prompt'][0]['text']}")
    dist.destroy_process_group()
