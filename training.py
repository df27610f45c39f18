"""
training.py: the plumbing the scripts share (sft.py, grpo.py, eval.py), so no trainer imports another.

  add_run_flags       the flags both trainers take: where a run lives, precision, compile, recompute, offload
  setup_distributed   rank, world size and device; a process group whenever FSDP runs (NCCL, or gloo on CPU), whose
                      collectives wait --dist-timeout minutes for the slowest rank
  precision_of        --precision: bf16 (the GPU policy below; default on CUDA) or fp32 (default elsewhere)
  load_for_training   the precision policy and sharding: FSDP2 over meta-device init, each rank loads its shard;
                      --offload keeps the shards, their gradients and AdamW's moments in host memory
  check_host_memory   --offload: refuse a host without the memory for its ranks' shards, before loading
  all_reduce_sum/max  lists of floats summed / maxed over ranks (barrier: every rank waits); gpu_peak_gib
  all_gather_arrays   every rank's token ids or log-probs, on every rank (GRPO's rollout, so ranks can share its training)
  grad_ckpt_flag, fit_recompute  which blocks recompute their activations in backward (auto: as memory needs)
  accumulate_gradients  one GPU: weights stay gathered between micro-batches, one fp32 gradient reduction per step
  idle_backward       what a rank with fewer SFT micro-batches runs to keep FSDP's collectives matched
  clip_grad_norm      grad-norm clipping, returning the global norm as a float
  train_flops, gpu_peaks  a forward+backward's model FLOPs, and the GPU's peaks: MFU
  micro_batch_plan    GRPO's update shared out over the ranks by tokens, so none waits long at FSDP's collectives
                      (group_slices, packed_tokens; train_balance: how evenly)
  stop_if_not_finite (divergence: nothing non-finite is saved), epoch_batch, lr_at, make_optimizer, check_vocab
  cli                 a script's main: one-line errors; catch_stop_signals: SIGTERM / SIGUSR1 noted while steps run
What a run writes (its directory, saved state, output model) is rundir.py's.

The precision policy is the same for every world size. bf16 (CUDA's default): fp32 master weights and AdamW
moments, bf16 compute (FSDP2's MixedPrecisionPolicy casts the gathered weights), fp32 gradient reduction, a bf16
rollout copy, and fp32 logits straight from the output head's matmul (head.head_logits); one GPU runs FSDP2 over a
one-rank process group (one unit where it fits), so single-GPU and multi-GPU runs take the same code path. fp32
(the CPU's default): fp32 throughout (FSDP2 over gloo with more than one rank, the plain model with one).
`--precision bf16` on CPU runs the GPU policy there (one-rank FSDP2 over gloo), so its numerics can be studied
without a GPU (toy.py's grid).

--offload (FSDP2's CPUOffloadPolicy): each rank's fp32 shards, their gradients and AdamW's moments live in host memory,
and AdamW steps there (fused, on the CPU). Every gather (forward, and backward's again) first copies the block's shard
to the GPU, and every backward copies the reduced gradients back: 16 bytes a parameter, over the ranks, leave each GPU
(weights, gradients, moments), for host-GPU copies at every micro-batch. For models whose training state does not fit
beside the rollout copy and its KV cache (README: 14B GRPO on 8 GPUs). The process group then has gloo beside NCCL
(cpu:gloo,cuda:nccl): the gradient norm of shards in host memory is reduced over gloo.
"""
import argparse
import functools
import itertools
import math
import os
import signal
import sys
import time
import traceback
from array import array
from datetime import timedelta

import torch
import torch.distributed as dist

import checkpoint
import model as M


def precision_of(flag, device):  # --precision's default: the GPU policy on CUDA, fp32 elsewhere
    return flag or ("bf16" if device.type == "cuda" else "fp32")


def uses_fsdp(world, device, precision=None):  # bf16 on one CPU process too: its mixed precision is FSDP2's
    return world > 1 or device.type == "cuda" or precision_of(precision, device) == "bf16"


def compile_wanted(flag, device):
    return flag if flag is not None else device.type == "cuda"  # --compile's default: on with CUDA


def add_run_flags(ap, compiles):
    """The flags both trainers take, about where a run lives and how it runs rather than what it learns."""
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir (default: --model)")
    ap.add_argument("--out", default=None, help="the run's directory (toy: runs/toy/sft or runs/toy/grpo)")
    ap.add_argument("--overwrite", action="store_true", help="start over in an --out that holds another run")
    ap.add_argument("--resume", nargs="?", const=True, default=False, type=resume_flag, help="continue the run in --out "
                    "from its last saved state; `--resume auto`: that if it has one, else start it (a job run again after a "
                    "requeue)")
    ap.add_argument("--stop-after-steps", type=int, default=0, help="stop (resumably) after this many steps in this run")
    ap.add_argument("--stop-after-minutes", type=float, default=0, help="stop (resumably, saving) where another step and "
                    "a save, each as long as the longest so far, would end past this many minutes of this run (a job's "
                    "limit); it saves after the first step too, to measure a save")
    ap.add_argument("--save-model-every", type=int, default=0, help="also keep the model in Hugging Face layout every N "
                    "steps, in OUT/models/step-N (0: only the final OUT/model)")
    ap.add_argument("--save-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="dtype of the saved model (default: the starting checkpoint's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", default=None, choices=["bf16", "fp32"],
                    help="bf16: bf16 compute (and rollouts) over fp32 master weights (CUDA's default; on CPU it simulates "
                         "a GPU run's numerics); fp32: fp32 throughout (the CPU's default)")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help=f"torch.compile {compiles} (default: on with CUDA)")
    ap.add_argument("--grad-ckpt", type=grad_ckpt_flag, default=None, help="blocks that recompute their activations in "
                    "backward: all, none, N, or auto: all, then after two steps as few as memory needs [auto; toy none]")
    ap.add_argument("--offload", action="store_true", help="keep the fp32 weights, gradients and AdamW moments in host "
                    "memory, AdamW stepping on the CPU (needs FSDP: a GPU, more than one rank, or --precision bf16)")
    add_dist_timeout_flag(ap)


def add_dist_timeout_flag(ap):  # the trainers' and eval.py's
    ap.add_argument("--dist-timeout", type=float, default=60.0, help="minutes a collective waits for the slowest rank "
                    "before the run is ended (setup_distributed: NCCL's default, 10, ends runs whose ranks' shares differ more)")


def resume_flag(value):  # --resume alone is True; --resume auto
    if value != "auto":
        raise argparse.ArgumentTypeError(f"--resume takes no value, or auto; got {value!r}")
    return value


def setup_distributed(cpu=False, precision=None, offload=False, timeout_minutes=60.0):
    """-> (rank, world, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain `python` run is rank 0 of 1.
    cpu: stay on the CPU where CUDA is available too (the toy: tuned in fp32 on CPU kernels, see toy.py). offload: the
    GPUs' process group also gets gloo, for collectives over shards in host memory. timeout_minutes (--dist-timeout):
    how long a collective waits for the slowest rank before the process is ended. The ranks wait for each other after
    work whose length differs by rank (a rollout's or a judging's share of long traces, rank 0's save of the model),
    and NCCL's own default, 10 minutes, would end such a run; a real hang is then found after this long instead."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available() and not cpu:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # a matmul left in fp32 (none in the model itself) uses TF32
    else:
        device = torch.device("cpu")
    if uses_fsdp(world, device, precision) and not dist.is_initialized():  # one GPU: a one-rank group (over a HashStore)
        store = dict(store=dist.HashStore(), rank=0, world_size=1) if world == 1 else {}
        backend = "gloo" if device.type != "cuda" else "cpu:gloo,cuda:nccl" if offload else "nccl"
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes), **store)
    return rank, world, device


def load_for_training(path, world, device, trainable=True, compile=False, grad_ckpt="none", precision=None, offload=False):
    """Load a checkpoint under the precision policy above (precision: the --precision flag). With FSDP the model is
    built on the meta device, sharded (each block, then the root), allocated on the device (in host memory with
    offload), and each rank reads the safetensors one tensor at a time and keeps only its shard: no rank ever holds a
    full fp32 copy. A frozen model (trainable=False, GRPO's reference) keeps its shards in bf16 under bf16: it is
    computed in bf16 anyway."""
    bf16 = precision_of(precision, device) == "bf16"
    if not uses_fsdp(world, device, precision):
        model = checkpoint.load_model(path, device, torch.float32)
        if compile:
            M.compile_blocks(model)
    else:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
        from torch.distributed.tensor import distribute_tensor
        with torch.device("meta"):
            model = M.Transformer(checkpoint.load_config(path))
        if bf16:
            model = model.to(torch.float32 if trainable else torch.bfloat16)
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        else:
            model, mp = model.to(torch.float32), MixedPrecisionPolicy()
        if compile:
            M.compile_blocks(model)  # before sharding, as FSDP2 expects
        # a unit per block, then the root (backward starts with its head: kept gathered). One rank where the whole
        # model's bf16 weights and gradients fit beside its state and an fp32 gradient sum (28 bytes a parameter, in
        # 58% of the GPU) shards the root alone: per-block units only add host time there (1.5B: 23.8% -> 28.6% MFU).
        # Offloaded, units stay per block, so the GPU holds one block's weights at a time
        memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else math.inf
        one_unit = world == 1 and 48 * M.num_params(model) < memory and not offload
        policy = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy()  # pinned: async copies
        for block in model.model.layers if not one_unit else ():
            fully_shard(block, mp_policy=mp, offload_policy=policy)
        # the root stays gathered from forward to backward; a frozen model's (no backward) is freed after each forward,
        # or its embeddings and head (2.2 GB at 7B, 3.1 GB at 14B) would stay gathered for the rest of the run
        fully_shard(model, mp_policy=mp, offload_policy=policy, reshard_after_forward=not trainable)
        model.to_empty(device="cpu" if offload else device)
        checkpoint.load_weights(model, path, place=lambda p, t: distribute_tensor(t.to(device, p.dtype), p.device_mesh,
                                                                         p.placements, src_data_rank=None))
        model.accumulate_gathered = one_unit and trainable  # see accumulate_gradients
        model.offloaded = offload  # make_optimizer: AdamW steps on the CPU
    model.compute_dtype = torch.bfloat16 if bf16 else torch.float32  # what the forward runs in (model.compute_dtype)
    layers, blocks = len(model.model.layers), grad_ckpt_flag(str(grad_ckpt))  # refuses a bool (True would be 1 block)
    model.recompute_blocks = min(layers, {"none": 0, "all": layers, "auto": layers}.get(blocks, blocks))
    return model.train(trainable).requires_grad_(trainable)


def host_memory_available():  # bytes the kernel can hand out without swapping (MemAvailable); None without /proc
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def state_shard_bytes(world, frozen_bytes=0):
    """Bytes a parameter of one rank's training state: its shard of the fp32 weights, gradients and AdamW's two moments
    (16 bytes) and of a frozen reference (frozen_bytes: 2 in bf16) over the world's ranks. Held on the GPU, or in host
    memory with --offload (check_host_memory)."""
    return (16 + frozen_bytes) / world


def check_host_memory(path, world, frozen_bytes=0):
    """--offload, before loading: this host's ranks keep their shards of the fp32 weights, gradients and AdamW's two
    moments in its memory (16 bytes a parameter over all ranks), and of a frozen reference (frozen_bytes a parameter:
    2 in bf16). Where even that exceeds the available memory, the run would fail late (pinning, or the kernel's OOM
    killer ending a rank without a message): it is refused now. The processes' own memory is not counted."""
    params = M.num_params(checkpoint.load_config(path))
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    need, available = state_shard_bytes(world, frozen_bytes) * params * ranks_here, host_memory_available()
    if available is not None and need > available:
        raise SystemExit(f"--offload: the {ranks_here} rank(s) on this host need {need / 1e9:.1f} GB of host memory for "
                         f"their shards of {params / 1e9:.2f}B parameters ({16 + frozen_bytes} bytes each over {world} "
                         f"ranks), and {available / 1e9:.1f} GB is available: use more hosts, or a host with more memory")


def grad_ckpt_flag(value):  # --grad-ckpt: all, none, auto (see fit_recompute) or how many blocks recompute
    if value not in ("all", "none", "auto") and not value.isdigit():
        raise argparse.ArgumentTypeError(f"all, none, auto or a number of blocks, got {value!r}")
    return int(value) if value.isdigit() else value


def fit_recompute(model, flag, steps_run, max_tokens, device, frac=0.9):
    """--grad-ckpt auto, after a run's first two steps (every block recomputed, AdamW's moments allocated): keep as many
    blocks' activations as fit in frac of the GPU beside their peak, less the hidden states and one block's recompute
    again at max_tokens (the longest micro-batch: theirs may have been shorter). A kept block holds 3 x intermediate +
    6.5 x hidden bf16 values a token compiled, 5 x + 4.7 x eager (CPU, 1.5B's widths); this counts 5 x + 8 x. -> line|None"""
    if flag != "auto" or device.type != "cuda" or steps_run != 2:
        return None
    cfg, layers, peak = model.config, len(model.model.layers), torch.cuda.max_memory_reserved(device)
    per_block = max_tokens * 2 * (5 * cfg.intermediate_size + 8 * cfg.hidden_size)
    spare = frac * torch.cuda.mem_get_info(device)[1] - peak - per_block - max_tokens * 2 * layers * cfg.hidden_size
    keep = -all_reduce_max([-max(0, spare // per_block)], device)[0]  # the fewest any rank can keep
    model.recompute_blocks = max(0, layers - int(keep))
    return (f"--grad-ckpt auto: {model.recompute_blocks} of {layers} blocks recompute (peak {peak / 2**30:.1f} GiB after "
            f"two steps, {per_block / 2**30:.2f} GiB a block kept at {max_tokens} tokens)")


def accumulate_gradients(model, last):
    """Before each micro-batch's backward (last: the step's last). One unit on one GPU keeps its bf16 weights gathered
    and sums its gradients unsharded in fp32 until the last micro-batch reduces them (FSDP2's no_sync); more ranks
    reduce-scatter every backward. Regathering and reducing took 30 of 174 ms of a profiled 1.5B 4k-token H100 step."""
    if getattr(model, "accumulate_gathered", False):
        model.set_requires_gradient_sync(last)
        model.set_reshard_after_backward(last)
        model.gradients_unreduced = not last  # clip_grad_norm refuses a step whose last backward did not reduce


def gpu_peak_gib(device):
    """The most GPU memory any rank's allocator has held so far (what running out depends on), GiB; 0 on the CPU."""
    held = torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else 0.0
    return all_reduce_max([held], device)[0]


GPU_PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12), "A100": (312e12, 2.0e12)}  # bf16 dense FLOP/s, HBM B/s


def gpu_peaks(device):  # this GPU's (bf16 dense FLOP/s, HBM bytes/s) by its name, or (None, None): a CPU, or not listed
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((v for k, v in GPU_PEAKS.items() if k in name), (None, None))


def train_flops(model, segments):
    """Model FLOPs of one forward+backward (MFU's numerator; recomputation not counted) over segments (context, length):
    `length` tokens that attend to `context` tokens before them and causally to each other (a sequence alone: (0, its
    length); a GRPO response packed after its prompt: (the prompt tokens before it, its length)). 6 a token and matmul
    weight (an untied input embedding is a lookup: not counted), and 12 x layers x (heads x head_dim) a query-key pair
    (QK^T and AV, 2 FLOPs a multiply-add, x3 with the backward): length x context + length^2 / 2 pairs a segment."""
    cfg = model.config
    weights = M.num_params(model) - (0 if cfg.tie_word_embeddings else model.model.embed_tokens.weight.numel())
    tokens, pairs = sum(n for _, n in segments), sum(n * c + n * n / 2 for c, n in segments)
    return 6 * weights * tokens + 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * pairs


def micro_batch_plan(prompt_lens, lengths, n, minibatch_prompts, micro_seqs, world):
    """The step's micro-batches -> plans[r][m]: rank r's micro-batches of mini-batch m in order, each a list of sequence
    indices g * n + j (response j of group g; prompt_lens [G], lengths [G * n]). A micro-batch costs about its packed rows'
    tokens, and at every forward each rank waits for the slowest (FSDP's collectives), so per mini-batch:
    1. items: whole groups (micro_seqs >= n), or each group in k = ceil(n / micro_seqs) slices (group_slices);
    2. the items, most tokens first, are cut in order into rounds of at most world x per items (per = micro_seqs // n
       groups, or one slice), as few rounds as that allows: like lengths share a round, so its rows pad little;
    3. a round is one micro-batch for each rank: its items go, in order, each to the one with the fewest tokens so far
       that has room. Rank r's i-th micro-batch is from round i, so every rank runs as many, each about as long."""
    k = -(-n // micro_seqs)
    per = max(1, micro_seqs // n) if k == 1 else 1
    tokens = lambda seqs: packed_tokens(prompt_lens, lengths, n, seqs)
    plans = [[] for _ in range(world)]
    for first in range(0, len(prompt_lens), minibatch_prompts):
        items = sorted((s for g in range(first, first + minibatch_prompts) for s in group_slices(g, n, k, lengths)),
                       key=lambda s: -tokens(s))
        rounds = -(-len(items) // (world * per))
        micros, held, load = [[] for _ in range(rounds * world)], [0] * (rounds * world), [0] * (rounds * world)
        for i, s in enumerate(items):  # round i * rounds // len(items) is micro-batches b0 ... b0 + world - 1
            b0 = i * rounds // len(items) * world
            b = min((b for b in range(b0, b0 + world) if held[b] < per), key=lambda b: load[b])
            micros[b], held[b], load[b] = micros[b] + s, held[b] + 1, load[b] + tokens(s)
        for r in range(world):
            plans[r].append([sorted(m) for m in micros[r::world]])
    return plans


def group_slices(g, n, k, lengths):
    """Group g's responses g * n ... in k slices of at most ceil(n / k), near-equal in tokens (longest first, each to the
    slice with the fewest tokens so far): a packed row costs its tokens, so the largest slice sets the peak memory."""
    slices, tokens = [[] for _ in range(k)], [0] * k
    for i in sorted(range(g * n, (g + 1) * n), key=lambda i: -lengths[i]):
        s = min((s for s in range(k) if len(slices[s]) < -(-n // k)), key=lambda s: tokens[s])
        slices[s].append(i)
        tokens[s] += lengths[i]
    return [sorted(s) for s in slices]


def packed_tokens(prompt_lens, lengths, n, seqs):
    """The tokens of sequences seqs in packed rows (grpo.group_batch): each group's prompt once, less the last token, which
    leads its first response, and the responses."""
    return sum(prompt_lens[g] - 1 for g in {i // n for i in seqs}) + sum(lengths[i] for i in seqs)


def train_balance(prompt_lens, lengths, n, plans):
    """How evenly the ranks' micro-batches share the update: (all tokens / ranks) / sum over i of the largest i-th
    micro-batch, in packed-row tokens. 1: no rank waits at any forward; 1 / world: one rank does all the work."""
    tokens = lambda seqs: packed_tokens(prompt_lens, lengths, n, seqs)
    steps = [max(map(tokens, micros)) for minibatches in zip(*plans) for micros in zip(*minibatches)]
    return sum(tokens(m) for plan in plans for micros in plan for m in micros) / len(plans) / max(sum(steps), 1)


def barrier():  # every rank waits here; nothing to wait for without a process group
    return dist.barrier() if dist.is_initialized() else None


def _all_reduce(values, device, op):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t.tolist()


all_reduce_sum = functools.partial(_all_reduce, op=dist.ReduceOp.SUM)  # (values, device) -> sums over ranks
all_reduce_max = functools.partial(_all_reduce, op=dist.ReduceOp.MAX)


def all_gather_arrays(seqs, device, typecode):
    """This rank's sequences of 32-bit numbers (any count, any lengths; typecode "i": token ids, "f": fp32 log-probs) ->
    every rank's, [rank 0's, rank 1's, ...], each sequence an array(typecode) (4 bytes a number, where a Python list
    takes 32-36), on every rank ([this rank's] without a process group). Each rank sends one flat int32 tensor, [lengths |
    the values' bits], padded to the longest rank's, so the values come back bit for bit."""
    if not dist.is_initialized():
        return [[array(typecode, s) for s in seqs]]
    values = array(typecode, itertools.chain.from_iterable(seqs))
    bits = torch.frombuffer(values, dtype=torch.int32) if values else torch.zeros(0, dtype=torch.int32)
    flat = torch.cat([torch.tensor([len(s) for s in seqs], dtype=torch.int32), bits]).to(device)
    sizes = [torch.zeros(2, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(seqs), len(flat)], device=device))
    longest = max(int(s[1]) for s in sizes)
    gathered = [flat.new_zeros(longest) for _ in sizes]
    dist.all_gather(gathered, torch.cat([flat, flat.new_zeros(longest - len(flat))]))
    out = []
    for (count, size), t in zip((s.tolist() for s in sizes), gathered):
        t = t.cpu()
        values = array(typecode, t[count:size].numpy().tobytes())
        ends = list(itertools.accumulate(t[:count].tolist(), initial=0))
        out.append([values[a:b] for a, b in zip(ends, ends[1:])])
    return out


def idle_backward(model, device):
    """A zero-loss forward/backward: under FSDP every rank must run as many forwards (each all-gathers the
    weights) and backwards (each reduce-scatters the gradients) as the busiest rank, or collectives mismatch."""
    dummy = torch.zeros(1, 2, dtype=torch.long, device=device)
    model(dummy, targets=dummy, loss_weights=torch.ones(1, 2, device=device)).mul(0).backward()


def clip_grad_norm(model, max_norm):
    """Clip gradients to max_norm (global over ranks) -> the norm before clipping, as a float."""
    assert not getattr(model, "gradients_unreduced", False), "accumulate_gradients(model, last=True) never came this step"
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return float(local_tensor(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))


def stop_if_not_finite(script, step, state_dir, **values):
    """Divergence: a non-finite loss, gradient norm or KL ends the run here, before the optimizer step and
    before anything is saved, so the last saved state stays the last good one."""
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad:
        raise SystemExit(f"\n{script}: non-finite {', '.join(f'{k} ({values[k]})' for k in bad)} at step {step}: "
                         f"stopping without saving; the last good state is kept in {state_dir} (if any)")


def end_distributed():
    """Every rank waits for the others, then leaves the group (one leaving early can abort a slower one's exit).
    Then a pause with the GIL released, before the interpreter shuts down: a gloo worker thread frees a finished
    collective's tensors just after the wait on it returns (the barrier keeps those of the collective before it), and
    freeing a tensor Python also sees takes the GIL. A thread that asks for it once the interpreter is shutting down
    aborts the process ("terminate called without an active exception"; a 2-rank CPU run's exit, about 1 in 30). The
    group's threads are not joined by destroy_process_group while anything still holds the group (FSDP2's mesh does)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        time.sleep(0.1)


def epoch_batch(n_items, batch_size, step, seed):
    """The item indices of a step's batch: each epoch is a seeded permutation, cut into whole batches in order."""
    epoch, k = divmod(step, n_items // batch_size)
    perm = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    return perm[k * batch_size:(k + 1) * batch_size]


def lr_at(step, total, lr, warmup_steps, min_ratio):
    """Linear warm-up, then cosine from lr to min_ratio * lr at the last step."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def local_tensor(t):  # this rank's part of a tensor: an FSDP2 shard's local tensor, else the tensor itself
    return t.to_local() if hasattr(t, "to_local") else t


def make_optimizer(model, lr, betas, weight_decay, fused=None):
    """AdamW; fused (one kernel for all parameters) on CUDA, and on the CPU for --offload's shards in host memory."""
    fused = next(model.parameters()).is_cuda or getattr(model, "offloaded", False) if fused is None else fused
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay, fused=fused)


def check_vocab(tokenizer, model_path, tokenizer_path):
    """A tokenizer with ids beyond the embedding would fail deep inside a forward: refuse it up front."""
    cfg = checkpoint.load_config(model_path)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise SystemExit(f"{tokenizer_path}: the tokenizer has {tokenizer.vocab_size} tokens, more than the "
                         f"{cfg.vocab_size} rows of {model_path}'s embedding (vocab_size in its config.json)")


def check_flags(ap, args, positive=(), nonnegative=(), fractions=()):
    """argparse-style errors for counts and sizes that must be finite and > 0 (or >= 0, or in (0, 1]; --dist-timeout
    wherever it is a flag), and for --offload where nothing is sharded and --resume with --overwrite (add_run_flags),
    before any work."""
    world, cuda = int(os.environ.get("WORLD_SIZE", 1)), torch.cuda.is_available() and not getattr(args, "toy", False)
    if getattr(args, "resume", False) and getattr(args, "overwrite", False):
        ap.error("--resume continues the run in --out and --overwrite starts over there: give one of them")
    if getattr(args, "offload", False) and not uses_fsdp(world, torch.device("cuda" if cuda else "cpu"), args.precision):
        ap.error("--offload keeps FSDP's shards in host memory, and one fp32 process on the CPU has no FSDP (and its "
                 "weights are in host memory already): add --precision bf16 or more ranks, or drop --offload")
    positive += ("dist_timeout",) if hasattr(args, "dist_timeout") else ()  # add_dist_timeout_flag's: every script's
    for k, strict in [(k, True) for k in positive + fractions] + [(k, False) for k in nonnegative]:
        v = getattr(args, k)
        if v is not None and not (math.isfinite(v) and (v > 0 if strict else v >= 0)):  # `not` also catches NaN
            ap.error(f"--{k.replace('_', '-')} must be {'>' if strict else '>='} 0 and finite, got {v}")
        if k in fractions and v is not None and v > 1:
            ap.error(f"--{k.replace('_', '-')} is a fraction, at most 1, got {v}")


# a scheduler's or launcher's "stop": SLURM's --signal and preemption, a cloud's spot reclaim, torchrun passing its own on
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
stop_request = {"script": False, "signal": 0}  # script: run by cli (not a test calling main); signal: the one noted


def catch_stop_signals(catch):
    """While a trainer's steps run (RunDir turns this on at open_metrics and off at the last step's save), a stop
    signal to a script is noted instead of ending the process: the run saves after the step in progress and stops
    (RunDir.log: every rank after the same step; a GRPO rollout, its log-prob passes or a judging is given up). It
    may come more than once (SLURM signals every process of a job step, and torchrun passes its own on too). At other
    times it does what it always does, at once."""
    if stop_request["script"]:
        for signum in STOP_SIGNALS:
            signal.signal(signum, note_stop_signal if catch else signal.SIG_DFL)


def note_stop_signal(signum, frame):
    stop_request["signal"] = signum


def stop_requested():  # a GRPO rollout, its log-prob passes, or a judging in the steps gives up when this says so
    return stop_request["signal"] > 0


def cli(main):
    """Run a script's main: bad input (data, checkpoint, tokenizer files) ends in one line naming the file,
    not a traceback. Only errors raised by this project's own checks: one raised inside a library is a bug to
    debug, and keeps its traceback. The system's errors (disk full, a read-only or missing path, a directory where
    a file belongs) are one line wherever they come from: the OS names the path, and so is Ctrl-C. A trainer run this
    way saves and stops on a stop signal (catch_stop_signals)."""
    stop_request["script"] = True
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C ends it at once, without a save (a stop signal saves first): say so, not where
        if os.environ.get("LOCAL_RANK", "0") == "0":  # a terminal's Ctrl-C reaches every rank: one line per node
            print(f"{os.path.basename(sys.argv[0])}: interrupted; what it saved before is kept (--resume continues a "
                  "trainer's run from its last save, and eval.py goes on from its outputs when run again)", file=sys.stderr)
        sys.exit(130)
    except OSError as e:
        sys.exit(f"{os.path.basename(sys.argv[0])}: error: {e}")
    except ValueError as e:
        raised_in = traceback.extract_tb(e.__traceback__)[-1].filename
        if os.path.dirname(os.path.abspath(raised_in)) != os.path.dirname(os.path.abspath(__file__)):
            raise
        sys.exit(f"{os.path.basename(sys.argv[0])}: error: {e}")
    finally:  # a rank that stops on an error is still in its process group: the pause of end_distributed, for its reason
        if dist.is_initialized():
            time.sleep(0.1)
