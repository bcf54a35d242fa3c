"""
Curation for PRISM's alignment stage: the policy's hardest unsolved problems, answered by a stronger teacher model over any
OpenAI-compatible chat-completions endpoint (the paper: 113K demonstrations, Gemini as the teacher).

    python curate.py --policy runs/x/sft --pool data/shapes/rl.parquet --out runs/x/curated \\
        --teacher-url http://127.0.0.1:8000/v1 --teacher-model oracle        # python data.py teacher --data data/shapes
    torchrun --nproc_per_node 8 curate.py --policy runs/x/sft --pool pool.parquet --out curated \\
        --teacher-url https://generativelanguage.googleapis.com/v1beta/openai/ --teacher-model MODEL_ID

1. difficulty: --samples k responses per problem from the policy (engine.generate, as rl.py's rollouts), scored by
   verify.reward; a problem is kept when its pass rate (correct / k) is at most --max-pass (default 0: unsolved), hardest
   first. --samples 0 keeps every problem.
2. teacher: each kept problem (and each of --teacher-samples samples) is one chat request: the teacher's system prompt,
   the images as base64 data URLs, the question. Bounded concurrency; our own retries (the client's are off, so every
   request is counted once) with exponential backoff and full jitter on 429 (at least its Retry-After), 5xx, timeouts,
   dropped connections, malformed bodies and answers without the caption/think/answer format; a per-request timeout.
   Authentication and not-found errors stop the run. Every accepted answer is cached in OUT/cache/rank<r>.jsonl
   (append-only, keyed by a hash of model, messages, parameters and sample index), so a re-run never pays twice.
3. clean-up: a demonstration is kept when the teacher's answer verifies against the ground truth (the first sample
   that does); whitespace normalised to the student's template; every drop counted by reason.
4. output: OUT/align.parquet (the source columns, images embedded, + teacher_caption, teacher_cot, teacher_response,
   pass_rate), OUT/sft.jsonl (the same demonstrations as sharegpt records, images in OUT/images/), OUT/pass_rates.jsonl,
   OUT/summary.json, OUT/run_config.json (last). Re-running the same command resumes.
The API key is read from the environment variable named by --api-key-env (default OPENAI_API_KEY).
"""

import argparse
import asyncio
import base64
import hashlib
import io
import json
import os
import random
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import verify

TEACHER_SYSTEM_PROMPT = (
    "You are an expert visual reasoner writing a demonstration for a student model. Answer about the image in exactly "
    "three blocks and nothing else:\n<caption>\n- one bullet point per visual element: every object with its position "
    "and attributes, every text, the style\n</caption>\n<think>\nstep-by-step reasoning that uses only the facts in the "
    "caption, one step per line\n</think>\n<answer>the final answer only</answer>"
)
RETRYABLE = ("429", "5xx", "timeout", "connection", "malformed", "format")


# -----------------------------------------------------------------------------
# 1. difficulty: the policy's pass rate per problem

def difficulty(args, pool, device, rank, world):
    """{pool index: number of correct samples} over every problem of the pool, from --samples samples each. Each rank
    samples its share (pool[rank::world]) in fixed batches seeded by (seed, rank, batch), and appends one line per
    finished batch to OUT/difficulty/rank<r>.jsonl: a re-run skips the finished batches and ends with the same numbers."""
    import engine
    import model as M
    path = os.path.join(args.out, "difficulty", f"rank{rank}.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    done = {}
    for rec in read_jsonl(path):
        done.update({int(k): v for k, v in rec.items()})
    mine = list(range(len(pool)))[rank::world]
    batches = [mine[i:i + args.batch_size] for i in range(0, len(mine), args.batch_size)]
    todo = [b for b in range(len(batches)) if not all(i in done for i in batches[b])]
    if todo:
        processor = M.load_processor(args.processor or args.policy)
        tok = processor.tokenizer
        infer = engine.make_inference_copy(M.load_policy(args.policy, processor, device), device)
        for b in tqdm(todo, desc="difficulty", disable=rank != 0):
            exs = [pool[i] for i in batches[b]]
            prompts = [data.render_chat(processor, ex, None, args.max_pixels) for ex in exs]
            torch.manual_seed(args.seed * 100003 + rank * 7919 + b)  # the samples are a function of (seed, rank, batch)
            outs = engine.generate(infer, [p for p in prompts for _ in range(args.samples)], tok, device,
                                   args.max_new_tokens, args.temperature, batch_size=args.gen_batch)
            rec = {}
            for j, (i, ex) in enumerate(zip(batches[b], exs)):
                texts = [tok.decode(o, skip_special_tokens=True) for o in outs[j * args.samples:(j + 1) * args.samples]]
                rec[i] = sum(int(verify.reward(t, ex.answer, ex.equivalents)["acc"]) for t in texts)
            with open(path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            done.update(rec)
        del infer
    gathered = [None] * world
    dist.all_gather_object(gathered, {i: done[i] for i in mine})
    return {i: c for g in gathered for i, c in g.items()}


# -----------------------------------------------------------------------------
# 2. teacher: one chat request per (problem, sample), cached

def read_jsonl(path, repair=True):
    """The records of an append-only JSONL file. A kill can tear only the last line: it is ignored, and with repair
    (the file's own writer) cut off, so the next append starts a fresh line; a bad line anywhere else is an error naming
    the file and line."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        raw = f.read()
    if raw and not raw.endswith(b"\n"):
        raw = raw[:raw.rfind(b"\n") + 1]
        if repair:
            with open(path, "r+b") as f:
                f.truncate(len(raw))
    out = []
    for n, line in enumerate(raw.splitlines()):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            raise SystemExit(f"{path}:{n}: not a JSON line: the file is damaged (delete it to start that part again)")
    return out


def image_url(ref, where):
    """An image ref as a base64 data URL, its bytes exactly as stored (the oracle teacher finds its scene by their hash)."""
    from PIL import Image
    raw = ref["bytes"] if isinstance(ref, dict) and ref.get("bytes") else open(ref["path"] if isinstance(ref, dict) else ref,
                                                                                "rb").read()
    try:
        fmt = Image.open(io.BytesIO(raw)).format or "PNG"
    except Exception as e:
        raise data.DataError(f"{where}: cannot decode image: {type(e).__name__}: {e}") from None
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(raw).decode()


def teacher_request(ex, system, args, sample):
    """(cache key, request kwargs) of one teacher sample for one problem: the user turn is the question split at its
    <image> markers with each image in its place (images first when there is no marker)."""
    content, k = [], 0
    for c in data.user_content(ex.question, len(ex.images), ex.where):
        if c["type"] == "image":
            content.append({"type": "image_url", "image_url": {"url": image_url(ex.images[k], ex.where)}})
            k += 1
        else:
            content.append(c)
    params = {"temperature": args.teacher_temperature, "max_tokens": args.teacher_max_tokens}
    if args.teacher_samples > 1:
        params["seed"] = sample  # distinct samples of one prompt (endpoints that ignore seeds still sample anew)
    req = {"model": args.teacher_model, "messages": [{"role": "system", "content": system}, {"role": "user", "content": content}],
           **params}
    key = hashlib.sha256(json.dumps({**req, "sample": sample}, sort_keys=True).encode()).hexdigest()
    return key, req


async def ask_teacher(jobs, cache, cache_path, args, stats, show=False):
    """The teacher's answer (None: failed) to each job (build, label), in order: build() gives (cache key, request
    kwargs), called only when the job's turn comes (one of at most --concurrency in flight), so a large pool's images
    are not all held as base64 at once. A key in `cache` (key -> answer) is not sent; an accepted answer is appended to
    cache_path at once, with its label (where, sample). stats counts calls made, cached, failed, retries by reason,
    tokens."""
    import openai
    client = openai.AsyncOpenAI(base_url=args.teacher_url, api_key=os.environ.get(args.api_key_env) or "none",
                                max_retries=0, timeout=args.timeout)
    sem, bar = asyncio.Semaphore(args.concurrency), tqdm(total=len(jobs), desc="teacher", disable=not show)
    rng = random.Random(args.seed)
    out = open(cache_path, "a")

    async def one(build, label):
        async with sem:
            key, req = build()
            if key in cache:
                stats["cached"] += 1
                bar.update()
                return cache[key]
            for attempt in range(args.max_retries + 1):
                wait = 0.0
                try:
                    stats["calls"] += 1
                    r = await client.chat.completions.create(**req)
                    if r.usage is not None:
                        stats["prompt_tokens"] += r.usage.prompt_tokens or 0
                        stats["completion_tokens"] += r.usage.completion_tokens or 0
                    text = (r.choices[0].message.content or "") if r.choices else ""
                    if verify.split_response(text) is not None:
                        cache[key] = text
                        out.write(json.dumps({"key": key, **label, "answer": text}) + "\n")
                        out.flush()
                        break
                    reason = "format"
                except openai.RateLimitError as e:
                    reason, wait = "429", float(e.response.headers.get("retry-after", 0) or 0)
                except openai.APITimeoutError:  # before APIConnectionError, its base class
                    reason = "timeout"
                except openai.APIConnectionError:
                    reason = "connection"
                except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
                    raise SystemExit(f"--teacher-url {args.teacher_url} --teacher-model {args.teacher_model}: {e} "
                                     f"(check the URL, the model name and ${args.api_key_env})")
                except openai.APIStatusError as e:
                    if e.status_code < 500:  # a request the endpoint will never accept (too large, bad content)
                        stats["retries"]["rejected"] = stats["retries"].get("rejected", 0) + 1
                        stats["failed"] += 1
                        stats["failed_by_reason"]["rejected"] = stats["failed_by_reason"].get("rejected", 0) + 1
                        break
                    reason = "5xx"
                except (ValueError, openai.APIResponseValidationError):  # a body that is not the protocol's JSON
                    reason = "malformed"
                stats["retries"][reason] = stats["retries"].get(reason, 0) + 1
                if attempt == args.max_retries:
                    stats["failed"] += 1
                    stats["failed_by_reason"][reason] = stats["failed_by_reason"].get(reason, 0) + 1  # the last error
                    break
                # exponential backoff with full jitter, at least the server's Retry-After
                await asyncio.sleep(max(wait, rng.uniform(0, min(args.backoff_max, args.backoff * 2 ** attempt))))
        bar.update()
        return cache.get(key)

    try:
        return await asyncio.gather(*(one(*j) for j in jobs))
    finally:
        out.close()
        bar.close()
        await client.close()


# -----------------------------------------------------------------------------
# 3. clean-up, 4. output

def normalise(text):
    """(caption, reasoning) of a format-valid answer in the student's template: each block's lines stripped, empty lines
    dropped; caption = "<caption>\\n...\\n</caption>", reasoning = "<think>\\n...\\n</think>\\n<answer>X</answer>"."""
    cap, rest = verify.split_response(text)
    inner = lambda s, tag: s.split(f"<{tag}>", 1)[1].split(f"</{tag}>", 1)[0]  # noqa: E731
    lines = lambda s: "\n".join(ln.strip() for ln in s.strip().splitlines() if ln.strip())  # noqa: E731
    return (f"<caption>\n{lines(inner(cap, 'caption'))}\n</caption>",
            f"<think>\n{lines(inner(rest, 'think'))}\n</think>\n<answer>{inner(rest, 'answer').strip()}</answer>")


def write_outputs(args, pool, kept, answers, pass_rates):
    """align.parquet and sft.jsonl of the demonstrations that verify, hardest first, each row the source record's columns
    (its images embedded) and the teacher's; returns (the drops by reason, the number of demonstrations)."""
    number = lambda ex: int(ex.where.rsplit(":", 1)[1])  # noqa: E731  the record number in the pool file
    need = {number(pool[i]) for i in kept}
    rows = {n: r for n, r in data.iter_records(args.pool) if n in need}
    drops, table, sft = {}, [], []
    os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
    for i in kept:
        ex, texts = pool[i], [a for a in answers[i] if a is not None]
        good = [t for t in texts if verify.reward(t, ex.answer, ex.equivalents)["acc"]]
        if not good:
            reason = "wrong_answer" if texts else "teacher_failed"
            drops[reason] = drops.get(reason, 0) + 1
            continue
        caption, cot = normalise(good[0])
        refs = [r if isinstance(r, dict) else {"bytes": open(r, "rb").read(), "path": os.path.basename(r)} for r in ex.images]
        row = {k: v for k, v in rows[number(ex)].items() if not k.startswith("teacher_")}
        table.append({**row, "images": [{"bytes": r["bytes"], "path": r.get("path")} for r in refs],
                      "teacher_caption": caption, "teacher_cot": cot, "teacher_response": caption + "\n" + cot,
                      "pass_rate": pass_rates.get(i)})
        paths = []
        for r in refs:  # the sharegpt records point at copies of the images, named by their content
            name = f"images/{hashlib.sha256(r['bytes']).hexdigest()[:20]}{os.path.splitext(r.get('path') or '.png')[1] or '.png'}"
            if not os.path.exists(os.path.join(args.out, name)):
                with open(os.path.join(args.out, name), "wb") as f:
                    f.write(r["bytes"])
            paths.append(name)
        sft.append({"messages": [{"role": "system", "content": ex.system}, {"role": "user", "content": ex.question},
                                 {"role": "assistant", "content": caption + "\n" + cot}], "images": paths})
    if table:
        data.write_parquet(os.path.join(args.out, "align.parquet"), table)
    data.write_jsonl(os.path.join(args.out, "sft.jsonl"), sft)
    return drops, len(table)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool", required=True, help="problems in the RL parquet/JSONL format (prompt, images, reward_model)")
    p.add_argument("--out", required=True, help="output directory (see above); re-running the same command resumes")
    p.add_argument("--policy", default=None, help="the policy whose unsolved problems are kept (HF dir); needed unless "
                   "--samples 0")
    p.add_argument("--processor", default=None, help="processor directory (default: the --policy directory)")
    p.add_argument("--limit", type=int, default=0, help="only the first N problems of the pool (0: all)")
    p.add_argument("--samples", type=int, default=8, help="k: policy samples per problem (0: no difficulty filter)")
    p.add_argument("--max-pass", type=float, default=0.0, help="keep problems whose pass rate (correct / k) is at most this")
    p.add_argument("--max-problems", type=int, default=0, help="send at most the N hardest kept problems to the teacher "
                   "(0: all): a cost cap")
    p.add_argument("--temperature", type=float, default=1.0, help="the policy's sampling temperature")
    p.add_argument("--max-new-tokens", type=int, default=512, help="the policy's response length limit in tokens")
    p.add_argument("--max-pixels", type=int, default=560 * 560, help="images are downscaled to at most this many pixels "
                   "for the policy (the teacher gets the stored bytes)")
    p.add_argument("--batch-size", type=int, default=64, help="problems per difficulty batch (a resume unit)")
    p.add_argument("--gen-batch", type=int, default=512, help="sequences per generation call")
    p.add_argument("--teacher-url", default=None, help="base URL of an OpenAI-compatible endpoint, e.g. "
                   "http://127.0.0.1:8000/v1 (a local vLLM server or python data.py teacher), https://api.openai.com/v1")
    p.add_argument("--teacher-model", default="oracle", help="the teacher's model name at that endpoint")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="the environment variable holding the API key")
    p.add_argument("--teacher-system", default=None, help="a text file: the teacher's system prompt (default: "
                   "TEACHER_SYSTEM_PROMPT, asking for dense grounding and step-by-step reasoning in the three blocks)")
    p.add_argument("--teacher-samples", type=int, default=1, help="n: teacher samples per problem; the first that verifies "
                   "is kept (best of n)")
    p.add_argument("--teacher-temperature", type=float, default=0.7, help="the teacher's sampling temperature")
    p.add_argument("--teacher-max-tokens", type=int, default=4096, help="the teacher's response length limit (a cost cap)")
    p.add_argument("--concurrency", type=int, default=16, help="teacher requests in flight per process")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per teacher request")
    p.add_argument("--max-retries", type=int, default=6, help="retries per request before it counts as failed")
    p.add_argument("--backoff", type=float, default=1.0, help="first backoff in seconds (doubling per retry, full jitter)")
    p.add_argument("--backoff-max", type=float, default=60.0, help="the longest backoff in seconds")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad pool records (and bad images) instead of "
                   "stopping at the first")
    p.add_argument("--image-root", default=None, help="relative image paths resolve against this folder, else the pool's")
    p.add_argument("--system-prompt", default=None, help="a text file: the student's system prompt of records that carry "
                   "none (default: data.SYSTEM_PROMPT)")
    p.add_argument("--seed", type=int, default=0, help="sampling and backoff seed")
    args = p.parse_args(argv)
    if args.samples and not args.policy:
        p.error("--policy is needed for the difficulty filter (or --samples 0 to keep every problem)")
    if not args.teacher_url:
        p.error("--teacher-url is required (an OpenAI-compatible endpoint)")
    return args


def main():
    args = parse_args()
    t0 = time.time()
    import model as M
    rank, world, device = M.init_dist()
    os.makedirs(os.path.join(args.out, "cache"), exist_ok=True)
    # the teacher phase can take hours per rank: its collectives run over gloo with a long timeout, not the NCCL default
    slow = dist.new_group(backend="gloo", timeout=timedelta(days=7)) if world > 1 else dist.group.WORLD

    pool, skipped = data.read_examples(args.pool, "prompt", skip_bad=args.skip_bad, image_root=args.image_root,
                                       system=data.system_prompt(args.system_prompt))
    good = []
    for ex in pool[:args.limit] if args.limit else pool:  # every image must decode before anything is paid for
        try:
            [data.image_size(r, ex.where, args.max_pixels) for r in ex.images]
            good.append(ex)
        except data.DataError as e:
            if not args.skip_bad:
                raise
            skipped.append(str(e))
    pool = good

    # ---- 1. difficulty -------------------------------------------------------------------------------------------
    correct = difficulty(args, pool, device, rank, world) if args.samples else {}
    rates = {i: c / args.samples for i, c in correct.items()}
    kept = sorted((i for i in range(len(pool)) if not args.samples or rates[i] <= args.max_pass), key=lambda i: (rates.get(i, 0), i))
    sent = kept[:args.max_problems] if args.max_problems else kept
    if rank == 0 and args.samples:
        data.write_jsonl(os.path.join(args.out, "pass_rates.jsonl"),
                         [{"where": pool[i].where, "correct": correct[i], "k": args.samples, "pass_rate": rates[i]}
                          for i in range(len(pool))])
    M.print0(f"difficulty: {len(pool)} problems ({len(skipped)} bad records skipped), {len(kept)} with pass rate <= "
             f"{args.max_pass} over {args.samples} samples" if args.samples else f"{len(pool)} problems ({len(skipped)} bad "
             f"records skipped), no difficulty filter")

    # ---- 2. teacher ----------------------------------------------------------------------------------------------
    system = data.system_prompt(args.teacher_system) if args.teacher_system else TEACHER_SYSTEM_PROMPT
    todo = [(i, s) for i in sent[rank::world] for s in range(args.teacher_samples)]
    jobs = [(lambda i=i, s=s: teacher_request(pool[i], system, args, s), {"where": pool[i].where, "sample": s}) for i, s in todo]
    own, cache = os.path.join(args.out, "cache", f"rank{rank}.jsonl"), {}
    for f in sorted(os.listdir(os.path.join(args.out, "cache"))):  # every rank's answers: a resume may change the world size
        path = os.path.join(args.out, "cache", f)
        cache.update({r["key"]: r["answer"] for r in read_jsonl(path, repair=path == own)})
    stats = {"calls": 0, "cached": 0, "failed": 0, "failed_by_reason": {}, "retries": {}, "prompt_tokens": 0,
             "completion_tokens": 0}
    mine = dict(zip(todo, asyncio.run(ask_teacher(jobs, cache, own, args, stats, rank == 0))))

    # ---- 3 and 4: gather every rank's answers and stats, clean up, write -----------------------------------------
    gathered = [None] * world
    dist.all_gather_object(gathered, (mine, stats), group=slow)
    if rank == 0:
        answers = {i: [None] * args.teacher_samples for i in sent}
        total = {k: {} if isinstance(v, dict) else 0 for k, v in stats.items()}
        for m, st in gathered:
            for (i, s), a in m.items():
                answers[i][s] = a
            for k, v in st.items():
                total[k] = {r: total[k].get(r, 0) + v.get(r, 0) for r in {**total[k], **v}} if isinstance(v, dict) else \
                    total[k] + v
        drops, n_demos = write_outputs(args, pool, sent, answers, rates)
        drops["bad_record"] = len(skipped)
        hist = {}
        for c in correct.values():
            hist[f"{c}/{args.samples}"] = hist.get(f"{c}/{args.samples}", 0) + 1
        summary = {"problems": len(pool) + len(skipped), "usable": len(pool), "pass_rate_histogram": dict(sorted(hist.items())),
                   "kept": len(kept), "sent_to_teacher": len(sent), "demonstrations": n_demos, "teacher_calls": total["calls"],
                   "teacher_cached": total["cached"], "teacher_failed": total["failed"],
                   "teacher_failed_by_reason": total["failed_by_reason"], "retries_by_reason": total["retries"],
                   "prompt_tokens": total["prompt_tokens"], "completion_tokens": total["completion_tokens"],
                   "drops_by_reason": drops, "wall_s": round(time.time() - t0, 1)}
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        with open(os.path.join(args.out, "run_config.json"), "w") as f:  # last: the output is complete
            json.dump({"stage": "curate", **vars(args), "world": world}, f, indent=1)
        print(f"curated {n_demos} demonstrations from {len(pool)} problems: {len(kept)} kept by difficulty, {len(sent)} "
              f"sent to {args.teacher_model} | calls {total['calls']} made, {total['cached']} cached, {total['failed']} "
              f"failed | drops {drops} | {summary['wall_s']:.0f} s -> {args.out}", flush=True)
        if not n_demos:
            raise SystemExit("no demonstration survived: raise --max-pass, grow the pool, or look at summary.json")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
