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
4. Paged cache (page_size > 0, as vLLM's): the cache is a pool of pages of page_size positions, and a slot holds only
   the pages its sequence has filled (kv_pages.py's Pages, on the host; the model reads them through a page table), so a
   short trace does not reserve max_len positions and a step reads each slot's own pages (FlexAttention, with the pages
   as the blocks of its mask), not the longest slot's span. The n samples of a prompt hold the pages its prompt fills
   whole once (GRPO's 7 samples of a 2k-token prompt: 2k positions of prompt, not 14k), and the whole pages of the
   opening all prompts of a call share (a judge template's system prompt) are held once for all of them
   (write_common_prefix). At each host check every running slot gets the pages of its next sync_every positions; when
   the pool runs dry the newest admitted sample is preempted: it lets go of its pages (those it shared go back when
   their last holder does) and waits at the front of the queue with its tokens, which are prefilled again, into pages of
   its own (past the common opening), when it returns. Its later draws are those it would have made (they are keyed by
   token index), so preemption changes no output.

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
import itertools
from collections import deque

import torch
import torch.distributed as dist

import model as M
from decode_model import copy_weights, fuse_projections, tensor_parallel_copy
from head import head_logits
from kv_pages import Pages


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
                 prefill_tokens=32768, group=1, page_size=0, pages=None):
        """model: a plain (unsharded) Transformer; it gets a KV cache for `slots` sequences of up to `max_len` positions
        (prompt + new tokens). compile: torch.compile the decode step (fullgraph, CUDA graphs on GPUs; backend "eager"
        lets CPU tests count compilations). sync_every: decode steps between host checks (CPU 1, CUDA 8). memory_frac
        (GPUs): the share of the GPU's memory the cache may take: dense, fewer slots, in whole groups of `group` (GRPO's
        n samples of a prompt are admitted together); paged, that many pages. prefill_tokens: the most (padded) prompt
        tokens one prefill forward runs. page_size > 0: a paged cache (see Pages) of `pages` pages (default: as many
        positions as the dense cache would hold), read through FlexAttention."""
        device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
        if page_size % 32 and compile and backend == "inductor" and device.type == "cpu":
            # torch's C++ FlexAttention kernel gave wrong attention for KV blocks of 8, 24, 40 and 56 positions (AVX2,
            # fp32; NaN at 8 in bf16), right for 16, 32, 48 and 64: refused, not sampled from wrong logits (GPUs: Triton)
            raise ValueError(f"page size {page_size}: compiled on a CPU, pages must be a multiple of 32 positions")
        budget = memory_frac * torch.cuda.get_device_properties(device).total_memory if memory_frac and device.type == "cuda" else 0
        if page_size:
            pages = pages or (int(budget // kv_bytes(model.config, page_size, dtype)) if budget else
                              slots * -(-max_len // page_size) + 1)
        elif budget:
            slots = min(slots, slots_that_fit(budget, model.config, max_len, dtype, group))
        self.model, self.slots, self.max_len, self.prefill_tokens = model, slots, max_len, prefill_tokens
        self.tp = getattr(model, "tp", (1, 0))  # (ranks, this rank's index) of a tensor-parallel copy
        self.sync_every = sync_every or (8 if device.type == "cuda" else 1)
        model.setup_cache(slots, max_len, page_size=page_size, pages=pages or 0)
        self.cache_layout = self.model_cache_layout()  # the model holds one engine's cache (see check_fits)
        self.pages = Pages(model, slots) if page_size else None
        self.admitted, self.admissions = [0] * slots, itertools.count(1)  # each slot's admission order (preemption)
        self.preemptions = 0  # samples sent back to the queue for want of pages, over the engine's life
        self.decode_steps = 0  # decode steps run (each over every slot in use), over the engine's life
        # per-slot state, written in place by the decode step: static addresses, like the cache
        zeros = lambda dtype: torch.zeros(slots, dtype=dtype, device=device)
        self.tok, self.pos, self.n_out, self.seq = zeros(torch.long), zeros(torch.long), zeros(torch.long), zeros(torch.long)
        self.done = torch.ones(slots, dtype=torch.bool, device=device)
        self.out = torch.zeros(slots, max_len + 1, dtype=torch.long, device=device)  # last column: finished rows' sink
        self.out_logp = torch.zeros(slots, max_len + 1, device=device)  # each output token's log-prob (fp32)
        self.seed, self.budget = torch.zeros((), dtype=torch.long, device=device), torch.zeros((), dtype=torch.long, device=device)
        for t in (self.tok, self.pos, self.n_out, self.seq, self.done, self.out, self.out_logp, self.seed, self.budget):
            torch._dynamo.mark_static_address(t)
        # attention spans of a dense cache: max_len / 8, / 4, / 2, max_len (a paged cache reads each slot's own pages)
        self.compiled, self.kv_spans = compile, [None] if page_size else [max_len >> k for k in (3, 2, 1, 0)]
        self.step = self.decode_step
        if compile:
            mode = "reduce-overhead" if device.type == "cuda" and backend == "inductor" else None
            graphs = 2 * len(self.buckets()) * len(self.kv_spans)  # one per (slots bucket, cache span, greedy or not)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, graphs + 2)
            self.step = torch.compile(self.decode_step, fullgraph=True, dynamic=False, mode=mode, backend=backend)

    @classmethod
    def for_policy(cls, policy, device, slots, max_len, compile=False, tp_group=None, **engine_kw):
        """An engine on `device` over a plain copy of a training policy (possibly FSDP-sharded, its shards possibly in
        host memory), in its compute dtype (bf16 on GPUs), with fused projections on GPUs (decode_model.py): the compiled
        step never meets FSDP hooks, and sampling reads the weights once per token, not per layer gather. load_weights
        refreshes the copy. tp_group: the copy is tensor parallel over that group's ranks, which then generate the same
        prompts together (in lockstep: the same calls give the same tokens, so the same host decisions)."""
        copy = tensor_parallel_copy(policy.config, device, M.compute_dtype(policy), tp_group)
        return cls(fuse_projections(copy), slots, max_len, compile, **engine_kw)

    def load_weights(self, policy):
        copy_weights(policy, self.model)  # under FSDP every rank calls this (one all-gather per tensor)

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
        # a finished slot stays where it is (a paged slot released at the host check then sits at position 0: its mask
        # lists one page, the sink, not pos / page_size of it)
        self.pos[:b] = (self.pos[:b] + live).clamp(max=self.max_len - 1)

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, n=1, stop_ids=(), seed=0,
                 vocab_size=None, prompt_ids=None, continuous=True, logprobs=False, stop_when=None, on_finish=None):
        """prompts: token ids (lists or arrays). prompt_ids: a global index per prompt (default 0..len-1): sample j of
        prompt i is sequence prompt_ids[i] * n + j for the random draws. continuous=False admits new prompts only when
        every slot is free (static batching, for comparison). stop_when: a function asked at every host check; once it
        says True the call gives up its work (the trainers: a stop signal) and returns None. on_finish(indices, outputs):
        called at each host check with the output indices that finished there (eval.py writes their rows as they come, so
        a killed run loses only the sequences still running); an output handed over is not kept (a benchmark's need not
        all stay in memory), and is None in what the call returns. -> token lists (logprobs: and their log-prob lists)."""
        self.check_fits(prompts, max_new_tokens, n)
        was_training = self.model.training
        self.model.eval()
        device = self.tok.device
        draw = (temperature, top_p, top_k, vocab_size or self.model.config.vocab_size)
        self.seed.fill_(seed)
        self.budget.fill_(max_new_tokens)
        self.done.fill_(True)
        self.pos.zero_()
        stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=device)
        ids = list(range(len(prompts))) if prompt_ids is None else list(prompt_ids)
        # waiting: a prompt's index (n samples to start), or a preempted sample (output index, tokens, log-probs)
        waiting, owner = deque(range(len(prompts))), [-1] * self.slots  # owner: the output index a slot fills
        outputs, hi, pos = [None] * (len(prompts) * n), 0, [0] * self.slots  # hi: an upper bound on positions in use
        out_logps = [None] * len(outputs)
        if self.pages:
            self.pages.peak = 0
            self.write_common_prefix(prompts)
        while waiting or max(owner) >= 0:
            free = [s for s in range(self.slots) if owner[s] < 0]
            if waiting and (continuous or len(free) == self.slots):
                hi = max(hi, self.admit_waiting(waiting, free, owner, prompts, ids, n, draw, stop))
            if not waiting:
                self.pack(owner)
            b = self.fit(max(s for s in range(self.slots) if owner[s] >= 0) + 1)
            for _ in range(self.sync_every):
                hi = min(hi + 1, self.max_len)
                self.step(b, stop, *draw, self.kv_span(hi))
            self.decode_steps += self.sync_every
            hi, finished = self.collect(owner, b, outputs, out_logps, pos)
            if on_finish and finished:
                on_finish(finished, outputs)
                for i in finished:
                    outputs[i] = out_logps[i] = None
            if stop_when and self.all_agree(stop_when()):  # the running samples let go of their pages
                for s in (s for s in range(self.slots) if owner[s] >= 0 and self.pages):
                    self.pages.release(s)
                outputs = None
                break
            if self.pages:
                self.reserve(owner, pos, waiting)
        if self.pages:
            self.pages.drop_prefix()
        self.model.train(was_training)
        return None if outputs is None else (outputs, out_logps) if logprobs else outputs

    def model_cache_layout(self):  # the model's KV cache as this engine set it up: where it is, its shapes, its pages
        k = self.model.model.layers[0].self_attn.k_cache
        return k.data_ptr(), tuple(k.shape), self.model.page_size, tuple(getattr(self.model, "page_table", k).shape)

    def check_fits(self, prompts, max_new_tokens, n):
        """Refuse a call the cache cannot finish: a cache another engine over the model has since replaced, an empty
        prompt, a sequence past max_len, more samples than slots, or a page pool too small for n samples of the longest
        prompt or for its one sequence."""
        longest = max((len(p) for p in prompts), default=0)
        if self.model_cache_layout() != self.cache_layout:  # else a shape error deep in attention, or pages misread
            raise RuntimeError("generate: another Sampler made over this model since gave it a KV cache of its own layout "
                               "(a model holds one); make this Sampler again")
        if not prompts or min(len(p) for p in prompts) == 0:
            raise ValueError("generate: every prompt needs at least one token")
        if longest + max_new_tokens > self.max_len or n > self.slots:
            raise ValueError(f"generate: prompts up to {longest} tokens + {max_new_tokens} new and n={n} do not fit "
                             f"{self.slots} slots of {self.max_len} positions")
        if self.pages and not self.pages.can_progress(n, longest, self.sync_every, self.ahead(longest + max_new_tokens)):
            raise ValueError(f"generate: a pool of {self.pages.pool} KV pages of {self.pages.size} positions is too small for "
                             f"{n} samples of a {longest}-token prompt, or for one sequence of {longest + max_new_tokens}")

    def all_agree(self, flag):
        """The ranks of a tensor-parallel copy decode in lockstep (an all-reduce a layer): one that stops, all do."""
        if self.tp[0] == 1:
            return flag
        flag = torch.tensor(float(flag), device=self.tok.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.model.tp_group)
        return bool(flag.item())

    def ahead(self, length):
        """Paged: the positions a sequence of `length` needs pages for until the next host check."""
        return min(length + self.sync_every, self.max_len)

    def write_common_prefix(self, prompts):
        """Paged: the whole pages of the opening every prompt shares (a judge template's system prompt) are written once,
        by a forward of that opening alone, and held for the call: every sample reads them (Pages.grow hands them out),
        and prefills run only what follows them, attending to them in the cache (model.cached_prefix): the opening's
        pages and its prefill are paid once a call, not once a prompt."""
        self.pages.drop_prefix()  # (a call cut short leaves its own)
        # whole pages, leaving every prompt a token of its own to prefill; all prompts share what the least and the
        # greatest share (os.path.commonprefix's way, for lists or arrays of ids)
        first, last = min(prompts), max(prompts)
        common = next((i for i, (a, b) in enumerate(zip(first, last)) if a != b), len(first))
        k = min(common, min(map(len, prompts)) - 1) // self.pages.size if len(prompts) > 1 else 0
        if not k:
            return
        self.pages.hold_prefix(k)
        self.pages.held[0] = list(self.pages.prefix)  # lent to slot 0 (free now) for the forward's writes
        self.pages.rows.add(0)
        self.pages.flush()
        self.prefill([prompts[0][:k * self.pages.size]], torch.tensor([0], device=self.tok.device), 1)
        self.pages.held[0] = []
        self.pages.rows.add(0)
        self.pages.flush()
        self.model.cached_prefix = k * self.pages.size

    def kv_span(self, hi):
        """Dense cache positions a step attends to, covering those in use (< hi): hi eager, the smallest kv_span compiled."""
        return None if self.pages else next(s for s in self.kv_spans if s >= hi) if self.compiled else hi

    def fit(self, k):
        """Slots the step runs on to cover slots 0..k-1: exactly k eager, the smallest bucket >= k compiled."""
        return min(x for x in self.buckets() if x >= k) if self.compiled else k

    def admit_waiting(self, waiting, free, owner, prompts, ids, n, draw, stop):
        """Admit waiting work in order while free slots (and KV pages) last: a prompt takes n slots and one prefill, a
        preempted sample one slot -> the longest sequence admitted (0: none)."""
        new, resumed, longest = [], [], 0
        while waiting:
            item = waiting[0]
            fresh = isinstance(item, int)  # a prompt's index, else a preempted sample (output index, tokens, log-probs)
            length = len(prompts[item]) if fresh else len(prompts[item[0] // n]) + len(item[1]) - 1
            rows = free[:n if fresh else 1]
            shared = length // self.pages.size if self.pages and fresh else 0  # the prompt's full pages, held once
            if len(rows) < (n if fresh else 1) or (self.pages and not self.pages.grow(rows, self.ahead(length), shared)):
                break
            waiting.popleft()
            free, longest = free[len(rows):], max(longest, length)
            (new if fresh else resumed).append((item, rows))
            for j, s in enumerate(rows):
                owner[s] = item * n + j if fresh else item[0]
                self.admitted[s] = next(self.admissions)
        if self.pages:
            self.pages.flush()
        if new:
            self.admit([prompts[i] for i, _ in new], [ids[i] for i, _ in new], [s for _, r in new for s in r], n, *draw, stop)
        for (o, tokens, logps), (s,) in resumed:
            self.resume(s, list(prompts[o // n]) + tokens[:-1], tokens, logps, ids[o // n] * n + o % n)
        return longest

    def prefill(self, seqs, rows, n):
        """Run sequences right-padded (at most prefill_tokens per forward), each one's K/V to its n cache rows `rows`
        [len(seqs) * n] -> each sequence's last hidden state [len(seqs), H]. Paged, a common prefix already in the
        cache (model.cached_prefix, C positions) is not run again: the rows start at position C and attend to it."""
        device, C = self.tok.device, self.model.cached_prefix
        lengths = torch.tensor([len(p) - C for p in seqs], device=device)
        ids = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
        for i, p in enumerate(seqs):
            ids[i, :len(p) - C] = torch.tensor(p[C:])
        positions = C + torch.arange(ids.shape[1], device=device).expand(ids.shape)
        per = max(1, self.prefill_tokens // ids.shape[1])  # sequences per forward
        return torch.cat([self.model(ids[s:s + per].to(device), positions[s:s + per], cache_rows=rows[s * n:(s + per) * n],
                                     head=False)[torch.arange(len(ids[s:s + per]), device=device), lengths[s:s + per] - 1]
                          for s in range(0, len(seqs), per)])  # [p, T, H] -> [p, H]

    def admit(self, prompts, prompt_ids, rows, n, temperature, top_p, top_k, vocab_size, stop):
        """Prefill prompts into slots `rows` (n per prompt: one prefill for the n samples) and draw first tokens."""
        device = self.tok.device
        rows_t, lengths = torch.tensor(rows, device=device), torch.tensor([len(p) for p in prompts], device=device)
        logits = head_logits(self.prefill(prompts, rows_t, n), self.model.lm_head.weight)  # [P, V] fp32, last tokens
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

    def resume(self, slot, seq_ids, tokens, logps, seq):
        """A preempted sample back into `slot`: its prompt and tokens but the last (seq_ids) are prefilled, and the step
        goes on from its last drawn token, as if it had never left (its random draws are keyed by token index)."""
        self.prefill([seq_ids], torch.tensor([slot], device=self.tok.device), 1)
        k = len(tokens)
        for t, value in ((self.tok, tokens[-1]), (self.pos, len(seq_ids)), (self.n_out, k), (self.seq, seq), (self.done, False)):
            t[slot] = value
        self.out[slot, :k] = torch.tensor(tokens)
        self.out_logp[slot, :k] = torch.tensor(logps)

    def pack(self, owner):
        """Nothing waits: move the running slots to the front when that shrinks the step by a quarter or more."""
        running = [s for s in range(self.slots) if owner[s] >= 0]
        if not running or self.fit(len(running)) * 4 > self.fit(running[-1] + 1) * 3:
            return
        src, dst = torch.tensor(running, device=self.tok.device), torch.arange(len(running), device=self.tok.device)
        if self.pages:  # a paged slot's K/V stays where it is: only its pages change hands
            self.pages.move(running)
            self.pages.flush()
        else:
            self.model.move_cache_rows(src, dst)
        for t in (self.tok, self.pos, self.n_out, self.seq, self.done, self.out, self.out_logp):
            t.index_copy_(0, dst, t.index_select(0, src))
        self.done[len(running):], self.pos[len(running):] = True, 0
        owner[:] = [owner[s] for s in running] + [-1] * (self.slots - len(running))
        self.admitted[:] = [self.admitted[s] for s in running] + [0] * (self.slots - len(running))

    def collect(self, owner, b, outputs, out_logps, pos):
        """Host check: copy out the outputs of finished slots and free them (and their pages); pos[s] <- each slot's
        position -> (the highest position still in use, the output indices that finished)."""
        done, pos[:b] = torch.stack([self.done[:b].long(), self.pos[:b]]).tolist()  # one device -> host copy
        finished, indices = [s for s in range(b) if owner[s] >= 0 and done[s]], []
        if finished:
            rows = torch.tensor(finished, device=self.tok.device)
            counts = self.n_out.index_select(0, rows).tolist()
            self.pos.index_fill_(0, rows, 0)  # idle from now on (see decode_step)
            tokens = self.out.index_select(0, rows)[:, :max(counts)].tolist()
            logps = self.out_logp.index_select(0, rows)[:, :max(counts)].tolist()
            for s, c, t, lp in zip(finished, counts, tokens, logps):
                outputs[owner[s]], out_logps[owner[s]] = t[:c], lp[:c]
                indices.append(owner[s])
                owner[s] = -1
                if self.pages:
                    self.pages.release(s)
        return max((pos[s] for s in range(b) if owner[s] >= 0), default=0), indices

    def reserve(self, owner, pos, waiting):
        """Paged: pages for every running slot's next sync_every positions, oldest admitted first. Where the pool runs
        dry, the newest admitted sample goes back to the front of the queue with its tokens so far (preempted; resume
        re-prefills them), until the rest fit: the oldest always go on, and one sequence always fits (can_progress)."""
        running = sorted((s for s in range(self.slots) if owner[s] >= 0), key=lambda s: self.admitted[s])
        for s in running:
            while owner[s] >= 0 and not self.pages.grow([s], self.ahead(pos[s])):
                victim = max((r for r in running if owner[r] >= 0), key=lambda r: self.admitted[r])
                k = int(self.n_out[victim])
                waiting.appendleft((owner[victim], self.out[victim, :k].tolist(), self.out_logp[victim, :k].tolist()))
                owner[victim], self.preemptions = -1, self.preemptions + 1
                self.done[victim], self.pos[victim] = True, 0
                self.pages.release(victim)
        self.pages.flush()


# ----------------------------------------------------------------------------- the KV cache's size

def kv_bytes(cfg, positions, dtype):
    """The KV cache of `positions` positions (a page, a dense slot): K and V, every layer."""
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * positions * dtype.itemsize


def slots_that_fit(budget_bytes, cfg, max_len, dtype, group=1):
    """The most slots, a multiple of group, whose KV cache (max_len positions each) fits the budget."""
    return int(budget_bytes // kv_bytes(cfg, max_len, dtype)) // group * group


def generate(model, prompts, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, n=1, stop_ids=(), seed=0,
             vocab_size=None, compile=False):
    """One-off generation with an engine sized to this call (every prompt admitted at once)."""
    engine = Sampler(model, slots=len(prompts) * n, max_len=max(map(len, prompts), default=1) + max_new_tokens,
                     compile=compile)
    return engine.generate(prompts, max_new_tokens, temperature, top_p, top_k, n, stop_ids, seed, vocab_size)
