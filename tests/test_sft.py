"""sft.py as a user runs it: global loss normalisation, 2-process FSDP2 == 1 process, kill + resume == uninterrupted,
a NaN gradient on one rank, over-long examples."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import model as M
from helpers import ENV, ROOT, assert_same_params, checkpoint_params, last_checkpoint, metrics, run, sft_args


def test_grad_accumulation_equals_one_big_batch(world, tmp_path):
    one, four = str(tmp_path / "one"), str(tmp_path / "four")
    run("sft.py", *sft_args(world, one, micro_batch=4))
    run("sft.py", *sft_args(world, four, micro_batch=1))  # 4 micro-steps of 1 example
    m1, m4 = metrics(one)[-2], metrics(four)[-2]  # the training record before the final val record
    assert m1["loss"] == pytest.approx(m4["loss"], rel=1e-5)
    assert m1["grad_norm"] == pytest.approx(m4["grad_norm"], rel=1e-4)  # global token normalisation, not per micro-batch
    # 5e-6: Adam's first step moves each weight by lr x g / (|g| + eps), so a gradient component at rounding level
    # (1 of the 16,384 of a projection) can move by a few 1e-6 more or less at lr 1e-4
    assert_same_params(checkpoint_params(last_checkpoint(one)), checkpoint_params(last_checkpoint(four)), atol=5e-6)


def test_packed_micro_batches_equal_padded_ones(world, tmp_path):
    """sft.py --pack (each micro-batch's examples in one row) trains as the padded batches do: loss, grad norm, weights.
    Steps prepared by DataLoader worker processes (the GPU default) are the ones the main process prepares, bit for bit."""
    plain, packed, workers = str(tmp_path / "plain"), str(tmp_path / "packed"), str(tmp_path / "workers")
    run("sft.py", *sft_args(world, plain, steps=2))
    run("sft.py", *sft_args(world, packed, steps=2), "--pack")
    run("sft.py", *sft_args(world, workers, steps=2), "--workers", 2)
    assert [{k: v for k, v in m.items() if k not in ("tok_s", "dt")} for m in metrics(workers)] == \
        [{k: v for k, v in m.items() if k not in ("tok_s", "dt")} for m in metrics(plain)]
    assert_same_params(checkpoint_params(last_checkpoint(plain)), checkpoint_params(last_checkpoint(workers)), atol=0)
    for a, b in zip(metrics(plain), metrics(packed)):
        for k in ("loss", "grad_norm", "val_loss"):
            if k in a:
                assert a[k] == pytest.approx(b[k], rel=1e-5), k
    assert_same_params(checkpoint_params(last_checkpoint(plain)), checkpoint_params(last_checkpoint(packed)), atol=5e-6)


def test_two_process_fsdp_equals_one_process(world, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run("sft.py", *sft_args(world, one, steps=3, micro_batch=2))
    run("sft.py", *sft_args(world, two, steps=3, micro_batch=2), nproc=2)
    l1 = [m["loss"] for m in metrics(one) if "loss" in m]
    l2 = [m["loss"] for m in metrics(two) if "loss" in m]
    assert len(l1) == len(l2) == 3 and l1 == pytest.approx(l2, rel=1e-5)
    assert_same_params(checkpoint_params(last_checkpoint(one)), checkpoint_params(last_checkpoint(two)), atol=1e-6)


def test_kill_and_resume_equals_uninterrupted(world, tmp_path):
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    args = dict(steps=6, save_every=2, micro_batch=2)
    run("sft.py", *sft_args(world, full, **args))
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
    r = run("sft.py", *sft_args(world, killed, **args))
    assert "resumed from" in r.stdout
    assert_same_params(checkpoint_params(last_checkpoint(full)), checkpoint_params(last_checkpoint(killed)), atol=0)
    # the metrics after the resume continue the same curve
    lf = [m["loss"] for m in metrics(full) if "loss" in m]
    lk = [m["loss"] for m in metrics(killed) if "loss" in m]
    assert lf == lk

# -----------------------------------------------------------------------------
# faults and bad input


def test_nan_gradient_on_one_rank_skips_the_sft_step_on_both(world, tmp_path):
    out = str(tmp_path / "sft")
    r = run("sft.py", *sft_args(world, out, micro_batch=2, steps=3), nproc=2, env={"PATCH_NAN": "1:2"})  # rank 1's gradient is NaN in step 2
    assert "non-finite" in r.stdout
    recs = [m for m in metrics(out) if "loss" in m]
    assert [m["step"] for m in recs] == [1, 3] and recs[-1]["skipped_steps"] == 1
    assert json.load(open(os.path.join(out, "run_config.json")))["skipped_steps"] == 1
    sd = M.Qwen3VLForConditionalGeneration.from_pretrained(out).state_dict()
    assert all(torch.isfinite(v).all() for v in sd.values())
    # K non-finite steps in a row stop the run with a message (one process, every step poisoned)
    r = run("sft.py", *sft_args(world, str(tmp_path / "stop"), micro_batch=2, steps=5, max_bad_steps=2), env={"PATCH_NAN": "0:all"},
            check=False)
    assert r.returncode != 0 and "2 non-finite steps in a row: stopping" in r.stdout + r.stderr


def test_over_long_sft_examples_are_dropped_and_counted(world, processor, tmp_path):
    exs, _ = data.read_examples(os.path.join(world[0], "sft.jsonl"), "sft")
    train = exs[:len(exs) - 8]
    lengths = [len(data.render_chat(processor, ex, ex.response)["input_ids"]) for ex in train]
    max_len = sorted(lengths)[len(lengths) // 2]  # about half the examples are too long
    batches = [data.stream_indices(len(train), 0, step * 4, 4) for step in range(3)]
    expected = [sum(lengths[i] > max_len for b in batches[:s + 1] for i in b) for s in range(3)]
    assert 0 < expected[-1] < 12
    out = str(tmp_path / "sft")
    run("sft.py", *sft_args(world, out, max_len=max_len, micro_batch=4, steps=3))
    assert [m["dropped"] for m in metrics(out) if "loss" in m] == expected
