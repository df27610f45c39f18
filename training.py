"""
training.py: the plumbing both trainers (sft.py, grpo.py) share, so neither imports the other.

  setup_distributed   rank, world size and device; NCCL on CUDA, gloo on CPU (torchrun sets the env)
  shard_model         FSDP2: each block, then the root
  all_reduce_sum      a list of floats summed (or maxed) over ranks
  idle_backward       the zero-loss forward/backward a rank with less data runs to keep FSDP's collectives matched
  log_step            one step's record to metrics.jsonl and the progress bar
  lr_at               linear warm-up, then cosine decay
  save_state / load_state   each rank's weights and AdamW shards, step and RNG; weights-only loading
  copy_tokenizer      tokenizer files beside a saved checkpoint
  make_optimizer      AdamW (fused on CUDA)
"""
import json
import math
import os
import shutil

import torch
import torch.distributed as dist


def setup_distributed():
    """-> (rank, world, device). Single process without torchrun; NCCL on CUDA, gloo on CPU."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def shard_model(model, world, device):
    """FSDP2: fully_shard each block, then the root (embeddings, final norm, head). bf16 compute with fp32
    reduction on CUDA; fp32 on CPU. A no-op in a single process (besides the device move)."""
    if world == 1:
        return model.to(device)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" else MixedPrecisionPolicy()
    for block in model.model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def all_reduce_sum(values, device, op="sum"):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def idle_backward(model, device):
    """A zero-loss forward/backward: under FSDP every rank must run as many forwards/backwards (each one
    all-gathers and reduce-scatters) as the busiest rank, or the collectives would not match."""
    dummy = torch.zeros(1, 2, dtype=torch.long, device=device)
    model(dummy, targets=dummy, loss_weights=torch.ones(1, 2, device=device)).mul(0).backward()


def log_step(metrics, bar, rec, **postfix):
    """One step's record to metrics.jsonl (flushed: a crash keeps it) and the progress bar."""
    metrics.write(json.dumps(rec) + "\n")
    metrics.flush()
    bar.set_postfix(**postfix)
    bar.update(1)


def lr_at(step, total, lr, warmup_steps, min_ratio):
    """Linear warm-up, then cosine from lr to min_ratio * lr at the last step."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def save_state(path, model, optimizer, step, rank, extra=None):
    """This rank's shards of weights and AdamW moments + step + RNG, as plain tensors (loadable with
    weights_only=True). Written to a temp dir and renamed, so a crash mid-save keeps the previous state."""
    tmp = f"{path}.tmp"
    os.makedirs(tmp, exist_ok=True)
    params = dict(model.named_parameters())
    state = {"step": step, "rng_cpu": torch.get_rng_state(), "extra": extra or {},
             "model": {n: _local(p.detach()).clone() for n, p in params.items()},
             "optim": {n: {k: _local(v).clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
                       for n, p in params.items() if p in optimizer.state}}
    if torch.cuda.is_available():
        state["rng_cuda"] = torch.cuda.get_rng_state()
    torch.save(state, os.path.join(tmp, f"rank{rank}.pt"))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        if os.path.exists(path):
            shutil.rmtree(path)
        os.rename(tmp, path)
    if dist.is_initialized():
        dist.barrier()


def load_state(path, model, optimizer, rank):
    file = os.path.join(path, f"rank{rank}.pt")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file} not found: resume needs the same number of ranks as the saved run")
    state = torch.load(file, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    params = dict(model.named_parameters())
    if set(state["model"]) != set(params):
        raise ValueError(f"{file}: saved parameters do not match the model ({len(state['model'])} vs {len(params)})")
    with torch.no_grad():
        for n, p in params.items():
            _local(p).copy_(state["model"][n])
            if n in state["optim"]:
                optimizer.state[p] = {k: (_local_like(p, v) if k != "step" else v) for k, v in state["optim"][n].items()}
    torch.set_rng_state(state["rng_cpu"])
    if "rng_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng_cuda"])
    return state["step"], state["extra"]


def _local_like(param, saved):
    t = torch.zeros_like(param)
    _local(t).copy_(saved)
    return t


def copy_tokenizer(src, dst):
    """Put the tokenizer files beside the weights, so the checkpoint is self-contained for eval/vLLM."""
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
              "added_tokens.json", "generation_config.json"):
        if os.path.exists(os.path.join(src, f)) and os.path.abspath(src) != os.path.abspath(dst):
            shutil.copy(os.path.join(src, f), os.path.join(dst, f))


def make_optimizer(model, lr, betas, weight_decay):
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay,
                             fused=next(model.parameters()).is_cuda)
