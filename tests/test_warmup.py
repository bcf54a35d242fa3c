"""warmup.py as a user runs it: the discriminator learns to rank the teacher above the student."""

import json
import os

import data
import model as M
from helpers import run


def test_warmup_reaches_held_out_pair_accuracy(tmp_path):
    """python model.py init + warmup.py --disc upcycle:... on the synthetic warm-up pairs: the discriminator
    ranks the teacher above the broad-style student on >= 90% of held-out pairs, in both channels."""
    world = str(tmp_path / "w")
    data.make_synthetic(world, seed=3, n_sft=8, n_align=8, n_rl=8, n_eval=8, n_hard=8, n_warmup=128)
    run("model.py", "init", "--config", "tiny", "--processor", world + "/processor", "--out", str(tmp_path / "p"))
    out = str(tmp_path / "disc")
    run("warmup.py", "--disc", f"upcycle:{tmp_path / 'p'}", "--data", world + "/warmup.jsonl", "--out", out,
        "--batch-size", "16", "--epochs", "1", "--val", "32", "--lr", "1e-3", "--disc-micro", "64")
    val = json.load(open(os.path.join(out, "run_config.json")))["val"]
    assert val["cap_acc"] >= 0.9 and val["cot_acc"] >= 0.9, val
    assert M.Discriminator.from_pretrained(out).config.text_config.num_experts == 4
    # the framing its scores were trained under, stored beside it for the game: our own (the records' system prompt)
    assert json.load(open(os.path.join(out, "framing.json"))) == {"system": None, "max_pixels": 560 * 560, "max_side": None}
