"""The sampler draws from the policy's distribution: on the GPU decode path, mean -log p of the sampled tokens (as the
decode loop returns them) vs the mean entropy of the teacher-forced distribution at those positions, and the returned
log-probs vs the teacher-forced ones. Prints one JSON line (and appends it to OUT).

    python results/miniature-speed-h200/sampler_check.py POLICY_DIR PROMPTS.parquet OUT.jsonl      # on a GPU
"""
import json, os, sys, torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import data, engine, model as M
pol, prompts_file, out = sys.argv[1:4]
M.init_dist()
proc = M.load_processor(pol)
tok = proc.tokenizer
dev = torch.device("cuda")
infer = engine.make_inference_copy(M.load_policy(pol, proc, dev), dev)
exs = data.read_examples(prompts_file, "prompt")[0][:64]
prompts = [data.render_chat(proc, ex) for ex in exs for _ in range(8)]
res = {"policy": pol, "device": torch.cuda.get_device_name(), "torch": torch.__version__}
for T in (1.0, 0.7):
    torch.manual_seed(0)
    outs, lps = engine.generate(infer, prompts, tok, dev, 256, temperature=T, logprobs=True, batch_size=256)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    banned = [i for i, t in tok.added_tokens_decoder.items() if t.special and i != eos]
    nl, ent, diff_lp = [], [], []
    for i in range(0, len(prompts), 64):
        b = data.collate([data.join_response(p, o) for p, o in zip(prompts[i:i + 64], outs[i:i + 64])], 0)
        with torch.no_grad():
            logits = infer(**M.model_inputs(b, dev)).logits.float()[:, :-1] / T
        logits[..., banned] = float("-inf")
        logq = torch.log_softmax(logits, -1)
        mask = (b["labels"][:, 1:] != -100).to(dev)
        want = logq.gather(-1, b["input_ids"][:, 1:, None].to(dev)).squeeze(-1)[mask]
        got = torch.tensor(sum(lps[i:i + 64], []), device=dev)
        nl.append(-want); ent.append(-(logq.exp() * logq.clamp(min=-1e9)).sum(-1)[mask]); diff_lp.append(got - want)
    nl, ent, d = torch.cat(nl), torch.cat(ent), torch.cat(diff_lp)
    x = nl - ent
    res[f"T{T}"] = {"tokens": len(x), "mean_neg_logp": nl.mean().item(), "mean_entropy": ent.mean().item(),
                    "diff": x.mean().item(), "diff_se": (x.std() / len(x) ** 0.5).item(),
                    "rollout_vs_teacher_forced_logp_max_abs": d.abs().max().item(), "mean_abs": d.abs().mean().item()}
print(json.dumps(res))
open(out, "a").write(json.dumps(res) + "\n")
