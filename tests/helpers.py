"""Shared by the tests that drive the stage scripts as a user would: subprocesses, torchrun, checkpoints."""

import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def script(name, *args, nproc=1, timeout=300, check=True):
    """Run a stage script (torchrun --standalone for nproc > 1) and return the CompletedProcess. A hang fails by timeout."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                      f"--nproc_per_node={nproc}"]
    cmd = launcher + [os.path.join(ROOT, name), *map(str, args)]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


def argv(defaults, **overrides):
    """Command-line arguments from {"--flag": value} defaults, with overrides given as flag_name=value."""
    a = {**defaults, **{f"--{k.replace('_', '-')}": v for k, v in overrides.items()}}
    return [x for kv in a.items() for x in kv]


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
