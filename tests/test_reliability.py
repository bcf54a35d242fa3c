"""Faults, distributed correctness, wrong configuration and safety, across the stages (the README's "Reliability" list).

Multi-process rows run the real scripts under torchrun (gloo) through tests/patched.py, which can replace generation by a
deterministic scripted policy and poison one rank's gradient with NaN; every subprocess has a timeout, so a hang fails."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import model as M
import test_sft
from helpers import ENV, ROOT, argv, checkpoint_params, last_checkpoint, metrics


def command(name, args, nproc):
    """A stage script through tests/patched.py (torchrun --standalone when nproc > 1)."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                      f"--nproc_per_node={nproc}"]
    return launcher + [os.path.join(ROOT, "tests", "patched.py"), name, *map(str, args)]


def run(name, *args, nproc=1, env=None, timeout=300, check=True):
    cmd = command(name, args, nproc)
    r = subprocess.run(cmd, cwd=ROOT, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


def kill_after(name, args, nproc, env, marker, timeout=240):
    """Start the command, SIGKILL it and every process it started as soon as `marker` exists, return once it is dead."""
    proc = subprocess.Popen(command(name, args, nproc), cwd=ROOT, env={**ENV, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not os.path.exists(marker) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    for pid in [proc.pid, *descendants(proc.pid)]:  # torchrun starts its workers in sessions of their own
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    assert os.path.exists(marker), "the run ended before its first checkpoint"


def descendants(pid):
    """Every process below `pid`, from /proc."""
    parent = {}
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError, IndexError):
            pass
    out, todo = [], [pid]
    while todo:
        top = todo.pop()
        kids = [c for c, p in parent.items() if p == top]
        out += kids
        todo += kids
    return out


def assert_same_params(a, b, atol):
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


MIXED = {"PATCH_GENERATE": "mixed"}


def rl_args(world, policy, out, **kw):
    a = {"--policy": policy, "--data": os.path.join(world[0], "rl.parquet"), "--out": out, "--prompts": 2,
         "--group-size": 4, "--steps": 4, "--max-new-tokens": 16, "--lr": 1e-4, "--micro-batch": 2, "--save-every": 2,
         "--eval-every": 0}
    return argv(a, **kw)


def align_args(world, policy, disc, out, **kw):
    a = {"--policy": policy, "--disc": disc, "--data": os.path.join(world[0], "align.parquet"), "--out": out,
         "--prompts": 2, "--group-size": 4, "--steps": 4, "--max-new-tokens": 16, "--lr": 1e-4, "--disc-lr": 1e-4,
         "--micro-batch": 2, "--disc-micro": 4, "--save-every": 2}
    return argv(a, **kw)


# -----------------------------------------------------------------------------
# distributed equivalence and kill -9 + resume, for the RL update and the alignment game (discriminator + policy)

@pytest.mark.parametrize("stage", ["rl.py", "align.py"])
def test_two_processes_equal_one_and_kill_resume_is_bitwise(world, tiny_dirs, tmp_path, stage):
    """The same global batch on 1 and on 2 processes gives the same weights; a 2-process run killed with SIGKILL after
    its first checkpoint (with a half-written later checkpoint left behind) and re-run ends bitwise equal to the
    uninterrupted one: data position, optimizer state and both models resume."""
    policy, disc = tiny_dirs
    args = (lambda out: rl_args(world, policy, out)) if stage == "rl.py" else \
        (lambda out: align_args(world, policy, disc, out))
    env = {**MIXED, "PATCH_NO_DROPOUT": "1"}
    one, two, killed = (str(tmp_path / n) for n in ("one", "two", "killed"))
    run(stage, *args(one), env=env)
    run(stage, *args(two), nproc=2, env=env)
    kill_after(stage, args(killed), 2, env, os.path.join(killed, "ckpt", "step_000002", "meta.json"))
    assert not os.path.exists(os.path.join(killed, "run_config.json"))  # it really was interrupted
    # what a kill during a save leaves: a temp directory, and a directory without its meta.json (never complete)
    os.makedirs(os.path.join(killed, "ckpt", "step_000004.tmp"), exist_ok=True)
    shutil.copytree(os.path.join(killed, "ckpt", "step_000002"), os.path.join(killed, "ckpt", "step_000003"))
    os.remove(os.path.join(killed, "ckpt", "step_000003", "meta.json"))
    r = run(stage, *args(killed), nproc=2, env=env)
    assert "resumed from" in r.stdout and "step_000002" in r.stdout
    p1, p2, pk = (checkpoint_params(last_checkpoint(d)) for d in (one, two, killed))
    assert_same_params(p1, p2, atol=2e-6)
    assert_same_params(p2, pk, atol=0)
    if stage == "align.py":  # the discriminator too
        d1, d2, dk = (checkpoint_params(last_checkpoint(d), "disc.") for d in (one, two, killed))
        assert_same_params(d1, d2, atol=1e-5)  # Adam moves even a rounding-level gradient by ~lr (1e-4) per step
        assert_same_params(d2, dk, atol=0)
    timeless = lambda out: [{k: v for k, v in m.items() if not k.startswith("t_")} for m in metrics(out)]  # noqa: E731
    assert timeless(killed) == timeless(two)  # the metrics continue the same curve


def test_a_group_split_over_two_processes_equals_one_process(world, tiny_dirs, tmp_path):
    """align.py with fewer prompts than processes (the paper's 4 prompts on 8 GPUs): one prompt's 4 rollouts over 2 ranks.
    The advantage gathers the group's scores from both; weights and logged scores equal the 1-process run's."""
    policy, disc = tiny_dirs
    env = {**MIXED, "PATCH_NO_DROPOUT": "1", "PATCH_GROUP": "4"}
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    for out, n in ((one, 1), (two, 2)):
        run("align.py", *align_args(world, policy, disc, out, prompts=1, steps=2, save_every=0), nproc=n, env=env)
    assert_same_params(checkpoint_params(last_checkpoint(one)), checkpoint_params(last_checkpoint(two)), atol=2e-6)
    assert_same_params(checkpoint_params(last_checkpoint(one), "disc."), checkpoint_params(last_checkpoint(two), "disc."),
                       atol=1e-5)
    m1, m2 = ([m for m in metrics(o) if "valid" in m] for o in (one, two))
    assert [m["valid"] for m in m1] == [m["valid"] for m in m2] == [0.5, 0.5]  # 2 of the 4 scripted rollouts are valid
    for a, b in zip(m1, m2):
        for k in ("student_cap", "student_cot", "teacher_cap", "d_loss"):
            assert abs(a[k] - b[k]) < 1e-4, k


def test_align_micro_batches_by_tokens_equal_one_micro_batch(world, tiny_dirs, tmp_path):
    """--micro-tokens caps the discriminator's update micro-batches too (the OOM of the 4-H100 alignment step): a cap of
    one token puts every pair (and every policy sequence) in its own forward; weights and scores equal the uncapped run's."""
    policy, disc = tiny_dirs
    env = {**MIXED, "PATCH_NO_DROPOUT": "1"}
    outs = [str(tmp_path / n) for n in ("whole", "capped")]
    for out, cap in zip(outs, (0, 1)):
        run("align.py", *align_args(world, policy, disc, out, steps=2, save_every=0, disc_micro=16, micro_tokens=cap),
            env=env)
    for prefix, atol in (("policy.model.", 2e-6), ("disc.", 1e-5)):
        assert_same_params(*(checkpoint_params(last_checkpoint(o), prefix) for o in outs), atol=atol)
    m1, m2 = ([m for m in metrics(o) if "valid" in m] for o in outs)
    assert [m["valid"] for m in m1] == [m["valid"] for m in m2] and m1[0]["valid"] > 0
    for a, b in zip(m1, m2):
        for k in ("student_cap", "student_cot", "d_loss", "cap_acc"):
            assert abs(a[k] - b[k]) < 1e-4, k


# -----------------------------------------------------------------------------
# non-finite steps: skipped on every rank together, counted; K in a row stop the run

def sft_args(world, out, **kw):  # test_sft.py's, with 2 examples per micro-batch and 3 steps
    return test_sft.sft_args(world, out, **{"micro_batch": 2, "steps": 3, **kw})


def test_nan_gradient_on_one_rank_skips_the_sft_step_on_both(world, tmp_path):
    out = str(tmp_path / "sft")
    r = run("sft.py", *sft_args(world, out), nproc=2, env={"PATCH_NAN": "1:2"})  # rank 1's gradient is NaN in step 2
    assert "non-finite" in r.stdout
    recs = [m for m in metrics(out) if "loss" in m]
    assert [m["step"] for m in recs] == [1, 3] and recs[-1]["skipped_steps"] == 1
    assert json.load(open(os.path.join(out, "run_config.json")))["skipped_steps"] == 1
    sd = M.Qwen3VLForConditionalGeneration.from_pretrained(out).state_dict()
    assert all(torch.isfinite(v).all() for v in sd.values())
    # K non-finite steps in a row stop the run with a message (one process, every step poisoned)
    r = run("sft.py", *sft_args(world, str(tmp_path / "stop"), steps=5, max_bad_steps=2), env={"PATCH_NAN": "0:all"},
            check=False)
    assert r.returncode != 0 and "2 non-finite steps in a row: stopping" in r.stdout + r.stderr


def test_rl_nan_on_one_rank_and_a_rank_without_images(world, tiny_dirs, tmp_path):
    """rl.py on 2 processes: rank 1's prompts have no image (the vision tower still runs in step on both ranks, no hang)
    and rank 1's gradient is NaN in step 1: the update is skipped on both ranks and counted."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = pq.read_table(os.path.join(world[0], "rl.parquet")).to_pylist()
    for pos in (1, 3):  # the stream positions rank 1 draws in steps 1 and 2 (2 prompts per step, one per rank)
        i = data.stream_indices(len(rows), 0, pos, 1)[0]
        rows[i]["images"] = []
        rows[i]["prompt"] = [{"role": "user", "content": "How many circles are there?"}]
    path = str(tmp_path / "rl.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    out = str(tmp_path / "rl")
    run("rl.py", *rl_args(world, tiny_dirs[0], out, data=path, steps=2, save_every=0), nproc=2,
        env={**MIXED, "PATCH_NAN": "1:1"}, timeout=240)
    recs = [m for m in metrics(out) if "grad_norm" in m]
    assert [m["skipped"] for m in recs] == [1, 0] and recs[-1]["skipped_steps"] == 1


def test_align_nan_in_the_discriminator_update_is_skipped_and_counted(world, tiny_dirs, tmp_path):
    out = str(tmp_path / "align")
    run("align.py", *align_args(world, *tiny_dirs, out, steps=2, save_every=0), nproc=2,
        env={**MIXED, "PATCH_NAN": "1:1"})  # the first clip_grad of the game: step 1's discriminator update
    recs = [m for m in metrics(out) if "valid" in m]
    assert [m["skipped_steps"] for m in recs] == [1, 1]
    assert json.load(open(os.path.join(out, "run_config.json")))["skipped_steps"] == 1


# -----------------------------------------------------------------------------
# wrong configuration: refused at start-up with a message saying what to change

def test_wrong_configurations_are_refused(world, tiny_dirs, tmp_path, processor):
    policy, disc = tiny_dirs
    # a policy directory that is not Qwen3-VL
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 1000, "hidden_size": 64,
                                                   "num_hidden_layers": 1, "num_attention_heads": 2}))
    with pytest.raises(SystemExit, match="must be a dense Qwen3-VL"):
        M.load_policy(str(llama), processor, torch.device("cpu"))
    # a model whose vocabulary is smaller than the tokenizer
    cfg = M.Qwen3VLForConditionalGeneration.config_class.from_pretrained(policy)
    cfg.text_config.vocab_size = len(processor.tokenizer) - 1
    with pytest.raises(SystemExit, match="model and processor do not match"):
        M.check_vocab(cfg, processor, "x")
    # a discriminator whose image processor differs from the policy's
    other = tmp_path / "disc"
    shutil.copytree(disc, other)
    p = M.load_processor(str(other))
    p.image_processor.image_mean = [0.0, 0.0, 0.0]
    p.save_pretrained(str(other))
    r = run("align.py", *align_args(world, policy, str(other), str(tmp_path / "a")), check=False, timeout=120)
    assert r.returncode != 0 and "tokenizer or image processor differs from the policy's" in r.stdout + r.stderr
    # a world size that does not divide the prompts per step
    r = run("rl.py", *rl_args(world, policy, str(tmp_path / "r"), prompts=3), nproc=2, check=False, timeout=120)
    assert r.returncode != 0 and "--prompts 3 must be divisible by the world size 2" in r.stdout + r.stderr
    r = run("align.py", *align_args(world, policy, disc, str(tmp_path / "a3"), prompts=1, group_size=3), nproc=2, check=False,
            timeout=120)
    assert r.returncode != 0 and "--prompts x --group-size (1 x 3) must be divisible by the world size 2" in r.stdout + r.stderr


# -----------------------------------------------------------------------------
# safety: weights only from safetensors, pickles never executed

class Boom:
    """Unpickling this runs os.system: a crafted checkpoint."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_crafted_pickles_are_refused(tiny_dirs, tmp_path, processor):
    marker = tmp_path / "pwned"
    # a policy directory holding a pickled pytorch_model.bin instead of safetensors
    bad = tmp_path / "policy"
    shutil.copytree(tiny_dirs[0], bad)
    os.remove(bad / "model.safetensors")
    with open(bad / "pytorch_model.bin", "wb") as f:
        pickle.dump(Boom(marker), f)
    with pytest.raises(Exception, match="safetensors"):
        M.load_policy(str(bad), processor, torch.device("cpu"))
    # a resume checkpoint whose RNG file is a crafted pickle: torch.load(weights_only=True) refuses it
    rng = tmp_path / "rng_0.pt"
    with open(rng, "wb") as f:
        pickle.dump(Boom(marker), f)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(rng, weights_only=True)
    assert not marker.exists()
    # and no torch.load in the code base without weights_only=True
    for name in ("model.py", "sft.py", "align.py", "rl.py", "eval.py", "data.py", "bench.py"):
        src = open(os.path.join(ROOT, name)).read()
        assert src.count("torch.load(") == src.count("weights_only=True"), name


# -----------------------------------------------------------------------------
# over-long samples: dropped and counted, never truncated

def test_over_long_sft_examples_are_dropped_and_counted(world, processor, tmp_path):
    exs, _ = data.read_examples(os.path.join(world[0], "sft.jsonl"), "sft")
    train = exs[:len(exs) - 8]
    lengths = [len(data.render_chat(processor, ex, ex.response)["input_ids"]) for ex in train]
    max_len = sorted(lengths)[len(lengths) // 2]  # about half the examples are too long
    batches = [data.stream_indices(len(train), 0, step * 4, 4) for step in range(3)]
    expected = [sum(lengths[i] > max_len for b in batches[:s + 1] for i in b) for s in range(3)]
    assert 0 < expected[-1] < 12
    out = str(tmp_path / "sft")
    run("sft.py", *sft_args(world, out, max_len=max_len, micro_batch=4))
    assert [m["dropped"] for m in metrics(out) if "loss" in m] == expected


def test_over_long_prompts_are_dropped_and_counted(world, processor, tiny_dirs, tmp_path):
    prompts, _ = data.read_examples(os.path.join(world[0], "rl.parquet"), "prompt")
    lengths = [len(data.render_chat(processor, ex)["input_ids"]) for ex in prompts]
    limit = sorted(lengths)[len(lengths) // 2]
    kept, n = data.drop_long_prompts(processor, prompts, limit)
    assert n == sum(x > limit for x in lengths) > 0 and kept == [ex for ex, x in zip(prompts, lengths) if x <= limit]
    # a limit no prompt fits: rl.py stops at start-up and says so
    r = run("rl.py", *rl_args(world, tiny_dirs[0], str(tmp_path / "r"), max_prompt_len=min(lengths) - 1), check=False,
            timeout=120)
    assert r.returncode != 0 and "every prompt is longer than --max-prompt-len" in r.stdout + r.stderr
