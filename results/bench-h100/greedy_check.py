"""
Agreement of the two rollout paths on a trained policy: engine.generate with Hugging Face generate() (dynamic cache)
and with the static-cache decode loop (compiled, replayed as a CUDA graph on a GPU), on the prompts of an RL-format
file: greedy at a few generation batch sizes (rows and tokens equal, the accuracy of each path), then sampled at
temperature 1 (8 samples per prompt: accuracy, length, distinct samples). Prints one JSON line.

    python results/bench-h100/greedy_check.py --model runs/shapes-small-s0/sft --data data/shapes-s0/eval.parquet --limit 256
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import data  # noqa: E402
import engine  # noqa: E402
import model as M  # noqa: E402
import verify  # noqa: E402

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--model", required=True, help="a trained policy HF directory")
p.add_argument("--data", required=True, help="RL-format parquet/JSONL")
p.add_argument("--limit", type=int, default=256, help="prompts")
p.add_argument("--max-new-tokens", type=int, default=256, help="response length limit")
p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64], help="generation batch sizes to compare at")
p.add_argument("--fp32", action="store_true", help="run both paths in fp32 (default: bf16 on a GPU, as the stages do)")
p.add_argument("--out", default=None, help="append the JSON line to this file")
args = p.parse_args()

rank, world, device = M.init_dist()
processor = M.load_processor(args.model)
tok = processor.tokenizer
exs = data.read_examples(args.data, "prompt")[0][:args.limit]
prompts = [data.render_chat(processor, ex) for ex in exs]
infer = engine.make_inference_copy(M.load_policy(args.model, processor, device), device)
infer = infer.float() if args.fp32 else infer
res = {"model": args.model, "dtype": str(next(infer.parameters()).dtype), "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
       "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}
hf_runs = []


def accuracy(outs, examples):
    return sum(verify.reward(tok.decode(o, skip_special_tokens=True), ex.answer, ex.equivalents)["acc"]
               for o, ex in zip(outs, examples)) / len(outs)


for bs in args.batch_sizes:
    outs = {static: engine.generate(infer, prompts, tok, device, args.max_new_tokens, 0.0, 1.0, bs, hf=not static)
            for static in (False, True)}
    a, b = outs[False], outs[True]
    same_tok = sum(x == y for r, s in zip(a, b) for x, y in zip(r, s))
    acc = {k: accuracy(v, exs) for k, v in outs.items()}
    res[f"batch{bs}"] = {"rows_equal": sum(r == s for r, s in zip(a, b)) / len(a),
                         "tokens_equal": same_tok / max(1, sum(max(len(r), len(s)) for r, s in zip(a, b))),
                         "acc_hf_generate": acc[False], "acc_static": acc[True],
                         "mean_len": sum(map(len, a)) / len(a)}
    hf_runs.append(a)
# sampling (T 1): the paths draw different random numbers, so compare statistics: accuracy, length, and how many of 8
# samples of a prompt are distinct (a CUDA graph replaying frozen noise would show here)
for static in (False, True):
    torch.manual_seed(0)
    outs = engine.generate(infer, [p for p in prompts for _ in range(8)], tok, device, args.max_new_tokens, 1.0, 1.0,
                      args.batch_sizes[-1], hf=not static)
    res["sampled_" + ("static" if static else "hf_generate")] = {
        "acc": accuracy(outs, [ex for ex in exs for _ in range(8)]),
        "mean_len": sum(map(len, outs)) / len(outs),
        "distinct_of_8": sum(len({tuple(o) for o in outs[i:i + 8]}) for i in range(0, len(outs), 8)) / len(prompts)}
# the noise level of one path alone: generate() at the first vs the last batch size (batched bf16 kernels differ by shape)
res["hf_generate_rows_equal_across_batch_sizes"] = sum(r == s for r, s in zip(hf_runs[0], hf_runs[-1])) / len(prompts)
print(json.dumps(res), flush=True)
if args.out:
    with open(args.out, "a") as f:
        f.write(json.dumps(res) + "\n")
