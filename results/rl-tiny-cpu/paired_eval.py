"""Per-prompt greedy and sampled (8 at T 0.7) accuracy of one model on 200 held-out prompts, through eval.py's evaluate:
    python paired_eval.py NAME MODEL_DIR DATA_DIR OUT_DIR   ->  OUT_DIR/paired-NAME.json"""
import json
import os
import sys

import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import data  # noqa: E402
import engine  # noqa: E402
import eval as evaluation  # noqa: E402
import model as M  # noqa: E402

name, path, D, out = sys.argv[1:5]
captured = {}
orig = dist.all_gather_object


def grab(dst, obj):  # evaluate() gathers its per-prompt rows: keep this rank's copy
    captured["rows"] = obj
    return orig(dst, obj)


dist.all_gather_object = grab
rank, world, device = M.init_dist()
M.seed_all(0)
proc = M.load_processor(path)
infer = engine.make_inference_copy(M.load_policy(path, proc, device), device)
exs, _ = data.read_examples(f"{D}/eval.parquet", "prompt")
res = evaluation.evaluate(infer, proc, exs[:200], device, samples=8, temperature=0.7, max_new_tokens=256)
json.dump({"greedy": [r["acc"] for r in captured["rows"]], "samples": [r["sample_acc"] for r in captured["rows"]],
           "acc": res["acc"], "mean@8": res["mean@8"]}, open(os.path.join(out, f"paired-{name}.json"), "w"))
print(name, res["acc"], res["mean@8"])
