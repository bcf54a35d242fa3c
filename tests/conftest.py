import os
import sys

import pytest
import torch

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
    from helpers import run
    base = str(tmp_path_factory.mktemp("tiny"))
    run("model.py", "init", "--config", "tiny", "--processor", os.path.join(world[0], "processor"), "--out", base + "/policy")
    run("model.py", "upcycle", "--dense", base + "/policy", "--out", base + "/disc")
    return base + "/policy", base + "/disc"


@pytest.fixture(scope="session")
def dist1():
    """A process group of one (gloo), for tests that call FSDP2-wrapped code in this process; the CPU device."""
    import torch.distributed as dist
    import model as M
    if not dist.is_initialized():
        M.init_dist()
    return torch.device("cpu")


@pytest.fixture(params=["tiny", "tiny-untied"])


def tiny_name(request, monkeypatch):
    """The tiny config with the output layer tied to the embeddings (as the 2B and 4B) and untied (as the 8B)."""
    import model
    monkeypatch.setitem(model.CONFIGS, "tiny-untied", dict(model.CONFIGS["tiny"], tied=False))
    return request.param
