"""
sampler.py: the KV-cached sampling engine with continuous batching (GRPO rollouts and evaluation).

    engine = Sampler(model, slots=S, max_len=L, compile=True)     # once per run
    outs = engine.generate(prompts, max_new_tokens, temperature, top_p, top_k, n, stop_ids, seed)

How it works (S slots, each holding one sequence in a static KV cache of L positions owned by the model):
1. Admission. Whenever n slots are free, the next waiting prompt is prefilled once (all prompts that fit, in
   right-padded causal forwards of at most prefill_tokens tokens) and its K/V goes to n slots: the n samples of a prompt
   share one prefill. A slot is left-aligned: position p holds token p, which is also its RoPE position.
   Each sample's first token is drawn from the prefill's logits at the prompt's last token.
2. Decode. One step feeds every slot of the current bucket one token: write K/V at the slot's position,
   attend to positions <= it, sample, store the token in the slot's output row, test for a stop id or the
   token budget. Attention reads only the first positions of the cache that cover every running slot (the
   smallest of max_len / 8, / 4, / 2, max_len when compiled): short traces never read a long cache whole. All
   of it is on the device in one fixed-shape function (decode_step), so compiled it is one graph per bucket, span,
   greedy or sampled, and stop-id count, replayed as a CUDA graph on GPUs (cache and slot state: static buffers).
3. Bookkeeping. Every `sync_every` steps the host reads which slots finished, collects their outputs and
   admits waiting prompts into the freed slots (continuous batching: a long trace holds up one slot, not a
   batch). When nothing waits and the running slots fit a smaller bucket, they are moved to the front and
   the step runs on that bucket: S, S/4, S/16, ... (>= 8) when compiled, so a run makes a few graphs, never
   one per batch size; the exact running count when eager (no graphs to keep).

Sampling: logits / temperature, optional top-k and top-p (nucleus), then the inverse CDF at one uniform
number per token. The uniform is a counter-based hash of (seed, sequence index, token index), drawn inside
the step, so a sequence's sample does not depend on its slot, its batch or the number of ranks.
Temperature 0 is greedy. Ids at or beyond the tokenizer's vocabulary (Qwen pads the embedding to 151936
rows) are never sampled.

Returns the generated ids of every sample, the stop id kept, in prompt-major order (prompt i, sample j at
index i*n + j); for greedy decoding they are the same whatever S, the order of admission or the buckets. With
logprobs=True also each sampled token's log-prob under the engine's own forward, log softmax(logits / temperature)
[token] over the model's whole vocabulary (before top-k / top-p and the tokenizer's limit: the quantity GRPO's training
forward computes): GRPO measures the sampler-trainer mismatch with it and corrects for it (grpo.rollout_is_weights).
"""
from collections import deque

import torch

import model as M


# splitmix64's constants as int64 (each is >= 2^63, so it wraps to a negative number)
_M1, _M2, _GOLDEN = (c - (1 << 64) for c in (0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0x9E3779B97F4A7C15))


def _mix(x):
    """splitmix64's finaliser on int64 tensors (multiplication wraps; logical shifts by masking)."""
    x = (x ^ ((x >> 30) & ((1 << 34) - 1))) * _M1
    x = (x ^ ((x >> 27) & ((1 << 37) - 1))) * _M2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def uniforms(seed, seq, t):
    """seed [] / seq [R] / t [R] int64 tensors -> one uniform number in [0, 1) per row, 24 random bits."""
    x = _mix(_mix(seed * _GOLDEN + seq) + t * _GOLDEN)
    return ((x >> 40) & 0xFFFFFF).float() * 2.0 ** -24


@torch.library.custom_op("rmr1::cumsum", mutates_args=())
def cumsum(x: torch.Tensor) -> torch.Tensor:
    """x.cumsum(-1), opaque to torch.compile: Inductor (torch 2.11, CUDA) fails to generate the split scan it picks
    for a 152k-wide row, so the compiled step calls ATen's kernel here instead (CUDA-graph safe, no host sync)."""
    return x.cumsum(-1)


cumsum.register_fake(torch.empty_like)  # its output's shape and dtype, for tracing


def token_logprob(logits, tok, temperature):
    """logits [R, V] fp32, tok [R] -> log softmax(logits / temperature)[tok] [R] (temperature 0: of the logits)."""
    z = logits / temperature if temperature not in (0, 1) else logits
    return z.gather(1, tok[:, None]).squeeze(1) - torch.logsumexp(z, -1)


def sample_next(logits, u, temperature, top_p, top_k):
    """logits [R, V] fp32, u [R] uniforms -> token ids [R]."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature if temperature != 1 else logits
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        p = sorted_logits.softmax(-1)
        drop = cumsum(p) - p > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    # inverse CDF: the first token whose CDF exceeds x = u * total (side="right"). That token has p > 0 (a
    # zero-probability token sits on a flat stretch of the CDF), and x is kept below the total so that float
    # rounding cannot push it past the last token with p > 0.
    cdf = cumsum(logits.softmax(-1))
    total = cdf[:, -1:]
    x = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, x, side="right").squeeze(1)


class Sampler:
    def __init__(self, model, slots, max_len, compile=False, sync_every=None, backend="inductor", memory_frac=None,
                 prefill_tokens=32768, group=1):
        """model: a plain (unsharded) Transformer; it gets a KV cache of `slots` x `max_len` (prompt + new tokens).
        compile: torch.compile the decode step (fullgraph, CUDA graphs on GPUs; backend "eager" lets CPU tests count
        compilations). sync_every: decode steps between host checks (CPU 1, CUDA 8). memory_frac (GPUs): fewer slots
        where their cache would pass this share of the GPU's memory, in whole groups of `group` (GRPO's n samples of a
        prompt are admitted together). prefill_tokens: the most (padded) prompt tokens one prefill forward runs."""
        device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
        if memory_frac and device.type == "cuda":
            budget = memory_frac * torch.cuda.get_device_properties(device).total_memory
            slots = min(slots, slots_that_fit(budget, model.config, max_len, dtype, group))
        self.model, self.slots, self.max_len, self.prefill_tokens = model, slots, max_len, prefill_tokens
        self.sync_every = sync_every or (8 if device.type == "cuda" else 1)
        model.setup_cache(slots, max_len)
        # per-slot state, written in place by the decode step: static addresses, like the cache
        zeros = lambda dtype: torch.zeros(slots, dtype=dtype, device=device)
        self.tok, self.pos, self.n_out, self.seq = zeros(torch.long), zeros(torch.long), zeros(torch.long), zeros(torch.long)
        self.done = torch.ones(slots, dtype=torch.bool, device=device)
        self.out = torch.zeros(slots, max_len + 1, dtype=torch.long, device=device)  # last column: finished rows' sink
        self.out_logp = torch.zeros(slots, max_len + 1, device=device)  # each output token's log-prob (fp32)
        self.seed, self.budget = torch.zeros((), dtype=torch.long, device=device), torch.zeros((), dtype=torch.long, device=device)
        for t in (self.tok, self.pos, self.n_out, self.seq, self.done, self.out, self.out_logp, self.seed, self.budget):
            torch._dynamo.mark_static_address(t)
        self.compiled, self.kv_spans = compile, [max_len >> k for k in (3, 2, 1, 0)]  # max_len / 8, / 4, / 2, max_len
        self.step = self.decode_step
        if compile:
            mode = "reduce-overhead" if device.type == "cuda" and backend == "inductor" else None
            graphs = 2 * len(self.buckets()) * len(self.kv_spans)  # one per (slots bucket, cache span, greedy or not)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, graphs + 2)
            self.step = torch.compile(self.decode_step, fullgraph=True, dynamic=False, mode=mode, backend=backend)

    @classmethod
    def for_policy(cls, policy, slots, max_len, compile=False, **engine_kw):
        """An engine over a plain copy of a training policy (possibly FSDP-sharded), in its compute dtype (bf16 on GPUs),
        with fused projections on GPUs (model.fuse_projections): the compiled step never meets FSDP hooks, and sampling
        reads the weights once per token, not per layer gather. load_weights refreshes the copy."""
        p = next(policy.parameters())
        copy = M.fuse_projections(M.empty_model(policy.config, p.device, M.compute_dtype(policy)))
        return cls(copy, slots, max_len, compile, **engine_kw)

    def load_weights(self, policy):
        M.copy_weights(policy, self.model)  # under FSDP every rank calls this (one all-gather per tensor)

    def buckets(self):
        sizes, b = [self.slots], self.slots // 4
        while b >= 8:
            sizes.append(b)
            b //= 4
        return sizes

    def decode_step(self, b, stop, temperature, top_p, top_k, vocab_size, kv_len=None):
        """One token for slots 0..b-1, entirely on the device (no host sync)."""
        logits = self.model(self.tok[:b, None], self.pos[:b, None], decode=True, kv_len=kv_len)[:, -1]  # [b, V] fp32
        drawable = logits
        if vocab_size < logits.shape[-1]:
            drawable = logits.masked_fill(torch.arange(logits.shape[-1], device=logits.device) >= vocab_size, float("-inf"))
        tok = sample_next(drawable, uniforms(self.seed, self.seq[:b], self.n_out[:b]), temperature, top_p, top_k)
        live = ~self.done[:b]
        column = torch.where(live, self.n_out[:b], self.out.shape[1] - 1)
        rows = torch.arange(b, device=tok.device)
        self.out[rows, column] = tok  # indexed: compiled in place, not a copy of out
        self.out_logp[rows, column] = token_logprob(logits, tok, temperature)
        self.n_out[:b] += live
        self.done[:b] |= (tok[:, None] == stop).any(-1) | (self.n_out[:b] >= self.budget)
        self.tok[:b] = tok
        self.pos[:b] = (self.pos[:b] + 1).clamp(max=self.max_len - 1)  # finished slots idle at the end

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, n=1, stop_ids=(), seed=0,
                 vocab_size=None, prompt_ids=None, continuous=True, logprobs=False):
        """prompt_ids: a global index per prompt (default 0..len-1): sample j of prompt i is sequence
        prompt_ids[i] * n + j for the random draws. continuous=False admits new prompts only when every slot
        is free (static batching, for comparison). -> token lists (logprobs: and their log-prob lists)."""
        longest = max((len(p) for p in prompts), default=0)
        if not prompts or min(len(p) for p in prompts) == 0:
            raise ValueError("generate: every prompt needs at least one token")
        if longest + max_new_tokens > self.max_len or n > self.slots:
            raise ValueError(f"generate: prompts up to {longest} tokens + {max_new_tokens} new and n={n} do not fit "
                             f"{self.slots} slots of {self.max_len} positions")
        was_training = self.model.training
        self.model.eval()
        device = self.tok.device
        vocab_size = vocab_size or self.model.config.vocab_size
        self.seed.fill_(seed)
        self.budget.fill_(max_new_tokens)
        self.done.fill_(True)
        stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=device)
        ids = list(range(len(prompts))) if prompt_ids is None else list(prompt_ids)
        waiting, owner = deque(range(len(prompts))), [-1] * self.slots  # owner: the output index a slot fills
        outputs, hi = [None] * (len(prompts) * n), 0  # hi: an upper bound on the positions in use
        out_logps = [None] * len(outputs)
        while waiting or max(owner) >= 0:
            free = [s for s in range(self.slots) if owner[s] < 0]
            if waiting and len(free) >= n and (continuous or len(free) == self.slots):
                take = [waiting.popleft() for _ in range(min(len(waiting), len(free) // n))]
                rows = free[:len(take) * n]
                self.admit([prompts[i] for i in take], [ids[i] for i in take], rows, n, temperature, top_p, top_k,
                           vocab_size, stop)
                for k, i in enumerate(take):
                    for j in range(n):
                        owner[rows[k * n + j]] = i * n + j
                hi = max(hi, max(len(prompts[i]) for i in take))
            elif not waiting:
                self.pack(owner)
            b = self.fit(max(s for s in range(self.slots) if owner[s] >= 0) + 1)
            for _ in range(self.sync_every):
                hi = min(hi + 1, self.max_len)
                self.step(b, stop, temperature, top_p, top_k, vocab_size, self.kv_span(hi))
            hi = self.collect(owner, b, outputs, out_logps)
        self.model.train(was_training)
        return (outputs, out_logps) if logprobs else outputs

    def kv_span(self, hi):
        """Cache positions a step attends to, covering those in use (< hi): hi eager, the smallest kv_span compiled."""
        return next(s for s in self.kv_spans if s >= hi) if self.compiled else hi

    def fit(self, k):
        """Slots the step runs on to cover slots 0..k-1: exactly k eager, the smallest bucket >= k compiled."""
        return min(x for x in self.buckets() if x >= k) if self.compiled else k

    def admit(self, prompts, prompt_ids, rows, n, temperature, top_p, top_k, vocab_size, stop):
        """Prefill prompts (right-padded, one forward) into slots `rows` (n per prompt) and draw first tokens."""
        device = self.tok.device
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        ids = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, :len(p)] = torch.tensor(p)
        rows_t, per = torch.tensor(rows, device=device), max(1, self.prefill_tokens // ids.shape[1])  # prompts per forward
        last = [self.model(ids[s:s + per].to(device), cache_rows=rows_t[s * n:(s + per) * n], head=False)  # [p, T, H]
                [torch.arange(len(ids[s:s + per]), device=device), lengths[s:s + per] - 1] for s in range(0, len(prompts), per)]
        logits = M.head_logits(torch.cat(last), self.model.lm_head.weight)  # [P, V] fp32 at each prompt's last token
        drawable = logits.masked_fill(torch.arange(logits.shape[-1], device=device) >= vocab_size, float("-inf"))
        seq = (torch.tensor(prompt_ids, device=device)[:, None] * n + torch.arange(n, device=device)).flatten()
        first = sample_next(drawable.repeat_interleave(n, 0), uniforms(self.seed, seq, torch.zeros_like(seq)),
                            temperature, top_p, top_k)
        self.tok.index_copy_(0, rows_t, first)
        self.pos.index_copy_(0, rows_t, lengths.repeat_interleave(n))
        self.seq.index_copy_(0, rows_t, seq)
        self.n_out.index_fill_(0, rows_t, 1)
        self.out[:, 0].index_copy_(0, rows_t, first)
        self.out_logp[:, 0].index_copy_(0, rows_t, token_logprob(logits.repeat_interleave(n, 0), first, temperature))
        self.done.index_copy_(0, rows_t, (first[:, None] == stop).any(-1) | (self.budget <= 1))

    def pack(self, owner):
        """Nothing waits: move the running slots to the front when that shrinks the step by a quarter or more."""
        running = [s for s in range(self.slots) if owner[s] >= 0]
        if not running or self.fit(len(running)) * 4 > self.fit(running[-1] + 1) * 3:
            return
        src, dst = torch.tensor(running, device=self.tok.device), torch.arange(len(running), device=self.tok.device)
        self.model.move_cache_rows(src, dst)
        for t in (self.tok, self.pos, self.n_out, self.seq, self.done, self.out, self.out_logp):
            t.index_copy_(0, dst, t.index_select(0, src))
        self.done[len(running):] = True
        owner[:] = [owner[s] for s in running] + [-1] * (self.slots - len(running))

    def collect(self, owner, b, outputs, out_logps):
        """Host check: copy out the outputs of finished slots and free them -> the highest position still in use."""
        done, pos = torch.stack([self.done[:b].long(), self.pos[:b]]).tolist()  # one device -> host copy
        finished = [s for s in range(b) if owner[s] >= 0 and done[s]]
        if finished:
            rows = torch.tensor(finished, device=self.tok.device)
            counts = self.n_out.index_select(0, rows).tolist()
            tokens = self.out.index_select(0, rows)[:, :max(counts)].tolist()
            logps = self.out_logp.index_select(0, rows)[:, :max(counts)].tolist()
            for s, c, t, lp in zip(finished, counts, tokens, logps):
                outputs[owner[s]], out_logps[owner[s]] = t[:c], lp[:c]
                owner[s] = -1
        return max((pos[s] for s in range(b) if owner[s] >= 0), default=0)


def slots_that_fit(budget_bytes, cfg, max_len, dtype, group=1):
    """The most slots, a multiple of group, whose KV cache (K and V, every layer, max_len positions) fits the budget."""
    per_slot = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * max_len * dtype.itemsize
    return int(budget_bytes // per_slot) // group * group


def generate(model, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, n=1, stop_ids=(), seed=0,
             vocab_size=None, compile=False):
    """One-off generation with an engine sized to this call (every prompt admitted at once)."""
    engine = Sampler(model, slots=len(prompts) * n, max_len=max(map(len, prompts), default=1) + max_new_tokens,
                     compile=compile)
    return engine.generate(prompts, max_new_tokens, temperature, top_p, top_k, n, stop_ids, seed, vocab_size)
