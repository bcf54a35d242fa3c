import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SMALL_WORLD = dict(n_sft=48, n_align=8, n_rl=8, n_eval=8, n_hard=8, n_warmup=16)


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A small synthetic world on disk: (directory, the generator's rows per split)."""
    import data
    out = str(tmp_path_factory.mktemp("shapes"))
    splits = data.make_synthetic(out, seed=0, **SMALL_WORLD)
    return out, splits


@pytest.fixture(scope="session")
def processor(world):
    from transformers import AutoProcessor
    return AutoProcessor.from_pretrained(os.path.join(world[0], "processor"))


@pytest.fixture(scope="session")
def tiny_dirs(world, tmp_path_factory):
    """(a random tiny policy HF dir, a 4-expert discriminator upcycled from it) written by `python model.py`."""
    from helpers import script
    base = str(tmp_path_factory.mktemp("tiny"))
    script("model.py", "init", "--config", "tiny", "--processor", os.path.join(world[0], "processor"), "--out", base + "/policy")
    script("model.py", "upcycle", "--dense", base + "/policy", "--out", base + "/disc")
    return base + "/policy", base + "/disc"
