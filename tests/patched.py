"""Run a stage script with model.generate replaced by a scripted policy (tests only), then exec the script as __main__.

    python tests/patched.py align.py --policy ...      with PATCH_GENERATE = rank0-valid | none-valid

rank0-valid: rank 0 answers every prompt with a format-valid response, every other rank with text that is never valid
(and of uneven lengths); none-valid: no rank ever produces a valid response."""

import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402

VALID = "<caption>\n- row 1, column 1: red circle\n</caption>\n<think>\nI look.\n</think>\n<answer>1</answer>"


def scripted_generate(infer, prompts, tokenizer, device, max_new_tokens, temperature=1.0, top_p=1.0, batch_size=64):
    rank = int(os.environ.get("RANK", 0))
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if os.environ["PATCH_GENERATE"] == "rank0-valid" and rank == 0:
        return [tokenizer(VALID, add_special_tokens=False)["input_ids"] + [eos] for _ in prompts]
    bad = tokenizer("no blocks at all, just words", add_special_tokens=False)["input_ids"]
    return [bad[:3 + i % 5] + [eos] for i in range(len(prompts))]


M.generate = scripted_generate
sys.argv = sys.argv[1:]
runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), sys.argv[0]), run_name="__main__")
