"""data.py: label masks, image tokens, readers (round-trip and every bad-input case), determinism, processor round-trip."""

import filecmp
import io
import json
import os
import struct
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import data
import verify
from conftest import SMALL_WORLD


def test_label_mask_is_exactly_the_assistant_turn(world, processor):
    exs, _ = data.read_examples(os.path.join(world[0], "sft.jsonl"), "sft")
    tok = processor.tokenizer
    for ex in exs[:10]:
        it = data.render_chat(processor, ex, ex.response)
        sup = it["labels"] != -100
        n_sup = int(sup.sum())
        # supervised tokens are one contiguous block at the very end: the response, then <|im_end|>
        assert sup[-n_sup:].all() and not sup[:-n_sup].any()
        assert torch.equal(it["labels"][sup], it["input_ids"][sup])
        assert tok.decode(it["input_ids"][sup]) == ex.response + "<|im_end|>"
        # the prompt part decodes to the chat template's generation prompt
        assert tok.decode(it["input_ids"][~sup]).endswith("<|im_start|>assistant\n")
        # image tokens: exactly what image_grid_thw implies (t * h * w / merge^2)
        n_img = int((it["input_ids"] == tok.convert_tokens_to_ids("<|image_pad|>")).sum())
        assert n_img == int(it["image_grid_thw"].prod(-1).sum()) // 4 == int((it["mm_token_type_ids"] == 1).sum())
        assert it["pixel_values"].shape[0] == int(it["image_grid_thw"].prod(-1).sum())


def test_collate_pads_right_and_keeps_images_in_order(world, processor):
    exs, _ = data.read_examples(os.path.join(world[0], "sft.jsonl"), "sft")
    items = [data.render_chat(processor, ex, ex.response) for ex in exs[:3]]
    b = data.collate(items, pad_id=0)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        assert b["attention_mask"][i].sum() == n and b["attention_mask"][i, :n].all()
        assert torch.equal(b["labels"][i, :n], it["labels"]) and (b["labels"][i, n:] == -100).all()
    assert torch.equal(b["pixel_values"], torch.cat([it["pixel_values"] for it in items]))


def test_readers_round_trip(world):
    out, splits = world
    sft, _ = data.read_examples(os.path.join(out, "sft.jsonl"), "sft")
    for ex, row in zip(sft, splits["sft"]):
        assert ex.response == row["messages"][2]["content"] and ex.question == row["messages"][1]["content"]
        assert ex.system == data.SYSTEM_PROMPT and ex.images == [os.path.join(out, row["images"][0])]
    align, _ = data.read_examples(os.path.join(out, "align.parquet"), "prompt", require=("teacher_caption",))
    for ex, row in zip(align, splits["align"]):
        assert ex.answer == row["reward_model"]["ground_truth"]
        eq = row["reward_model"]["equivalent_answers"]  # the release's layout; "__EMPTY__" means none
        assert ex.equivalents == (() if eq == ["__EMPTY__"] else tuple(eq))
        assert ex.teacher_caption == row["teacher_caption"] and ex.teacher_cot == row["teacher_cot"]
        assert ex.images[0]["bytes"] == row["images"][0]["bytes"]
        # the teacher demonstration is format-valid and earns the full reward
        assert verify.reward(ex.teacher_caption + "\n" + ex.teacher_cot, ex.answer, ex.equivalents)["score"] == 1.0
    rl, _ = data.read_examples(os.path.join(out, "rl.parquet"), "prompt")
    assert len(rl) == SMALL_WORLD["n_rl"] and rl[0].teacher_caption is None
    hard, _ = data.read_examples(os.path.join(out, "eval_hard.parquet"), "prompt")
    assert isinstance(hard[0].images[0], str) and os.path.isfile(hard[0].images[0])  # plain relative paths, resolved
    pairs, _ = data.read_examples(os.path.join(out, "warmup.jsonl"), "pair")
    assert pairs[0].student_caption == splits["warmup"][0]["student_caption"]
    # embedded bytes and the same picture drawn from a path decode to the same pixels
    img = data.load_image(align[0].images[0], "x", 10 ** 6)
    assert img.size == (96, 96)


def test_max_pixels_caps_images(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (800, 600), (1, 2, 3)).save(path)
    img = data.load_image(str(path), "x", 560 * 560)
    assert img.size[0] * img.size[1] <= 560 * 560 and abs(img.size[0] / img.size[1] - 800 / 600) < 0.01


def test_generator_is_deterministic(world, tmp_path):
    other = str(tmp_path / "again")
    data.make_synthetic(other, seed=0, **SMALL_WORLD)
    cmp = filecmp.dircmp(world[0], other)
    def same(c):
        _, mismatch, errors = filecmp.cmpfiles(c.left, c.right, c.common_files, shallow=False)
        return not mismatch and not errors and not c.left_only and not c.right_only and all(same(s) for s in c.subdirs.values())
    assert same(cmp)
    third = str(tmp_path / "seed1")
    data.make_synthetic(third, seed=1, **SMALL_WORLD)
    assert open(os.path.join(third, "sft.jsonl")).read() != open(os.path.join(world[0], "sft.jsonl")).read()


def test_held_out_pairs_are_never_in_training_and_solve_gives_the_ground_truth(tmp_path):
    """In a world of one-object scenes (108 of them, few questions each), training draws repeat (scene, question) pairs
    often, so held-out draws would too; none of the eval pairs is in sft, align, rl or warm-up. The scene table holds every
    image, and solve() on its objects reproduces each record's answer and its type."""
    import hashlib
    out = str(tmp_path / "w")
    data.make_synthetic(out, seed=0, n_sft=400, n_align=16, n_rl=64, n_eval=64, n_hard=0, n_warmup=64, min_objects=1,
                        max_objects=1)
    scenes = {r["sha256"]: tuple(map(tuple, r["objects"])) for r in map(json.loads, open(os.path.join(out, data.SCENES)))}
    read = lambda rel: open(os.path.join(out, rel), "rb").read()  # noqa: E731
    pairs = {}
    for r in map(json.loads, open(os.path.join(out, "sft.jsonl"))):
        pairs.setdefault("sft", []).append((scenes[hashlib.sha256(read(r["images"][0])).hexdigest()],
                                            r["messages"][1]["content"].split("\n", 1)[1]))
    for r in map(json.loads, open(os.path.join(out, "warmup.jsonl"))):
        pairs.setdefault("warmup", []).append((scenes[hashlib.sha256(read(r["image"])).hexdigest()], r["prompt"].split("\n", 1)[1]))
    for name in ("align", "rl", "eval"):
        for r in pq.read_table(os.path.join(out, f"{name}.parquet")).to_pylist():
            objs = scenes[hashlib.sha256(r["images"][0]["bytes"]).hexdigest()]
            q = r["extra_info"]["question"]
            pairs.setdefault(name, []).append((objs, q))
            assert data.solve(q, objs)[0] == r["reward_model"]["ground_truth"]
            assert r["extra_info"]["kind"] in ("count", "attribute", "choice", "pair", "arith")
    train = set(pairs["sft"] + pairs["align"] + pairs["rl"] + pairs["warmup"])
    assert len(set(pairs["sft"])) < len(pairs["sft"]) - 20  # the space is small: training repeats itself
    assert not set(pairs["eval"]) & train and len(pairs["eval"]) == 64


def test_answers_are_spread_evenly_over_each_question_types_support(tmp_path):
    """No answer is a shortcut: per split and question type, every answer is in answer_support's list and each of its
    values is about as common as the others (within 4 binomial standard errors of 1/len). Left to the scenes, "0" was
    half of all counts and a policy answering it scored like every RL run of an earlier world."""
    import collections
    out = str(tmp_path / "w")
    data.make_synthetic(out, seed=2, n_sft=8, n_align=8, n_rl=1200, n_eval=8, n_hard=800, n_warmup=8)
    for name, hard, hi in (("rl", False, 4), ("eval_hard", True, 7)):
        by = collections.defaultdict(list)
        for r in pq.read_table(os.path.join(out, f"{name}.parquet"), columns=["extra_info"]).to_pylist():
            by[r["extra_info"]["kind"]].append(r["extra_info"]["answer"])
        assert set(by) == set(data.HARD_KINDS if hard else data.KINDS)
        for kind, answers in by.items():
            support, n = data.answer_support(kind, hard, hi), len(answers)
            p = 1 / len(support)
            assert set(answers) <= set(support), (name, kind)
            for a in support:
                assert abs(answers.count(a) / n - p) <= 4 * (p * (1 - p) / n) ** 0.5, (name, kind, a, answers.count(a), n)


def test_hard_split_has_more_objects(world):
    n = [r["extra_info"]["n_objects"] for r in world[1]["eval"]]
    h = [r["extra_info"]["n_objects"] for r in world[1]["eval_hard"]]
    assert max(n) < min(h)


def test_processor_round_trips_through_autoprocessor(world, processor, tmp_path):
    from transformers import AutoProcessor
    processor.save_pretrained(tmp_path)
    again = AutoProcessor.from_pretrained(tmp_path)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}]
    t1 = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert t1 == again.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert t1 == "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>How many?<|im_end|>\n<|im_start|>assistant\n"
    img = Image.new("RGB", (96, 96))
    a, b = processor(text=[t1], images=[img]), again(text=[t1], images=[img])
    assert a["input_ids"] == b["input_ids"] and torch.equal(torch.as_tensor(a["pixel_values"]), torch.as_tensor(b["pixel_values"]))
    text = "<caption>\n- row 1, column 2: red circle\n</caption>"
    assert again.tokenizer.decode(again.tokenizer(text)["input_ids"]) == text  # byte-level BPE decodes exactly


# -----------------------------------------------------------------------------
# bad input: each case raises DataError naming the file and the record, or is counted under skip_bad

def good_prompt_row(img):
    return {"prompt": [{"role": "user", "content": "<image>\nHow many?"}], "images": [img],
            "reward_model": {"ground_truth": "2"}, "extra_info": {"index": 0}}


def png(w=8, h=8):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png():
    """A PNG header claiming 100000 x 100000 pixels (decoding it would need 30 GB)."""
    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_equivalent_answers_in_both_released_columns(tmp_path):
    """reward_model.equivalent_answers (where the release's reward managers read them) and extra_info's; a list holding
    "__EMPTY__" means none, as in the release's math_verify_with_format.py."""
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    base = {"prompt": [{"role": "user", "content": "<image>\nWhich colour? (A) red (B) blue"}], "images": ["a.png"]}
    rows = [{**base, "reward_model": {"ground_truth": "B", "equivalent_answers": ["blue"]}},
            {**base, "reward_model": {"ground_truth": "B", "equivalent_answers": ["__EMPTY__"]}},
            {**base, "reward_model": {"ground_truth": "B", "equivalent_answers": ["blue", "__EMPTY__"]}},
            {**base, "reward_model": {"ground_truth": "B"}, "extra_info": {"equivalent_answers": ["blue"]}},
            {**base, "reward_model": {"ground_truth": "B", "equivalent_answers": ["blue"]},
             "extra_info": {"equivalent_answers": ["Blue", "blue"]}}]
    strs = pa.list_(pa.string())
    schema = pa.schema([("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
                        ("images", strs), ("reward_model", pa.struct([("ground_truth", pa.string()), ("equivalent_answers", strs)])),
                        ("extra_info", pa.struct([("equivalent_answers", strs)]))])  # every row's columns, as the release's
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), str(tmp_path / "rl.parquet"))
    exs, _ = data.read_examples(str(tmp_path / "rl.parquet"), "prompt")
    assert [ex.equivalents for ex in exs] == [("blue",), (), (), ("blue",), ("blue", "Blue")]
    text = "<caption>- a</caption><think>b</think><answer>blue</answer>"
    assert [verify.reward(text, ex.answer, ex.equivalents)["score"] for ex in exs] == [1.0, 0.2, 0.2, 1.0, 1.0]


@pytest.mark.parametrize("case,row_fn,msg", [
    ("missing prompt", lambda d: {k: v for k, v in good_prompt_row("a.png").items() if k != "prompt"}, "prompt"),
    ("missing ground truth", lambda d: {**good_prompt_row("a.png"), "reward_model": {"style": "rule"}}, "ground_truth"),
    ("non-string answer", lambda d: {**good_prompt_row("a.png"), "reward_model": {"ground_truth": 2}}, "must be a string"),
    ("marker mismatch", lambda d: {**good_prompt_row("a.png"), "images": ["a.png", "a.png"]}, "2 images"),
    ("empty question", lambda d: {**good_prompt_row("a.png"), "prompt": [{"role": "user", "content": "<image>  "}]},
     "empty question"),
    ("bad equivalents", lambda d: {**good_prompt_row("a.png"), "extra_info": {"equivalent_answers": [1]}}, "equivalent"),
    ("bad released equivalents", lambda d: {**good_prompt_row("a.png"), "reward_model": {"ground_truth": "2",
                                            "equivalent_answers": "blue"}}, "reward_model.equivalent_answers"),
    ("bad image entry", lambda d: {**good_prompt_row(None), "images": [{"bytes": None, "path": None}]}, "bad image entry"),
])
def test_bad_parquet_records(tmp_path, case, row_fn, msg):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    path = str(tmp_path / "d.jsonl")
    rows = [good_prompt_row("a.png"), row_fn(tmp_path)]
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    with pytest.raises(data.DataError, match=rf"d\.jsonl:1: .*{msg}"):
        data.read_examples(path, "prompt")
    exs, skipped = data.read_examples(path, "prompt", skip_bad=True)
    assert len(exs) == 1 and len(skipped) == 1


def test_bad_lines_and_encodings(tmp_path):
    path = tmp_path / "s.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"}],
                       "images": ["a.png"]}).encode()
    path.write_bytes(good + b"\n{not json\n" + b'{"messages": "\xff\xfe"}\n' + b"[1, 2]\n" + good + b"\n")
    with pytest.raises(data.DataError, match=r"s\.jsonl:1: malformed JSON"):
        data.read_examples(str(path), "sft")
    exs, skipped = data.read_examples(str(path), "sft", skip_bad=True)
    assert len(exs) == 2 and len(skipped) == 3
    assert "s.jsonl:2" in skipped[1] and "UnicodeDecodeError" in skipped[1] and "s.jsonl:3" in skipped[2]


def test_missing_columns_in_parquet_and_all_bad(tmp_path):
    path = str(tmp_path / "x.parquet")
    write_parquet(path, [{"question": "q"}])
    with pytest.raises(data.DataError, match=r"x\.parquet:0: missing 'prompt'"):
        data.read_examples(path, "prompt")
    with pytest.raises(data.DataError, match="no usable records"):
        data.read_examples(path, "prompt", skip_bad=True)
    align_like = str(tmp_path / "y.parquet")
    write_parquet(align_like, [good_prompt_row("a.png")])
    with pytest.raises(data.DataError, match="missing 'teacher_caption'"):
        data.read_examples(align_like, "prompt", require=("teacher_caption",))


@pytest.mark.parametrize("kind,content,msg", [
    ("missing", None, "image not found"),
    ("empty", b"", "image file is empty"),
    ("corrupt", b"\x89PNG\r\n\x1a\n garbage", "cannot decode image"),
    ("bomb", "bomb", "cannot decode image"),
])
def test_bad_images_name_the_record(tmp_path, processor, kind, content, msg):
    img = tmp_path / "i.png"
    if content is not None:
        img.write_bytes(bomb_png() if content == "bomb" else content)
    path = str(tmp_path / "p.jsonl")
    with open(path, "w") as f:
        f.write(json.dumps(good_prompt_row("i.png")) + "\n")
    exs, _ = data.read_examples(path, "prompt")
    with pytest.raises(data.DataError, match=rf"p\.jsonl:0: {msg}"):
        data.render_chat(processor, exs[0])


def test_image_bytes_and_relative_paths(tmp_path, processor):
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (64, 32)).save(tmp_path / "sub" / "i.png")
    dicts, paths = str(tmp_path / "p.parquet"), str(tmp_path / "q.parquet")  # a parquet column holds one type
    write_parquet(dicts, [good_prompt_row({"bytes": png(), "path": "ignored.png"}),
                          good_prompt_row({"bytes": None, "path": "sub/i.png"})])
    write_parquet(paths, [good_prompt_row("sub/i.png")])
    exs = data.read_examples(dicts, "prompt")[0] + data.read_examples(paths, "prompt")[0]
    grids = [data.render_chat(processor, ex)["image_grid_thw"].tolist() for ex in exs]
    assert grids[0] == [[1, 2, 2]] and grids[1] == grids[2] == [[1, 2, 4]]  # 32 x 64 px -> 2 x 4 patches of 16


# -----------------------------------------------------------------------------
# the release's other schemas: LLaMA-Factory sharegpt, warm-up pairs, teacher_response; images under an image root

def test_sharegpt_multi_turn_system_column_one_image_string_and_image_root(tmp_path, processor):
    """LLaMA-Factory sharegpt as it comes: `conversations` with from/value, several turns (every assistant turn is
    supervised), a `system` column, `images` as one string relative to a media folder (--image-root)."""
    media = tmp_path / "media"
    media.mkdir()
    Image.new("RGB", (64, 64), (10, 200, 10)).save(media / "g.png")
    rec = {"conversations": [{"from": "human", "value": "<image>What colour?"}, {"from": "gpt", "value": "green"},
                             {"from": "human", "value": "And its shape?"}, {"from": "gpt", "value": "a square"}],
           "system": "Answer briefly.", "images": "g.png"}
    path = tmp_path / "sft" / "d.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps(rec) + "\n")
    with pytest.raises(data.DataError, match="image not found"):  # relative to the data file's folder by default
        data.render_chat(processor, data.read_examples(str(path), "sft")[0][0], "x")
    (ex,), _ = data.read_examples(str(path), "sft", image_root=str(media))
    assert ex.system == "Answer briefly." and ex.images == [str(media / "g.png")]
    assert ex.response == "green" and ex.turns == [("And its shape?", "a square")]
    it = data.render_chat(processor, ex, ex.response)
    tok = processor.tokenizer
    sup = it["labels"] != -100
    # the supervised tokens are exactly the two assistant turns, each with its end-of-turn token
    runs, cur = [], []
    for i in range(len(sup)):
        if sup[i]:
            cur.append(int(it["labels"][i]))
        elif cur:
            runs, cur = runs + [cur], []
    runs += [cur] if cur else []
    assert [tok.decode(r) for r in runs] == ["green<|im_end|>", "a square<|im_end|>"]
    # the whole text is the chat template's, turn for turn
    want = processor.apply_chat_template([{"role": "system", "content": "Answer briefly."},
                                          {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
                                          {"role": "assistant", "content": "green"}, {"role": "user", "content": "And its shape?"},
                                          {"role": "assistant", "content": "a square"}], tokenize=False)
    text = tok.decode(it["input_ids"]).replace("<|image_pad|>" * int(it["image_grid_thw"].prod() // 4), "<|image_pad|>")
    assert text == want.rstrip("\n")


@pytest.mark.parametrize("rec,msg", [
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "f()"}]}, "tool turns"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                   {"role": "user", "content": "q2"}]}, "alternating, from a user turn to an assistant turn"),
    ({"messages": [{"role": "user", "content": "<image>q"}, {"role": "assistant", "content": "a"},
                   {"role": "user", "content": "<image>r"}, {"role": "assistant", "content": "b"}], "images": ["a.png"]},
     "2 <image> markers but the record has 1 images"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "images": ["https://example.com/a.png"]}, "is a URL; nothing is downloaded"),
])
def test_bad_sharegpt_records_name_what_to_change(tmp_path, rec, msg):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    with pytest.raises(data.DataError, match=rf"d\.jsonl:0: .*{msg}"):
        data.read_examples(str(path), "sft")


def test_warmup_pairs_under_an_image_root_and_whole_response_pairs(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    Image.new("RGB", (8, 8)).save(root / "p.png")
    rows = [{"prompt": "How many?", "image": "p.png", "teacher_caption": "<caption>a</caption>", "teacher_cot": "t",
             "student_caption": "<caption>b</caption>", "student_cot": "s"},
            {"question": "How many?", "image": "p.png", "teacher_caption": "", "teacher_cot": "",
             "teacher_response": "T whole", "student_response": "S whole"}]
    path = tmp_path / "pairs" / "w.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    split, whole = data.read_examples(str(path), "pair", image_root=str(root))[0]
    assert split.images == [str(root / "p.png")] and split.student_cot == "s" and split.teacher_response is None
    assert (whole.teacher_response, whole.student_response, whole.teacher_caption) == ("T whole", "S whole", None)


def test_alignment_rows_keep_teacher_response_and_data_source(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    row = {**good_prompt_row("a.png"), "data_source": "mm_gad", "teacher_caption": "<caption>c</caption>",
           "teacher_cot": "<think>t</think><answer>2</answer>", "teacher_response": "<caption>c</caption><think>t</think>"
           "<answer>2</answer>"}
    write_parquet(str(tmp_path / "a.parquet"), [row])
    (ex,), _ = data.read_examples(str(tmp_path / "a.parquet"), "prompt", system="custom system")
    assert ex.data_source == "mm_gad" and ex.teacher_response == row["teacher_response"]
    assert ex.system == "custom system"  # the record carries no system turn: the --system-prompt one


def test_a_prompt_with_two_images_renders_collates_and_rolls_out(tmp_path, processor):
    """Several images per prompt, end to end: the reader, render_chat (both images' tokens, in order), collate (their
    pixels concatenated in batch order), the decode loop (the M-RoPE positions of two images) against generate(), and
    the discriminator's framing and score."""
    import engine
    import model as M
    for name, col in (("r.png", (200, 10, 10)), ("b.png", (10, 10, 200))):
        Image.new("RGB", (64, 32), col).save(tmp_path / name)
    row = {"prompt": [{"role": "user", "content": "<image> left, <image> right: which is red?"}],
           "images": ["r.png", "b.png"], "reward_model": {"ground_truth": "left"}}
    write_parquet(str(tmp_path / "two.parquet"), [row])
    (ex,), _ = data.read_examples(str(tmp_path / "two.parquet"), "prompt")
    it = data.render_chat(processor, ex)
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert it["image_grid_thw"].tolist() == [[1, 2, 4], [1, 2, 4]] and int((it["input_ids"] == pad).sum()) == 4
    one = data.Example(question="<image> a", images=[str(tmp_path / "b.png")], where="x")
    single = data.render_chat(processor, one)
    b = data.collate([it, single], 0)
    assert b["pixel_values"].shape[0] == it["pixel_values"].shape[0] + single["pixel_values"].shape[0]
    assert torch.equal(b["pixel_values"][:it["pixel_values"].shape[0]], it["pixel_values"])
    policy = M.load_policy("tiny", processor, torch.device("cpu"), seed=1)
    infer = engine.make_inference_copy(policy, torch.device("cpu"))
    a = engine.generate(infer, [it, single], processor.tokenizer, "cpu", 8, temperature=0, hf=True)
    assert engine.generate(infer, [it, single], processor.tokenizer, "cpu", 8, temperature=0) == a
    # scoring: both images reach the discriminator; the batched, padded score equals the one of the prompt alone
    import align
    import torch.distributed as dist
    if not dist.is_initialized():
        M.init_dist()
    disc = M.Discriminator(policy.config).eval()
    disc.model.load_state_dict(policy.model.state_dict())
    seg = data.render_segment(processor, ex, "<caption>\n- red, blue\n</caption>")
    assert seg["image_grid_thw"].tolist() == [[1, 2, 4], [1, 2, 4]]
    framing = align.Framing(processor)
    seqs = [align.Seq(ex, "<caption>\n- red, blue\n</caption>", "cap"), align.Seq(one, "a longer segment " * 9, "cot")]
    with torch.no_grad():
        both = align.score_segments(disc, framing, seqs, "cpu", seqs[0])[0]
        alone = align.score_segments(disc, framing, seqs[:1], "cpu", seqs[0])[0]
    assert both[0].item() == pytest.approx(alone[0].item(), abs=1e-5)


def test_prompt_length_without_decoding_images_equals_the_rendered_length(world, processor, tmp_path):
    """drop_long_prompts' lengths come from image headers: equal to render_chat's, for embedded bytes, paths, two images
    of different sizes, a large image that load_image downscales, and no image."""
    out = world[0]
    exs = sum((data.read_examples(os.path.join(out, f), "prompt")[0] for f in ("rl.parquet", "eval_hard.parquet")), [])
    Image.new("RGB", (1200, 700)).save(tmp_path / "big.png")
    Image.new("RGB", (64, 32)).save(tmp_path / "wide.png")
    exs += [data.Example(question="<image> and <image>: which?", images=[str(tmp_path / "big.png"), str(tmp_path / "wide.png")],
                         where="x"), data.Example(question="No image here.", images=[], where="y")]
    for ex in exs:
        assert data.prompt_length(processor, ex, 400 * 400) == len(data.render_chat(processor, ex, None, 400 * 400)["input_ids"])
    (tmp_path / "cut.png").write_bytes((tmp_path / "wide.png").read_bytes()[:60])  # a truncated file
    with pytest.raises(data.DataError, match="cannot decode image"):
        data.prompt_length(processor, data.Example(question="q", images=[str(tmp_path / "cut.png")], where="z"))


def test_cached_image_processing_gives_the_processors_own_encoding(world, processor, tmp_path):
    """render_chat / render_segment process each image once (data.processed_image, cached) and expand the text's image
    placeholders themselves: the same ids, mm_token_type_ids, pixels and grids as processor(text=..., images=...) on the
    whole text, for embedded bytes, paths, two images of different sizes, the release's 560-px framing and no image."""
    out = world[0]
    exs = data.read_examples(os.path.join(out, "align.parquet"), "prompt")[0][:3]
    exs += data.read_examples(os.path.join(out, "eval_hard.parquet"), "prompt")[0][:2]
    Image.new("RGB", (1200, 700), (9, 90, 200)).save(tmp_path / "big.png")
    Image.new("RGB", (64, 32), (200, 9, 9)).save(tmp_path / "wide.png")
    exs += [data.Example(question="<image> and <image>?", images=[str(tmp_path / "big.png"), str(tmp_path / "wide.png")],
                         where="x"), data.Example(question="No image.", images=[], where="y")]
    for ex in exs:
        for max_side in (None, 560):
            it = data.render_segment(processor, ex, "<caption>\n- a\n</caption>", max_pixels=400 * 400, max_side=max_side)
            imgs = [data.load_image(r, "x", 400 * 400, max_side) for r in ex.images]
            messages = [{"role": "system", "content": ex.system}, {"role": "user", "content": data.user_content(
                ex.question, len(imgs), "x")}, {"role": "assistant", "content": "<caption>\n- a\n</caption>"}]
            text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
            want = processor(text=[text], images=imgs or None, return_tensors="pt")
            assert torch.equal(it["input_ids"], want["input_ids"][0])
            assert torch.equal(it["mm_token_type_ids"], want["mm_token_type_ids"][0])
            if imgs:
                assert torch.equal(it["pixel_values"], want["pixel_values"])
                assert torch.equal(it["image_grid_thw"], want["image_grid_thw"])



def test_broad_answers_are_right_as_often_as_their_question_can_be_read_off(tmp_path):
    """In the SFT mixture, response_style tells the two supervision styles apart; the high-fidelity responses are always
    right, and the broad ones right at BROAD_CORRECT's rate for their question's type (within 4 binomial standard errors):
    mostly for one object's attribute, rarely for the compositional types."""
    import hashlib
    import re
    out = str(tmp_path / "w")
    data.make_synthetic(out, seed=1, n_sft=3000, n_align=8, n_rl=8, n_eval=8, n_hard=8, n_warmup=8)
    scenes = {r["sha256"]: tuple(map(tuple, r["objects"])) for r in map(json.loads, open(os.path.join(out, data.SCENES)))}
    right = {}
    for r in map(json.loads, open(os.path.join(out, "sft.jsonl"))):
        q, resp = r["messages"][1]["content"].split("\n", 1)[1], r["messages"][2]["content"]
        objs = scenes[hashlib.sha256(open(os.path.join(out, r["images"][0]), "rb").read()).hexdigest()]
        kind = ("pair" if " and how many " in q else "arith" if "number of" in q else "choice" if "(A)" in q else
                "attribute" if q.startswith("What is the") else "count")
        got = re.search(r"<answer>(.*)</answer>", resp)[1]
        right.setdefault((data.response_style(resp), kind), []).append(got == data.solve(q, objs)[0])
    assert {s for s, _ in right} == {"teacher", "broad"}
    for (style, kind), ok in right.items():
        p = 1.0 if style == "teacher" else data.BROAD_CORRECT[kind]
        assert abs(sum(ok) / len(ok) - p) <= 4 * (p * (1 - p) / len(ok)) ** 0.5, (style, kind, sum(ok) / len(ok))
    assert data.response_style("<caption>\n- row 1, column 2: red circle\n- something else\n</caption>") == "other"
