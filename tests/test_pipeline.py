"""run.sh QUICK=1 end to end in a temp dir: every stage runs (curation through the oracle teacher server included), and
the report holds every row with finite numbers and its three figures.
A second run of the same command resumes: every stage is found complete and nothing is recomputed."""

import json
import math
import os
import re
import shutil
import subprocess

import data
from helpers import ENV, ROOT


def test_quick_pipeline_report():
    # as a user runs it: no RUN/DATA given, so run.sh picks its default paths (a seed nobody else uses keeps them apart)
    env = {k: v for k, v in ENV.items() if k not in ("RUN", "DATA")}
    env.update(QUICK="1", NPROC="1", SEED="9173")
    run, data = os.path.join(ROOT, "runs", "shapes-tiny-s9173-quick"), os.path.join(ROOT, "data", "shapes-s9173-quick")
    for d in (run, data):
        shutil.rmtree(d, ignore_errors=True)
    try:
        check_pipeline(env, run)
    finally:
        for d in (run, data):
            shutil.rmtree(d, ignore_errors=True)


def check_pipeline(env, run):
    r = subprocess.run(["bash", "run.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    rows = report_rows(run)
    assert list(rows) == ["base", "SFT", "SFT + align (PRISM)", "SFT + RL (grpo)", "SFT + align + RL (grpo)"]
    for name, vals in rows.items():
        for v in vals:
            assert re.fullmatch(r"-?\d+\.\d+", v) and math.isfinite(float(v)), (name, vals)
    # the alignment set came from curate.py through the oracle server, and the report says what it kept
    s = json.load(open(os.path.join(run, "curated", "summary.json")))
    assert json.load(open(os.path.join(run, "align", "run_config.json")))["data"].endswith("curated/align.parquet")
    assert 0 < s["demonstrations"] <= s["kept"] <= s["usable"] == 16 and s["teacher_calls"] >= s["sent_to_teacher"]
    assert f"of 16 pool problems, {s['kept']} were unsolved" in open(os.path.join(run, "report.md")).read()
    # eval.json keeps the per-prompt results that paired comparisons between stages need
    for split, r in json.load(open(os.path.join(run, "sft", "eval.json")))["results"].items():
        pp = r["per_prompt"]
        assert len(pp) == r["n"] == 32 and sum(p["acc"] for p in pp) / r["n"] == r["acc"]
        assert r["caption_exact"] == sum(p["caption_exact"] for p in pp) / len(pp)  # the world's splits carry teacher text
        for kind, acc in r["acc_by_kind"].items():
            assert acc == sum(p["acc"] for p in pp if p["kind"] == kind) / sum(p["kind"] == kind for p in pp)
        for style, share in r["style_share"].items():  # the greedy responses' supervision style, and accuracy within it
            mine = [p for p in pp if p["style"] == style]
            assert share == len(mine) / len(pp) and r["acc_by_style"][style] == sum(p["acc"] for p in mine) / len(mine)
        assert abs(sum(r["style_share"].values()) - 1) < 1e-12
        assert all(p["style"] == data.response_style(p["text"]) for p in pp)  # the greedy response is kept with its row
    assert "| stage | caption exact (held-out) | caption exact (hard) | arith | attribute | choice | conj | count | pair |" in \
        open(os.path.join(run, "report.md")).read()
    # paired differences between stages: RL's gain over its start on the same prompts, with the interval around it
    report = open(os.path.join(run, "report.md")).read()
    res = {d: json.load(open(os.path.join(run, d, "eval.json")))["results"] for d in ("sft", "sft-rl-grpo")}
    diff = res["sft-rl-grpo"]["eval"]["acc"] - res["sft"]["eval"]["acc"]
    row = re.search(r"\| SFT \+ RL \(grpo\) - SFT \| ([-+]\d\.\d+) \[([-+]\d\.\d+), ([-+]\d\.\d+)\] \(32\) \|", report)
    assert row and abs(float(row[1]) - diff) < 1e-3 and float(row[2]) <= float(row[1]) <= float(row[3])
    assert "| SFT + align + RL (grpo) - SFT + RL (grpo) |" in report
    # the report's figures exist beside it (matplotlib is a pinned dependency)
    figs = re.findall(r"!\[[^]]*\]\(([^)]+)\)", open(os.path.join(run, "report.md")).read())
    assert sorted(figs) == ["align_gap.png", "drift.png", "rl_curves.png"]
    assert all(os.path.getsize(os.path.join(run, f)) > 10_000 for f in figs)
    # the same command again: all stages are complete, so it only rewrites the report
    mtimes = {d: os.path.getmtime(os.path.join(run, d, "model.safetensors")) for d in ("sft", "align")}
    r2 = subprocess.run(["bash", "run.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert {d: os.path.getmtime(os.path.join(run, d, "model.safetensors")) for d in mtimes} == mtimes
    # a run directory with only the aligned arm still reports, and concurrent GPU runs leave NAME.log files
    shutil.rmtree(os.path.join(run, "sft-rl-grpo"))
    open(os.path.join(run, "sft-rl-gspo.log"), "w").close()
    r3 = subprocess.run(["python", "eval.py", "--report", run], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r3.returncode == 0, r3.stderr[-3000:]
    assert list(report_rows(run)) == ["base", "SFT", "SFT + align (PRISM)", "SFT + align + RL (grpo)"]


def report_rows(run):
    """The report table's rows: {stage label: [the six cells]}."""
    rows = {}
    for line in open(os.path.join(run, "report.md")).read().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0] and not cells[0].startswith("-") and cells[0] != "stage":
            rows[cells[0]] = cells[1:]
    return rows


def test_caption_lines_read_what_a_caption_lists_in_any_order():
    import eval as E
    a = "<caption>\n- row 2, column 1: red circle\n - row 1, column 1: blue square\n\n</caption>\n<think>x</think><answer>1</answer>"
    b = "<caption>- row 1, column 1: blue square\n- row 2, column 1: red circle</caption>"
    assert E.caption_lines(a) == E.caption_lines(b) == ["- row 1, column 1: blue square", "- row 2, column 1: red circle"]
    assert E.caption_lines(a.replace("red", "blue")) != E.caption_lines(b) and E.caption_lines("no blocks") is None


def test_paired_difference_is_the_mean_difference_with_a_bootstrap_interval():
    import random

    import eval as E
    rng = random.Random(0)
    a = [{"where": f"f:{i}", "acc": float(rng.random() < 0.4)} for i in range(400)]
    b = [{"where": p["where"], "acc": float(rng.random() < 0.5) if p["acc"] == 0 else 1.0} for p in reversed(a)]  # paired by where
    d = [y["acc"] - x["acc"] for x, y in zip(a, reversed(b))]
    mean, lo, hi, n = E.paired_difference(a, b)
    assert n == 400 and abs(mean - sum(d) / 400) < 1e-12
    # against the normal approximation of the mean's sampling distribution (n = 400): +-1.96 standard errors
    se = (sum((x - mean) ** 2 for x in d) / 399 / 400) ** 0.5
    assert abs(lo - (mean - 1.96 * se)) < 0.25 * se and abs(hi - (mean + 1.96 * se)) < 0.25 * se
    assert E.paired_difference(a, a)[:3] == (0.0, 0.0, 0.0)
    assert E.paired_difference(a, [{"where": "other", "acc": 1.0}])[3] == 0  # no prompt in common
    # mean@k: the per-prompt mean of the sampled accuracies; prompts without samples are left out
    sa = [dict(p, sample_acc=[1.0, 0.0, 0.0, 1.0]) for p in a[:300]] + a[300:]
    sb = [dict(p, sample_acc=[1.0, 1.0, 1.0, 0.0]) for p in a[:200]]
    mean, lo, hi, n = E.paired_difference(sa, sb, value=E.sampled)
    assert n == 200 and abs(mean - 0.25) < 1e-12 and lo == hi == mean  # every prompt differs by the same 0.25
