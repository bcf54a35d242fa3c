"""Tables from the device results: per-condition greedy held-out/hard accuracy vs the SFT start with a paired per-prompt
bootstrap 95% interval, and per-step training curves (first/last 10 steps)."""
import json, random, sys, os
R = sys.argv[1] if len(sys.argv) > 1 else "raw/res"
sft = json.load(open(f"{R}/eval_sft.json"))["results"]
def boot(a, b, B=10000, seed=0):
    rng = random.Random(seed); n = len(a); d = [x - y for x, y in zip(a, b)]
    m = sum(d) / n; bs = sorted(sum(d[rng.randrange(n)] for _ in range(n)) / n for _ in range(B))
    return m, bs[int(0.025 * B)], bs[int(0.975 * B)]
print("SFT:", {k: {kk: round(v[kk], 4) for kk in ("acc", "format", "length", "mean@8", "pass@8", "sample_len")} for k, v in sft.items()})
print("SFT first 400 held-out greedy:", sum(sft["eval"]["pp_acc"][:400]) / 400, " hard first 400:", sum(sft["eval_hard"]["pp_acc"][:400]) / 400)
conds = [("g1e5", "1e-5", "32x8", 0), ("g3e5", "3e-5", "32x8", 0), ("g3e5b64", "3e-5", "64x8", 0), ("g1e4", "1e-4", "32x8", 0),
         ("g1e4kl", "1e-4", "32x8", 0.5), ("g1e4plc", "1e-4 placebo", "32x8", 0), ("g1e4b64", "1e-4", "64x8", 0)]
print("\n| run | lr | batch | KL | steps done | eval step | param drift | held-out greedy (SFT 0.564) | diff [95% CI] | hard greedy (SFT 0.335) | diff [95% CI] | held-out format/len | hard format/len |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for n, lr, b, kl in conds:
    m = [json.loads(l) for l in open(f"{R}/{n}_metrics.jsonl")]; tr = [r for r in m if "reward" in r]
    ev = [json.loads(l) for l in open(f"{R}/{n}_evalpp.jsonl")] if os.path.exists(f"{R}/{n}_evalpp.jsonl") else []
    steps = {}
    for e in ev: steps.setdefault(e["step"], {})[e["name"]] = e
    if not steps: print(f"| {n} | {lr} | {b} | {kl} | {len(tr)} | - | - | - | - | - | - | - | - |")
    for s, d in sorted(steps.items()):
        row = [n, lr, b, kl, len(tr), s, f'{d["eval"]["param_drift"]:.4f}']
        for k in ("eval", "eval_hard"):
            if k in d:
                mm, lo, hi = boot(d[k]["pp_acc"], sft[k]["pp_acc"])
                row += [f'{d[k]["acc"]:.3f}', f'{mm:+.3f} [{lo:+.3f}, {hi:+.3f}]']
            else: row += ["-", "-"]
        row += [f'{d[k]["format"]:.3f}/{d[k]["length"]:.0f}' if k in d else "-" for k in ("eval", "eval_hard")]
        print("| " + " | ".join(map(str, row)) + " |")
print("\n| run | steps | train acc first10 / last10 | format first10 / last10 | entropy first10 / last10 | len first10 / last10 | grad norm first10 / last10 | clip_frac / clip_frac_lower (max) | rollout_k3 (mean) | zero-var groups last10 |")
print("|---|---|---|---|---|---|---|---|---|---|")
for n, lr, b, kl in conds:
    tr = [json.loads(l) for l in open(f"{R}/{n}_metrics.jsonl")]; tr = [r for r in tr if "reward" in r]
    f10, l10 = tr[:10], tr[-10:]
    av = lambda rs, k: sum(r[k] for r in rs) / len(rs)
    cells = [f"{av(f10, k):.3f} / {av(l10, k):.3f}" for k in ("acc", "format", "entropy", "len_mean", "grad_norm")]
    print(f"| {n} | {len(tr)} | " + " | ".join(cells) + f" | {max(r['clip_frac'] for r in tr):.3f} / {max(r['clip_frac_lower'] for r in tr):.3f} | {av(tr, 'rollout_k3'):.1e} | {av(l10, 'zero_var_groups'):.2f} |")
for n in ("g1e4",):
    p = f"{R}/eval_{n}.json"
    if os.path.exists(p):
        e = json.load(open(p))["results"]["eval"]
        print(f"\nsampled eval of {n} (final, held-out): greedy {e['acc']:.3f} mean@8 {e['mean@8']:.3f} pass@8 {e['pass@8']:.3f} sample len {e['sample_len']:.1f}")
