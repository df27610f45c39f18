"""
model.py: a minimal decoder-only transformer for the Qwen2 / Qwen2.5 architecture (also
DeepSeek-R1-Distill-Qwen, which is Qwen2) and Qwen3 (checkpoint.py loads and saves them in the Hugging Face layout).

One block, applied num_hidden_layers times (pre-norm residual):
    h = x + o_proj(Attn(RoPE(q), RoPE(k), v))      q, k, v = {q,k,v}_proj(RMSNorm(x))
    x = h + down_proj(silu(gate_proj(y)) * up_proj(y))   y = RMSNorm(h)
    RMSNorm(x) = w * x / sqrt(mean(x^2) + eps)   (computed in fp32, as the reference does)
    RoPE, rotate-half layout: x * cos(p * f) + rotate_half(x) * sin(p * f),  f_i = theta^(-2i/d)
Attention is grouped-query (num_key_value_heads <= num_attention_heads) through F.scaled_dot_product_attention
(causal), or a PackedRows layout (training rows that hold several sequences). Qwen2 has a bias on q/k/v only; Qwen3
has none, but RMSNorms q and k per head *before* RoPE, and a head_dim decoupled from hidden_size / heads.

Module names mirror the Hugging Face ones, so a state-dict key here is the key in the safetensors file.

The forward runs the blocks one way and then one of four heads:
    logits [B, T, V]            model(ids)
    hidden states [B, T, H]     model(ids, head=False)
    token log-probs + entropy   model(ids, targets=t)                  (GRPO; SFT's loss_weights: a sum)
The log-prob heads run the output head in chunks of tokens (head.py), so the full [tokens, vocab] fp32 logits (152k
vocab) never exist; they live inside forward so that FSDP has the head's weight gathered while they run.

The KV cache belongs to the model (as in gpt-fast): setup_cache(slots, max_len) gives every attention
module static buffers [slots, kv_heads, max_len, head_dim], allocated once, so a compiled decode step sees
the same addresses on every call (CUDA graphs replay only then). Two cached modes (sampler.py drives them):
    prefill   model(ids, cache_rows=r)       causal attention over ids (right-padded rows, positions 0..T-1);
                                             row b's K/V also go to cache rows r[b*k:(b+1)*k], k = len(r) / B
    decode    model(tok, pos, decode=True)   one token per cache row 0..B-1, written at position pos[b],
                                             attending to that row's positions <= pos[b]
setup_cache(..., page_size=P, pages=N) makes the cache a pool of N pages of P positions instead, [kv_heads, N * P,
head_dim] per layer, with a page table that maps each row's position p to its page p // P (the sampler assigns pages):
rows hold only what they fill (the samples of one prompt hold its full pages once), and a decode step attends through
FlexAttention over each row's own pages. With cached_prefix = C > 0 (paged), every row's first C positions are
already in the cache (a prefix all rows hold): a prefill's ids are positions C, C + 1, ... and attend to it as well.
"""
import inspect
import warnings
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from head import ChunkedTokenLogProb, ChunkedWeightedLogProbSum, head_logits


SUPPORTED_MODEL_TYPES = ("qwen2", "qwen3")


@dataclass
class ModelConfig:
    model_type: str = "qwen2"
    vocab_size: int = 151936
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    head_dim: int = 0  # 0 = hidden_size // num_attention_heads (Qwen2); Qwen3 sets it explicitly
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    tie_word_embeddings: bool = True
    attention_bias: bool = True  # Qwen2: bias on q/k/v; Qwen3: none
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    torch_dtype: str = "bfloat16"

    def __post_init__(self):
        """Every field of the type it is used as (JSON allows "1e-6" or "false" where a number or a boolean belongs)."""
        is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
        for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "max_position_embeddings"):
            if not is_int(getattr(self, k)) or getattr(self, k) <= 0:
                raise ValueError(f"field {k!r} must be a positive integer, got {getattr(self, k)!r}")
        for k in ("rms_norm_eps", "rope_theta"):
            if not (is_int(getattr(self, k)) or isinstance(getattr(self, k), float)) or not getattr(self, k) > 0:
                raise ValueError(f"field {k!r} must be a positive number, got {getattr(self, k)!r}")
            setattr(self, k, float(getattr(self, k)))
        for k in ("tie_word_embeddings", "attention_bias"):
            if not isinstance(getattr(self, k), bool):
                raise ValueError(f"field {k!r} must be true or false, got {getattr(self, k)!r}")
        if str(self.torch_dtype).replace("torch.", "") not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"field 'torch_dtype' must be float32, bfloat16 or float16, got {self.torch_dtype!r}")
        if not is_int(self.head_dim) or self.head_dim < 0:
            raise ValueError(f"field 'head_dim' must be a positive integer, got {self.head_dim!r}")
        for k in ("bos_token_id", "eos_token_id"):
            v = getattr(self, k)
            if v is not None and not is_int(v) and not (isinstance(v, list) and all(map(is_int, v))):
                raise ValueError(f"field {k!r} must be a token id or a list of them, got {v!r}")
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")

    @classmethod
    def from_hf(cls, d: dict, source: str = "config"):
        """Read a Hugging Face config.json dict; refuse what this model does not implement."""
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{source}: model_type {mt!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})")
        if d.get("use_sliding_window"):
            raise ValueError(f"{source}: sliding-window attention (use_sliding_window=true) is not implemented")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {d['hidden_act']!r} is not supported (only silu)")
        # RoPE base: `rope_theta` at top level, or inside `rope_parameters` (newer files); scaling refused.
        rope = d.get("rope_parameters") or {}
        for r in (rope, d.get("rope_scaling") or {}):
            if not isinstance(r, dict):
                raise ValueError(f"{source}: rope_parameters / rope_scaling must be an object, got {r!r}")
            rope_type = r.get("rope_type", r.get("type", "default"))
            if rope_type != "default":
                raise ValueError(f"{source}: RoPE scaling type {rope_type!r} is not implemented (only 'default')")
        theta = d.get("rope_theta", rope.get("rope_theta"))
        if theta is None:
            raise ValueError(f"{source}: no RoPE base (rope_theta) found")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw.setdefault("tie_word_embeddings", False)  # an absent field as transformers reads it (Qwen2Config's defaults)
        if kw.get("num_key_value_heads") is None:  # (a 0 stays, to be refused)
            kw["num_key_value_heads"] = kw.get("num_attention_heads")
        kw.update(rope_theta=theta, attention_bias=d.get("attention_bias", mt == "qwen2"),
                  head_dim=d.get("head_dim") or 0, torch_dtype=d.get("torch_dtype") or d.get("dtype") or "bfloat16")
        try:
            return cls(**kw)
        except ValueError as e:  # the file's name with the field's
            raise ValueError(f"{source}: {e}") from None

    def to_hf(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["architectures"] = ["Qwen2ForCausalLM" if self.model_type == "qwen2" else "Qwen3ForCausalLM"]
        d.update(hidden_act="silu", use_sliding_window=False, sliding_window=None, use_cache=True,
                 attention_dropout=0.0, max_window_layers=self.num_hidden_layers)
        return d


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_cos_sin(positions, head_dim, theta, dtype):
    """positions [B, T] -> cos, sin [B, 1, T, head_dim], computed in fp32 then cast (as the reference)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim))
    freqs = positions[..., None].float() * inv_freq  # [B, T, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class PackedRows:
    """Attention layout of rows that hold several sequences back to back, with no padding between them (packing):
    SFT's traces, or GRPO's group [prompt | response 1 | ... | response n] with the prompt run once for all n.
    doc [B, T] says which sequence each token belongs to: 0 = the row's shared prefix (every sequence of the row sees
    it: GRPO's prompt), 1, 2, ... = the sequences, -1 = the row's right padding. Query t sees key s iff
        s <= t  and  (doc[s] == doc[t]  or  doc[s] == 0)
    so each sequence's outputs equal those of [prefix, sequence] run alone (the caller gives each sequence its own
    positions, continuing the prefix's), and a pad sees only the prefix and pads. Built once per forward, for every
    layer, one kernel per device:
      CUDA  a FlexAttention BlockMask (128 x 128 blocks: pairs of blocks no query sees are skipped, cost grows with the
            sequences' own lengths, not the row's) -> flex_attention, compiled (fused forward and backward)
      CPU   a dense additive mask [B, 1, T, T] in the compute dtype -> SDPA (FlexAttention has no backward on CPU)."""

    def __init__(self, doc, dtype=torch.float32, flex=None):
        B, T = doc.shape
        self.flex = doc.is_cuda if flex is None else flex  # flex=True on CPU: the tests' check of the CUDA layout
        if self.flex:
            def same_sequence_or_prefix(b, h, q_idx, kv_idx):
                return (kv_idx <= q_idx) & ((doc[b, kv_idx] == doc[b, q_idx]) | (doc[b, kv_idx] == 0))
            # compiled on CUDA, so the [B, T, T] mask never exists (only its block summary)
            self.block_mask = create_block_mask(same_sequence_or_prefix, B, None, T, T, device=doc.device,
                                                _compile=doc.is_cuda)
        else:
            t = torch.arange(T, device=doc.device)
            keep = (doc[:, None, :] == doc[:, :, None]).logical_or_(doc[:, None, :] == 0).logical_and_(t[:, None] >= t)
            # [B, T, T], in place; additive, built once for all layers (SDPA would convert a bool mask per call)
            self.mask = torch.full(keep.shape, float("-inf"), dtype=dtype, device=doc.device).masked_fill_(keep, 0.0)[:, None]
            torch._dynamo.maybe_mark_dynamic(self.mask, [0, 2, 3])  # sizes that change per micro-batch (compile_blocks)

    def attend(self, q, k, v):
        """q [B, heads, T, hd], k, v [B, kv_heads, T, hd] -> [B, heads, T, hd]"""
        if self.flex:
            return flex(q, k, v, self.block_mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask.to(q.dtype), enable_gqa=True)


def pack_rows(rows, pad_id, device, dtype):
    """Rows of segments -> input ids, positions, targets, loss weights (all [B, T], right-padded with pad_id, weight 0)
    and their PackedRows. A segment is (ids, targets, weights, first position, doc): its tokens go back to back after
    the row's earlier segments, at positions first, first + 1, ..., with doc as PackedRows reads it (0: a prefix).
    Where no row holds more than one sequence (after its prefix), that layout is plain causal attention: the layout is
    then None (forward's causal SDPA: flash / cuDNN kernels on GPUs, faster than FlexAttention's and with no block mask
    to build; on CPU the dense mask's digits exactly, docs/measurements.md)."""
    T = max(sum(len(seg[0]) for seg in row) for row in rows)
    columns = [], [], [], [], []  # ids, targets, weights, positions, doc: lists of rows, then one tensor a column (five
    for row in rows:              # tensors a segment took 8-14 ms of a toy micro-batch of 16 groups; this takes 4)
        values = [], [], [], [], []
        for seg_ids, seg_targets, seg_weights, first, seg_doc in row:
            n = len(seg_ids)
            for value, seg in zip(values, (seg_ids, seg_targets, seg_weights, range(first, first + n), [seg_doc] * n)):
                value += seg
        for column, value, pad in zip(columns, values, (pad_id, pad_id, 0, 0, -1)):
            column.append(value + [pad] * (T - len(value)))
    ids, targets, positions, doc = (torch.tensor(columns[k], dtype=torch.long) for k in (0, 1, 3, 4))
    weights = torch.tensor(columns[2], dtype=torch.float)
    causal = all(sum(seg[4] != 0 for seg in row) <= 1 for row in rows)
    return (ids.to(device), positions.to(device), targets.to(device), weights.to(device),
            None if causal else PackedRows(doc.to(device), dtype))


def flex(q, k, v, block_mask):
    """flex_attention, compiled on CUDA where the caller is not (eager, it is a reference that materialises every score)."""
    if not q.is_cuda or torch.compiler.is_compiling():
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True)
    if not _FLEX_COMPILED:
        _FLEX_COMPILED.append(torch.compile(flex_attention, dynamic=True))
    return _FLEX_COMPILED[0](q, k, v, block_mask=block_mask, enable_gqa=True)


_FLEX_COMPILED = []  # compiled on first use: a CPU process never needs torch.compile's imports
# eager FlexAttention on the CPU is this project's choice (the paged decode's reference path), so torch's advice to
# compile it, printed once by every rank, says nothing to act on
warnings.filterwarnings("ignore", message="flex_attention called without torch.compile", category=UserWarning)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        hd, nh, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        self.q_proj = nn.Linear(cfg.hidden_size, nh * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, nkv * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, nkv * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(nh * hd, cfg.hidden_size, bias=False)
        if cfg.model_type == "qwen3":
            self.q_norm, self.k_norm = RMSNorm(hd, cfg.rms_norm_eps), RMSNorm(hd, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, packed=None, cache_rows=None, decode_pos=None, decode_mask=None, context=None):
        B, T, _ = x.shape
        hd = self.cfg.head_dim
        if hasattr(self, "qkv_proj"):  # fused (fuse_projections): one GEMM
            q, k, v = self.qkv_proj(x).split(self.fused_split, -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = q.view(B, T, -1, hd), k.view(B, T, -1, hd), v.view(B, T, -1, hd).transpose(1, 2)
        if self.cfg.model_type == "qwen3":  # per-head q/k norm, before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # [B, heads, T, hd]
        k = apply_rope(k.transpose(1, 2), cos, sin)  # [B, kv_heads, T, hd]
        paged = getattr(self, "k_cache", None) is not None and self.k_cache.dim() == 3  # pages [kv_heads, pages*P, hd]
        if decode_pos is not None:  # decode: this token's K/V at decode_pos[b] (its cache row's position, or pool slot)
            if paged:
                self.k_cache[:, decode_pos] = k[:, :, 0].transpose(0, 1).to(self.k_cache.dtype)  # [kv_heads, B, hd]
                self.v_cache[:, decode_pos] = v[:, :, 0].transpose(0, 1).to(self.v_cache.dtype)
                y = flex(q, self.k_cache[None], self.v_cache[None], decode_mask)
            else:
                rows = torch.arange(B, device=x.device)  # indexed writes stay in place compiled (scatter_ copied the cache)
                self.k_cache[rows, :, decode_pos] = k[:, :, 0].to(self.k_cache.dtype)
                self.v_cache[rows, :, decode_pos] = v[:, :, 0].to(self.v_cache.dtype)
                L = decode_mask.shape[-1]
                y = masked_attention(q, self.k_cache[:B, :, :L], self.v_cache[:B, :, :L], decode_mask)
        else:
            if cache_rows is not None and paged:  # prefill, paged: cache_rows [B * k, T] are pool positions
                copies = cache_rows.shape[0] // B
                for cache, t in ((self.k_cache, k), (self.v_cache, v)):
                    cache[:, cache_rows.flatten()] = t.to(cache.dtype).repeat_interleave(copies, 0).transpose(0, 1).flatten(1, 2)
            elif cache_rows is not None:  # prefill: each row's K/V to its cache rows (the n samples of a prompt)
                copies = cache_rows.numel() // B
                self.k_cache[:, :, :T].index_copy_(0, cache_rows, k.to(self.k_cache.dtype).repeat_interleave(copies, 0))
                self.v_cache[:, :, :T].index_copy_(0, cache_rows, v.to(self.v_cache.dtype).repeat_interleave(copies, 0))
            if context is not None:  # after a cached prefix (pool positions context [C]): its K/V, then the rows' own
                kc, vc = (c[:, context].to(k.dtype)[None].expand(B, -1, -1, -1) for c in (self.k_cache, self.v_cache))
                keep = torch.ones(T, len(context) + T, dtype=torch.bool, device=x.device).tril(len(context))  # s <= C + t
                y = masked_attention(q, torch.cat([kc, k], 2), torch.cat([vc, v], 2), keep[None, None])
            elif packed is not None:
                y = packed.attend(q, k, v)
            else:  # causal; right padding never leaks into real tokens, so no mask: the flash kernel applies
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def masked_attention(q, k, v, keep):
    """q [B, heads, T, hd], k, v [B, kv_heads, L, hd], keep [B or 1, 1, T, L] (query t sees key s) -> [B, heads, T, hd].
    The query heads that share a KV head are folded into the query-length dimension ([B, kv_heads, heads/kv_heads * T,
    hd]), so SDPA needs no enable_gqa: with a mask, enable_gqa would rule out the flash and memory-efficient kernels and
    leave the math kernel. Decoding (T = 1, row b's positions <= its own) and prefills after a cached prefix use it.
    Decoding on the CPU computes it as two fp32 matmuls instead: SDPA's CPU flash kernel sets up a tile per (row, KV
    head) that outweighs one query's work, and took twice as long (docs/measurements.md)."""
    B, H, T, hd = q.shape
    g = H // k.shape[1]
    q = q.reshape(B, k.shape[1], g * T, hd)  # folded query j * T + t is query t of head j
    if T == 1 and not q.is_cuda:
        scores = q.float() @ k.float().transpose(-1, -2) * hd ** -0.5  # [B, kv_heads, g, L]
        y = scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v.float()
        return y.to(q.dtype).reshape(B, H, T, hd)
    keep = keep.repeat(1, 1, g, 1) if T > 1 else keep
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    return y.reshape(B, H, T, hd)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, -1) if hasattr(self, "gate_up_proj") else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, packed=None, cache_rows=None, decode_pos=None, decode_mask=None, recompute=False,
                context=None):
        if recompute:  # activation checkpointing inside the block: a compiled block recomputes in its backward graph
            return torch.utils.checkpoint.checkpoint(self.forward, x, cos, sin, packed, use_reentrant=False)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, packed, cache_rows, decode_pos, decode_mask, context)
        return x + self.mlp(self.post_attention_layernorm(x))

    # the compiled decode step's call: one block's code for every layer (torch >= 2.8), not unrolled (eager, it would
    # only add a wrapper's cost to each call: about 10% of a toy-sized block's)
    decode = getattr(torch.compiler, "nested_compile_region", lambda fn: fn)(forward)


class Decoder(nn.Module):  # the Hugging Face "model." prefix
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.recompute_blocks = 0  # the first this many blocks recompute their activations in backward (--grad-ckpt)
        self.compute_dtype = None  # the precision policy's, where it is not the weights' (see compute_dtype)
        self.logprob_chunk = 1024  # tokens per output-head chunk: 1024 x 152k logits, 0.6 GB in fp32
        self.page_size = 0  # the KV cache's page size; 0: dense (setup_cache)
        self.cached_prefix = 0  # paged: the first positions of every row already in the cache (prefills start after)

    def forward(self, input_ids, positions=None, cache_rows=None, decode=False, kv_len=None, packed=None,
                head=True, targets=None, temperature=1.0, token_mask=None, loss_weights=None):
        """input_ids [B, T]; positions [B, T] (default 0..T-1).
        Cache (setup_cache first): cache_rows [B * k] prefills, decode=True decodes (see the module docstring);
        kv_len (decode, dense cache) attends to the first kv_len cache positions instead of all of them.
        packed (a PackedRows) replaces the causal mask: rows of sequences back to back (give their positions).
        Returns logits [B, T, V]; with head=False the final normed hidden states [B, T, H]; with targets [B, T] the fp32
        (log p(targets), entropy), each [B, T], only where token_mask is set (0 elsewhere: prompts skip the output head);
        with loss_weights [B, T] the scalar sum(loss_weights * log p(targets)) (zero weights skipped)."""
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        if decode:  # where each row's K/V goes and what it attends to: built once, for every layer
            decode_pos, decode_mask = self.decode_addressing(positions[:, 0], kv_len)
            for layer in self.model.layers:  # compiled, one block's code for all (Block.decode); eager, without its wrapper
                x = (layer.decode if torch.compiler.is_compiling() else layer)(x, cos, sin, None, None, decode_pos, decode_mask)
        else:
            context = None
            if cache_rows is not None and self.page_size:  # paged: rows' positions C..C+T-1 -> pool positions [B * k, T]
                P, C, table = self.page_size, self.cached_prefix, self.page_table[cache_rows]
                at = C + torch.arange(T, device=x.device)
                if C:  # the prefix every row holds, already in the cache: its pool positions [C], read by each layer
                    context = (table[0, :C // P, None] * P + torch.arange(P, device=x.device)).flatten()
                cache_rows = table[:, at // P] * P + at % P
            recompute = self.recompute_blocks if torch.is_grad_enabled() else 0
            for i, layer in enumerate(self.model.layers):
                for t in (x, cos, sin):  # batch and length change per call: dynamic in compiled blocks, marked at every
                    torch._dynamo.maybe_mark_dynamic(t, [0, t.dim() - 2])  # layer (a graph may first run at any of them)
                x = layer(x, cos, sin, packed, cache_rows, recompute=i < recompute, context=context)
        x = self.model.norm(x)
        if not head:
            return x
        if targets is None:
            return head_logits(x.flatten(0, -2), self.lm_head.weight).unflatten(0, x.shape[:-1])  # fp32
        return self._token_logprobs(x, targets, temperature, token_mask, loss_weights)

    def _token_logprobs(self, x, targets, temperature, token_mask, loss_weights):
        B, T, _ = x.shape
        hidden, targets = x.reshape(B * T, -1), targets.reshape(-1)
        if loss_weights is not None:
            rows = (loss_weights.reshape(-1) != 0).nonzero().squeeze(1)
            return ChunkedWeightedLogProbSum.apply(hidden[rows], self.lm_head.weight, targets[rows],
                                                   loss_weights.reshape(-1)[rows], self.logprob_chunk, temperature)
        rows = token_mask.reshape(-1).nonzero().squeeze(1) if token_mask is not None else None
        if rows is not None:
            hidden, targets = hidden[rows], targets[rows]
        logp, entropy = ChunkedTokenLogProb.apply(hidden, self.lm_head.weight, targets, self.logprob_chunk, temperature)
        if rows is not None:  # scatter back (fresh tensors, not views: FSDP2 hooks backward onto outputs)
            logp, entropy = (torch.zeros(B * T, device=x.device).index_put((rows,), t) for t in (logp, entropy))
        return logp.view(B, T).clone(), entropy.view(B, T).clone()

    def setup_cache(self, slots, max_len, dtype=None, page_size=0, pages=0):
        """Give every attention module a static KV cache (reused when the shape is unchanged), marked as static
        addresses: a compiled decode step writes into it in place, and CUDA graphs are recorded only over tensors that
        never move. Dense (page_size 0): [slots, kv_heads, max_len, head_dim], a row per slot. Paged: a pool of `pages`
        pages of page_size positions, [kv_heads, pages * page_size, head_dim], shared by the slots through page_table
        [slots, max_len / page_size] (logical page j of slot s is pool page page_table[s, j]; page 0 is a sink that
        unassigned entries point at), with page_index [pages], each page's logical index in the slots that hold it (a
        prompt's full pages are held by all its samples, at the same index). The sampler assigns pages (kv_pages.Pages);
        decoding reads only a slot's own pages."""
        cfg, p = self.config, self.lm_head.weight
        dtype, kv = dtype or p.dtype, (cfg.num_key_value_heads, cfg.head_dim)
        shape = (kv[0], pages * page_size, kv[1]) if page_size else (slots, kv[0], max_len, kv[1])
        self.page_size = page_size
        if page_size:
            for name, size in (("page_table", (slots, -(-max_len // page_size))), ("page_index", (pages,))):
                self.register_buffer(name, torch.zeros(size, dtype=torch.long, device=p.device), persistent=False)
                torch._dynamo.mark_static_address(getattr(self, name))
        for layer in self.model.layers:
            attn = layer.self_attn
            if getattr(attn, "k_cache", None) is None or attn.k_cache.shape != shape or attn.k_cache.dtype != dtype:
                for name in ("k_cache", "v_cache"):
                    attn.register_buffer(name, torch.zeros(shape, device=p.device, dtype=dtype), persistent=False)
                    torch._dynamo.mark_static_address(getattr(attn, name))

    def decode_addressing(self, pos, kv_len=None):
        """pos [B]: the position each decoding row writes -> (where its K/V goes, the mask its query attends with).
        Dense: (pos, keep [B, 1, 1, kv_len]: positions <= pos). Paged: (pool positions [B], a BlockMask over the pool
        whose blocks are pages: row b reads only its pages 0..pos[b] / P, in their pool order, and within them the
        positions <= pos[b], so what a step reads grows with each row's own length, not the longest's). The pages
        before a row's last are full blocks (every position visible: the kernel skips mask_mod there), and only the
        last is a partial block, masked."""
        if not self.page_size:
            kv_len = kv_len or self.model.layers[0].self_attn.k_cache.shape[2]
            return pos, (torch.arange(kv_len, device=pos.device) <= pos[:, None])[:, None, None, :]
        P, table, index = self.page_size, self.page_table[:pos.shape[0]], self.page_index
        page = table.gather(1, (pos // P)[:, None]).squeeze(1)

        def visible(b, h, q_idx, kv_idx):  # kv_idx: a pool position; row b sees its own positions <= pos[b]
            j = index[kv_idx // P]  # the page's logical index; row b holds the page iff its table says so there
            return (table[b, j] == kv_idx // P) & (j * P + kv_idx % P <= pos[b])
        pages = index.shape[0]  # the block mask's indices span the pool (a slot never holds more than pages - 1)
        full = F.pad(table, (0, pages - table.shape[1])) if pages > table.shape[1] else table[:, :pages]
        last = F.pad(page[:, None], (0, pages - 1))  # [B, pages]: the page pos is in, then unused entries
        mask = BlockMask.from_kv_blocks(torch.ones_like(pos).int()[:, None, None], last.int()[:, None, None],
                                        (pos // P).int()[:, None, None], full.int()[:, None, None], BLOCK_SIZE=(128, P),
                                        mask_mod=visible, seq_lengths=(1, pages * P), **_NO_Q_BLOCKS)
        return page * P + pos % P, mask

    def move_cache_rows(self, src, dst):
        """Copy cache rows src -> dst (LongTensors) in every (dense) layer: the sampler packs running rows to the front."""
        for layer in self.model.layers:
            for c in (layer.self_attn.k_cache, layer.self_attn.v_cache):
                c.index_copy_(0, dst, c.index_select(0, src))


# BlockMask.from_kv_blocks also derives the transposed (query-block) indices that only a backward needs; newer torch
# lets decoding skip that
_NO_Q_BLOCKS = {"compute_q_blocks": False} if "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters else {}


def empty_model(cfg: ModelConfig, device="cpu", dtype=torch.float32) -> Transformer:
    """A Transformer with uninitialised weights: built on the meta device, allocated once in dtype on device."""
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)  # free on meta: the one real allocation is in `dtype`
    model = model.to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty breaks the tie; restore it
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def compile_blocks(model, backend="inductor"):
    """torch.compile each block for training (CUDA; before FSDP): norms, residual adds, RoPE and SwiGLU fuse. Blocks share
    code and take only tensors and the recompute flag, so a graph per value of the flag (recomputing inside it with
    checkpointing) serves all layers; sizes are dynamic from the first call (see forward: static first graphs passed
    Dynamo's recompile limit)."""
    for layer in model.model.layers:
        layer.compile(backend=backend)
    return model


def compute_dtype(model):
    """The dtype model's forward computes in: the precision policy's (training.load_for_training sets it; bf16 over fp32
    master weights), else its weights' own."""
    return model.compute_dtype or next(model.parameters()).dtype


def num_params(model):  # a model, or a config: counted on the meta device, nothing allocated
    if isinstance(model, ModelConfig):
        with torch.device("meta"):
            model = Transformer(model)
    return sum(p.numel() for p in model.parameters())
