"""
Models and their plumbing, shared by every stage: distributed init, the policy (any Qwen3-VL HF directory or a built-in
config), FSDP2 wrapping, per-token log-probs, HF save and resume checkpoints, and the discriminator (sparse upcycling to
Qwen3-VL-MoE + a score head). Generation lives in engine.py.

    python model.py init --config tiny --processor data/shapes/processor --out runs/tiny-init    # a random-weight HF dir
    python model.py upcycle --dense runs/x/sft --out runs/x/disc-init --experts 4 --top-k 2 --noise 0.01
    python model.py export --disc runs/x/align/disc --out runs/x/disc-release    # the release's warm-up layout
"""

import atexit
import contextlib
import functools
import itertools
import json
import os
import random
import shutil
import sys
import threading
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import (AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, Qwen3VLConfig,
                          Qwen3VLForConditionalGeneration, Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration)
from transformers.initialization import no_init_weights
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import load_balancing_loss_func


# -----------------------------------------------------------------------------
# distributed

def init_dist():
    """(rank, world_size, device). One path for `python x.py` (a 1-process group) and torchrun (gloo on CPU, NCCL on GPU)."""
    cuda = torch.cuda.is_available()
    if "RANK" in os.environ:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    else:
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        # a process group of one, so FSDP2 and every collective run the same code as under torchrun (no port needed)
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    if dist.get_world_size() > 1:
        watcher = threading.Thread(target=watch_for_abort, daemon=True)
        watcher.start()
        # stopped and joined before the interpreter tears down (a thread inside a store call then aborts the process)
        atexit.register(lambda: (_watch_stop.set(), watcher.join()))
    return dist.get_rank(), dist.get_world_size(), device


ABORT_KEY = "prism/abort"
_aborting = threading.Event()  # set on the rank that posts the abort
_watch_stop = threading.Event()


def watch_for_abort(every=0.2):
    """Every rank's watcher (a thread): once another rank has posted why it stops (oom_guard), print it and exit, rather
    than wait in a collective for a rank that has left."""
    store = dist.distributed_c10d._get_default_store()
    while not _watch_stop.wait(every) and dist.is_initialized():
        try:
            if store.check([ABORT_KEY]) and not _aborting.is_set():
                print(f"rank {dist.get_rank()}: stopping, because {store.get(ABORT_KEY).decode()}", file=sys.stderr, flush=True)
                os._exit(1)
        except Exception:  # the store went away: the run is ending anyway
            return


def is_oom(e):
    """A CUDA out-of-memory, also the kind NCCL reports when it cannot allocate its buffers."""
    return isinstance(e, torch.OutOfMemoryError) or any(s in str(e) for s in ("out of memory", "Failed to CUDA calloc"))


@contextlib.contextmanager
def oom_guard(phase, sizes, flags):
    """Turn an out-of-memory inside `phase` into one message that every rank prints: the phase, its sizes, the memory,
    and the flags that make it fit. The rank that ran out posts the message in the process group's store (the other
    ranks' watch_for_abort prints it and exits) and stops."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not is_oom(e):
            raise
        mem = "host memory" if not torch.cuda.is_available() else f"{torch.cuda.max_memory_allocated() / 1e9:.1f} GB " \
            f"peak of {torch.cuda.get_device_properties(0).total_memory / 1e9:.0f} GB"
        rank = dist.get_rank() if dist.is_initialized() else 0
        msg = f"rank {rank} ran out of memory in {phase} ({sizes}; {mem}). To fit: {flags}"
        print(f"rank {rank}: {msg}", file=sys.stderr, flush=True)
        if dist.is_initialized() and dist.get_world_size() > 1:
            _aborting.set()  # this rank's own watcher stays quiet
            dist.distributed_c10d._get_default_store().set(ABORT_KEY, msg)
            time.sleep(2)  # the watchers read it before this rank's exit ends the job
        raise SystemExit(1) from None


def print0(*a, **k):
    print(*a, **k, flush=True) if not dist.is_initialized() or dist.get_rank() == 0 else None


def all_sum(x, device, op=dist.ReduceOp.SUM):
    """Sum (or `op`) a float or a list of floats over ranks (as float64 on `device`)."""
    t = torch.tensor(x, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return t.tolist()


def all_max(n, device):
    """The largest of an int over ranks: e.g. the forward count every rank must run under FSDP."""
    return int(all_sum(float(n), device, dist.ReduceOp.MAX))


def metrics_logger(out, start, args):
    """log(rec): append a record to OUT/metrics.jsonl on rank 0 (and to wandb with --wandb). Resuming at step `start`, the
    file keeps what was logged before: training records up to `start`, eval records ("eval": True) before it (the eval at
    `start` runs again)."""
    path = os.path.join(out, "metrics.jsonl")
    run = None
    if dist.get_rank() == 0:
        old = []
        for line in open(path) if os.path.exists(path) else []:
            try:
                old.append(json.loads(line))
            except json.JSONDecodeError:  # a line torn by a kill mid-write
                pass
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in old if r["step"] < start or (r["step"] == start and not r.get("eval")))
        if args.wandb:
            import wandb
            run = wandb.init(project=args.wandb, config=vars(args), resume="allow")

    def log(rec):
        if dist.get_rank() == 0:
            with open(path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if run is not None:
                run.log(rec, step=rec["step"])
    return log


def peak_mem_gb():
    """Peak GPU memory allocated so far, in GB, the largest over ranks (a collective on GPUs; 0 on CPU)."""
    if not torch.cuda.is_available():
        return 0.0
    t = torch.tensor(torch.cuda.max_memory_allocated() / 1e9, device="cuda")
    dist.all_reduce(t, dist.ReduceOp.MAX)
    return t.item()


def seed_all(seed):
    random.seed(seed)
    torch.manual_seed(seed)


# -----------------------------------------------------------------------------
# configurations and loading

# built-in Qwen3-VL sizes (random init): tiny runs the whole pipeline on 2 CPU cores in minutes, small on one GPU in minutes;
# 2b / 4b / 8b are the real architectures (151,936-token vocabulary), for benchmarks only
VISION_2B = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, num_position_embeddings=2304,
                 deepstack_visual_indexes=[5, 11, 17])
CONFIGS = {
    "tiny": dict(text=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=32, mrope_section=[8, 4, 4]),
                 vision=dict(depth=2, hidden_size=128, intermediate_size=256, num_heads=4, num_position_embeddings=64,
                             deepstack_visual_indexes=[1])),
    "small": dict(text=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                            num_key_value_heads=4, head_dim=64, mrope_section=[16, 8, 8]),
                  vision=dict(depth=4, hidden_size=256, intermediate_size=1024, num_heads=4, num_position_embeddings=256,
                              deepstack_visual_indexes=[1, 3])),
    "2b": dict(vocab=151936, text=dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                                       num_key_value_heads=8, head_dim=128, mrope_section=[24, 20, 20]), vision=VISION_2B),
    "4b": dict(vocab=151936, text=dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                                       num_key_value_heads=8, head_dim=128, mrope_section=[24, 20, 20]), vision=VISION_2B),
    "8b": dict(vocab=151936, tied=False, text=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                                   num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                                   mrope_section=[24, 20, 20]),
               vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, num_position_embeddings=2304,
                           deepstack_visual_indexes=[8, 16, 24])),
}


def build_config(name, tokenizer):
    """A Qwen3VLConfig for a built-in size whose vocabulary and special-token ids match `tokenizer`."""
    c = CONFIGS[name]
    text = {k: v for k, v in c["text"].items() if k != "mrope_section"}
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e6 if "vocab" in c else 1e4,
                               "mrope_section": c["text"]["mrope_section"], "mrope_interleaved": True}
    ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in (("image_token_id", "<|image_pad|>"), ("video_token_id",
           "<|video_pad|>"), ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return Qwen3VLConfig(text_config=dict(vocab_size=c.get("vocab", len(tokenizer)), pad_token_id=pad, **text),
                         vision_config=dict(out_hidden_size=text["hidden_size"], patch_size=16, spatial_merge_size=2,
                                            temporal_patch_size=2, **c["vision"]),
                         tie_word_embeddings=c.get("tied", True), **ids)


def attn_impl(device):
    """flash_attention_2 when flash-attn is installed and the device is CUDA, else PyTorch SDPA."""
    import importlib.util
    return "flash_attention_2" if device.type == "cuda" and importlib.util.find_spec("flash_attn") else "sdpa"


def load_policy(spec, processor, device, seed=0, trust_remote_code=False):
    """A Qwen3-VL policy (fp32 master weights) from an HF directory or a built-in config name ("tiny", "small")."""
    if spec in CONFIGS:
        torch.manual_seed(seed)
        cfg = build_config(spec, processor.tokenizer)
        cfg._attn_implementation = attn_impl(device)
        # random init where the model will run (a 4B init takes minutes on the host, seconds on a GPU); inside a
        # caller's `with torch.device("meta")` it stays there
        where = device if torch.get_default_device().type == "cpu" else torch.get_default_device()
        with torch.device(where):
            return use_packed_attention(Qwen3VLForConditionalGeneration(cfg))
    if not os.path.isfile(os.path.join(spec, "config.json")):
        raise SystemExit(f"--policy/--init {spec!r}: not a built-in config ({', '.join(CONFIGS)}) nor an HF directory")
    cfg = AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
    if cfg.model_type != "qwen3_vl":
        raise SystemExit(f"{spec}: model_type is {cfg.model_type!r}; the policy must be a dense Qwen3-VL (qwen3_vl)")
    check_vocab(cfg, processor, spec)
    return use_packed_attention(AutoModelForImageTextToText.from_pretrained(
        spec, dtype=torch.float32, attn_implementation=attn_impl(device), trust_remote_code=trust_remote_code,
        use_safetensors=True))


def check_vocab(cfg, processor, where):
    """Refuse a model whose embedding table or image token does not fit the processor's tokenizer."""
    tc = getattr(cfg, "text_config", cfg)
    n = len(processor.tokenizer)
    if tc.vocab_size < n:
        raise SystemExit(f"{where}: vocabulary {tc.vocab_size} < tokenizer size {n}: model and processor do not match")
    img = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    if getattr(cfg, "image_token_id", img) != img:
        raise SystemExit(f"{where}: image_token_id {cfg.image_token_id} != the processor's {img}: model and processor do not match")


def load_processor(path):
    if not os.path.isdir(path):
        raise SystemExit(f"processor directory not found: {path}")
    return AutoProcessor.from_pretrained(path)


# -----------------------------------------------------------------------------
# FSDP2

def shard(model, device, freeze_vision=False, grad_ckpt=False, compile=False):
    """Prepare a model for training and wrap it in FSDP2, in the order torchtitan's `parallelize` uses, because each step
    changes what the next one sees:
      1. freeze (requires_grad) before sharding: FSDP2 groups parameters per module and keeps the flag of each;
      2. activation checkpointing on the plain HF blocks, so the checkpointed region is the block FSDP then wraps;
      3. fully_shard each vision block and decoder block (one all-gather per block), then the root (embeddings, output layer);
         with one process only the root (per-block groups would cost a reduction each per step, for no memory saved);
      4. compile each decoder block after wrapping, so the compiled graph runs inside FSDP's pre/post-forward hooks;
      5. the gradient contract: FSDP2 would divide the reduced gradient by the world size; we turn that off and reduce with a
         plain SUM, because every loss in this repository is already divided by a GLOBAL count (all ranks, all micro-batches
         of the optimizer step: sft.py, rl.update_policy, align.discriminator_step, warmup.py). So the update does not depend
         on the number of processes or micro-batches (tested: 2 processes == 1).
    bf16 compute with fp32 master weights and fp32 gradient reduction on GPU; fp32 on CPU."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    hf = model.hf if isinstance(model, LogProbs) else model
    if freeze_vision:  # 1
        for p in trunk(model).visual.parameters():
            p.requires_grad_(False)
    if grad_ckpt:  # 2
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    hf.config.use_cache = False
    world = dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" else \
        MixedPrecisionPolicy()
    model.to(device)
    if world > 1:  # 3: per block (with one process there is nothing to gather: the root alone, one group to reduce)
        for block in list(trunk(model).visual.blocks) + list(trunk(model).language_model.layers):
            fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=world > 1)
    if compile:  # 4: one compiled graph serves every block (fused norms, rotary, SwiGLU)
        for block in trunk(model).language_model.layers:
            block.compile()
    for m in model.modules():  # 5: sum, don't average
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # plain SUM collectives (gloo has no pre-multiplied sum)
    return model


def trunk(model):
    """The Qwen3VLModel(-Moe) inside a policy, its LogProbs wrapper, or a discriminator (all keep it in `.model`)."""
    return model.hf.model if isinstance(model, LogProbs) else model.model


def make_optimizer(model, lr, weight_decay, betas=(0.9, 0.999)):
    """AdamW over the trainable parameters, created after sharding (it holds DTensor shards). No decay on norms/biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    other = [p for p in params if p.ndim < 2]
    # fused on GPUs: one kernel over all shards, and no foreach temporaries (a full fp32 copy of the shards at the peak)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}],
                             lr=lr, betas=betas, eps=1e-8, fused=params[0].device.type == "cuda")


def clip_grad(model, max_norm):
    """Clip the global grad norm (over all shards); returns it as a float (may be nan/inf: callers skip such steps)."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm.item()


class Offload:
    """A model's fp32 shards and its optimizer's state in pinned host memory while another model has the GPU (align.py
    --offload: the policy's during the discriminator's scoring and update, the discriminator's during the rollouts and
    the policy update). The device storages are freed (resized to 0) and re-allocated on the way back, so every tensor,
    view and optimizer key stays what it was (FSDP2's shards are views of its padded buffers). The copies run on a side
    stream: `out` and `back` return at once, `wait` makes the compute stream wait for them (free them before this
    returns, and the allocator reuses their blocks only once the copies are done)."""

    def __init__(self, model, opt):
        self.model, self.opt, self.storages, self.host = model, opt, [], []
        pin = torch.cuda.is_available()
        self.stream = torch.cuda.Stream() if pin else None
        self.on_device = True

    def _collect(self):
        """The distinct storages under the parameters and the optimizer's state (AdamW makes its state at its first step,
        so they are read at each offload); host buffers are allocated once for them."""
        tensors = list(self.model.parameters()) + [v for st in self.opt.state.values() for v in st.values()
                                                    if torch.is_tensor(v)]
        seen, storages = set(), []  # several tensors may share one storage
        for t in tensors:
            st = (t.to_local() if hasattr(t, "to_local") else t).untyped_storage()
            if (st.device.type != "cpu" or self.stream is None) and st.nbytes() and st.data_ptr() not in seen:
                seen.add(st.data_ptr())  # (on a CPU-only machine the same path runs, host to host)
                storages.append(st)
        if [st.nbytes() for st in storages] != [h.numel() for h in self.host]:
            self.host = [torch.empty(st.nbytes(), dtype=torch.uint8, pin_memory=self.stream is not None) for st in storages]
        self.storages, self.nbytes = storages, [st.nbytes() for st in storages]

    @staticmethod
    def _bytes(st):  # a uint8 view of a whole storage
        return torch.empty(0, dtype=torch.uint8, device=st.device).set_(st, 0, (st.nbytes(),), (1,))

    def _side(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def out(self):
        """Copy every storage to the host and free it on the device."""
        assert self.on_device, "offloaded twice"
        self._collect()
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream())  # after the last kernel that wrote them
        with self._side():
            for st, h in zip(self.storages, self.host):
                b = self._bytes(st)
                h.copy_(b, non_blocking=True)
                if self.stream is not None:
                    b.record_stream(self.stream)  # the block is reused only after this copy
        for st in self.storages:
            st.resize_(0)
        self.on_device = False

    def back(self):
        """Re-allocate every storage on the device and copy it back from the host (call wait() before using them)."""
        assert not self.on_device, "not offloaded"
        for st, n in zip(self.storages, self.nbytes):
            st.resize_(n)
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream())  # the storages' new blocks are allocated
        with self._side():
            for st, h in zip(self.storages, self.host):
                b = self._bytes(st)
                b.copy_(h, non_blocking=True)
                if self.stream is not None:
                    b.record_stream(self.stream)
        self.on_device = True

    def wait(self):
        if self.stream is not None:
            torch.cuda.current_stream().wait_stream(self.stream)


# -----------------------------------------------------------------------------
# forward passes

def model_inputs(batch, device):
    """The batch entries a Qwen3-VL forward takes, moved to `device`."""
    keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")
    return {k: batch[k].to(device) for k in keys if k in batch}


def trunk_inputs(batch, device):
    """model_inputs for a training or scoring forward, without the attention mask when every row is padded on the right:
    causal attention already keeps each real token from the padding after it, and no caller reads a padding position's
    output (log-probs at supervised tokens, scores at the last real token), so SDPA runs its unmasked causal kernels
    instead of a masked one (on 2 CPU cores a quarter of an SFT step was the masked attention). Tested against the
    masked forward."""
    x = model_inputs(batch, device)
    am = batch["attention_mask"]
    if bool((am[:, 1:] <= am[:, :-1]).all()):  # each row: ones, then zeros
        del x["attention_mask"]
    return x


_vision_sizes = [None, None]  # (the cu_seqlens tensor last seen, its images' patch counts on the host)


def stacked_vision_attention(self, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
    """Qwen3-VL's vision attention with the images of a batch stacked by size: one SDPA call per distinct patch count, over
    (images, heads, patches, d) with no mask (the fused flash kernel). transformers' SDPA path runs one attention call
    per image: at the miniature's 16-130 small images per forward, a GPU idle between hundreds of tiny kernels per layer
    (and ~0.3 ms of host time each). hidden_states (N, D) patches of all images; cu_seqlens (n_images + 1,) their
    boundaries, read on the host once per forward (every block gets the same tensor). A flash-attention model takes
    transformers' own path (varlen kernels)."""
    if self.config._attn_implementation != "sdpa":
        return type(self)._transformers_forward(self, hidden_states, cu_seqlens, position_embeddings, **kwargs)
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision
    if _vision_sizes[0] is not cu_seqlens:
        _vision_sizes[:] = [cu_seqlens, (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()]
    sizes = _vision_sizes[1]
    n = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(n, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # (N, h, d) each
    q, k = apply_rotary_pos_emb_vision(q, k, *position_embeddings)
    starts = [0, *itertools.accumulate(sizes)]  # each image's first patch
    by_size = {}  # patch count -> the images of that size
    for i, size in enumerate(sizes):
        by_size.setdefault(size, []).append(i)
    outs, order = [], []
    for size, imgs in by_size.items():
        rows = slice(0, n) if len(by_size) == 1 else \
            torch.cat([torch.arange(starts[i], starts[i] + size) for i in imgs]).to(q.device)  # their patches, in order
        qs, ks, vs = (t[rows].view(len(imgs), size, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))  # (m, h, P, d)
        o = F.scaled_dot_product_attention(qs, ks, vs, dropout_p=self.attention_dropout if self.training else 0.0,
                                           scale=self.scaling)  # (m, h, P, d)
        outs.append(o.transpose(1, 2).reshape(len(imgs) * size, -1))
        order.append(rows)
    out = outs[0] if len(outs) == 1 else torch.cat(outs)[torch.cat(order).argsort()]  # back to the batch's patch order
    return self.proj(out)


def use_stacked_vision_attention():
    """Route Qwen3-VL(-MoE) vision attention through stacked_vision_attention (idempotent)."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionAttention
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeVisionAttention
    for cls in (Qwen3VLVisionAttention, Qwen3VLMoeVisionAttention):
        if not hasattr(cls, "_transformers_forward"):
            cls._transformers_forward, cls.forward = cls.forward, stacked_vision_attention


use_stacked_vision_attention()


@functools.cache
def _varlen_params():
    """torch's varlen_attn and the names of its parameters, read once (not in every layer's call)."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def varlen_causal(q, k, v, cu, max_len, scale):
    """Causal attention within each segment of a packed row: q (T, H, D), k and v (T, Hkv, D), cu (n + 1,) int32 segment
    starts on the device. PyTorch's variable-length flash kernel (its signature changed between releases: causality as
    is_causal or as a window, scale and grouped-query heads absent from the first ones)."""
    varlen_attn, params = _varlen_params()
    kw = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if q.shape[1] != k.shape[1]:  # grouped-query attention
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
    if "scale" in params:
        kw["scale"] = scale
    elif scale is not None:  # early releases: the default 1/sqrt(D) only
        q = q * (scale * q.shape[-1] ** 0.5)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw)


def packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, packed_cu_seqlens=None,
                     packed_max_len=0, **kwargs):
    """The decoder's attention ("prism"): SDPA, except on a packed row (data.collate(packed=True): several sequences one
    after another), where each sequence attends causally to itself only: one variable-length flash call on GPUs (no
    FLOPs across sequences or on padding), one causal SDPA call per sequence elsewhere. query (1, H, T, D), key and value
    (1, Hkv, T, D); returns ((1, T, H, D), None) as transformers' attention functions do."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if packed_cu_seqlens is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if dropout and module.training:
        raise ValueError("packed attention has no dropout: set the model's attention_dropout to 0")
    q, k, v = query[0], key[0], value[0]  # (H, T, D), (Hkv, T, D)
    if q.is_cuda:
        out = varlen_causal(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), packed_cu_seqlens, packed_max_len,
                            scaling)  # (T, H, D)
    else:
        cu = packed_cu_seqlens.tolist()
        out = torch.cat([F.scaled_dot_product_attention(q[:, s:e], k[:, s:e], v[:, s:e], is_causal=True, scale=scaling,
                                                        enable_gqa=True) for s, e in zip(cu, cu[1:])], dim=1).transpose(0, 1)
    return out[None], None


def _register_packed_attention():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register("prism", packed_attention)
    AttentionMaskInterface.register("prism", sdpa_mask)  # padded batches get SDPA's masks, as before


_register_packed_attention()


def use_packed_attention(model):
    """Route a Qwen3-VL(-MoE) decoder's attention through packed_attention (the vision tower keeps SDPA); a model on
    another attention implementation (flash-attn) is left as it is."""
    text = model.config.text_config
    if text._attn_implementation == "sdpa":
        text._attn_implementation = "prism"
    return model


def rope_positions(t, batch, device=None):
    """The M-RoPE positions (3, B, T) of a batch with images, computed on the host from its CPU tensors, as transformers'
    get_rope_index computes them (tested equal) without its per-token Python loop: text tokens count up on all three
    axes; an image's merged patches at (s, s + row, s + col), s the position after the text before it, and the text after
    it continues at s + max(rows, cols). Padding (attention_mask 0) stays 0. None without images."""
    if "pixel_values" not in batch and "cu_seqlens" not in batch:
        return None
    # FSDP's root moves a batch to the GPU before the forward: then one copy back (the caller's CPU tensors need none)
    mm, am = batch["mm_token_type_ids"].cpu().numpy(), batch["attention_mask"].cpu().numpy().astype(bool)
    grids = batch["image_grid_thw"].tolist() if "image_grid_thw" in batch else []
    merge = t.config.vision_config.spatial_merge_size
    B, T = mm.shape
    pos, g = np.zeros((3, B, T), dtype=np.int64), 0
    if "cu_seqlens" in batch:  # a packed row (data.collate(packed=True)): every sequence counts from 0 again
        cu = batch["cu_seqlens"].tolist()
        docs = [(0, slice(s, e)) for s, e in zip(cu, cu[1:])]
    else:
        docs = [(b, am[b]) for b in range(B)]
    for b, where in docs:
        types = mm[b, where]
        if types.max(initial=0) > 1:
            raise ValueError("video tokens: rope_positions handles images only")
        row = np.empty((3, len(types)), dtype=np.int64)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], types, [0]])))  # each image run's start and end
        cur = done = 0
        for s, e in zip(edges[::2], edges[1::2]):
            row[:, done:s] = cur + np.arange(s - done)  # the text before the image
            cur += s - done
            nt, h, w = grids[g][0], grids[g][1] // merge, grids[g][2] // merge
            g += 1
            if nt * h * w != e - s:
                raise ValueError(f"row {b}: an image of {e - s} tokens for a grid of {nt}x{h}x{w} merged patches")
            row[0, s:e] = cur + np.repeat(np.arange(nt), h * w)
            row[1, s:e] = cur + np.tile(np.repeat(np.arange(h), w), nt)
            row[2, s:e] = cur + np.tile(np.arange(w), nt * h)
            cur, done = cur + max(h, w), e
        row[:, done:] = cur + np.arange(len(types) - done)
        pos[:, b, where] = row
    pos = torch.from_numpy(pos)
    return pos.to(device) if device is not None else pos


def hidden_states(model, batch, device):
    """Last hidden states (B, T, H) of the trunk, with the processor's M-RoPE positions (computed from mm_token_type_ids)."""
    t = trunk(model)
    tie = 0.0
    if "pixel_values" not in batch:
        # a batch without images: run the vision tower on one blank 2x2-patch image and add 0 x its outputs, so that under
        # FSDP this rank joins the vision blocks' collectives, in the same order as a rank with images (vision, then the
        # decoder; the reverse in backward), and gets (zero) gradients like them
        vc = t.visual.config
        pix = torch.zeros(4, vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2, device=device)
        out = t.visual(pix.to(t.visual.dtype), grid_thw=torch.tensor([[1, 2, 2]], device=device))
        tie = 0.0 * (out.pooler_output.sum() + sum(d.sum() for d in out.deepstack_features))
    packed = {}
    if "cu_seqlens" in batch:  # a packed row: packed_attention keeps each sequence to itself
        cu = batch["cu_seqlens"]
        packed = {"packed_cu_seqlens": cu.to(device), "packed_max_len": int((cu[1:] - cu[:-1]).max())}
    out = t(**trunk_inputs(batch, device), position_ids=rope_positions(t, batch, device), use_cache=False, **packed)
    return out.last_hidden_state + tie


def chunk_logprobs(h, weight, targets, temperature=1.0):
    """log p(targets) for hidden rows h (N, H) under the output layer `weight` (V, H) at a sampling temperature, fp32, and
    the entropy of each row's distribution (no gradient: a metric). (N,), (N,)"""
    logits = (h @ weight.t()).float() / temperature
    lse = torch.logsumexp(logits, dim=-1)
    with torch.no_grad():
        ent = lse - (logits.softmax(-1) * logits).sum(-1)
    return logits.gather(1, targets[:, None]).squeeze(1) - lse, ent


def token_logprobs(model, batch, device, chunk=2048, temperature=1.0, entropy=False):
    """Per-token log-probs of the supervised tokens: out[b, t] = log p(input_ids[b, t] | tokens < t) where labels[b, t] != -100,
    else 0. (B, T) fp32. The vocabulary projection runs on `chunk` target rows at a time and is recomputed in backward,
    so full fp32 logits over the vocabulary are never materialised for the whole sequence. With a temperature, p is the
    distribution the rollouts were sampled from, softmax(logits / T). With entropy=True also that distribution's entropy at
    each supervised position (B, T), 0 elsewhere, from the same chunked pass (no second softmax over the vocabulary).
    A batch with "packed" (data.collate(packed=True)) runs on its one packed row and returns the same (B, T) layout."""
    if "packed" in batch:
        out = token_logprobs(model, batch["packed"], device, chunk, temperature, entropy)
        B, T = batch["labels"].shape
        # (FSDP's root may have moved the batch to the device already: everything here on `device`)
        starts = batch["packed"]["cu_seqlens"][:B].long().to(device)  # (B,) each sequence's first position in the row
        at = torch.arange(T, device=device)
        idx = (starts[:, None] + at).clamp(max=batch["packed"]["input_ids"].shape[1] - 1)  # (B, T)
        real = at < batch["attention_mask"].to(device).sum(1, keepdim=True)  # (B, T)
        unpack = lambda x: torch.where(real, x[0][idx], 0.0)  # noqa: E731 (1, L) -> (B, T)
        return (unpack(out[0]), unpack(out[1])) if entropy else unpack(out)
    labels = batch["labels"].to(device)
    h = hidden_states(model, batch, device)  # (B, T, H)
    # position t-1 predicts token t: targets are labels shifted left by one
    tgt = torch.full_like(labels, -100)
    tgt[:, :-1] = labels[:, 1:]
    idx = (tgt != -100).nonzero(as_tuple=True)  # rows with a target
    hs, ts = h[idx], tgt[idx]  # (N, H), (N,)
    w = model.lm_head.weight
    lp = torch.zeros(labels.shape, dtype=torch.float32, device=device)
    ent = torch.zeros_like(lp)
    if len(ts) == 0:  # nothing supervised (a placeholder): keep the output layer in the graph, as on the other ranks
        lp = lp + 0.0 * chunk_logprobs(h[0, :1], w, ts.new_zeros(1))[0].sum()
        return (lp, ent) if entropy else lp
    parts = [checkpoint(chunk_logprobs, hs[i:i + chunk], w, ts[i:i + chunk], temperature, use_reentrant=False)
             if torch.is_grad_enabled() else chunk_logprobs(hs[i:i + chunk], w, ts[i:i + chunk], temperature)
             for i in range(0, len(ts), chunk)]
    # the log-prob of the token at t sits at t (shift back), so that out and labels line up
    lp[idx[0], idx[1] + 1] = torch.cat([a for a, _ in parts])
    if entropy:
        ent[idx[0], idx[1] + 1] = torch.cat([e for _, e in parts])
        return lp, ent
    return lp


class LogProbs(nn.Module):
    """Wraps a Qwen3-VL policy so that FSDP2's root hooks gather the root parameters (embeddings, lm_head) around
    token_logprobs, which calls the trunk and the output layer separately. RL and alignment pass their rollout temperature:
    the policy gradient is that of the distribution the responses were sampled from (as in verl)."""

    def __init__(self, hf, temperature=1.0):
        super().__init__()
        self.hf, self.temperature = hf, temperature

    def forward(self, batch, chunk=2048, entropy=False):
        return token_logprobs(self.hf, batch, self.hf.lm_head.weight.device, chunk, self.temperature, entropy)


# -----------------------------------------------------------------------------
# saving and resuming

def full_state_dict(model):
    """The full (unsharded) state dict on rank 0 (CPU tensors); {} on other ranks. Collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_hf(model, processor, out, run_config):
    """Save a stage output as a plain HF directory on rank 0: bf16 safetensors, config, processor, run_config.json.
    Files are written to a temp dir, then moved into `out` (which may also hold metrics.jsonl and ckpt/)."""
    sd = full_state_dict(model)
    if dist.get_rank() == 0:
        sd = {k.removeprefix("hf."): v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}
        hf = model.hf if isinstance(model, LogProbs) else model
        tmp = os.path.join(out, "tmp_save")
        shutil.rmtree(tmp, ignore_errors=True)
        hf.config.dtype = torch.bfloat16
        hf.config.use_cache = True
        hf.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
        processor.save_pretrained(tmp)
        with open(os.path.join(tmp, "run_config.json"), "w") as f:
            json.dump(run_config, f, indent=2, default=str)
        for name in sorted(os.listdir(tmp), key=lambda n: n == "run_config.json"):  # run_config.json last: "complete"
            os.replace(os.path.join(tmp, name), os.path.join(out, name))
        os.rmdir(tmp)
    dist.barrier()


def rng_state():
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(s):
    random.setstate(s["python"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


def checkpoint_state(parts):
    """{name.model, name.optim: sharded state dicts} for parts = {name: (model, optimizer)}."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    state = {}
    for name, (m, opt) in parts.items():
        state[f"{name}.model"], state[f"{name}.optim"] = get_state_dict(m, opt)
    return state


def save_checkpoint(ckpt_dir, step, parts, meta, keep=1):
    """A resume checkpoint of parts = {name: (model, optimizer)}: sharded states (torch.distributed.checkpoint), step and
    meta on rank 0, each rank's RNG. Written under a temp name and renamed when complete, so a kill never leaves a
    half-written checkpoint behind; older checkpoints beyond `keep` are removed."""
    import torch.distributed.checkpoint as dcp
    rank = dist.get_rank()
    final = os.path.join(ckpt_dir, f"step_{step:06d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    dcp.save(checkpoint_state(parts), checkpoint_id=tmp)
    torch.save(rng_state(), os.path.join(tmp, f"rng_{rank}.pt"))
    dist.barrier()
    if rank == 0:
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"step": step, "world_size": dist.get_world_size(), **meta}, f)
        os.replace(tmp, final)
        for old in sorted(d for d in os.listdir(ckpt_dir) if d.startswith("step_") and not d.endswith(".tmp"))[:-keep]:
            shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
    dist.barrier()


def latest_checkpoint(ckpt_dir):
    if not os.path.isdir(ckpt_dir):
        return None
    done = sorted(d for d in os.listdir(ckpt_dir) if d.startswith("step_") and not d.endswith(".tmp")
                  and os.path.isfile(os.path.join(ckpt_dir, d, "meta.json")))
    return os.path.join(ckpt_dir, done[-1]) if done else None


def load_checkpoint(path, parts):
    """Restore parts = {name: (model, optimizer)} and this rank's RNG from save_checkpoint's directory; returns its meta."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    if meta["world_size"] != dist.get_world_size():
        raise SystemExit(f"{path} was written by {meta['world_size']} processes; resume with the same number "
                         f"(or start a new --out)")
    state = checkpoint_state(parts)
    dcp.load(state, checkpoint_id=path)
    for name, (m, opt) in parts.items():
        set_state_dict(m, opt, model_state_dict=state[f"{name}.model"], optim_state_dict=state[f"{name}.optim"])
    set_rng_state(torch.load(os.path.join(path, f"rng_{dist.get_rank()}.pt"), weights_only=True))
    return meta


# -----------------------------------------------------------------------------
# the discriminator: a Qwen3-VL(-MoE) trunk + a scalar score head, in the released layout (model.* + score.weight)

def upcycle(dense, num_experts=4, top_k=2, noise_std=0.01, seed=0):
    """Sparse upcycling: a dense Qwen3-VL -> Qwen3-VL-MoE. Every decoder MLP becomes `num_experts` copies of itself plus
    N(0, noise_std^2) noise; routers are N(0, 0.02^2); normalised top-k routing; vision tower, attention, embeddings and
    norms are copied. With noise_std=0 all experts are equal and the top-k weights sum to 1, so the function is unchanged."""
    dc = dense.config
    text = dc.text_config.to_dict()
    text = {k: text[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                 "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                                 "rope_parameters", "attention_bias", "pad_token_id", "initializer_range") if k in text}
    cfg = Qwen3VLMoeConfig(
        text_config=dict(**text, num_experts=num_experts, num_experts_per_tok=top_k, moe_intermediate_size=text["intermediate_size"],
                         decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.01),
        vision_config=dc.vision_config.to_dict(), image_token_id=dc.image_token_id, video_token_id=dc.video_token_id,
        vision_start_token_id=dc.vision_start_token_id, vision_end_token_id=dc.vision_end_token_id,
        tie_word_embeddings=dc.tie_word_embeddings)
    cfg._attn_implementation = dc._attn_implementation
    dev = next(dense.parameters()).device  # a built-in config is initialised on the GPU: upcycle there too
    with no_init_weights(), torch.device(dev):  # every tensor is overwritten below: skip the random init (minutes at 2B+)
        moe = Qwen3VLMoeForConditionalGeneration(cfg)
    moe.tie_weights()  # post_init's tying was skipped with the init
    g = torch.Generator().manual_seed(seed)  # drawn on the host: the same experts and routers on every device
    randn = lambda shape: torch.randn(shape, generator=g).to(dev)  # noqa: E731
    noise = lambda t: t + noise_std * randn(t.shape) if noise_std > 0 else t  # noqa: E731
    src = {k: v.float() for k, v in dense.state_dict().items()}
    out = {}
    for k, v in moe.state_dict().items():
        if ".mlp.experts.gate_up_proj" in k:  # (E, 2I, H): [gate; up] of the dense MLP per expert
            pre = k.replace("experts.gate_up_proj", "")
            w = torch.cat([src[pre + "gate_proj.weight"], src[pre + "up_proj.weight"]], 0)
            out[k] = torch.stack([noise(w) for _ in range(num_experts)])
        elif ".mlp.experts.down_proj" in k:  # (E, H, I)
            w = src[k.replace("experts.down_proj", "down_proj.weight")]
            out[k] = torch.stack([noise(w) for _ in range(num_experts)])
        elif ".mlp.gate.weight" in k:  # the router (E, H)
            out[k] = 0.02 * randn(v.shape)
        else:
            out[k] = src[k]
    moe.load_state_dict(out)
    return moe


class MaskedRouter(nn.Module):
    """Qwen3-VL-MoE's top-k router with an optional (N, E) boolean mask of allowed experts per token, set for hard routing
    (--disc-routing segment); disallowed experts get -inf logits before softmax and top-k. Same parameters as the original."""

    def forward(self, hidden_states):
        h = hidden_states.reshape(-1, self.hidden_dim)
        logits = F.linear(h, self.weight)  # (N, E)
        routed = logits if getattr(self, "mask", None) is None else logits.masked_fill(~self.mask, float("-inf"))
        probs = torch.softmax(routed, dtype=torch.float, dim=-1)
        top, idx = torch.topk(probs, self.top_k, dim=-1)  # (N, k)
        top = (top / top.sum(-1, keepdim=True)).to(logits.dtype)
        return logits, top, idx


class Discriminator(PreTrainedModel):
    """Score model: `.model` is a Qwen3-VL(-MoE) trunk, `.score` = Linear(hidden, 1) after dropout 0.1, without bias (the
    release's MoE head) or with one (its dense head: config.score_bias). Saves as model.* + score.weight (the layout of
    Qwen3VLMoeForTokenClassification); load_discriminator also reads the release's warm-up layouts; export_release writes
    them. A dense trunk (the 1-expert ablation) works the same."""
    config_class = Qwen3VLMoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen3VLMoeTextDecoderLayer", "Qwen3VLTextDecoderLayer", "Qwen3VLMoeVisionBlock", "Qwen3VLVisionBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _can_set_experts_implementation_cached_value = True  # the MoE trunk's experts dispatch (eager / grouped_mm) as usual

    def __init__(self, config):
        super().__init__(config)
        if not hasattr(config.text_config, "num_experts"):  # dense trunk: it has no experts implementation to set
            config._experts_implementation = None
        self.model = AutoModel.from_config(config)
        self.dropout = nn.Dropout(0.1)
        self.score = nn.Linear(config.text_config.hidden_size, 1, bias=getattr(config, "score_bias", False))
        for m in self.model.modules():  # hard routing needs the masked router: same parameters, same output without a mask
            if type(m).__name__ == "Qwen3VLMoeTextTopKRouter":
                m.__class__ = type("Qwen3VLMoeTextTopKRouter", (MaskedRouter, type(m)), {})
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if module is getattr(self, "score", None):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, batch, last_idx, routing_mask=None, with_aux=False):
        """Scores (B,) read at token positions last_idx (B,), and the router load-balancing loss when with_aux (MoE).
        routing_mask: (B, E) experts each sequence may use (hard routing), applied to all of its tokens."""
        device = self.score.weight.device
        routers = [m for m in self.model.modules() if isinstance(m, MaskedRouter)]
        if routing_mask is not None:
            T = batch["input_ids"].shape[1]
            flat = routing_mask.to(device).repeat_interleave(T, 0)  # (B*T, E), rows in the trunk's flattened (B, T) order
            for r in routers:
                r.mask = flat
        try:
            kw = {"output_router_logits": True} if with_aux and routers else {}
            out = self.model(**trunk_inputs(batch, device), position_ids=rope_positions(self.model, batch, device),
                             use_cache=False, **kw)
        finally:
            for r in routers:
                r.mask = None
        h = out.last_hidden_state[torch.arange(len(last_idx), device=device), last_idx.to(device)]  # (B, H)
        scores = self.score(self.dropout(h)).squeeze(-1).float().clone()  # not a view: FSDP2's backward hook stays on it
        aux = torch.zeros((), device=device)
        if with_aux and routers:
            tc = self.config.text_config
            aux = load_balancing_loss_func(out.router_logits, tc.num_experts, tc.num_experts_per_tok,
                                           batch["attention_mask"].to(device))
        return scores, aux


def stored_tensors(path):
    """{tensor name: file} of an HF directory's safetensors (model.safetensors, or the shards of its index)."""
    from safetensors import safe_open
    index = os.path.join(path, "model.safetensors.index.json")
    files = sorted(set(json.load(open(index))["weight_map"].values())) if os.path.isfile(index) else ["model.safetensors"]
    names = {}
    for f in files:
        if not os.path.isfile(os.path.join(path, f)):
            raise SystemExit(f"{path}: {f} not found (weights load from safetensors only)")
        with safe_open(os.path.join(path, f), "pt") as sf:
            names.update({k: f for k in sf.keys()})
    return names


def read_head(path, names):
    """The score head {"weight": (1, H)[, "bias": (1,)]} and where it was found, wherever the release stores it: in the
    model's safetensors as score.* (ours, and Qwen3VLMoeForTokenClassification's) or v_head.1.* (the release's warm-up,
    `moe/train_moe_vl_warmup_fast.py`, merges Sequential(Dropout, Linear) there), else beside them in value_head.safetensors
    or value_head.pt (`moe/extract_value_head.py`, `convert_value_head.py`: v_head.summary.*). (None, None) when absent."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    for pre in ("score", "v_head.1"):
        if pre + ".weight" in names:
            head = {}
            for part in ("weight", "bias"):
                if f"{pre}.{part}" in names:
                    with safe_open(os.path.join(path, names[f"{pre}.{part}"]), "pt") as sf:
                        head[part] = sf.get_tensor(f"{pre}.{part}")
            return head, f"{pre}.* in {names[pre + '.weight']}"
    for f in ("value_head.safetensors", "value_head.pt"):
        if os.path.isfile(os.path.join(path, f)):
            sd = load_file(os.path.join(path, f)) if f.endswith(".safetensors") else \
                torch.load(os.path.join(path, f), map_location="cpu", weights_only=True)
            for pre in ("v_head.summary", "v_head.1", "summary", "score"):
                if f"{pre}.weight" in sd:
                    return {part: sd[f"{pre}.{part}"] for part in ("weight", "bias") if f"{pre}.{part}" in sd}, f"{pre}.* in {f}"
            raise SystemExit(f"{path}/{f}: no head weight in it (keys {sorted(sd)[:8]})")
    return None, None


def summarize_keys(names):
    """"model.language_model.* (312), model.visual.* (301), lm_head.weight": a key list, grouped, for messages."""
    groups = {}
    for k in names:
        g = ".".join(k.split(".")[:2]) + ".*" if k.count(".") > 1 else k
        groups[g] = groups.get(g, 0) + 1
    return ", ".join(f"{g} ({n})" if n > 1 else g for g, n in sorted(groups.items()))


def load_discriminator(spec, processor, device, experts=4, top_k=2, noise=0.01, seed=0, trust_remote_code=False,
                       fresh_head=False):
    """A discriminator from a saved directory, or upcycled from a dense policy: spec = "upcycle:DIR" (experts > 1) or
    "dense:DIR" / experts == 1 (the dense-discriminator ablation), with a fresh score head. fp32 master weights.
    A directory is read in any of the release's layouts (read_head; the experts in transformers 4.57's orientation are
    transposed on load by transformers' own conversion); it is refused when it has no score head (unless fresh_head),
    when any other tensor is missing or unexpected, or when its tokenizer or image processor differs from `processor`."""
    spec_dir = spec.split(":", 1)[-1]
    if any(os.path.isfile(os.path.join(spec_dir, f)) for f in ("preprocessor_config.json", "processor_config.json")):
        # the discriminator reads the policy's tokens and pixels: its tokenizer and image processor must be the same
        other = load_processor(spec_dir)
        keys = ("patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std")
        ip_a, ip_b = processor.image_processor.to_dict(), other.image_processor.to_dict()
        if other.tokenizer.get_vocab() != processor.tokenizer.get_vocab() or any(ip_a.get(k) != ip_b.get(k) for k in keys):
            raise SystemExit(f"{spec_dir}: its tokenizer or image processor differs from the policy's; build the "
                             f"discriminator from the same family (e.g. --disc upcycle:<the SFT policy dir>)")
    if spec.startswith(("upcycle:", "dense:")):
        dense = load_policy(spec.split(":", 1)[1], processor, device, seed=seed, trust_remote_code=trust_remote_code)
        trunk_model = upcycle(dense, experts, top_k, noise, seed) if spec.startswith("upcycle:") and experts > 1 else dense
        with no_init_weights(), torch.device(next(trunk_model.parameters()).device):  # the trunk is copied in below
            disc = Discriminator(trunk_model.config)
        disc.model.load_state_dict(trunk_model.model.state_dict(), strict=True)
        torch.manual_seed(seed)
        nn.init.normal_(disc.score.weight, std=0.02)  # the fresh head (no init ran inside no_init_weights)
        if disc.score.bias is not None:
            nn.init.zeros_(disc.score.bias)
        disc.head_source = None
        return disc
    cfg = AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
    if cfg.model_type not in ("qwen3_vl_moe", "qwen3_vl"):
        raise SystemExit(f"{spec}: model_type {cfg.model_type!r}; the discriminator must be Qwen3-VL or Qwen3-VL-MoE")
    check_vocab(cfg, processor, spec)
    tc = cfg.text_config
    if getattr(tc, "num_experts", 0) and tc.hidden_size in (tc.moe_intermediate_size, 2 * tc.moe_intermediate_size):
        # transformers 4.57 stores experts as (E, H, 2I) / (E, I, H), this version as (E, 2I, H) / (E, H, I), and converts by
        # comparing shapes: with H = I or H = 2I both read the same, so a checkpoint of either age would load silently wrong
        raise SystemExit(f"{spec}: hidden size {tc.hidden_size} vs expert size {tc.moe_intermediate_size}: the experts' "
                         f"orientation cannot be told from their shapes; transpose them by hand for this transformers")
    names = stored_tensors(spec)
    head, where = read_head(spec, names)
    if head is None and not fresh_head:
        raise SystemExit(f"{spec}: no score head: looked for score.weight and v_head.1.weight in its safetensors and for "
                         f"value_head.safetensors / value_head.pt beside them; it holds {summarize_keys(names)}. "
                         f"Pass --disc-fresh-head to start from a random head (e.g. an upcycled model never warmed up)")
    cfg.score_bias = head is not None and "bias" in head
    from transformers.utils import logging as hf_logging
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its "newly initialized: score.weight" is about the head, loaded just below
    try:
        disc, info = Discriminator.from_pretrained(spec, config=cfg, dtype=torch.float32, use_safetensors=True,
                                                   attn_implementation=attn_impl(device), output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = [k for k in info["missing_keys"] if not k.startswith("score.")]
    unexpected = [k for k in info["unexpected_keys"] if not k.startswith("v_head.") and k != "lm_head.weight"]
    if missing or unexpected or info.get("mismatched_keys"):
        raise SystemExit(f"{spec}: its tensors do not fit a Qwen3-VL discriminator: missing {missing[:6]}, unexpected "
                         f"{unexpected[:6]}, mismatched {list(info.get('mismatched_keys') or [])[:6]}")
    if head is None:
        print0(f"{spec}: a fresh random score head (--disc-fresh-head)")
    else:
        with torch.no_grad():
            disc.score.weight.copy_(head["weight"].reshape(disc.score.weight.shape))
            if "bias" in head:
                disc.score.bias.copy_(head["bias"].reshape(disc.score.bias.shape))
        print0(f"{spec}: score head from {where}" + (" (the language-model output layer it also holds is not part of a "
               "discriminator: not loaded)" if "lm_head.weight" in info["unexpected_keys"] else ""))
    disc.head_source = where  # "v_head.1.* in ...": the release's warm-up wrote it (its framing applies: align.py)
    return disc


def export_release(disc, processor, out):
    """Write a discriminator in the layout of the release's warm-up output, for its verl code: the trunk's tensors with the
    experts in transformers 4.57's orientation (gate_up_proj (E, H, 2I), down_proj (E, I, H)) and the head merged as
    v_head.1.weight (+ bias), value_head.pt beside them (v_head.summary.*), config.json, the processor. Rank 0 only."""
    from safetensors.torch import save_file
    sd = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in disc.state_dict().items()}
    out_sd = {}
    for k, v in sd.items():
        if k.startswith("score."):
            out_sd["v_head.1." + k.split(".", 1)[1]] = v
        elif k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):  # ours (E, 2I, H) / (E, H, I): transpose
            out_sd[k] = v.transpose(1, 2).contiguous()
        else:
            out_sd[k] = v
    os.makedirs(out, exist_ok=True)
    save_file(out_sd, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    torch.save({"v_head.summary." + k.split(".", 1)[1]: v for k, v in sd.items() if k.startswith("score.")},
               os.path.join(out, "value_head.pt"))
    cfg = disc.config.to_dict()
    cfg["architectures"] = ["Qwen3VLMoeForConditionalGeneration" if cfg.get("model_type") == "qwen3_vl_moe" else
                            "Qwen3VLForConditionalGeneration"]
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, default=str)
    processor.save_pretrained(out)


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description="Model utilities: write a random-init built-in policy, or upcycle a dense "
                                            "Qwen3-VL into a Qwen3-VL-MoE discriminator (released layout).")
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("init", help="a random-weight built-in config (tiny | small) saved as an HF directory")
    q.add_argument("--config", default="tiny", choices=list(CONFIGS), help="built-in size")
    q.add_argument("--processor", required=True, help="processor directory (its tokenizer sets the vocabulary)")
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--seed", type=int, default=0, help="init seed")
    q = sub.add_parser("upcycle", help="dense Qwen3-VL -> MoE discriminator with a fresh score head")
    q.add_argument("--dense", required=True, help="a dense Qwen3-VL HF directory (e.g. the SFT output)")
    q.add_argument("--out", required=True, help="output directory (loads with model.Discriminator.from_pretrained)")
    q.add_argument("--experts", type=int, default=4, help="experts per MLP (1: a dense discriminator)")
    q.add_argument("--top-k", type=int, default=2, help="experts per token")
    q.add_argument("--noise", type=float, default=0.01, help="std of the noise added to each expert copy")
    q.add_argument("--seed", type=int, default=0, help="noise, router and score-head seed")
    q.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from --dense")
    q = sub.add_parser("export", help="a discriminator directory -> the release's warm-up layout (v_head.1.weight merged, "
                                      "value_head.pt, experts in transformers 4.57's orientation) for its verl code")
    q.add_argument("--disc", required=True, help="a discriminator directory (warmup.py / align.py output)")
    q.add_argument("--out", required=True, help="output directory")
    a = p.parse_args()
    init_dist()
    if a.cmd == "init":
        proc = load_processor(a.processor)
        os.makedirs(a.out, exist_ok=True)
        save_hf(load_policy(a.config, proc, torch.device("cpu"), seed=a.seed), proc, a.out, {"stage": "init", **vars(a)})
    elif a.cmd == "export":
        proc = load_processor(a.disc)
        export_release(load_discriminator(a.disc, proc, torch.device("cpu")), proc, a.out)
    else:
        proc = load_processor(a.dense)
        disc = load_discriminator(("upcycle:" if a.experts > 1 else "dense:") + a.dense, proc, torch.device("cpu"), a.experts,
                                  a.top_k, a.noise, a.seed, a.trust_remote_code)
        os.makedirs(a.out, exist_ok=True)
        save_hf(disc, proc, a.out, {"stage": "upcycle", **vars(a)})
    print(f"saved {a.out}")
    dist.destroy_process_group()
