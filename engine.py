"""
Rollouts: the generation engine shared by align.py, rl.py and eval.py (nanochat's engine.py in spirit).

The training model is sharded; generation runs on a plain inference copy (make_inference_copy) refreshed once per rollout
phase (sync_weights). `generate` batches prompt encodings and decodes them with `decode`: one prefill, then a loop over a
static KV cache whose step (decode_step, the decoder layers written out for one token) is replayed as a CUDA graph on a
GPU, compiled first for large models, with sampling on the device. `generate(..., hf=True)` uses Hugging Face generate()
instead: the readable reference, with the same greedy tokens in fp32 (tested).
"""

import weakref
from functools import partial

import torch
import torch.nn.functional as F
from transformers import StaticCache

import data
from model import model_inputs, rope_positions


@torch.no_grad()
def sync_weights(src, dst):
    """Copy a (sharded) training model's weights into the plain inference copy: one all-gather per tensor per rollout phase,
    never per decode step."""
    dst_params = dict(dst.named_parameters())
    for name, p in src.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        dst_params[name.removeprefix("hf.")].copy_(full)


def make_inference_copy(hf, device):
    """A plain (unsharded) copy of the policy for generation: bf16 on GPU, fp32 on CPU, eval mode, cache on."""
    import copy
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    infer = copy.deepcopy(hf).to(device=device, dtype=dtype).eval()
    infer.config.use_cache = True
    infer.requires_grad_(False)
    return infer


def sample(logits, temperature, top_p, banned):
    """Next tokens from logits (B, V) on the device, no host sync: greedy at temperature 0, else nucleus sampling at
    `temperature` by the Gumbel-max trick over the kept tokens. banned: (V,) bool, never sampled.
    Returns (tokens (B,), their log-probs (B,) under the distribution they were drawn from: softmax(logits / T) over the
    kept tokens; at temperature 0 under softmax(logits))."""
    logits = logits.float().masked_fill(banned, float("-inf"))
    if temperature == 0:
        tok = logits.argmax(-1)
    else:
        logits = logits / temperature
        if top_p < 1.0:  # keep the smallest set of most likely tokens whose probability reaches top_p
            srt, idx = logits.sort(-1, descending=True)
            drop = srt.softmax(-1).cumsum(-1) - srt.softmax(-1) >= top_p
            logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
        tok = (logits - torch.empty_like(logits).exponential_().log()).argmax(-1)
    return tok, logits.log_softmax(-1).gather(-1, tok[:, None]).squeeze(-1)


def decode_step(lm, head, tok, slot, delta, mask, cache, temperature, top_p, ban):
    """One decode step of the language model, written out (Hugging Face's decoder layer launches ~55 kernels per layer
    for one token, this ~25: the step of a small model is launch-bound, and a CUDA graph replays every kernel it holds).
    tok (B,) written at cache slot `slot` (1,); delta (B, 1) the rows' position offsets; mask (B, n) the prompts' padding.
    -> (the next tokens (B,), their log-probs (B,)). The same arithmetic as the layer (tested: greedy tokens equal
    generate()'s in fp32). A generated token is text, so its three M-RoPE positions are equal and the rotary is the plain
    one at that position; the deepstack features touch only image positions (the prefill). On a GPU the step is replayed
    as a CUDA graph (compiled first for large models)."""
    B = tok.shape[0]
    x = lm.embed_tokens(tok)  # (B, H)
    rope = lm.rotary_emb
    freqs = (slot + delta).view(B, 1).float() * rope.inv_freq.float()  # (B, D/2)
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = ((emb.cos() * rope.attention_scaling).to(x.dtype)[:, None], (emb.sin() * rope.attention_scaling).to(x.dtype)[:, None])
    keep = (mask.bool() & (torch.arange(mask.shape[1], device=mask.device) <= slot))[:, None, None]  # (B, 1, 1, n)
    for i, layer in enumerate(lm.layers):
        a = layer.self_attn
        h = rms(x, layer.input_layernorm)
        q = rms(a.q_proj(h).view(B, -1, a.head_dim), a.q_norm)  # (B, Hq, D)
        k = rms(a.k_proj(h).view(B, -1, a.head_dim), a.k_norm)  # (B, Hkv, D)
        v = a.v_proj(h).view(B, -1, a.head_dim)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        K, V = cache.layers[i].keys, cache.layers[i].values  # (B, Hkv, n, D)
        K.index_copy_(2, slot, k[:, :, None])
        V.index_copy_(2, slot, v[:, :, None])
        Hkv = K.shape[1]
        o = F.scaled_dot_product_attention(q.view(B, Hkv, -1, a.head_dim), K, V, attn_mask=keep, scale=a.scaling)
        x = x + a.o_proj(o.reshape(B, -1))  # (B, Hkv, g, D): query head = kv head * g + j, as in the layer
        h = rms(x, layer.post_attention_layernorm)
        m = layer.mlp
        x = x + m.down_proj(m.act_fn(m.gate_proj(h)) * m.up_proj(h))
    return sample(head(rms(x, lm.norm)), temperature, top_p, ban)


def rms(x, norm):
    """Qwen3-VL's RMSNorm module as one fused call: weight * x / sqrt(mean(x^2) + eps) over the last dimension."""
    return F.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


def rotate_half(x):
    return torch.cat([-x[..., x.shape[-1] // 2:], x[..., :x.shape[-1] // 2]], -1)


def cuda_graph(fn):
    """fn() captured as a CUDA graph: replaying it launches a decode step's hundreds of kernels at once. fn's inputs must
    keep their addresses and it must not sync with the host. Returns a function that replays it and returns its output
    (the same tensor every time). The warm-up call, on a side stream as capture requires, compiles and autotunes."""
    global _side_stream
    _side_stream = _side_stream or torch.cuda.Stream()  # one for the process: each stream gets its own cuBLAS workspace
    _side_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(_side_stream):
        fn()
    torch.cuda.current_stream().wait_stream(_side_stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=_side_stream):
        out = fn()
    return lambda: (graph.replay(), out)[1]


_side_stream = _compiled_step = None
_kept = {}  # (model, batch, slots, sampling) -> the decode step's cache, inputs and CUDA graph, while small
KEEP_CACHE_BYTES = 1 << 30
COMPILE_MIN_WIDTH_X_DEPTH = 2048 * 16  # hidden size x layers from which the decode step is compiled (small: 512 x 8)


def kv_cache_bytes(text_cfg, batch, slots, dtype):
    """Bytes of a static KV cache: K and V per layer, (batch, KV heads, slots, head dim) each (4B: 147 kB per slot and row)."""
    return 2 * text_cfg.num_hidden_layers * batch * text_cfg.num_key_value_heads * slots * text_cfg.head_dim * dtype.itemsize


@torch.no_grad()
def decode(infer, batch, device, max_new_tokens, eos, pad, banned, temperature=1.0, top_p=1.0, check_every=16):
    """The fast rollout path: one prefill, then a decode loop over a static KV cache (on a GPU the step is replayed as a
    CUDA graph, compiled first for large models); sampling stays on the device and the host looks at the `done` flags
    only every `check_every` steps (early exit once all have ended).
    A cache of up to KEEP_CACHE_BYTES and its graph are kept for the next call of the same shape; a larger one lives for
    this call alone, so that between rollout phases its memory goes back to training. Greedy output equals generate()'s
    (tested).
    batch: collate(left=True) output. Returns the new tokens (B, n <= max_new_tokens), `pad` after each sequence's eos, and
    their log-probs under the sampling distribution (B, n), 0 after eos."""
    global _compiled_step
    B, L = batch["input_ids"].shape
    cuda = torch.device(device).type == "cuda"
    n = -(-(L + max_new_tokens) // 256) * 256 if cuda else L + max_new_tokens  # cache slots; rounded: few compiled shapes
    text_cfg = infer.config.text_config
    if cuda:  # a cache that cannot fit stops here with the flags to change, not as an out-of-memory error in the prefill
        need = kv_cache_bytes(text_cfg, B, n, infer.dtype)
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        if need > free:
            raise SystemExit(f"rollout: the KV cache of {B} sequences x {n} slots needs {need / 1e9:.1f} GB, {free / 1e9:.1f} GB "
                             "is free: lower --gen-batch (sequences per generation call) or --max-new-tokens")
    inputs = model_inputs(batch, device)
    am = inputs["attention_mask"]
    # compile the step only where the kernels' work outweighs their launches (the 4B: fused norms and rotary pay, ~80 s of
    # compilation per shape); a small model's step is launch-bound, and the CUDA graph alone removes the launches
    compiled = cuda and text_cfg.hidden_size * text_cfg.num_hidden_layers >= COMPILE_MIN_WIDTH_X_DEPTH
    trunk_ = infer.model
    key = (id(infer), B, n, temperature, top_p, tuple(banned))
    st = _kept.get(key)
    if st is None or st["model"]() is not infer:
        # a new cache, the step's inputs (updated in place: a CUDA graph replays on fixed addresses) and the step
        _kept.clear()
        st = dict(model=weakref.ref(infer), cache=StaticCache(config=infer.config, max_cache_len=n),
                  mask=torch.ones(B, n, dtype=am.dtype, device=device),  # (B, n): padding masked, causality does the rest
                  ban=torch.zeros(text_cfg.vocab_size, dtype=torch.bool, device=device),
                  tok=torch.zeros(B, dtype=torch.long, device=device),
                  slot=torch.full((1,), L, dtype=torch.long, device=device),  # advanced on the device: no host copy
                  delta=torch.zeros(B, 1, dtype=torch.long, device=device))
        st["ban"][banned] = True
        if compiled and _compiled_step is None:
            torch._dynamo.config.cache_size_limit = 64  # one graph per (batch, cache length): a few per stage
            _compiled_step = torch.compile(decode_step, dynamic=False)
        st["step"] = partial(_compiled_step if compiled else decode_step, trunk_.language_model, infer.lm_head,
                             st["tok"], st["slot"], st["delta"], st["mask"], st["cache"], temperature, top_p, st["ban"])
        if cuda:  # capture before the prefill: the warm-up writes a step into the cache, which reset() below clears
            st["cache"].early_initialization(B, text_cfg.num_key_value_heads, text_cfg.head_dim, infer.dtype, device)
            st["step"] = cuda_graph(st["step"])
        # a small cache and its graph stay for the next call of the same shape (a capture is ~0.1 s); a large one
        # goes back to training between rollout phases (16 rows x 8.4k slots of the 4B are 20 GB)
        if cuda and need <= KEEP_CACHE_BYTES:
            _kept[key] = st
    cache, mask, ban, tok, slot, delta, step = (st[k] for k in ("cache", "mask", "ban", "tok", "slot", "delta", "step"))
    if cuda:
        cache.reset()
    mask[:, :L] = am
    mask[:, L:] = 1
    slot.fill_(L)
    n_real = am.sum(1, keepdim=True)  # (B, 1) tokens that are not left padding
    # prefill at the M-RoPE positions (computed on the host; text only: the real tokens counted, as generate() does)
    pos = rope_positions(trunk_, batch)
    if pos is None:
        pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0).view(1, B, L).expand(3, B, L)
    h = trunk_(**inputs, position_ids=pos.to(device), past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
    # a generated token's position, on all three M-RoPE axes: the row's next position after its prompt (the vision
    # tokens' positions compress, so it is below the token count), i.e. its cache slot - the left padding + delta
    rope_delta = pos.amax((0, 2)).view(B, 1).to(device) + 1 - n_real
    delta.copy_(rope_delta - (L - n_real))
    out = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=device)
    out_lp = torch.zeros(B, max_new_tokens, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    nxt, lp = sample(infer.lm_head(h), temperature, top_p, ban)
    for t in range(max_new_tokens):
        tok.copy_(nxt)
        out[:, t] = torch.where(done, pad, tok)
        out_lp[:, t] = torch.where(done, 0.0, lp)
        done |= tok == eos
        if t + 1 == max_new_tokens or ((t + 1) % check_every == 0 and bool(done.all())):
            return out[:, :t + 1], out_lp[:, :t + 1]
        nxt, lp = step()
        slot += 1
    return out, out_lp


@torch.no_grad()
def generate(infer, prompts, tokenizer, device, max_new_tokens, temperature=1.0, top_p=1.0, batch_size=64, hf=False,
             logprobs=False):
    """Sample one response per prompt encoding (repeat a prompt n times for n samples). Greedy when temperature == 0.
    Stops at the end-of-turn token. Returns a list of token-id lists, each ending with <|im_end|> unless cut at max_new_tokens
    (with logprobs=True also, per response, the log-prob of each sampled token under the distribution it was drawn from).
    Runs on the plain inference copy: no collectives, so ranks that finish early never hang the others.
    The decode loop above (compiled on a GPU), or with hf=True (the stages' --hf-generate) Hugging Face generate() with the
    dynamic KV cache, the readable reference. Greedy tokens are equal in fp32 (tested on CPU; on an H100, 64 prompts x 256
    tokens, all equal); in bf16 kernels of different shapes round differently, so near-ties can flip."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    # special tokens other than the end of turn are never sampled: a stray <|image_pad|> in a response would break the
    # image-token count of every later forward over it
    banned = sorted(i for i, t in tokenizer.added_tokens_decoder.items() if t.special and i != eos)
    out, out_lp = [], []
    for i in range(0, len(prompts), batch_size):
        batch = data.collate(prompts[i:i + batch_size], pad, left=True)
        if not hf:
            new, lp = decode(infer, batch, device, max_new_tokens, eos, pad, banned, temperature, top_p)
        else:
            kw = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
            g = infer.generate(**model_inputs(batch, device), max_new_tokens=max_new_tokens, eos_token_id=eos,
                               pad_token_id=pad, top_k=None, suppress_tokens=banned, output_scores=True,
                               return_dict_in_generate=True, **kw)
            new = g.sequences[:, batch["input_ids"].shape[1]:]
            # the scores are the processed logits each token was drawn from (temperature, top-p, suppressed tokens)
            lp = torch.stack(g.scores, 1).float().log_softmax(-1).gather(-1, new[..., None]).squeeze(-1)
        for row, row_lp in zip(new.tolist(), lp.tolist()):
            n = row.index(eos) + 1 if eos in row else len(row)
            out.append(row[:n])
            out_lp.append(row_lp[:n])
    return (out, out_lp) if logprobs else out
