"""
Data for every stage: the system prompt and chat rendering, readers for the released formats, collation, and the synthetic
visual-reasoning world (images, questions, supervision, tokenizer, processor) that the whole pipeline runs on by default.

    python data.py --out data/shapes --seed 0          # writes sft.jsonl, align.parquet, rl.parquet, eval.parquet,
                                                        # eval_hard.parquet, warmup.jsonl, images/, processor/, scenes.jsonl
    python data.py teacher --data data/shapes --port 8000   # the world's oracle teacher for curate.py (OpenAI protocol)

Formats read (PRISM_NOTES.md "Data formats"): sharegpt multimodal JSON/JSONL (`messages` role/content or `conversations`
from/value, `<image>` markers, `images` paths); parquet (or JSONL) with `prompt`, `images`, `reward_model.ground_truth`,
`reward_model.equivalent_answers` / `extra_info.equivalent_answers`, `teacher_caption`, `teacher_cot`; warm-up pairs JSONL. Image paths may be absolute or relative
to the data file. Every bad record raises DataError naming the file and record, or is skipped and counted with skip_bad.
"""

import argparse
import hashlib
import io
import itertools
import json
import os
import random
import re
import sys
from dataclasses import dataclass, field

import torch
from PIL import Image, ImageDraw

SYSTEM_PROMPT = (
    "You are a scientific assistant. Answer about the image in exactly three blocks: <caption> bullet points on its "
    "style, key objects and text </caption> <think> step-by-step reasoning </think> <answer> the final answer only </answer>"
)
IMAGE_MARKER = "<image>"
# the system prompt the release's discriminator warm-up frames every segment with (moe/train_moe_vl_warmup_fast.py:37-51),
# character for character: a released discriminator's scores mean what they meant in its training only under it
RELEASE_WARMUP_SYSTEM_PROMPT = (
    "You are a helpful scientific assistant.\nAnswer the user's question based on the image provided.\n\nYour output must "
    "strictly follow this XML format:\n\n<caption>\n- [Briefly describe the image style, key objects, and text using "
    "bullet points]\n</caption>\n<think>\n[Reason step-by-step to solve the problem]\n</think>\n<answer>\n[Final answer "
    "ONLY]\n</answer>\n"
)

# Qwen-style chat template: <|im_start|>role\n content <|im_end|>\n, an image is <|vision_start|><|image_pad|><|vision_end|>
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
# Qwen3-VL's special tokens, so that the processor and the model configs find the ids they expect by name
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
                  "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                  "<|image_pad|>", "<|video_pad|>"]


class DataError(ValueError):
    """A bad record: the message names the file and the record."""


@dataclass
class Example:
    """One record of any reader. `question` holds the user text with one "<image>" marker per image."""
    question: str
    images: list  # image refs: absolute paths, or {"bytes": ..., "path": ...} dicts
    where: str  # "file:record" for error messages
    system: str = SYSTEM_PROMPT
    response: str | None = None  # SFT target
    answer: str | None = None  # verifiable gold answer
    equivalents: tuple = ()
    teacher_caption: str | None = None
    teacher_cot: str | None = None
    student_caption: str | None = None
    student_cot: str | None = None
    teacher_response: str | None = None  # whole responses: alignment parquet, GAD-style warm-up pairs
    student_response: str | None = None
    turns: list = field(default_factory=list)  # multi-turn SFT: the (user, assistant) turns after the first
    data_source: str | None = None
    extra: dict = field(default_factory=dict)


# -----------------------------------------------------------------------------
# images and chat rendering

def load_image(ref, where, max_pixels, max_side=None):
    """Decode an image ref to RGB, downscaled (aspect kept) so that its longer side is at most max_side (when given: the
    release's warm-up caps it at 560, LANCZOS, sizes floored) and width * height <= max_pixels."""
    try:
        if isinstance(ref, dict) and ref.get("bytes"):
            img = Image.open(io.BytesIO(ref["bytes"]))
        else:
            path = ref["path"] if isinstance(ref, dict) else ref
            if not os.path.isfile(path):
                raise DataError(f"{where}: image not found: {path}")
            if os.path.getsize(path) == 0:
                raise DataError(f"{where}: image file is empty: {path}")
            img = Image.open(path)
        img = img.convert("RGB")
    except DataError:
        raise
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, DecompressionBombError, OSError, ...)
        raise DataError(f"{where}: cannot decode image: {type(e).__name__}: {e}") from None
    w, h = img.size
    if max_side and max(w, h) > max_side:
        r = max_side / max(w, h)
        img = img.resize((int(w * r), int(h * r)), Image.LANCZOS)
        w, h = img.size
    if w * h > max_pixels:
        img = img.resize(area_fit(w, h, max_pixels), Image.BICUBIC)
    return img


def area_fit(w, h, max_pixels):
    """(width, height) scaled down, aspect kept, to at most max_pixels pixels: load_image's rule, which image_size uses too."""
    if w * h <= max_pixels:
        return w, h
    s = (max_pixels / (w * h)) ** 0.5
    return max(1, int(w * s)), max(1, int(h * s))


IMAGE_CACHE_BYTES = 2 << 30  # processed images kept (pixel values), least recently used first out
_image_cache, _image_cache_bytes = {}, [0]


def image_ident(ref):
    """An image ref's identity: the hash of its bytes, else its path."""
    if isinstance(ref, dict) and ref.get("bytes"):
        return hashlib.blake2b(ref["bytes"], digest_size=16).hexdigest()
    return ref["path"] if isinstance(ref, dict) else ref


def processed_image(processor, ref, where, max_pixels, max_side=None):
    """(pixel_values (P, D), image_grid_thw (1, 3)) of one image, as the processor computes them, cached: a prompt's image
    is decoded and processed once for all its rollouts, scores and updates, not once per sequence."""
    key = (id(processor), image_ident(ref), max_pixels, max_side)
    if key in _image_cache:
        _image_cache[key] = _image_cache.pop(key)  # most recently used: to the end
        return _image_cache[key]
    enc = processor.image_processor(images=[load_image(ref, where, max_pixels, max_side)], return_tensors="pt")
    val = (enc["pixel_values"], enc["image_grid_thw"])
    _image_cache[key] = val
    _image_cache_bytes[0] += val[0].numel() * val[0].element_size()
    while _image_cache_bytes[0] > IMAGE_CACHE_BYTES and len(_image_cache) > 1:
        old = _image_cache.pop(next(iter(_image_cache)))
        _image_cache_bytes[0] -= old[0].numel() * old[0].element_size()
    return val


def encode_text(processor, text, images):
    """processor(text=[text], images=...) with the images already processed (processed_image): each image placeholder of
    the text becomes its grid's merged-patch count of placeholder tokens, the text is tokenised whole, and the image
    tokens are marked in mm_token_type_ids (1). Returns input_ids, mm_token_type_ids (L,) [, pixel_values, image_grid_thw]."""
    tok, pad = processor.tokenizer, processor.image_token
    merge = processor.image_processor.merge_size ** 2
    pieces = text.split(pad)
    if len(pieces) - 1 != len(images):
        raise ValueError(f"{len(pieces) - 1} image placeholders in the text for {len(images)} images")
    text = pieces[0] + "".join(pad * int(g.prod() // merge) + p for (_, g), p in zip(images, pieces[1:]))
    ids = torch.tensor(tok(text)["input_ids"])  # the tokenizer's defaults, as the processor calls it
    out = {"input_ids": ids, "mm_token_type_ids": (ids == processor.image_token_id).long()}
    if images:
        out["pixel_values"], out["image_grid_thw"] = torch.cat([p for p, _ in images]), torch.cat([g for _, g in images])
    return out


def user_content(question, n_images, where):
    """Chat content list for a user turn: the text split at "<image>" markers (images first if there is no marker)."""
    if IMAGE_MARKER not in question:
        question = IMAGE_MARKER * n_images + question
    pieces = question.split(IMAGE_MARKER)
    if len(pieces) - 1 != n_images:
        raise DataError(f"{where}: the prompt has {len(pieces) - 1} <image> markers but the record has {n_images} images")
    content = []
    for i, text in enumerate(pieces):
        if i > 0:
            content.append({"type": "image"})
        if text:
            content.append({"type": "text", "text": text})
    return content


def render_chat(processor, ex, response=None, max_pixels=560 * 560, with_images=True):
    """Tokenise one chat: system, user (images + question), and optionally the assistant turn `response` (and then the
    example's further turns, multi-turn SFT). Returns a dict of 1-D tensors input_ids, labels, mm_token_type_ids (L,) and
    pixel_values (P, D), image_grid_thw (n, 3). labels are -100 except on each assistant turn's tokens and its end-of-turn
    token. Without a response the text ends with the assistant header (a generation prompt). with_images=False renders
    the same chat with no image at all (text-only ablation). An assistant turn is tokenised on its own, exactly as a
    rollout's tokens follow its prompt; the template's text around it is taken turn by turn from apply_chat_template."""
    images = [processed_image(processor, r, ex.where, max_pixels) for r in ex.images] if with_images else []
    strip = (lambda t: t) if with_images else (lambda t: t.replace(IMAGE_MARKER, ""))  # noqa: E731
    users = [strip(ex.question)] + [strip(u) for u, _ in ex.turns]
    replies = [response] + [a for _, a in ex.turns] if response is not None else []
    counts = [u.count(IMAGE_MARKER) for u in users]
    if not any(counts):  # no marker anywhere: the images go before the first question
        counts[0] = len(images)
    if sum(counts) != len(images):
        raise DataError(f"{ex.where}: the chat has {sum(counts)} <image> markers but the record has {len(images)} images")
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    messages = [{"role": "system", "content": ex.system}] if ex.system else []
    ids, labels, mm, pix, grid, done, n_img = [], [], [], [], [], "", 0
    for k, user in enumerate(users[:max(1, len(replies))]):
        messages.append({"role": "user", "content": user_content(user, counts[k], ex.where)})
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not text.startswith(done):
            raise DataError(f"{ex.where}: the chat template does not render this conversation turn by turn (turn {k} "
                            f"rewrites the earlier ones), so its assistant turns cannot be supervised token by token")
        enc = encode_text(processor, text[len(done):], images[n_img:n_img + counts[k]])
        n_img += counts[k]
        ids.append(enc["input_ids"])
        labels.append(torch.full_like(ids[-1], -100))
        mm.append(enc["mm_token_type_ids"])
        if "pixel_values" in enc:
            pix.append(enc["pixel_values"])
            grid.append(enc["image_grid_thw"])
        if k < len(replies):
            r = torch.tensor(tok(replies[k], add_special_tokens=False)["input_ids"] + [eos])
            ids.append(r)
            labels.append(r)
            mm.append(torch.zeros_like(r))
            messages.append({"role": "assistant", "content": replies[k]})
            done = text + replies[k] + "<|im_end|>"
    out = {"input_ids": torch.cat(ids), "labels": torch.cat(labels), "mm_token_type_ids": torch.cat(mm)}
    if pix:
        out["pixel_values"], out["image_grid_thw"] = torch.cat(pix), torch.cat(grid)
    return out


SEGMENT_CACHE_ENTRIES = 8192
_segment_cache = {}


def render_segment(processor, ex, segment, system=None, max_pixels=560 * 560, max_side=None, with_images=True):
    """A segment framed for the discriminator as the release's warm-up frames it: system (`system`, else the record's),
    user (images + question), assistant = the segment, rendered by the chat template WITHOUT a generation prompt and
    tokenised whole, so the text ends with the end-of-turn token and the template's newline after it, the position the
    score is read at. Returns input_ids, mm_token_type_ids (L,) and the images' pixel_values, image_grid_thw. Kept for
    later calls (the game scores a segment, then trains on it; a teacher segment comes back with its prompt): the
    template and the tokenizer take ~2 ms a segment. The tensors are shared: read them, don't write them."""
    key = (id(processor), tuple(image_ident(r) for r in ex.images), ex.question, ex.system, segment, system, max_pixels,
           max_side, with_images)
    if key in _segment_cache:
        return _segment_cache[key]
    images = [processed_image(processor, r, ex.where, max_pixels, max_side) for r in ex.images] if with_images else []
    question = ex.question if with_images else ex.question.replace(IMAGE_MARKER, "")
    messages = [{"role": "system", "content": system or ex.system}] if system or ex.system else []
    messages += [{"role": "user", "content": user_content(question, len(images), ex.where)},
                 {"role": "assistant", "content": segment}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    out = encode_text(processor, text, images)
    out["labels"] = torch.full_like(out["input_ids"], -100)
    if len(_segment_cache) >= SEGMENT_CACHE_ENTRIES:
        _segment_cache.pop(next(iter(_segment_cache)))  # the oldest out
    _segment_cache[key] = out
    return out


def image_size(ref, where, max_pixels):
    """(width, height) of an image after load_image's downscaling, from its header alone (verified, not decoded)."""
    try:
        img = Image.open(io.BytesIO(ref["bytes"])) if isinstance(ref, dict) and ref.get("bytes") else \
            Image.open(ref["path"] if isinstance(ref, dict) else ref)
        w, h = img.size
        img.verify()  # a truncated or corrupt file fails here, at start-up, not in the middle of training
    except Exception:
        load_image(ref, where, max_pixels)  # the same error message as rendering would give
        raise
    return area_fit(w, h, max_pixels)


def prompt_length(processor, ex, max_pixels=560 * 560):
    """The token count of render_chat(processor, ex) without decoding or processing an image: the chat text's tokens with
    one image placeholder each, plus each image's merged patches (the image processor's own resize) minus that one."""
    messages = [{"role": "system", "content": ex.system}] if ex.system else []
    messages.append({"role": "user", "content": user_content(ex.question, len(ex.images), ex.where)})
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ip = processor.image_processor
    n = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    for ref in ex.images:
        w, h = image_size(ref, ex.where, max_pixels)
        n += ip.get_number_of_image_patches(h, w, {}) // ip.merge_size ** 2 - 1
    return n


def drop_long_prompts(processor, examples, max_len, max_pixels=560 * 560):
    """(the examples whose prompt, images included, has at most max_len tokens, how many were dropped). Over-long prompts
    are dropped and counted up front (every rank decides the same), never truncated; the lengths come from prompt_length
    (image headers only), so a start-up over thousands of prompts takes seconds."""
    from tqdm import tqdm
    kept = [ex for ex in tqdm(examples, desc="prompt lengths", leave=False, disable=len(examples) < 1000)
            if prompt_length(processor, ex, max_pixels) <= max_len]
    return kept, len(examples) - len(kept)


def stream_indices(n, seed, start, count):
    """Indices at positions [start, start + count) of an endless stream over n items: one seeded permutation per epoch,
    so a run resumed at a position continues exactly where it stopped (no item seen twice or skipped)."""
    perms = {}

    def perm(epoch):
        if epoch not in perms:
            perms[epoch] = list(range(n))
            random.Random(seed * 1000 + epoch).shuffle(perms[epoch])
        return perms[epoch]
    return [perm(pos // n)[pos % n] for pos in range(start, start + count)]


GPU_PAD_MULTIPLE = 64


def collate(items, pad_id, left=False, packed=False):
    """Pad a list of render_chat dicts into a batch (on the right; on the left for generation prompts): input_ids,
    attention_mask, labels, mm_token_type_ids (B, T); pixel_values (sum P, D) and image_grid_thw (n_images, 3) concatenated
    in batch order (absent when no item has images); rollout_logprobs (B, T) at the supervised positions when every item
    has them (join_response). On a GPU, T is rounded up to a multiple of GPU_PAD_MULTIPLE: a bounded set of shapes, so
    cuDNN's attention reuses its plans (a new shape costs ~4 ms of host time per attention call) and a compiled block
    its graphs.
    packed=True adds "packed": the same items one after another in ONE row (1, L) (input_ids, attention_mask, labels,
    mm_token_type_ids, the same images) with "cu_seqlens" (B + 1,) int32, each item's start, then L (the padding to a
    GPU multiple forms one more segment). The forwards run on that row (model.token_logprobs) and hand back the padded
    (B, T) layout, so no FLOP is spent on padding and everything downstream reads the batch as before."""
    B, T = len(items), max(len(it["input_ids"]) for it in items)
    if torch.cuda.is_available():
        T = -(-T // GPU_PAD_MULTIPLE) * GPU_PAD_MULTIPLE
    batch = {"input_ids": torch.full((B, T), pad_id, dtype=torch.long), "attention_mask": torch.zeros(B, T, dtype=torch.long),
             "labels": torch.full((B, T), -100, dtype=torch.long), "mm_token_type_ids": torch.zeros(B, T, dtype=torch.long)}
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        s = slice(T - n, T) if left else slice(0, n)
        batch["input_ids"][i, s] = it["input_ids"]
        batch["attention_mask"][i, s] = 1
        batch["labels"][i, s] = it["labels"]
        batch["mm_token_type_ids"][i, s] = it["mm_token_type_ids"]
    if all("rollout_logprobs" in it for it in items):
        batch["rollout_logprobs"] = torch.zeros(B, T)
        batch["rollout_logprobs"][batch["labels"] != -100] = torch.cat([it["rollout_logprobs"] for it in items])
    with_img = [it for it in items if "pixel_values" in it]
    if with_img:
        batch["pixel_values"] = torch.cat([it["pixel_values"] for it in with_img])
        batch["image_grid_thw"] = torch.cat([it["image_grid_thw"] for it in with_img])
    if packed:
        assert not left, "a packed batch is for training and scoring forwards (right-padded)"
        lens = [len(it["input_ids"]) for it in items]
        ends = list(itertools.accumulate(lens))
        L = -(-ends[-1] // GPU_PAD_MULTIPLE) * GPU_PAD_MULTIPLE if torch.cuda.is_available() else ends[-1]
        row = {k: torch.cat([it[k] for it in items] + [torch.full((L - ends[-1],), fill, dtype=torch.long)])[None]
               for k, fill in (("input_ids", pad_id), ("labels", -100), ("mm_token_type_ids", 0))}
        row["attention_mask"] = torch.ones(1, L, dtype=torch.long)  # the padding at the end is its own segment
        row["cu_seqlens"] = torch.tensor([0] + ends + [L] * (L > ends[-1]), dtype=torch.int32)
        row.update({k: batch[k] for k in ("pixel_values", "image_grid_thw") if k in batch})
        batch["packed"] = row
    return batch


def join_response(prompt, response_ids, logprobs=None):
    """A training item: prompt encoding + generated tokens, labels on the generated tokens only; with the rollout's
    log-probs of those tokens (engine.generate(logprobs=True)) as "rollout_logprobs" (n,)."""
    r = torch.tensor(response_ids, dtype=torch.long)
    item = {"input_ids": torch.cat([prompt["input_ids"], r]), "labels": torch.cat([torch.full_like(prompt["input_ids"], -100), r]),
            "mm_token_type_ids": torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(r)])}
    if "pixel_values" in prompt:
        item["pixel_values"], item["image_grid_thw"] = prompt["pixel_values"], prompt["image_grid_thw"]
    if logprobs is not None:
        item["rollout_logprobs"] = torch.tensor(logprobs, dtype=torch.float32)
    return item


# -----------------------------------------------------------------------------
# readers

def iter_records(path):
    """(record number, dict) for .jsonl, .json (a list) and .parquet files; DataError on anything malformed."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:
            raise DataError(f"{path}: cannot read parquet: {e}") from None
        yield from enumerate(rows)
    elif path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                rows = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: not valid UTF-8 JSON: {e}") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: a .json file must hold a list of records")
        yield from enumerate(rows)
    else:
        with open(path, "rb") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    yield i, json.loads(line.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    yield i, DataError(f"{path}:{i}: malformed JSON line ({type(e).__name__}: {e})")


def resolve_image(ref, base, where):
    """An image ref as written in a data file -> an absolute path or a {bytes, path} dict. Relative paths resolve against
    `base` (--image-root, else the data file's folder); URLs are refused (nothing is fetched)."""
    if isinstance(ref, str) and ref.startswith(("http://", "https://")):
        raise DataError(f"{where}: image {ref[:80]!r} is a URL; nothing is downloaded: fetch the images, then point "
                        f"--image-root at their folder")
    if isinstance(ref, str) and ref:
        return ref if os.path.isabs(ref) else os.path.join(base, ref)
    if isinstance(ref, dict) and (ref.get("bytes") or ref.get("path")):
        if ref.get("bytes"):
            return {"bytes": ref["bytes"], "path": ref.get("path")}
        return resolve_image(ref["path"], base, where)
    raise DataError(f"{where}: bad image entry {str(ref)[:80]!r} (want a path or a dict with bytes and/or path)")


def need_str(rec, key, where, allow_empty=False):
    v = rec.get(key) if isinstance(rec, dict) else None
    if not isinstance(v, str) or (not allow_empty and not v.strip()):
        raise DataError(f"{where}: field '{key}' must be a non-empty string, got {type(v).__name__}")
    return v


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def parse_sharegpt(rec, base, where, system):
    """LLaMA-Factory sharegpt: `messages` (role/content) or `conversations` (from/value), user and assistant turns
    alternating from a user turn to an assistant turn (every assistant turn is supervised), a system turn or a `system`
    column, `images` (a list, or one path)."""
    msgs = rec.get("messages")
    if msgs is None and isinstance(rec.get("conversations"), list):  # original sharegpt: from/value, human/gpt
        msgs = [{"role": SHAREGPT_ROLES.get(m.get("from"), m.get("from")), "content": m.get("value")}
                for m in rec["conversations"] if isinstance(m, dict)]
    if not isinstance(msgs, list) or not all(isinstance(m, dict) for m in msgs):
        raise DataError(f"{where}: missing 'messages' (a list of {{role, content}}) or 'conversations' (a list of {{from, value}})")
    if rec.get("system") is not None:
        system = need_str(rec, "system", where)
    if msgs and msgs[0].get("role") == "system":
        system, msgs = need_str(msgs[0], "content", where), msgs[1:]
    roles = [m.get("role") for m in msgs]
    if len(msgs) < 2 or len(msgs) % 2 or roles != ["user", "assistant"] * (len(msgs) // 2):
        raise DataError(f"{where}: want user and assistant turns alternating, from a user turn to an assistant turn, got "
                        f"roles {roles} (tool turns such as function_call / observation are not supported)")
    images = rec.get("images") or []
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list):
        raise DataError(f"{where}: 'images' must be a list or one path")
    text = [need_str(m, "content", where) for m in msgs]
    markers = sum(t.count(IMAGE_MARKER) for t in text[0::2])
    if markers and markers != len(images):
        raise DataError(f"{where}: the user turns have {markers} <image> markers but the record has {len(images)} images")
    return Example(question=text[0], images=[resolve_image(r, base, where) for r in images], where=where, system=system,
                   response=text[1], turns=list(zip(text[2::2], text[3::2])))


def parse_prompt(rec, base, where, system):
    """The RL/alignment format: prompt (chat list, its system turn if any), images, reward_model.ground_truth and
    .equivalent_answers, extra_info, data_source, the teacher_caption / teacher_cot / teacher_response columns."""
    prompt = rec.get("prompt")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt or not all(isinstance(m, dict) for m in prompt):
        raise DataError(f"{where}: missing 'prompt' (a list of chat messages)")
    system = next((need_str(m, "content", where) for m in prompt if m.get("role") == "system"), system)
    users = [m for m in prompt if m.get("role") == "user"]
    if len(users) != 1:
        raise DataError(f"{where}: 'prompt' must hold exactly one user message, found {len(users)}")
    rm = rec.get("reward_model")
    if not isinstance(rm, dict) or "ground_truth" not in rm:
        raise DataError(f"{where}: missing 'reward_model.ground_truth'")
    answer = rm["ground_truth"]
    if not isinstance(answer, str):
        raise DataError(f"{where}: 'reward_model.ground_truth' must be a string, got {type(answer).__name__}")
    extra = rec.get("extra_info") or {}
    eq = []  # more correct answers: the release's reward managers read reward_model.equivalent_answers; extra_info's too
    for col, holder in (("reward_model", rm), ("extra_info", extra)):
        e = holder.get("equivalent_answers") if isinstance(holder, dict) else None
        if e is None:
            continue
        if not isinstance(e, (list, tuple)) or not all(isinstance(x, str) for x in e):
            raise DataError(f"{where}: '{col}.equivalent_answers' must be a list of strings")
        if "__EMPTY__" not in e:  # the release's placeholder for "none": a list holding it is discarded whole
            eq += [x for x in e if x not in eq]
    images = rec.get("images") or []
    if not isinstance(images, list):
        raise DataError(f"{where}: 'images' must be a list")
    ex = Example(question=need_str(users[0], "content", where), images=[resolve_image(r, base, where) for r in images],
                 where=where, system=system, answer=answer, equivalents=tuple(eq), extra=extra if isinstance(extra, dict) else {},
                 data_source=rec.get("data_source") if isinstance(rec.get("data_source"), str) else None)
    for k in ("teacher_caption", "teacher_cot", "teacher_response"):
        if rec.get(k) is not None:
            setattr(ex, k, need_str(rec, k, where))
    user_content(ex.question, len(ex.images), where)  # marker count check now, not deep inside a later stage
    return ex


def parse_pair(rec, base, where, system):
    """A warm-up pair (the release's warm-up JSONL): prompt (or question), image (one path, relative to --image-root as
    the release's IMAGE_BASE_PATH), teacher_caption / teacher_cot / student_caption / student_cot, or, when both teacher
    segments are empty, a whole-response pair teacher_response / student_response (GAD-style: --disc-segments whole)."""
    q = rec.get("prompt", rec.get("question")) if isinstance(rec, dict) else None
    if not isinstance(q, str) or not q.strip():
        raise DataError(f"{where}: field 'prompt' (or 'question') must be a non-empty string")
    img = rec.get("image", rec.get("images"))
    images = [] if img is None else [resolve_image(r, base, where) for r in (img if isinstance(img, list) else [img])]
    if not (rec.get("teacher_caption") or rec.get("teacher_cot")) and rec.get("teacher_response") is not None:
        return Example(question=q, images=images, where=where, system=system,
                       **{k: need_str(rec, k, where) for k in ("teacher_response", "student_response")})
    return Example(question=q, images=images, where=where, system=system,
                   **{k: need_str(rec, k, where) for k in ("teacher_caption", "teacher_cot", "student_caption", "student_cot")})


def system_prompt(path):
    """The system prompt for records that carry none: the text of --system-prompt FILE, else SYSTEM_PROMPT."""
    if path is None:
        return SYSTEM_PROMPT
    if not os.path.isfile(path):
        raise SystemExit(f"--system-prompt {path}: no such file")
    with open(path, encoding="utf-8") as f:
        return f.read()


def read_examples(path, kind, skip_bad=False, require=(), image_root=None, system=SYSTEM_PROMPT):
    """Read a data file as Examples. kind: "sft" (sharegpt), "prompt" (RL/alignment parquet or JSONL), "pair" (warm-up JSONL).
    `require` names Example fields that must be present (e.g. teacher_caption for alignment). Relative image paths resolve
    against `image_root`, else the data file's folder; `system` is the system prompt of records that carry none.
    Returns (examples, skipped) where skipped lists the DataError messages of the records dropped under skip_bad."""
    parse = {"sft": parse_sharegpt, "prompt": parse_prompt, "pair": parse_pair}[kind]
    base = os.path.abspath(image_root) if image_root else os.path.dirname(os.path.abspath(path))
    examples, skipped = [], []
    for i, rec in iter_records(path):
        where = f"{path}:{i}"
        try:
            if isinstance(rec, DataError):
                raise rec
            if not isinstance(rec, dict):
                raise DataError(f"{where}: a record must be a JSON object, got {type(rec).__name__}")
            ex = parse(rec, base, where, system)
            for k in require:
                if getattr(ex, k) is None:
                    raise DataError(f"{where}: missing '{k}'")
            if not ex.question.replace(IMAGE_MARKER, "").strip():
                raise DataError(f"{where}: empty question")
            examples.append(ex)
        except DataError as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
    if not examples:
        raise DataError(f"{path}: no usable records" + (f" ({len(skipped)} skipped, first: {skipped[0]})" if skipped else ""))
    return examples, skipped


# -----------------------------------------------------------------------------
# the synthetic world: a grid of cells, some holding one coloured shape; questions with verifiable answers

COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220), "yellow": (230, 190, 30)}
SHAPES = ("circle", "square", "triangle")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
LETTERS = "ABCDEFGH"
FAULTS = ("429", "500", "drop", "timeout", "malformed", "unformatted")  # the oracle's fault kinds
SCENES = "scenes.jsonl"  # beside the world: {"sha256" of an image's PNG bytes, "objects"} per line


def sample_objects(rng, grid, n_objects):
    """n_objects shapes in distinct cells of a grid x grid scene, sorted row-major as (row, col, colour, shape), 1-based."""
    cells = rng.sample([(r, c) for r in range(grid) for c in range(grid)], n_objects)
    return sorted((r + 1, c + 1, rng.choice(list(COLOURS)), rng.choice(SHAPES)) for r, c in cells)


def draw_scene(rng, objs, grid, cell):
    """A white image of grid x grid cells (cell px each) holding the objects, each with a jitter of up to 2 px a side."""
    img = Image.new("RGB", (grid * cell, grid * cell), (250, 250, 250))
    d = ImageDraw.Draw(img)
    for r, c, colour, shape in objs:
        m = cell // 8  # margin, plus the jitter
        x0, y0 = (c - 1) * cell + m + rng.randint(0, 2), (r - 1) * cell + m + rng.randint(0, 2)
        x1, y1 = c * cell - m - rng.randint(0, 2), r * cell - m - rng.randint(0, 2)
        fill = COLOURS[colour]
        if shape == "circle":
            d.ellipse([x0, y0, x1, y1], fill=fill)
        elif shape == "square":
            d.rectangle([x0, y0, x1, y1], fill=fill)
        else:
            d.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return img


def describe(o):
    return f"row {o[0]}, column {o[1]}: {o[2]} {o[3]}"


# Question types, each as often as it is listed. The hard split adds conj, conjunction counts ("red circles"), a
# composition never seen in training.
KINDS = ("count", "count", "attribute", "choice", "pair", "arith")
HARD_KINDS = KINDS + ("conj", "conj")


def answer_support(kind, hard, max_objects):
    """The answers a question type's examples are spread over evenly. Left to the scenes, 0 is by far the commonest
    count and difference, and a policy that always gave the commonest answer of each type scored as well as every RL
    run did in an earlier world; so make_synthetic draws the answer first, uniformly from this list, then scenes and
    questions until solve() gives it."""
    top = min(4 if hard else 3, max_objects)  # the largest count asked for (rare above: all objects alike)
    return {"count": [str(n) for n in range(top + 1)],
            "conj": [str(n) for n in range(top)],
            "pair": [f"{a}, {b}" for a in range(max(top, 2)) for b in range(max(top, 2))],
            "arith": [str(n) for n in range(1 - top, top + 1)],
            "attribute": list(COLOURS) + list(SHAPES),
            "choice": list(LETTERS[:len(COLOURS)])}[kind]


def make_question(rng, objs, kind):
    """A question of the given type (KINDS) about a scene: count, attribute, choice (multiple choice), pair (two-part),
    arith or conj. solve() answers it."""

    def prop():  # a property to count: a colour or a shape
        return f"{rng.choice(list(COLOURS))} shapes" if rng.random() < 0.5 else PLURAL[rng.choice(SHAPES)]

    def question():
        if kind == "count":
            return f"How many {prop()} are there?"
        if kind == "conj":
            c, s = rng.choice(list(COLOURS)), rng.choice(SHAPES)
            return f"How many {c} {PLURAL[s]} are there?"
        if kind in ("attribute", "choice"):
            o, attr = rng.choice(objs), rng.choice(["colour", "shape"])
            q = f"What is the {attr} of the object in row {o[0]}, column {o[1]}?"
            if kind == "attribute":
                return q
            opts = list(COLOURS) if attr == "colour" else list(SHAPES)
            rng.shuffle(opts)
            return q + " " + " ".join(f"({LETTERS[i]}) {v}" for i, v in enumerate(opts))
        if kind == "pair":
            return f"How many {prop()} and how many {prop()} are there?"
        n1, n2 = prop(), prop()
        return f"What is the number of {n1} {'plus' if rng.random() < 0.5 else 'minus'} the number of {n2}?"

    return question()


def solve(question, objs):
    """(answer, reasoning lines, equivalent answers) of a make_question question about a scene: the world's ground truth
    and its step-by-step reasoning (the oracle teacher answers with it too). ValueError for any other question."""
    singular = {v: k for k, v in PLURAL.items()}

    def predicate(name):  # "red shapes", "circles", "red circles"
        words = name.split()
        colour = words[0] if len(words) == 2 and words[0] in COLOURS else None
        shape = singular.get(words[-1])
        if len(words) > 2 or (len(words) == 2 and colour is None) or (shape is None and words[-1] != "shapes") or \
                (colour is None and shape is None):
            raise ValueError(f"not a property of the world: {name!r}")
        return lambda o: (colour is None or o[2] == colour) and (shape is None or o[3] == shape)

    def count(name):
        pred = predicate(name)
        n = sum(map(pred, objs))
        return n, [f"I look for {name}."] + [f"{describe(o)}, {'yes' if pred(o) else 'no'}." for o in objs] + \
            [f"So there are {n} {name}."]

    if m := re.fullmatch(r"How many (.+) and how many (.+) are there\?", question):
        (a, la), (b, lb) = count(m[1]), count(m[2])
        return f"{a}, {b}", la + lb, []
    if m := re.fullmatch(r"How many (.+) are there\?", question):
        n, lines = count(m[1])
        return str(n), lines, []
    if m := re.fullmatch(r"What is the number of (.+) (plus|minus) the number of (.+)\?", question):
        (a, la), (b, lb) = count(m[1]), count(m[3])
        v = a + b if m[2] == "plus" else a - b
        return str(v), la + lb + [f"{a} {m[2]} {b} is {v}."], []
    if m := re.fullmatch(r"What is the (colour|shape) of the object in row (\d+), column (\d+)\?((?: \([A-H]\) \w+)*)", question):
        o = next((o for o in objs if (o[0], o[1]) == (int(m[2]), int(m[3]))), None)
        if o is None:
            raise ValueError(f"no object in row {m[2]}, column {m[3]}")
        val = o[2] if m[1] == "colour" else o[3]
        lines = [f"I find row {o[0]}, column {o[1]}.", f"{describe(o)}."]
        if not m[4]:
            return val, lines + [f"Its {m[1]} is {val}."], []
        letter = dict((v, k) for k, v in re.findall(r"\(([A-H])\) (\w+)", m[4])).get(val)
        if letter is None:
            raise ValueError(f"no option is {val}")
        return letter, lines + [f"Its {m[1]} is {val}, option {letter}."], [val]  # the option's text is an equivalent answer
    raise ValueError(f"not a question of the world: {question!r}")


def high_fidelity(objs, lines):
    """(caption, cot): every object with its cell, then step-by-step reasoning over that list."""
    caption = "<caption>\n" + "\n".join(f"- {describe(o)}" for o in objs) + "\n</caption>"
    return caption, "<think>\n" + "\n".join(lines) + "\n</think>"


# How often the broad style's answer is right, per question type: one object's property can be read off the image, a
# count of one property mostly, but a composition (two counts, their sum or difference) not without listing the objects
# and reasoning over the list. So the high-fidelity style is needed for the compositional types, and a policy that
# drifts toward the broad style loses them.
BROAD_CORRECT = {"attribute": 0.9, "choice": 0.9, "count": 0.6, "pair": 0.2, "arith": 0.2, "conj": 0.2}


def broad(rng, objs, answer, grid, kind):
    """(caption, cot, answer) in the terse style of broad public data: a one-line caption, one line of reasoning,
    and a wrong answer in a share of the cases that grows with the question's composition (BROAD_CORRECT)."""
    caption = f"<caption>\n- a {grid} by {grid} grid with {len(objs)} coloured shapes\n</caption>"
    cot = "<think>\nI read the answer off the image.\n</think>"
    if rng.random() >= BROAD_CORRECT[kind]:
        answer = wrong_answer(rng, answer)
    return caption, cot, answer


def response_style(text):
    """Which of the world's supervision styles a response's caption has: "teacher" (every object by its cell, as
    high_fidelity writes it), "broad" (broad's one-line grid summary) or "other"."""
    m = re.search(r"<caption>(.*?)</caption>", text, re.DOTALL)
    lines = [ln.strip() for ln in m.group(1).splitlines() if ln.strip()] if m else []
    if lines and all(re.fullmatch(r"- row \d+, column \d+: \w+ \w+", ln) for ln in lines):
        return "teacher"
    if len(lines) == 1 and re.fullmatch(r"- a \d+ by \d+ grid with \d+ coloured shapes", lines[0]):
        return "broad"
    return "other"


def wrong_answer(rng, answer):
    if answer in COLOURS:
        return rng.choice([c for c in COLOURS if c != answer])
    if answer in SHAPES:
        return rng.choice([s for s in SHAPES if s != answer])
    if len(answer) == 1 and answer in LETTERS:
        return rng.choice([x for x in LETTERS[:3] if x != answer])
    if "," in answer:
        a, b = answer.split(", ")
        return f"{a}, {int(b) + rng.choice([-1, 1])}"
    return str(int(answer) + rng.choice([-1, 1, 2]))


def train_tokenizer(texts, vocab_size):
    """A byte-level BPE trained on the world's text plus Qwen3-VL's special tokens, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, bos_token=None, model_max_length=32768, clean_up_tokenization_spaces=False)


def build_processor(tokenizer, max_pixels=560 * 560):
    """The Qwen3-VL processor: patch 16, merge 2, temporal patch 2 (one merged token per 32x32 px), our chat template."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor
    common = dict(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    image = Qwen2VLImageProcessor(size={"shortest_edge": 32 * 32, "longest_edge": max_pixels}, **common)
    video = Qwen3VLVideoProcessor(size={"shortest_edge": 32 * 32 * 2, "longest_edge": max_pixels * 2}, **common)
    return Qwen3VLProcessor(image_processor=image, tokenizer=tokenizer, video_processor=video, chat_template=CHAT_TEMPLATE)


def png_bytes(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), path)


def make_synthetic(out, seed=0, n_sft=4000, n_align=256, n_rl=512, n_eval=200, n_hard=200, n_warmup=1024, hf_ratio=0.5,
                   grid=3, cell=32, min_objects=1, max_objects=4, hard_objects=(5, 7), vocab_size=1024):
    """Write the whole synthetic world under `out`. Same arguments -> byte-identical files."""
    from tqdm import tqdm
    rng = random.Random(seed)
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    texts, splits, scenes, seen = [], {}, [], {"train": set(), "eval": set()}
    plan = [("sft", n_sft, False), ("align", n_align, False), ("rl", n_rl, False), ("eval", n_eval, False),
            ("eval_hard", n_hard, True), ("warmup", n_warmup, False)]
    bar = tqdm(total=sum(n for _, n, _ in plan), desc="synthetic world", unit="ex")
    for name, n, hard in plan:
        rows = []
        for i in range(n):
            lo, hi = hard_objects if hard else (min_objects, max_objects)
            side, other = ("eval", "train") if name.startswith("eval") else ("train", "eval")
            kind = rng.choice(HARD_KINDS if hard else KINDS)
            target = rng.choice(answer_support(kind, hard, hi))
            for _ in range(100000):  # the target answer, and a held-out (scene, question) pair in no training split
                objs = sample_objects(rng, grid, rng.randint(lo, hi))
                q = make_question(rng, objs, kind)
                ans, lines, eq = solve(q, objs)
                if ans == target and (tuple(objs), q) not in seen[other]:
                    break
            else:
                raise SystemExit(f"{name}: no {kind} question with the answer {target} left outside the {other} splits: "
                                 f"the world is too small for these split sizes (grow --grid or --max-objects, or ask for "
                                 f"fewer examples)")
            img = draw_scene(rng, objs, grid, cell)
            seen[side].add((tuple(objs), q))
            cap, cot = high_fidelity(objs, lines)
            rel, png = f"images/{name}_{i:06d}.png", png_bytes(img)
            scenes.append({"sha256": hashlib.sha256(png).hexdigest(), "objects": objs})
            save = lambda: open(os.path.join(out, rel), "wb").write(png)  # noqa: E731
            user = IMAGE_MARKER + "\n" + q
            if name == "sft":
                if rng.random() < hf_ratio:
                    resp = f"{cap}\n{cot}\n<answer>{ans}</answer>"
                else:
                    bcap, bcot, bans = broad(rng, objs, ans, grid, kind)
                    resp = f"{bcap}\n{bcot}\n<answer>{bans}</answer>"
                save()
                rows.append({"messages": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user},
                                          {"role": "assistant", "content": resp}], "images": [rel]})
                texts.append(resp)
            elif name == "warmup":
                bcap, bcot, bans = broad(rng, objs, ans, grid, kind)
                save()
                rows.append({"prompt": user, "image": rel, "teacher_caption": cap,
                             "teacher_cot": f"{cot}\n<answer>{ans}</answer>", "student_caption": bcap,
                             "student_cot": f"{bcot}\n<answer>{bans}</answer>"})
            else:
                # parquet: embedded PNG bytes (HF image dicts); the hard split uses plain relative paths instead
                if hard:
                    save()
                    image_col = [rel]
                else:
                    image_col = [{"bytes": png, "path": rel}]
                rows.append({"data_source": "shapes", "prompt": [{"role": "system", "content": SYSTEM_PROMPT},
                                                                 {"role": "user", "content": user}],
                             "images": image_col, "reward_model": {"style": "rule", "ground_truth": ans,
                                                                   "equivalent_answers": eq or ["__EMPTY__"]},
                             "extra_info": {"index": i, "answer": ans, "question": q, "kind": kind, "n_objects": len(objs)},
                             "teacher_caption": cap, "teacher_cot": f"{cot}\n<answer>{ans}</answer>"})
            texts.append(q)
            bar.update()
        splits[name] = rows
    bar.close()
    write_jsonl(os.path.join(out, "sft.jsonl"), splits["sft"])
    write_jsonl(os.path.join(out, "warmup.jsonl"), splits["warmup"])
    write_jsonl(os.path.join(out, SCENES), scenes)  # the oracle teacher's table: an image's PNG hash -> its objects
    for name in ("align", "rl", "eval", "eval_hard"):
        rows = splits[name]
        if name == "rl":  # the RL set has no teacher columns (eval keeps them to measure drift against the supervision)
            rows = [{k: v for k, v in r.items() if not k.startswith("teacher_")} for r in rows]
        write_parquet(os.path.join(out, f"{name}.parquet"), rows)
    # tokenizer text: everything the models will read or write, plus the digits and tags spelled out
    texts += [SYSTEM_PROMPT, " ".join(str(i) for i in range(-20, 100)), "<caption> </caption> <think> </think> <answer> </answer>"]
    tok = train_tokenizer(texts, vocab_size)
    build_processor(tok).save_pretrained(os.path.join(out, "processor"))
    return splits


# -----------------------------------------------------------------------------
# the world's oracle teacher: an OpenAI-compatible chat-completions server that answers from the scene table

def serve_teacher(data_dir, host="127.0.0.1", port=0, error_rate=0.0, error_kinds=FAULTS, mistake_rate=0.0, latency=0.0,
                  hang=60.0, retry_after=1.0):
    """The oracle teacher of the world in `data_dir` over HTTP (POST /v1/chat/completions; GET /v1/models, /stats). It
    finds the request's image in the scene table by the hash of its bytes and writes the high-fidelity demonstration
    (every object with its cell, step-by-step reasoning over that list, the answer). Faults for tests and demos: a share
    `error_rate` of requests fails with one of `error_kinds` (chosen by a hash of the request body and of how often this
    server has seen it, so a re-run meets the same faults), and a share `mistake_rate` of requests is answered wrongly
    (by a hash of the body alone: the same request, the same answer). Returns the server (not yet serving: call
    serve_forever); its port is server.server_address[1]."""
    import base64
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    table = {}
    with open(os.path.join(data_dir, SCENES), encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            table[r["sha256"]] = [tuple(o) for o in r["objects"]]
    seen, stats, lock = {}, {"requests": 0, "answered": 0, "faults": {}, "by_question": {}}, threading.Lock()

    def draw(body, n, salt):  # a number in [0, 1) from the request body, its repeat count and a salt
        return int.from_bytes(hashlib.sha256(body + f"|{n}|{salt}".encode()).digest()[:8], "big") / 2 ** 64

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):  # one line per request is noise in a run's log
            pass

        def send(self, code, payload, headers=()):
            body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            try:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in headers:
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
                pass

        def do_GET(self):
            if self.path.rstrip("/").endswith("/models"):
                return self.send(200, {"object": "list", "data": [{"id": "oracle", "object": "model", "owned_by": "data.py"}]})
            if self.path == "/stats":
                with lock:
                    return self.send(200, stats)
            self.send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if not self.path.rstrip("/").endswith("/chat/completions"):
                return self.send(404, {"error": {"message": f"no route {self.path}"}})
            try:
                req = json.loads(body)
                user = [m for m in req["messages"] if m["role"] == "user"][-1]["content"]
                texts = [c["text"] for c in user if c["type"] == "text"]
                urls = [c["image_url"]["url"] for c in user if c["type"] == "image_url"]
                question = "".join(texts).strip()
                if len(urls) != 1 or not urls[0].startswith("data:"):
                    raise ValueError(f"want one image as a data URL, got {len(urls)} images")
                objs = table.get(hashlib.sha256(base64.b64decode(urls[0].split(",", 1)[1])).hexdigest())
                if objs is None:
                    raise ValueError("the image is not in this world's scene table")
                answer, lines, _ = solve(question, objs)
            except (ValueError, KeyError, TypeError, IndexError) as e:
                return self.send(400, {"error": {"message": f"{type(e).__name__}: {e}", "type": "invalid_request_error"}})
            with lock:
                n = seen[body] = seen.get(body, 0) + 1
                stats["requests"] += 1
                stats["by_question"][question] = stats["by_question"].get(question, 0) + 1
                fault = error_kinds[int(draw(body, n, "kind") * len(error_kinds))] if draw(body, n, "fault") < error_rate else None
                if fault:
                    stats["faults"][fault] = stats["faults"].get(fault, 0) + 1
            time.sleep(latency)
            if fault == "429":
                return self.send(429, {"error": {"message": "rate limit", "type": "rate_limit_error"}},
                                 [("Retry-After", f"{retry_after:g}")])
            if fault == "500":
                return self.send(500, {"error": {"message": "internal error", "type": "server_error"}})
            if fault == "drop":  # the connection closes with no response at all
                self.close_connection = True
                return
            if fault == "timeout":
                time.sleep(hang)
            if fault == "malformed":
                return self.send(200, b'{"id": "x", "choices": [{"message": ')
            if draw(body, 0, "mistake") < mistake_rate:  # a function of the request alone: asked again, as wrong
                answer = wrong_answer(random.Random(body), answer)
            caption, cot = high_fidelity(objs, lines)
            content = "I can see the shapes." if fault == "unformatted" else f"{caption}\n{cot}\n<answer>{answer}</answer>"
            with lock:
                stats["answered"] += 1
            self.send(200, {"id": "chatcmpl-" + hashlib.sha256(body).hexdigest()[:24], "object": "chat.completion",
                            "created": int(time.time()), "model": req.get("model", "oracle"),
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                         "finish_reason": "stop"}],
                            "usage": {"prompt_tokens": len(body) // 4, "completion_tokens": len(content) // 4,
                                      "total_tokens": (len(body) + len(content)) // 4}})  # ~4 bytes a token

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 1024  # the default backlog of 5 refuses a burst of concurrent requests
    return Server((host, port), Handler)


if __name__ == "__main__" and sys.argv[1:2] == ["teacher"]:
    p = argparse.ArgumentParser(prog="data.py teacher", description="Serve the world's oracle teacher over the OpenAI "
                                "chat-completions protocol (curate.py --teacher-url http://HOST:PORT/v1).")
    p.add_argument("--data", required=True, help="a world written by `python data.py` (its scenes.jsonl)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=0, help="port (0: any free port)")
    p.add_argument("--port-file", default=None, help="write the port here once listening (for scripts)")
    p.add_argument("--error-rate", type=float, default=0.0, help="share of requests that fail with a fault")
    p.add_argument("--error-kinds", default=",".join(FAULTS), help=f"faults to draw from, comma-separated: {','.join(FAULTS)}")
    p.add_argument("--mistake-rate", type=float, default=0.0, help="share of answers that are wrong (format kept)")
    p.add_argument("--latency", type=float, default=0.0, help="seconds before every response")
    p.add_argument("--hang", type=float, default=60.0, help="seconds a 'timeout' fault waits before answering")
    p.add_argument("--retry-after", type=float, default=1.0, help="the Retry-After seconds of a 429")
    a = p.parse_args(sys.argv[2:])
    kinds = tuple(k for k in a.error_kinds.split(",") if k)
    if set(kinds) - set(FAULTS) or not kinds:
        p.error(f"--error-kinds {a.error_kinds}: choose from {','.join(FAULTS)}")
    srv = serve_teacher(a.data, a.host, a.port, a.error_rate, kinds, a.mistake_rate, a.latency, a.hang, a.retry_after)
    if a.port_file:
        with open(a.port_file + ".tmp", "w") as f:
            f.write(str(srv.server_address[1]))
        os.replace(a.port_file + ".tmp", a.port_file)
    print(f"oracle teacher of {a.data} at http://{a.host}:{srv.server_address[1]}/v1", flush=True)
    srv.serve_forever()
elif __name__ == "__main__":
    p = argparse.ArgumentParser(description="Write the synthetic visual-reasoning world in the released data formats.")
    p.add_argument("--out", default="data/shapes", help="output directory")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives byte-identical files")
    p.add_argument("--n-sft", type=int, default=4000, help="SFT demonstrations (sft.jsonl)")
    p.add_argument("--n-align", type=int, default=256, help="alignment prompts with teacher columns (align.parquet)")
    p.add_argument("--n-rl", type=int, default=512, help="RL prompts (rl.parquet)")
    p.add_argument("--n-eval", type=int, default=200, help="held-out prompts (eval.parquet)")
    p.add_argument("--n-hard", type=int, default=200, help="harder held-out prompts: more objects, unseen questions")
    p.add_argument("--n-warmup", type=int, default=1024, help="discriminator warm-up pairs (warmup.jsonl)")
    p.add_argument("--hf-ratio", type=float, default=0.5, help="share of high-fidelity demonstrations in sft.jsonl (rest: broad)")
    p.add_argument("--grid", type=int, default=3, help="cells per image side")
    p.add_argument("--cell", type=int, default=32, help="cell size in pixels (32 = one merged visual token)")
    p.add_argument("--min-objects", type=int, default=1, help="fewest objects per image (train/eval)")
    p.add_argument("--max-objects", type=int, default=4, help="most objects per image (train/eval)")
    p.add_argument("--vocab-size", type=int, default=1024, help="tokenizer vocabulary size (BPE)")
    a = p.parse_args()
    assert 1 <= a.min_objects <= a.max_objects <= a.grid * a.grid, "need 1 <= min-objects <= max-objects <= grid^2"
    make_synthetic(a.out, a.seed, a.n_sft, a.n_align, a.n_rl, a.n_eval, a.n_hard, a.n_warmup, a.hf_ratio, a.grid, a.cell,
                   a.min_objects, a.max_objects, (min(a.max_objects + 1, a.grid ** 2), min(a.max_objects + 3, a.grid ** 2)),
                   a.vocab_size)
    print(f"wrote {a.out}: sft.jsonl ({a.n_sft}), align.parquet ({a.n_align}), rl.parquet ({a.n_rl}), eval.parquet ({a.n_eval}),"
          f" eval_hard.parquet ({a.n_hard}), warmup.jsonl ({a.n_warmup}), images/, processor/")
