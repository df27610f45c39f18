"""
sft.py: stage 1 of RM-R1, distillation SFT of reasoning traces, in one process or under torchrun + FSDP2.

    python sft.py                                  # the toy judge task (toy.py), a few minutes on a laptop CPU
    torchrun --nproc_per_node 8 sft.py --model Qwen2.5-7B-Instruct --data distill.jsonl --out runs/sft-7b

The loss is token cross-entropy on the assistant span only (the tokens after the generation prompt,
through the end-of-turn token), normalised over the whole optimizer step:

    L = - (1 / N_step) * sum_{sequences s in the global batch} sum_{t in assistant(s)} log p(x_t | x_<t)

where N_step counts the supervised tokens of the global batch across all micro-batches and all ranks (a
mean of per-micro-batch means would weight short sequences more). log p comes from model.py's chunked
output head, so the [tokens, vocab] fp32 logits never exist. Each optimizer step takes --global-batch
sequences from a seeded per-epoch permutation; each rank takes every world-th of them and groups them by
length into micro-batches of about --tokens-per-micro tokens (right-padded; causal attention keeps pads
out of real tokens). AdamW (0.9, 0.95), linear warm-up then cosine decay to 0.1 x LR, grad-norm clip 1.0.

With --val-data the greedy judge accuracy on those pairs is measured every --val-every steps (logged as
val_accuracy), and --stop-at-accuracy ends training at the first check that reaches it (the toy uses this
so GRPO starts from a comparable judge whatever the machine's float kernels).

Data: JSONL rows in the RM-R1 distillation format (context_messages = [system, user], winner = the
trace) or a plain chat format (messages ending with the assistant turn to learn). Rows longer than
--max-len are dropped and counted (or cut to --max-len with the end token kept, by --truncate).

Distributed: torchrun sets RANK/WORLD_SIZE; each block is fully_shard-ed, then the root; gloo on CPU,
NCCL on CUDA; with more than one rank on CUDA, bf16 compute with fp32 master weights and fp32 gradient
reduction (FSDP's mixed precision; a single process computes in fp32 for now). Checkpoints:
a Hugging Face layout model (gathered one tensor at a time, written by rank 0) and a resumable training
state per rank (local shards of weights and AdamW moments, step, RNG), loaded weights-only; --resume
continues exactly where the last saved step left off (with the same number of ranks).

The plumbing shared with grpo.py (distributed setup, sharding, training state, LR schedule, logging) lives in
training.py.
"""
import argparse
import json
import os
import random
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import model as M
from data import DataError, check_messages, load_tokenizer, need, read_jsonl
from eval import heldout_accuracy, load_heldout
from sampler import Sampler
from training import (_local, all_reduce_sum, copy_tokenizer, idle_backward, load_state, log_step, lr_at, make_optimizer,
                      save_state, setup_distributed, shard_model)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Distillation SFT (RM-R1 stage 1)")
    ap.add_argument("--model", default=None, help="HF checkpoint dir (default: the toy task's tiny model)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir (default: --model)")
    ap.add_argument("--data", default=None, help="JSONL: RM-R1 distillation rows or chat rows (default: toy)")
    ap.add_argument("--out", default=None, help="output dir (default runs/toy/sft for the toy task)")
    ap.add_argument("--max-len", type=int, default=None, help="drop (or --truncate) longer rows [12288; toy 512]")
    ap.add_argument("--truncate", action="store_true", help="cut long rows instead of dropping them")
    ap.add_argument("--epochs", type=float, default=None, help="[1; toy 3]")
    ap.add_argument("--global-batch", type=int, default=None, help="sequences per optimizer step [128; toy 32]")
    ap.add_argument("--tokens-per-micro", type=int, default=None, help="padded tokens per micro-batch [16384; toy 4096]")
    ap.add_argument("--lr", type=float, default=None, help="[5e-6; toy 3e-3]")
    ap.add_argument("--warmup", type=float, default=0.03, help="warm-up fraction of the steps")
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing per block")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0 = all epochs)")
    ap.add_argument("--save-every", type=int, default=50, help="save resumable state every N steps")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the blocks (default: on with CUDA)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--stop-after-steps", type=int, default=0, help="stop (resumably) after this many steps in this run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-data", default=None, help="pairs JSONL for held-out judge accuracy at the end (toy: its held-out set)")
    ap.add_argument("--eval-limit", type=int, default=200)
    ap.add_argument("--eval-max-new-tokens", type=int, default=None, help="token budget of each judgement [8192; toy 64]")
    ap.add_argument("--val-data", default=None, help="pairs JSONL judged every --val-every steps (toy: its validation set)")
    ap.add_argument("--val-every", type=int, default=10)
    ap.add_argument("--stop-at-accuracy", type=float, default=None,
                    help="end training once validation judge accuracy (%%) reaches this [0 = off; toy 72]")
    args = ap.parse_args(argv)
    import toy
    paths = toy.apply_defaults(args, dict(max_len=(512, 12288), epochs=(5.0, 1.0), global_batch=(32, 128),
                                          tokens_per_micro=(4096, 16384), lr=(3e-3, 5e-6), eval_max_new_tokens=(64, 8192),
                                          stop_at_accuracy=(72.0, 0.0)))
    if paths:
        args.model, args.tokenizer, args.data = paths["init"], paths["tokenizer"], args.data or paths["sft"]
        args.eval_data = args.eval_data or paths["heldout"]
        args.val_data = args.val_data or paths["val"]
        args.out = args.out or "runs/toy/sft"
    if args.data is None or args.out is None:
        ap.error("--data and --out are required with --model")
    if args.stop_at_accuracy and not args.val_data:
        ap.error("--stop-at-accuracy needs --val-data")
    args.tokenizer = args.tokenizer or args.model
    return args


def micro_batches(seqs, tokens_per_micro):
    """Group (ids, loss_mask) sequences by length into micro-batches of <= tokens_per_micro padded tokens."""
    seqs = sorted(seqs, key=lambda s: len(s[0]))
    out, cur = [], []
    for s in seqs:
        if cur and len(s[0]) * (len(cur) + 1) > tokens_per_micro:
            out.append(cur)
            cur = []
        cur.append(s)
    return out + ([cur] if cur else [])


def pad_batch(seqs, pad_id, device):
    """-> input ids [B, T-1], targets [B, T-1], loss mask [B, T-1] (next-token shift, right padding)."""
    T = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.float)
    for i, (s, m) in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(m)] = torch.tensor(m, dtype=torch.float)
    return ids[:, :-1].to(device), ids[:, 1:].to(device), mask[:, 1:].to(device)


# ----------------------------------------------------------------------------- data

def encode_sft_rows(path, tokenizer, max_len, truncate):
    """-> list of (ids, loss_mask) and the number dropped for length. loss_mask is 1 on the assistant span
    (the answer's tokens and the end-of-turn token), 0 on the prompt."""
    out, dropped = [], 0
    for n, row in read_jsonl(path):
        where = f"{path}:{n}"
        if "context_messages" in row:
            msgs = check_messages(need(row, "context_messages", where, list), where, "context_messages")
            answer = need(row, "winner", where)
        elif "messages" in row:
            msgs = check_messages(need(row, "messages", where, list), where)
            if msgs[-1]["role"] != "assistant":
                raise DataError(f"{where}: field 'messages' must end with the assistant turn to learn")
            answer = msgs.pop()["content"]
            if not answer.strip():
                raise DataError(f"{where}: field 'messages[-1].content' (the assistant turn) is empty")
        else:
            raise DataError(f"{where}: missing field 'context_messages' (RM-R1 format) or 'messages' (chat format)")
        prompt = tokenizer.encode(tokenizer.apply_chat_template(msgs, add_generation_prompt=True))
        completion = tokenizer.encode(answer) + [tokenizer.eos_id]
        ids, mask = prompt + completion, [0] * len(prompt) + [1] * len(completion)
        if len(ids) > max_len:
            if not truncate or len(prompt) >= max_len - 1:
                dropped += 1
                continue
            ids, mask = ids[:max_len - 1] + [tokenizer.eos_id], mask[:max_len]
        out.append((ids, mask))
    if not out:
        raise DataError(f"{path}: no usable rows ({dropped} longer than --max-len {max_len})")
    return out, dropped


# ----------------------------------------------------------------------------- training

def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    tokenizer = load_tokenizer(args.tokenizer)
    rows, dropped = encode_sft_rows(args.data, tokenizer, args.max_len, args.truncate)
    steps_per_epoch = len(rows) // args.global_batch
    if steps_per_epoch == 0:
        raise DataError(f"{args.data}: {len(rows)} usable rows, fewer than --global-batch {args.global_batch}")
    total = int(steps_per_epoch * args.epochs)
    total = planned = min(total, args.max_steps) if args.max_steps else total
    model = M.load_model(args.model, device="cpu", dtype=torch.float32)  # fp32 master weights
    model.checkpoint_activations = args.grad_ckpt
    if args.compile if args.compile is not None else device.type == "cuda":
        M.compile_blocks(model)
    model = shard_model(model, world, device)
    optimizer = make_optimizer(model, args.lr, (0.9, 0.95), args.weight_decay)
    state_dir = os.path.join(args.out, "state")
    step = 0
    if args.resume and os.path.exists(state_dir):
        step, extra = load_state(state_dir, model, optimizer, rank)
        total = step if extra.get("target_met") else total  # a run that met --stop-at-accuracy stays finished
    elif args.resume and rank == 0:
        print(f"--resume: no saved state in {state_dir}, starting from step 0")
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        print(f"sft: {len(rows)} rows ({dropped} dropped as longer than {args.max_len}), {M.num_params(model) / 1e6:.2f}M params, "
              f"{world} rank(s) on {device.type}, {total} steps of {args.global_batch} sequences, start at step {step}")
    metrics = open(os.path.join(args.out, "metrics.jsonl"), "a" if step else "w") if rank == 0 else None
    judges = {k: load_heldout(path, tokenizer, args.eval_limit, args.seed) for k, path in
              (("val", args.val_data), ("heldout", args.eval_data)) if path}
    engine = None
    if judges:  # greedy judgements through the sampler, on a plain copy of the weights
        longest = max(len(p) for _, ids in judges.values() for p in ids)
        engine = Sampler.for_policy(model, 128, longest + args.eval_max_new_tokens, compile=args.compile)

    def judge(which):  # -> (accuracy %, unparsed) of the current weights on the validation or held-out pairs
        engine.load_weights(model)
        return heldout_accuracy(engine, tokenizer, *judges[which], args.eval_max_new_tokens, rank, world, args.seed)

    warmup = max(1, int(args.warmup * total))
    bar = tqdm(total=total, initial=step, disable=rank != 0, desc="sft")
    rec = {}
    stop_at = min(total, step + args.stop_after_steps) if args.stop_after_steps else total
    while step < stop_at:
        t0 = time.time()
        epoch, k = divmod(step, steps_per_epoch)
        perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        batch = [rows[i] for i in perm[k * args.global_batch:(k + 1) * args.global_batch].tolist()]
        n_step = sum(sum(m[1:]) for _, m in batch)  # supervised tokens in the whole global batch (all ranks)
        lr = lr_at(step, total, args.lr, warmup, args.min_lr_ratio)
        for g in optimizer.param_groups:
            g["lr"] = lr
        loss_sum = 0.0
        micros = micro_batches(batch[rank::world], args.tokens_per_micro)
        n_micro = int(all_reduce_sum([len(micros)], device, op="max")[0])
        for mb in micros:
            ids, targets, mask = pad_batch(mb, tokenizer.pad_id or 0, device)
            nll = -model(ids, targets=targets, loss_weights=mask)  # sum of -log p over supervised tokens
            # FSDP averages gradients over ranks; * world turns that into the sum over the global batch
            (nll / n_step * world).backward()
            loss_sum += nll.item()
        for _ in range(n_micro - len(micros)):
            idle_backward(model, device)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        grad_norm = float(_local(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        loss_sum, tokens = all_reduce_sum([loss_sum, sum(len(s) for s, _ in batch[rank::world])], device)
        rec = {"step": step, "loss": loss_sum / n_step, "lr": lr, "grad_norm": grad_norm,
               "tokens_per_s": tokens / (time.time() - t0)}
        if "val" in judges and step % args.val_every == 0:
            rec["val_accuracy"] = judge("val")[0]
            if args.stop_at_accuracy and rec["val_accuracy"] >= args.stop_at_accuracy:
                total = stop_at = step  # the target is met: this step is the last
                if rank == 0:
                    tqdm.write(f"sft: validation judge accuracy {rec['val_accuracy']:.1f}% >= {args.stop_at_accuracy:g}% "
                               f"at step {step}: stopping")
        if rank == 0:
            log_step(metrics, bar, rec, loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
        if step % args.save_every == 0 or step == stop_at:
            save_state(state_dir, model, optimizer, step, rank, extra={"target_met": step == total and total < planned})
    bar.close()
    if step < total:  # stopped early on purpose: the state is saved, --resume continues
        return {"steps": step}
    M.save_model(model, os.path.join(args.out, "model"), rank=rank)
    if rank == 0:
        copy_tokenizer(args.tokenizer, os.path.join(args.out, "model"))
    summary = {"steps": step, "final_loss": rec.get("loss"), "dropped": dropped}
    if "heldout" in judges:
        acc, unparsed = judge("heldout")
        summary.update(heldout_accuracy=acc, heldout_unparsed=unparsed)
    if rank == 0:
        json.dump(summary, open(os.path.join(args.out, "summary.json"), "w"), indent=2)
        print("sft done: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items())
              + f"\ncheckpoint: {os.path.join(args.out, 'model')}")
        metrics.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
