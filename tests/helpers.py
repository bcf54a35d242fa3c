"""Shared by the tests that drive the stage scripts as a user would: one launcher (subprocess, torchrun for nproc > 1,
tests/patched.py when a fault or a scripted policy is patched in), kill -9 mid-run, the stages' small arguments, checkpoints."""

import json
import os
import signal
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
MIXED = {"PATCH_GENERATE": "mixed"}  # tests/patched.py's scripted policy: half the rollouts valid, the same on 1 and 2 ranks


def command(name, args, nproc=1, env=None):
    """The command line of a stage script: torchrun --standalone when nproc > 1, through tests/patched.py when `env`
    patches something in (PATCH_* variables)."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                      f"--nproc_per_node={nproc}"]
    patched = [os.path.join(ROOT, "tests", "patched.py")] if any(k.startswith("PATCH_") for k in env or {}) else []
    return launcher + patched + [os.path.join(ROOT, name) if not patched else name, *map(str, args)]


def run(name, *args, nproc=1, env=None, timeout=300, check=True):
    """Run a stage script and return the CompletedProcess; a hang fails by timeout."""
    cmd = command(name, args, nproc, env)
    r = subprocess.run(cmd, cwd=ROOT, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


def kill_after(name, args, nproc, env, marker, timeout=240):
    """Start the command, SIGKILL it and every process it started as soon as `marker` exists, return once it is dead."""
    proc = subprocess.Popen(command(name, args, nproc, env), cwd=ROOT, env={**ENV, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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


def argv(defaults, **overrides):
    """Command-line arguments from {"--flag": value} defaults, with overrides given as flag_name=value."""
    a = {**defaults, **{f"--{k.replace('_', '-')}": v for k, v in overrides.items()}}
    return [x for kv in a.items() for x in kv]


def sft_args(world, out, **kw):
    a = {"--init": "tiny", "--processor": os.path.join(world[0], "processor"), "--data": os.path.join(world[0], "sft.jsonl"),
         "--out": out, "--val-size": 8, "--batch-size": 4, "--micro-batch": 4, "--lr": 1e-4, "--steps": 1,
         "--eval-every": 0, "--save-every": 0, "--warmup-ratio": 0}
    return argv(a, **kw)


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


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def checkpoint_params(ckpt, prefix="policy.model."):
    """The fp32 parameters stored in a torch.distributed.checkpoint directory, keyed without `prefix`."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    path = ckpt.rstrip("/") + ".pt"
    dcp_to_torch_save(ckpt, path)
    sd = torch.load(path, weights_only=True)
    os.remove(path)
    flat = {}

    def walk(d, pre):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, pre + k + ".")
            elif torch.is_tensor(v):
                flat[pre + k] = v
    walk(sd, "")
    return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}


def last_checkpoint(out):
    d = os.path.join(out, "ckpt")
    return os.path.join(d, sorted(x for x in os.listdir(d) if not x.endswith(".tmp"))[-1])


def assert_same_params(a, b, atol):
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def check_two_equal_one_and_resume(stage, args, tmp_path, prefixes):
    """The same global batch on 1 and on 2 processes gives the same weights; a 2-process run killed with SIGKILL after
    its first checkpoint (with a half-written later checkpoint left behind) and re-run ends bitwise equal to the
    uninterrupted one: data position, optimizer state and every model resume. prefixes: {checkpoint key prefix: atol of
    1 vs 2 processes}."""
    import shutil
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
    for prefix, atol in prefixes.items():
        p1, p2, pk = (checkpoint_params(last_checkpoint(d), prefix) for d in (one, two, killed))
        assert_same_params(p1, p2, atol=atol)
        assert_same_params(p2, pk, atol=0)
    timeless = lambda out: [{k: v for k, v in m.items() if not k.startswith("t_")} for m in metrics(out)]  # noqa: E731
    assert timeless(killed) == timeless(two)  # the metrics continue the same curve
