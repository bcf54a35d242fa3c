"""sft.py as a user runs it: global loss normalisation, 2-process FSDP2 == 1 process, kill + resume == uninterrupted."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import ENV, ROOT, argv, checkpoint_params, last_checkpoint, metrics, script


def sft_args(world, out, **kw):
    a = {"--init": "tiny", "--processor": os.path.join(world[0], "processor"), "--data": os.path.join(world[0], "sft.jsonl"),
         "--out": out, "--val-size": 8, "--batch-size": 4, "--micro-batch": 4, "--lr": 1e-4, "--steps": 1,
         "--eval-every": 0, "--save-every": 0, "--warmup-ratio": 0}
    return argv(a, **kw)


def assert_params_close(a, b, atol):
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def test_grad_accumulation_equals_one_big_batch(world, tmp_path):
    one, four = str(tmp_path / "one"), str(tmp_path / "four")
    script("sft.py", *sft_args(world, one, micro_batch=4))
    script("sft.py", *sft_args(world, four, micro_batch=1))  # 4 micro-steps of 1 example
    m1, m4 = metrics(one)[-2], metrics(four)[-2]  # the training record before the final val record
    assert m1["loss"] == pytest.approx(m4["loss"], rel=1e-5)
    assert m1["grad_norm"] == pytest.approx(m4["grad_norm"], rel=1e-4)  # global token normalisation, not per micro-batch
    assert_params_close(checkpoint_params(last_checkpoint(one)), checkpoint_params(last_checkpoint(four)), atol=1e-6)


def test_two_process_fsdp_equals_one_process(world, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    script("sft.py", *sft_args(world, one, steps=3, micro_batch=2))
    script("sft.py", *sft_args(world, two, steps=3, micro_batch=2), nproc=2)
    l1 = [m["loss"] for m in metrics(one) if "loss" in m]
    l2 = [m["loss"] for m in metrics(two) if "loss" in m]
    assert len(l1) == len(l2) == 3 and l1 == pytest.approx(l2, rel=1e-5)
    assert_params_close(checkpoint_params(last_checkpoint(one)), checkpoint_params(last_checkpoint(two)), atol=1e-6)


def test_kill_and_resume_equals_uninterrupted(world, tmp_path):
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    args = dict(steps=6, save_every=2, micro_batch=2)
    script("sft.py", *sft_args(world, full, **args))
    # the same command, killed with SIGKILL once its first checkpoint is complete, then re-run
    cmd = [sys.executable, os.path.join(ROOT, "sft.py"), *map(str, sft_args(world, killed, **args))]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = os.path.join(killed, "ckpt", "step_000002", "meta.json")
    deadline = time.time() + 120
    while not os.path.exists(first) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.exists(first), "the run ended before its first checkpoint"
    done = sorted(os.listdir(os.path.join(killed, "ckpt")))
    assert "step_000006" not in done  # it really was interrupted
    r = script("sft.py", *sft_args(world, killed, **args))
    assert "resumed from" in r.stdout
    assert_params_close(checkpoint_params(last_checkpoint(full)), checkpoint_params(last_checkpoint(killed)), atol=0)
    # the metrics after the resume continue the same curve
    lf = [m["loss"] for m in metrics(full) if "loss" in m]
    lk = [m["loss"] for m in metrics(killed) if "loss" in m]
    assert lf == lk
