"""
Throughput and memory benchmarks on GPUs with random-weight, real-size Qwen3-VL architectures (no downloads).

    python bench.py train --config 4b --seq 4096 --batch 2 --steps 6                 # 1 GPU
    torchrun --nproc_per_node 2 bench.py train --config 4b --seq 4096 --batch 2       # FSDP2 over 2 GPUs

    python bench.py rollout --config 4b --batches 16 64 256 --prompt 256 --new 128      # 1 GPU

train: the policy's training step as the stages run it (FSDP2, bf16 compute / fp32 master weights, chunked log-probs,
AdamW), on random text sequences of --seq tokens; reports tokens/s per GPU, MFU and peak memory.
MFU counts 6 N FLOPs per token (N = decoder + output-layer parameters) plus causal attention, 6 L H Q T per token
(fwd + bwd), against 989 TFLOP/s of bf16 per H100.
rollout: decode time per step of the static-cache loop (engine.decode) and of plain generate() with the dynamic cache, in
the same run, on the bf16 inference copy, for prompts of one image + text; ms per step is (time for --new tokens - time for
1 token) / (--new - 1), so the prefill is excluded. The floor: bytes read per step (bf16 weights + the filled part of the
KV cache at the mean context) over the card's memory bandwidth (its datasheet figure from BANDWIDTH, else measured by a
device-to-device copy). Results are printed as JSON lines (and appended to --out).
align: one full alignment step, i.e. align.py itself run on --steps steps (--config policy, an upcycled --disc-config
discriminator with 4 experts, top-2), on --prompts prompts x --group-size rollouts of --new tokens, prompts of one
448x448 image + --prompt text tokens, teacher segments of the same length as the responses; reports align.py's time split
per step (generate / score / disc update / policy update) and the peak memory over ranks. The rollouts are decoded for
real (random weights: nearly all of them run to --new tokens), then each is replaced by a format-valid response of the
same token length: a random-weight policy never writes the format, and invalid rollouts skip scoring and the
discriminator update. Saving is skipped (align.py saves only at the end of a run).

    torchrun --nproc_per_node 4 bench.py align --config 4b --disc-config 2b --prompts 4 --group-size 16 --prompt 1800 \
        --new 6144 --steps 2 --grad-ckpt

pipeline: the miniature as run.sh runs it on one GPU (small config, its batch sizes), stage scripts as subprocesses of the
code tree --code (default: this one; pass a checkout of another commit to compare in the same run): SFT steps (64
examples, the miniature's SFT recipe), RL steps (8 prompts x 8 rollouts of <= 256 tokens), alignment steps (the same,
discriminator upcycled from the SFT policy), eval.py on 400 prompts, then --concurrent RL runs at once on the one GPU. Reports medians of the step times
after the first two (which compile), the first step, and each process's wall time; one JSON line per measurement.

    python bench.py pipeline --config small --workdir runs/bench-pipeline --out pipeline.jsonl [--code ../old-checkout]
"""

import argparse
import io
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

import data
import engine
import model as M

H100_BF16 = 989e12

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("what", choices=["train", "rollout", "align", "rl", "pipeline"], help="which measurement")
p.add_argument("--config", default="4b", choices=list(M.CONFIGS), help="architecture (random weights)")
p.add_argument("--processor", default="data/shapes/processor", help="any processor dir (special-token ids only)")
p.add_argument("--seq", type=int, default=4096, help="tokens per sequence")
p.add_argument("--batch", type=int, default=2, help="sequences per GPU per step")
p.add_argument("--steps", type=int, default=6, help="train: timed steps (after 2 warm-up steps); align, rl: stage steps")
p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing in every block")
p.add_argument("--compile", action="store_true", help="train: torch.compile each decoder block")
p.add_argument("--pack", action="store_true", help="train: the --batch sequences packed into one row (varlen attention); "
               "align, rl: the stage's --pack")
p.add_argument("--offload", action="store_true", help="align: the stage's --offload (the model not in use on the host)")
p.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256], help="rollout: sequences per decode batch")
p.add_argument("--prompt", type=int, default=256, help="rollout, align, rl: text tokens per prompt (plus one 448x448 image)")
p.add_argument("--new", type=int, default=128, help="rollout, align, rl: tokens generated per sequence")
p.add_argument("--disc-config", default="2b", choices=list(M.CONFIGS), help="align: the dense model the discriminator "
               "is upcycled from")
p.add_argument("--prompts", type=int, default=4, help="align, rl: prompts per step (global)")
p.add_argument("--group-size", type=int, default=16, help="align, rl: rollouts per prompt")
p.add_argument("--micro-batch", type=int, default=8, help="align, rl: policy sequences per forward/backward (at most)")
p.add_argument("--gen-batch", type=int, default=64, help="align, rl: sequences per generation call")
p.add_argument("--hf-generate", action="store_true", help="align, rl: roll out with generate() instead of the decode loop")
p.add_argument("--code", default=None, help="pipeline: the code tree whose stage scripts run (default: this one)")
p.add_argument("--workdir", default="runs/bench-pipeline", help="pipeline: data and stage outputs (reused when present)")
p.add_argument("--concurrent", type=int, nargs="*", default=[1, 4, 8], help="pipeline: RL runs at once on one GPU")
p.add_argument("--out", default=None, help="append the result JSON lines to this file")
args = p.parse_args()
dev_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
# datasheet memory bandwidth (bytes/s) of known cards, matched in order against the device name
BANDWIDTH = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("H20", 4.0e12), ("B200", 8.0e12), ("GH200", 4.0e12),
             ("A100 80GB PCIe", 1.935e12), ("A100-SXM4-80GB", 2.039e12), ("A100", 1.555e12), ("L40S", 0.864e12)]


def bandwidth():
    """(bytes/s, source) of this card: the datasheet figure when the name is known, else measured by copying 4 GiB on
    the device (bytes read + written over the time), which reads ~85-90% of a datasheet figure."""
    for name, bw in BANDWIDTH:
        if name in dev_name:
            return bw, f"datasheet ({name})"
    x, y = torch.empty(1 << 31, dtype=torch.bfloat16, device="cuda"), torch.empty(1 << 31, dtype=torch.bfloat16, device="cuda")
    y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.time()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 10 * 2 * x.numel() * 2 / (time.time() - t0), "measured (device copy)"


def emit(res):
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(res), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(res) + "\n")


def bench_image():
    png = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (448, 448, 3), dtype=np.uint8)).save(png, format="PNG")
    return {"bytes": png.getvalue()}


if args.what == "pipeline":
    import statistics
    import subprocess
    code = os.path.abspath(args.code or os.path.dirname(os.path.abspath(__file__)))
    W = os.path.abspath(args.workdir)
    D = os.path.join(W, "data")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "2"}

    def launch(script, *a, log):
        return subprocess.Popen([sys.executable, os.path.join(code, script), *map(str, a)], cwd=code, env=env,
                                stdout=open(log, "w"), stderr=subprocess.STDOUT)

    def finish(procs, logs):
        for proc, log in zip(procs, logs):
            if proc.wait():
                raise SystemExit(f"{log} failed:\n" + open(log).read()[-3000:])

    def steps(out, keys):
        """The stage's per-step time (the sum of `keys`) from its metrics.jsonl, and the records."""
        recs = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl")) if '"eval"' not in x]
        return [sum(r[k] for k in keys) for r in recs], recs

    def summary(stage, wall, dts, **extra):
        emit({"what": "pipeline", "stage": stage, "code": code, "device": dev_name, "torch": torch.__version__,
              "wall_s": wall, "steps": len(dts), "first_step_s": dts[0], "step_s_median": statistics.median(dts[2:] or dts),
              "overhead_s": wall - sum(dts), **extra})

    if not os.path.isfile(os.path.join(D, "processor", "tokenizer.json")):
        subprocess.run([sys.executable, os.path.join(code, "data.py"), "--out", D, "--n-sft", "16000", "--n-align", "512",
                        "--n-rl", "2048", "--n-eval", "400", "--n-hard", "400", "--n-warmup", "64"], check=True, env=env)
    base, sft = os.path.join(W, "base"), os.path.join(W, "sft")
    if not os.path.isfile(os.path.join(base, "run_config.json")):
        subprocess.run([sys.executable, os.path.join(code, "model.py"), "init", "--config", args.config, "--processor",
                        os.path.join(D, "processor"), "--out", base], check=True, env=env)
    import shutil
    for d in ("sft-bench", "rl-bench", "align-bench"):
        shutil.rmtree(os.path.join(W, d), ignore_errors=True)
    t0 = time.time()
    finish([launch("sft.py", "--init", base, "--data", os.path.join(D, "sft.jsonl"), "--out", os.path.join(W, "sft-bench"),
                   "--steps", 60, "--batch-size", 64, "--micro-batch", 64, "--lr", 3e-4, "--eval-every", 0, "--save-every", 0,
                   "--max-len", 1024, log=os.path.join(W, "sft.log"))], [os.path.join(W, "sft.log")])
    dts, recs = steps(os.path.join(W, "sft-bench"), ["dt"])
    summary("sft", time.time() - t0, dts, tok_s_median=statistics.median(r["tok_s"] for r in recs[2:]))
    if not os.path.isfile(os.path.join(sft, "run_config.json")):  # the start of RL and alignment: 300 SFT steps
        finish([launch("sft.py", "--init", base, "--data", os.path.join(D, "sft.jsonl"), "--out", sft, "--steps", 300,
                       "--batch-size", 16, "--micro-batch", 16, "--lr", 3e-4, "--eval-every", 0, "--save-every", 0,
                       "--max-len", 1024, log=os.path.join(W, "sft300.log"))], [os.path.join(W, "sft300.log")])
    game = ["--prompts", 8, "--group-size", 8, "--max-new-tokens", 256, "--save-every", 0, "--micro-batch", 64,
            "--micro-tokens", 65536]  # run.sh's GPU settings
    t0 = time.time()
    out = os.path.join(W, "align-bench")
    finish([launch("align.py", "--policy", sft, "--disc", f"upcycle:{sft}", "--data", os.path.join(D, "align.parquet"),
                   "--out", out, "--steps", 10, "--lr", 2e-5, "--disc-lr", 2e-5, "--disc-micro", 128, *game,
                   log=out + ".log")], [out + ".log"])
    dts, recs = steps(out, ["t_gen", "t_score", "t_disc", "t_policy"])
    summary("align", time.time() - t0, dts, **{k: statistics.median(r[k] for r in recs[2:]) for k in
                                               ("t_gen", "t_score", "t_disc", "t_policy", "length")})
    t0 = time.time()
    log = os.path.join(W, "eval.log")
    finish([launch("eval.py", "--model", sft, "--data", os.path.join(D, "eval.parquet"), "--limit", 400, "--max-new-tokens",
                   256, "--batch-size", 400, "--out", os.path.join(W, "eval-bench.json"), log=log)], [log])
    r = json.load(open(os.path.join(W, "eval-bench.json")))["results"]["eval"]
    emit({"what": "pipeline", "stage": "eval", "code": code, "device": dev_name, "wall_s": time.time() - t0,
          "prompts": r["n"], "t_generate": r.get("t_generate"), "length": r["length"]})
    for n in args.concurrent:  # n RL runs at once; each run's own step times, summed as a rate
        outs = [os.path.join(W, f"rl-bench-{n}-{i}") for i in range(n)]
        for o in outs:
            shutil.rmtree(o, ignore_errors=True)
        t0 = time.time()
        finish([launch("rl.py", "--policy", sft, "--algo", "grpo", "--data", os.path.join(D, "rl.parquet"), "--out", o,
                       "--steps", 12, "--lr", 3e-5, "--eval-every", 0, "--seed", i, *game, log=o + ".log")
                for i, o in enumerate(outs)], [o + ".log" for o in outs])
        per = [steps(o, ["t_gen", "t_logprobs", "t_update"]) for o in outs]
        dts, recs = per[0]
        summary("rl", time.time() - t0, dts, concurrent=n, steps_per_s=sum(1 / statistics.median(d[2:]) for d, _ in per),
                **{k: statistics.median(r[k] for r in recs[2:]) for k in ("t_gen", "t_update", "len_mean")})
    raise SystemExit(0)

if args.what in ("align", "rl"):
    # the stage's script runs as it is, in this process, on a parquet of --prompts records written here (the same on
    # every rank: align.py reads the teacher fields, rl.py the ground truth)
    import runpy
    import tempfile

    processor = M.load_processor(args.processor)
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    filler = ids(" shape")[-1]

    def valid_response(n, answer):
        """A format-valid response of (about) n tokens ending in eos: a quarter caption block, the rest reasoning."""
        head, mid = ids("<caption>\n-"), ids("\n</caption>\n<think>\n")
        tail = ids(f"\n</think>\n<answer>{answer}</answer>") + [eos]
        k = max(0, n - len(head) - len(mid) - len(tail))
        return head + [filler] * (k // 4) + mid + [filler] * (k - k // 4) + tail

    text = lambda n: tok.decode([filler] * n)  # noqa: E731
    tmp = tempfile.mkdtemp(prefix=f"bench-{args.what}-")
    rows = [{"prompt": [{"role": "user", "content": "<image>\n" + text(args.prompt)}], "images": [bench_image()],
             "reward_model": {"ground_truth": "1"}, "teacher_caption": "<caption>\n-" + text(args.new // 4) + "\n</caption>",
             "teacher_cot": "<think>\n" + text(args.new - args.new // 4) + "\n</think>\n<answer>1</answer>"}
            for _ in range(args.prompts)]
    data.write_parquet(os.path.join(tmp, "prompts.parquet"), rows)
    real_generate, gen_peak = engine.generate, []
    cuda = torch.cuda.is_available()

    def generate_valid(*a, **k):
        """The real decode (timed inside the stage), then same-length format-valid responses, every other one with the
        right answer (RL: each group gets nonzero advantages); the rollout phase's own peak memory is recorded."""
        torch.cuda.reset_peak_memory_stats() if cuda else None
        outs = real_generate(*a, **k)
        outs = outs[0] if k.get("logprobs") else outs
        gen_peak.append(torch.cuda.max_memory_allocated() / 1e9 if cuda else 0.0)
        torch.cuda.reset_peak_memory_stats() if cuda else None  # the stage's mem_gb: the updates' peak from here on
        new = [valid_response(len(o), "12"[i % 2]) for i, o in enumerate(outs)]
        return (new, [[-1.0] * len(o) for o in new]) if k.get("logprobs") else new
    engine.generate = generate_valid
    M.save_checkpoint = M.save_hf = lambda *a, **k: None  # a benchmark writes no weights
    sys.argv = [f"{args.what}.py", "--policy", args.config, "--processor", args.processor, "--data",
                os.path.join(tmp, "prompts.parquet"), "--out", tmp, "--steps", str(args.steps), "--prompts", str(args.prompts),
                "--group-size", str(args.group_size), "--max-new-tokens", str(args.new), "--max-prompt-len",
                str(args.prompt + 4096), "--gen-batch", str(args.gen_batch), "--micro-batch", str(args.micro_batch),
                "--save-every", "0"] + ["--hf-generate"] * args.hf_generate + ["--grad-ckpt"] * args.grad_ckpt + \
        ["--pack"] * args.pack + ["--offload"] * (args.offload and args.what == "align") + \
        (["--disc", f"upcycle:{args.disc_config}"] if args.what == "align" else ["--algo", "grpo", "--eval-every", "0"])
    runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{args.what}.py"), run_name="__main__")
    if int(os.environ.get("RANK", 0)) != 0:  # rank 0 wrote the metrics
        raise SystemExit(0)
    recs = [json.loads(line) for line in open(os.path.join(tmp, "metrics.jsonl"))]
    keys = ("step", "length", "t_gen", "t_score", "t_disc", "t_policy", "mem_gb") if args.what == "align" else \
        ("step", "reward", "len_mean", "t_gen", "t_logprobs", "t_update", "mem_gb")
    ex = data.Example(question=rows[0]["prompt"][0]["content"], images=rows[0]["images"], where="bench")
    emit({"what": args.what, "config": args.config, "gpus": int(os.environ.get("WORLD_SIZE", 1)), "prompts": args.prompts,
          "group_size": args.group_size, "prompt_tokens": len(data.render_chat(processor, ex)["input_ids"]),
          "new_tokens": args.new, "gen_batch": args.gen_batch, "hf_generate": args.hf_generate, "grad_ckpt": args.grad_ckpt,
          "pack": args.pack, "offload": args.offload,
          **({"disc": f"upcycle:{args.disc_config} x4 top-2"} if args.what == "align" else {"algo": "grpo"}),
          "device": dev_name, "torch": torch.__version__,
          "steps": [{**{k: r[k] for k in keys}, "gen_peak_gb_rank0": g} for r, g in zip(recs, gen_peak)]})
    raise SystemExit(0)

rank, world, device = M.init_dist()
processor = M.load_processor(args.processor)
with torch.device("meta"):
    hf = M.load_policy(args.config, processor, device)
cfg = hf.config.text_config
n_dec = sum(p.numel() for n, p in hf.named_parameters() if ".language_model.layers." in n)
N = n_dec + cfg.vocab_size * cfg.hidden_size  # decoder + output layer (the input embedding is a lookup)
flops_tok = 6 * N + 6 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * args.seq
hf.to_empty(device=device)
hf.tie_weights()
for m in hf.modules():  # to_empty leaves the rotary tables uninitialised (NaN logits at random): recompute them
    if hasattr(m, "inv_freq"):
        m.__init__(m.config)
        m.to(device)
torch.manual_seed(0)
with torch.no_grad():  # random weights, scaled like an init (values do not matter for speed, only finiteness)
    for p_ in hf.parameters():
        p_.normal_(0, 0.02) if p_.ndim > 1 else p_.fill_(1.0)

if args.what == "rollout":
    infer = engine.make_inference_copy(hf, device)
    tok = processor.tokenizer
    eos, pad = -1, tok.convert_tokens_to_ids("<|endoftext|>")  # no eos: every sequence runs all --new steps
    img = bench_image()
    words = " ".join(["shape"] * args.prompt)
    prompt = data.render_chat(processor, data.Example(question="<image>" + words, images=[img], where="bench"))
    L = len(prompt["input_ids"])
    kv_per_tok = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2  # K and V, bf16 bytes
    w_bytes = 2 * (n_dec + cfg.vocab_size * cfg.hidden_size)
    bw, bw_source = bandwidth()

    def timed(fn):
        torch.cuda.synchronize() if device.type == "cuda" else None
        t0 = time.time()
        fn()
        torch.cuda.synchronize() if device.type == "cuda" else None
        return time.time() - t0

    for B in args.batches:
        batch = data.collate([prompt] * B, pad, left=True)
        paths = {
            "static": lambda n: engine.decode(infer, batch, device, n, eos, pad, [], temperature=1.0),
            "hf_generate": lambda n: infer.generate(**M.model_inputs(batch, device), max_new_tokens=n, min_new_tokens=n,
                                                    do_sample=True, top_k=None, pad_token_id=pad)}
        res = {"what": "rollout", "config": args.config, "batch": B, "prompt_tokens": L, "new_tokens": args.new,
               "device": dev_name, "torch": torch.__version__}
        for name, fn in paths.items():
            fn(1), fn(args.new)  # warm-up, and compilation of both cache lengths where there is any
            t1, tn = timed(lambda: fn(1)), timed(lambda: fn(args.new))
            res[f"{name}_ms_per_step"] = (tn - t1) / (args.new - 1) * 1e3
            res[f"{name}_tok_s"] = B * (args.new - 1) / (tn - t1)
        res["ratio_static_vs_hf"] = res["hf_generate_ms_per_step"] / res["static_ms_per_step"]
        # (same tokens? a random model's near-uniform logits flip under bf16 rounding: greedy_check.py, trained policy)
        res["floor_ms_per_step"] = (w_bytes + B * kv_per_tok * (L + args.new / 2)) / bw * 1e3
        res["bandwidth_tb_s"], res["bandwidth_source"] = bw / 1e12, bw_source
        res["x_floor"] = res["static_ms_per_step"] / res["floor_ms_per_step"]
        res["peak_mem_gb"] = M.peak_mem_gb()
        emit(res)
    dist.destroy_process_group()
    raise SystemExit(0)

policy = M.shard(M.LogProbs(hf), device, grad_ckpt=args.grad_ckpt, compile=args.compile)
opt = M.make_optimizer(policy, 1e-5, 0.0)
ids = torch.randint(100, cfg.vocab_size, (args.batch, args.seq))
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
         "mm_token_type_ids": torch.zeros_like(ids)}
batch["labels"][:, : args.seq // 4] = -100  # a prompt quarter without loss, like the stages
if args.pack:  # the same sequences one after another in one row, each attending to itself (varlen attention)
    batch = data.collate([{k: v[i] for k, v in batch.items()} for i in range(args.batch)], 0, packed=True)
times = []
for step in range(args.steps + 2):
    torch.cuda.synchronize() if device.type == "cuda" else None
    t0 = time.time()
    lp = policy(batch)
    loss = -lp.sum() / (batch["labels"] != -100).sum()
    loss.backward()
    M.clip_grad(policy, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize() if device.type == "cuda" else None
    if step >= 2:
        times.append(time.time() - t0)
dt = sum(times) / len(times)
tok_s = args.batch * args.seq / dt  # per GPU
res = {"what": "train", "config": args.config, "gpus": world, "seq": args.seq, "batch_per_gpu": args.batch,
       "grad_ckpt": args.grad_ckpt, "compile": args.compile, "pack": args.pack, "step_s": dt, "tok_s_per_gpu": tok_s,
       "mfu": tok_s * flops_tok / H100_BF16,
       "peak_mem_gb": M.peak_mem_gb(), "params_b": sum(p.numel() for p in hf.parameters()) / 1e9,
       "device": dev_name, "torch": torch.__version__}
emit(res)
dist.destroy_process_group()
