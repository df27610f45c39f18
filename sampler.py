"""
sampler.py: batched, KV-cached autoregressive sampling for model.Transformer.

    generate(model, prompts, max_new_tokens, temperature, top_p, top_k, n, stop_ids, seed)

How it works (shapes for B prompts, n samples each, P = longest prompt, N = max_new_tokens):
1. Left-pad the prompts to [B, P] so every row writes its next token to the same cache slot. RoPE positions
   are per row (a pad count of p_i shifts row i's positions by -p_i) and `key_valid` [B, P+N] masks pads,
   so a short prompt in a ragged batch sees exactly what it would see alone.
2. Prefill the B prompts once into a static cache sized P+N (not the model's context length), then repeat
   each row n times: GRPO's n samples per judge prompt share one prefill.
3. Decode one token per step for the B*n rows. Sampling: logits / temperature, optional top-k and top-p
   (nucleus) truncation, a draw from a seeded generator; temperature 0 is greedy. Ids at or beyond the
   tokenizer's vocabulary (Qwen pads the embedding to 151936 rows) are never sampled.
4. A row that emits a stop id is finished (the stop id is kept in its output). Once a quarter of the
   running rows are finished, the batch is compacted (cache rows dropped), so finished rows stop costing.

Returns the generated ids of every sample in prompt-major order (prompt i, sample j at index i*n + j),
optionally with the log-probability of each sampled token under log_softmax(logits / temperature)
(before truncation; trainers recompute their own log-probs, this is for inspection and eval).
"""
import torch

from model import KVCache


def sample_next(logits, temperature, top_p, top_k, generator):
    """logits [R, V] fp32 -> token ids [R]."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        p = sorted_logits.softmax(-1)
        drop = p.cumsum(-1) - p > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    # inverse CDF: one uniform draw per row, where torch.multinomial draws one random number per vocabulary
    # entry (its exponential race), which dominates a small model's decode step on CPU. side="right" never
    # lands on a zero-probability token (a flat stretch of the CDF); a draw that float rounding pushes to
    # the total takes the last token with p > 0.
    probs = logits.softmax(-1)
    cdf = probs.cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, device=cdf.device, generator=generator) * cdf[:, -1:]
    last = probs.shape[1] - 1 - (probs.flip(-1) > 0).int().argmax(-1)
    return torch.minimum(torch.searchsorted(cdf, u, side="right").squeeze(1), last)


def _decode_step(model, tok, pos, key_valid, cache, slot):
    return model(tok, pos, key_valid, cache, cache_index=slot, kv_len=key_valid.shape[1], last_only=True)[:, -1].float()


_compiled = {}


def decode_step(model, *args):
    """The fixed-shape decode step under torch.compile (CUDA graphs via reduce-overhead on GPUs)."""
    if "fn" not in _compiled:
        mode = "reduce-overhead" if torch.cuda.is_available() else None
        _compiled["fn"] = torch.compile(_decode_step, dynamic=False, mode=mode)
    return _compiled["fn"](model, *args)


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, n=1, stop_ids=(),
             seed=None, vocab_size=None, return_logprobs=False, pad_id=0, compile=False):
    """compile=True runs the decode step under torch.compile with fixed shapes: the cache length is rounded
    up to a multiple of 256 and attended in full (masked), the slot index is a tensor, and the batch is
    not compacted, so one compiled graph (a CUDA graph on GPUs) serves every step of a call."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    was_training = model.training
    model.eval()
    device = model.lm_head.weight.device
    dtype = model.model.embed_tokens.weight.dtype
    vocab_size = vocab_size or model.config.vocab_size
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    B, P, N = len(prompts), max(len(p) for p in prompts), max_new_tokens
    if compile:  # bucket the padded prompt length so the cache shape repeats across calls
        P = -(-(P + N) // 256) * 256 - N

    # 1. left-pad; per-row positions and key validity
    ids = torch.full((B, P), pad_id, dtype=torch.long)
    key_valid = torch.zeros(B, P + N, dtype=torch.bool)
    lengths = torch.tensor([len(p) for p in prompts])
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        key_valid[i, P - len(p):] = True  # the P+N-P decode slots become real as they are written
    ids, key_valid, lengths = ids.to(device), key_valid.to(device), lengths.to(device)
    positions = (torch.arange(P, device=device)[None] - (P - lengths)[:, None]).clamp(min=0)

    # 2. prefill once per prompt, then share it across the n samples
    cache = KVCache(model.config, B, P + N, device, dtype)
    logits = model(ids, positions, key_valid, cache, cache_index=0, last_only=True)[:, -1].float()
    rows = torch.arange(B, device=device).repeat_interleave(n)
    cache.select(rows)
    logits, key_valid, lengths = logits[rows], key_valid[rows], lengths[rows]

    # 3-4. decode
    gen = torch.full((B * n, N), -1, dtype=torch.long, device=device)  # -1 = nothing generated here
    gen_lp = torch.zeros(B * n, N, device=device)
    row_ids = torch.arange(B * n, device=device)  # which output each running row belongs to
    done = torch.zeros(B * n, dtype=torch.bool, device=device)
    stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=device)
    for t in range(N):
        if vocab_size < logits.shape[-1]:
            logits[:, vocab_size:] = float("-inf")
        tok = sample_next(logits, temperature, top_p, top_k, generator)
        live = row_ids[~done]
        gen[live, t] = tok[~done]
        if return_logprobs:
            lp = torch.log_softmax(logits / (temperature or 1.0), -1).gather(1, tok[:, None]).squeeze(1)
            gen_lp[live, t] = lp[~done]
        done |= torch.isin(tok, stop)
        if t == N - 1 or bool(done.all()):
            break
        if not compile and done.sum() * 4 >= done.numel():  # compact: drop finished rows from the batch and the cache
            keep = (~done).nonzero().squeeze(1)
            cache.select(keep)
            tok, key_valid, lengths, row_ids, done = tok[keep], key_valid[keep], lengths[keep], row_ids[keep], done[keep]
        slot = P + t
        key_valid[:, slot] = True
        if compile:
            logits = decode_step(model, tok[:, None], (lengths + t)[:, None], key_valid, cache, torch.tensor(slot, device=device))
        else:
            logits = model(tok[:, None], (lengths + t)[:, None], key_valid, cache, cache_index=slot, last_only=True)[:, -1].float()
    counts = (gen >= 0).sum(1).tolist()
    out = [row[:c] for row, c in zip(gen.tolist(), counts)]
    out_lp = [row[:c] for row, c in zip(gen_lp.tolist(), counts)]
    model.train(was_training)
    return (out, out_lp) if return_logprobs else out
