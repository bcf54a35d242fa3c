"""Per-prompt evaluation (mirrors eval.evaluate: same render, engine.generate, verify.reward), but the decode runs in
batches of --batch-size rows (eval.evaluate passes no batch size to engine.generate, so it decodes 64 rows at a time) and
every prompt's greedy acc/format/length and sampled accs are written out, for paired bootstraps.

    python x_eval.py --model DIR --data a.parquet b.parquet --out OUT.json [--samples 8]
"""
import argparse
import json
import os
import time

import torch

import data
import engine
import model as M
import verify

_PROMPTS = {}


@torch.no_grad()
def evaluate_pp(infer, processor, examples, device, samples=0, temperature=1.0, max_new_tokens=256,
                max_pixels=560 * 560, batch_size=500, hf=False):
    t0 = time.time()
    tok = processor.tokenizer
    key = id(examples)
    if key not in _PROMPTS:
        _PROMPTS[key] = [data.render_chat(processor, ex, None, max_pixels) for ex in examples]
    prompts = _PROMPTS[key]
    acc, fmt, ln, sacc, slen = [], [], [], [], []
    for i in range(0, len(examples), batch_size):
        chunk, pr = examples[i:i + batch_size], prompts[i:i + batch_size]
        greedy = engine.generate(infer, pr, tok, device, max_new_tokens, temperature=0, batch_size=batch_size, hf=hf)
        sampled = engine.generate(infer, [q for q in pr for _ in range(samples)], tok, device, max_new_tokens,
                                  temperature, batch_size=batch_size, hf=hf) if samples else []
        for j, ex in enumerate(chunk):
            r = verify.reward(tok.decode(greedy[j], skip_special_tokens=True), ex.answer, ex.equivalents)
            acc.append(int(r["acc"]))
            fmt.append(int(r["format"]))
            ln.append(len(greedy[j]))
            if samples:
                ss = sampled[j * samples:(j + 1) * samples]
                sacc.append(sum(int(verify.reward(tok.decode(t, skip_special_tokens=True), ex.answer,
                                                  ex.equivalents)["acc"]) for t in ss))
                slen.append(sum(len(t) for t in ss) / samples)
    n = len(acc)
    res = {"n": n, "acc": sum(acc) / n, "format": sum(fmt) / n, "length": sum(ln) / n, "pp_acc": acc, "pp_format": fmt,
           "pp_len": ln}
    if samples:
        res[f"mean@{samples}"] = sum(sacc) / (samples * n)
        res[f"pass@{samples}"] = sum(s > 0 for s in sacc) / n
        res["sample_len"] = sum(slen) / n
        res["pp_sample_correct"] = sacc
    res["t"] = time.time() - t0
    return res


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--samples", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    rank, world, device = M.init_dist()
    M.seed_all(a.seed)
    processor = M.load_processor(a.model)
    hf = M.load_policy(a.model, processor, device, seed=a.seed)
    infer = engine.make_inference_copy(hf, device)
    del hf
    out = {"model": a.model, "results": {}}
    for path in a.data:
        exs, _ = data.read_examples(path, "prompt", system=data.system_prompt(None))
        name = os.path.basename(path).rsplit(".", 1)[0]
        r = evaluate_pp(infer, processor, exs, device, a.samples, a.temperature, a.max_new_tokens, batch_size=a.batch_size)
        out["results"][name] = r
        print(f"{a.model} {name}: n {r['n']} greedy acc {r['acc']:.4f} format {r['format']:.3f} len {r['length']:.1f}"
              + (f" mean@{a.samples} {r[f'mean@{a.samples}']:.4f} pass@{a.samples} {r[f'pass@{a.samples}']:.4f}"
                 if a.samples else "") + f" ({r['t']:.1f}s)", flush=True)
    with open(a.out, "w") as f:
        json.dump(out, f)
