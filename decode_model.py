"""
decode_model.py: the model a Sampler decodes with, made from a training policy or a checkpoint (sampler.py runs it).

    copy = tensor_parallel_copy(policy.config, device, torch.bfloat16, group)   # empty; the whole model if group is None
    copy = fuse_projections(copy)                                                # on GPUs: q/k/v, gate/up one GEMM each
    copy_weights(policy, copy)                                                   # every rollout: from FSDP shards
    judge = load_for_decoding(path, device, group=group)                         # eval.py: from a checkpoint

- fuse_projections: a decode step reads x once for q/k/v and once for gate/up and launches one GEMM for each, not 3 and 2.
- tensor_parallel_copy (grpo.py --rollout-tp T, eval.py --tp T; as vLLM's tensor-parallel rollouts): each of T ranks
  holds 1/T of the query heads, KV heads and MLP columns, so 1/T of the blocks' weights and of every sequence's KV cache:
      q/k/v, gate/up:      split by output rows (W_r = W[r-th T-th of the rows]); a head stays on one rank
      o_proj, down_proj:   split by input columns, so each rank's output is a partial sum: y = sum_r x_r W_r^T,
                           summed over the group by an all-reduce (RowParallelLinear; traced into the compiled step)
      embeddings, norms, head: whole on every rank, so every rank computes the same logits and draws the same tokens,
  and the group's ranks run the same generate() calls in lockstep.
- copy_weights: each tensor all-gathered from the FSDP shards on its own (on the GPU, also when they sit in host memory),
  cast, cut to this rank's share (tp_share) and written into its rows of a fused projection.
"""
import dataclasses
import os

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

import checkpoint
import model as M


def tensor_parallel_copy(cfg, device, dtype, group=None):
    """An empty plain model for decoding; over a process group of T > 1 ranks, this rank's share of it, as in vLLM's
    tensor-parallel rollouts: 1/T of the query heads, KV heads and MLP columns (q/k/v and gate/up split by output rows,
    o_proj and down_proj by input columns, RowParallelLinear), with the embeddings, norms and head whole. So each rank
    holds about 1/T of the blocks' weights and of every sequence's KV cache. -> the model, with model.tp = (T, rank)."""
    T = dist.get_world_size(group) if group is not None else 1
    model = M.empty_model(tensor_parallel_config(cfg, T), device, dtype)
    for layer in model.model.layers if T > 1 else ():
        layer.self_attn.o_proj = RowParallelLinear(layer.self_attn.o_proj, group)
        layer.mlp.down_proj = RowParallelLinear(layer.mlp.down_proj, group)
    model.tp = (T, dist.get_rank(group) if T > 1 else 0)
    model.tp_group = group if T > 1 else None  # the sampler's ranks agree on when to give up a call
    return model


def tensor_parallel_group(size, rank):
    """The process group of the `size` consecutive ranks that hold `rank` (every rank makes every group, in the same
    order, as torch.distributed requires), or None for size 1 (grpo.py's --rollout-tp, eval.py's --tp)."""
    if size == 1:
        return None
    groups = [dist.new_group(list(range(first, first + size))) for first in range(0, dist.get_world_size(), size)]
    return groups[rank // size]


def load_for_decoding(path, device, dtype=None, group=None):
    """A checkpoint as a decoding model (eval.py's judge): whole, or over a process group this rank's tensor-parallel
    share (each tensor read, cut and checked one at a time: no rank holds the whole model), projections fused on GPUs."""
    cfg = checkpoint.load_config(path)
    model = tensor_parallel_copy(cfg, device, dtype or checkpoint.saved_dtype(cfg), group)
    checkpoint.load_weights(model, path, share=lambda name, t: tp_share(name, t, *model.tp))
    return fuse_projections(model)


def check_split(ap, flag, T, checkpoint_dir=None, dtype=None, cache_frac=0.0, beside=0.0, remedy=None):
    """grpo.py's --rollout-tp, eval.py's --tp, before any work: T divides the ranks and (given a checkpoint) its model's
    heads, KV heads and MLP columns, and on a GPU each rank's share of the decoding copy (in dtype; default the
    checkpoint's), a KV cache of cache_frac of the GPU and `beside` bytes a parameter held beside them (sft.py's
    judging: the training shards) fit in the GPU: where they do not, the run would fail with the GPU out of memory
    after loading. remedy: what the refusal advises (default: a larger T)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if T < 1 or world % T:
        ap.error(f"{flag} must be > 0, got {T}" if T < 1 else f"{flag} {T} must divide the {world} ranks")
    gpu = gpu_memory()
    if not checkpoint_dir or (T == 1 and not gpu):  # nothing to check
        return
    cfg = checkpoint.load_config(checkpoint_dir)
    share, held = copy_bytes(cfg, T, dtype or checkpoint.saved_dtype(cfg), flag), beside * M.num_params(cfg)
    if gpu and share + cache_frac * gpu + held > gpu:
        ap.error(f"{checkpoint_dir}: its decoding copy takes {share / 1e9:.1f} GB a GPU split over {T} rank(s) ({flag})"
                 + (f" and its KV cache {cache_frac:g} of the GPU" if cache_frac else "")
                 + (f", beside {held / 1e9:.1f} GB of training state" if held else "")
                 + f": more than the GPU's {gpu / 1e9:.1f} GB. {remedy or f'Split it over more ranks with {flag}'}")


def copy_bytes(cfg, T, dtype, flag="--rollout-tp"):
    """The bytes of one rank's share of a model's decoding copy split over T ranks (the embeddings and head whole)."""
    return M.num_params(tensor_parallel_config(cfg, T, flag)) * dtype.itemsize


def gpu_memory():  # this rank's GPU's memory in bytes; 0 without CUDA
    local = int(os.environ.get("LOCAL_RANK", 0))
    return torch.cuda.get_device_properties(local).total_memory if torch.cuda.is_available() else 0


def tensor_parallel_config(cfg, T, flag="--rollout-tp"):
    """A model's config -> that of one rank's share of it split over T ranks (refused unless the heads, KV heads and MLP
    columns split evenly)."""
    split = {"num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
             "intermediate_size": cfg.intermediate_size}
    if any(v % T for v in split.values()):
        raise ValueError(f"a model split over {T} ranks ({flag}) needs "
                         f"{', '.join(f'{k} {v}' for k, v in split.items())} to be multiples of {T}")
    return dataclasses.replace(cfg, head_dim=cfg.head_dim, **{k: v // T for k, v in split.items()}) if T > 1 else cfg


class RowParallelLinear(torch.nn.Linear):
    """o_proj / down_proj of a tensor-parallel copy: its inputs are this rank's heads or MLP columns, so its output is
    a partial sum, summed over the group (a functional all-reduce: traced into the compiled decode step)."""

    def __init__(self, linear, group):
        w = linear.weight
        super().__init__(linear.in_features, linear.out_features, bias=False, device=w.device, dtype=w.dtype)
        self.group = group

    def forward(self, x):
        return funcol.all_reduce(super().forward(x), "sum", self.group)


FUSED_PROJECTION_DEVICES = ("cuda",)  # where fuse_projections fuses (tests and bench.py add "cpu")


@torch.no_grad()
def fuse_projections(model, devices=None):
    """For decoding (the rollout copy, eval's judge): q/k/v and gate/up become one Linear each (qkv_proj, gate_up_proj,
    their weights stacked by rows), so a decode step reads x once and launches one GEMM where it launched three and
    two. copy_weights fills their rows by the checkpoint's names (model.fused_rows). Only on FUSED_PROJECTION_DEVICES:
    elsewhere (the toy's CPU) the decode keeps the training forward's GEMMs and rounding."""
    if model.lm_head.weight.device.type not in (devices or FUSED_PROJECTION_DEVICES):
        return model
    model.fused_rows = {}  # a checkpoint tensor's name -> (its fused parameter's name, first row)
    for i, layer in enumerate(model.model.layers):
        for owner, where, parts, fused in ((layer.self_attn, "self_attn", ("q_proj", "k_proj", "v_proj"), "qkv_proj"),
                                           (layer.mlp, "mlp", ("gate_proj", "up_proj"), "gate_up_proj")):
            linears = [getattr(owner, p) for p in parts]
            w = linears[0].weight
            one = torch.nn.Linear(w.shape[1], sum(l.out_features for l in linears), bias=linears[0].bias is not None,
                            device="meta", dtype=w.dtype).to_empty(device=w.device)
            row = 0
            for part, lin in zip(parts, linears):
                for kind, t in (("weight", lin.weight), ("bias", lin.bias)):
                    if t is not None:
                        getattr(one, kind)[row:row + len(t)].copy_(t)
                        model.fused_rows[f"model.layers.{i}.{where}.{part}.{kind}"] = (f"model.layers.{i}.{where}.{fused}.{kind}", row)
                row += lin.out_features
                delattr(owner, part)
            setattr(owner, fused, one)
            owner.fused_split = [lin.out_features for lin in linears]  # its outputs' widths, in order
    return model


@torch.no_grad()
def copy_weights(src, dst):
    """dst's parameters <- src's (dtype cast on the way; into their rows of dst's fused projections; a tensor-parallel
    copy's share). src may be FSDP-sharded: each tensor is all-gathered on its own (every rank must call), so no rank
    holds more than dst plus one full tensor."""
    dst_params, fused = dict(dst.named_parameters()), getattr(dst, "fused_rows", {})
    for name, p in src.named_parameters():
        full = tp_share(name, checkpoint.gathered(p), *getattr(dst, "tp", (1, 0)))
        target, row = fused.get(name, (name, 0))
        dst_params[target][row:row + len(full)].copy_(full)


def tp_share(name, full, T, rank):
    """A checkpoint tensor -> rank's share of it in a copy split over T ranks (tensor_parallel_copy)."""
    if T > 1 and name.endswith(tuple(f"{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")) +
                               ("gate_proj.weight", "up_proj.weight")):
        return full.chunk(T, 0)[rank]  # output rows: heads, MLP columns
    if T > 1 and name.endswith(("o_proj.weight", "down_proj.weight")):
        return full.chunk(T, 1)[rank]  # input columns
    return full
