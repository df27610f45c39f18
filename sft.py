"""
sft.py: stage 1 of RM-R1, distillation SFT of reasoning traces, in one process or under torchrun + FSDP2.

    python sft.py                                  # the toy judge task (toy.py), a few minutes on a laptop CPU
    torchrun --nproc_per_node 8 sft.py --model Qwen2.5-7B-Instruct --data distill.jsonl --out runs/sft-7b

The loss is token cross-entropy on the assistant span only (the tokens after the generation prompt,
through the end-of-turn token), normalised over the whole optimizer step:

    L = - (1 / N_step) * sum_{sequences s in the global batch} sum_{t in assistant(s)} log p(x_t | x_<t)

where N_step counts the supervised tokens of the global batch across all micro-batches and all ranks (a
mean of per-micro-batch means would weight short sequences more). log p comes from the model's chunked
output head (head.py), so the [tokens, vocab] fp32 logits never exist. Each optimizer step takes --global-batch
sequences from a seeded per-epoch permutation and packs them back to back into rows as long as the longest
(model.PackedRows: each sequence attends only to itself, from position 0), about --tokens-per-micro tokens of rows
per micro-batch: no padding between sequences, and on CUDA attention costs each sequence's own length (FlexAttention
skips the blocks of other sequences; a micro-batch of one sequence a row is plain causal attention). Rank r runs
micro-batches r, r + world, ...: they come out longest first and full, so at each forward the ranks hold about as
many tokens (FSDP makes every rank wait for the slowest), and a rank one short runs an empty one.
AdamW (0.9, 0.95), linear warm-up then cosine decay to 0.1 x LR, grad-norm clip 1.0.

With --val-data the greedy judge accuracy on those pairs is measured every --val-every steps (logged as
val_accuracy), and --stop-at-accuracy ends training at the first check that reaches it (the toy uses this
so GRPO starts from a comparable judge whatever the machine's float kernels). A stop signal (SIGTERM) ends the step in
progress and saves it (rundir.py); a validation judging then is given up (val_accuracy null) unless it decides
--stop-at-accuracy.

Data: JSONL rows in the RM-R1 distillation format (context_messages = [system, user], winner = the
trace) or a plain chat format (messages ending with the assistant turn to learn). Rows longer than
--max-len are dropped and counted (or, by --truncate, cut to --max-len with the end token kept, and counted).

Each trace ends with the chat template's end-of-turn token (<|im_end|> for Qwen, whatever the tokenizer's
eos), as the judge will write it. RM-R1 RL rows (winner model_a/model_b) carry no trace: counted and skipped.

Precision and sharding as in training.py: fp32 master weights and AdamW moments, bf16 compute and fp32 gradient
reduction through FSDP2 on any number of GPUs (one included), fp32 on CPU (--precision bf16 runs the GPU's policy
there); --grad-ckpt auto recomputes every block's activations in backward for two steps, then only as many blocks as
the measured GPU memory needs; --offload keeps the weights, gradients and AdamW's moments in host memory (AdamW steps on
the CPU). Checkpoints as in rundir.py: the model is saved in the starting checkpoint's dtype (--save-dtype), whole or
not at all, beside a resumable state per rank (loaded weights-only) that --resume continues exactly, on any number of
ranks. A non-finite loss or gradient norm stops the run before the optimizer step, without saving.
"""
import argparse
import json
import os
import random
import time
from array import array

import torch
from tqdm import tqdm

import model as M
import toy
from data import FORMATS, DataError, default_judge_family, describe_counts, load_tokenizer, read_sft_rows
from decode_model import check_split
from eval import heldout_accuracy, load_heldout
from rundir import RunDir, done_already, load_state, save_checkpoint, write_swapped
from sampler import Sampler
from training import (accumulate_gradients, add_run_flags, all_reduce_sum, check_flags, check_host_memory, check_vocab, cli,
                      clip_grad_norm, compile_wanted, end_distributed, epoch_batch, fit_recompute, gpu_peak_gib,
                      gpu_peaks, idle_backward, load_for_training, lr_at, make_optimizer, precision_of, setup_distributed,
                      state_shard_bytes, stop_if_not_finite, stop_requested, train_flops)


JUDGE_CACHE_FRAC = 0.25  # of each GPU's memory: the KV cache of the validation and held-out judging


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Distillation SFT (RM-R1 stage 1)")
    ap.add_argument("--model", default=None, help="HF checkpoint dir (default: the toy task's tiny model)")
    ap.add_argument("--data", default=None, help="JSONL: RM-R1 distillation rows or chat rows (default: toy)")
    ap.add_argument("--max-len", type=int, default=None, help="drop (or --truncate) longer rows [12288; toy 512]")
    ap.add_argument("--truncate", action="store_true", help="cut long rows instead of dropping them")
    ap.add_argument("--epochs", type=float, default=None, help="[1; toy 5, ended early by --stop-at-accuracy]")
    ap.add_argument("--global-batch", type=int, default=None, help="sequences per optimizer step [128; toy 32]")
    ap.add_argument("--tokens-per-micro", type=int, default=None, help="tokens per micro-batch, in packed rows [16384; toy 4096]")
    ap.add_argument("--lr", type=float, default=None, help="[5e-6; toy 3e-3]")
    ap.add_argument("--warmup", type=float, default=0.03, help="warm-up fraction of the steps")
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0 = all epochs)")
    ap.add_argument("--save-every", type=int, default=50, help="save resumable state every N steps")
    ap.add_argument("--family", default=None, choices=["instruct", "reasoning"], help="judge prompts: those of RM-R1 rows "
                    "(checked) and of held-out pairs [the chat template's: reasoning for DeepSeek-R1-Distill, else instruct]")
    ap.add_argument("--eval-data", default=None, help="pairs for held-out judge accuracy at the end (toy: its held-out set)")
    ap.add_argument("--eval-format", default="pairs", choices=FORMATS, help="--eval-data's and --val-data's format: "
                    "rm-r1 (its RL rows), pairs, or a benchmark's")
    ap.add_argument("--eval-limit", type=int, default=200)
    ap.add_argument("--eval-max-new-tokens", type=int, default=None, help="token budget of each judgement [8192; toy 64]")
    ap.add_argument("--val-data", default=None, help="pairs judged every --val-every steps (toy: its validation set)")
    ap.add_argument("--val-every", type=int, default=10)
    ap.add_argument("--stop-at-accuracy", type=float, default=None,
                    help="end training once validation judge accuracy (%%) reaches this [0 = off; toy 78]")
    add_run_flags(ap, compiles="the blocks")
    args = ap.parse_args(argv)
    args.toy = toy.fill_defaults(args, dict(max_len=(512, 12288), epochs=(5.0, 1.0), global_batch=(32, 128),
                                            tokens_per_micro=(4096, 16384), lr=(3e-3, 5e-6), eval_max_new_tokens=(64, 8192),
                                            stop_at_accuracy=(78.0, 0.0), grad_ckpt=("none", "auto")))
    if args.toy:
        paths = toy.files()
        args.model, args.tokenizer, args.data = paths["init"], paths["tokenizer"], args.data or paths["sft"]
        args.eval_data, args.val_data = args.eval_data or paths["heldout"], args.val_data or paths["val"]
        args.out = args.out or "runs/toy/sft"
    if args.data is None or args.out is None:
        ap.error("--data and --out are required with --model")
    check_flags(ap, args, positive=("max_len", "epochs", "global_batch", "tokens_per_micro", "lr", "save_every",
                                    "eval_max_new_tokens", "val_every"),
                nonnegative=("warmup", "min_lr_ratio", "weight_decay", "grad_clip", "max_steps", "stop_after_steps",
                             "stop_after_minutes", "save_model_every", "eval_limit", "stop_at_accuracy"))
    if args.warmup >= 1 or args.min_lr_ratio > 1:
        ap.error("--warmup is a fraction of the steps (< 1) and --min-lr-ratio at most 1")
    if args.stop_at_accuracy and not 1 < args.stop_at_accuracy <= 100:  # 0.78 would stop at the first check
        ap.error(f"--stop-at-accuracy is a percentage (78 means 78%), above 1 and at most 100, got {args.stop_at_accuracy:g}")
    if args.stop_at_accuracy and not (args.val_data and args.eval_limit):
        ap.error("--stop-at-accuracy needs --val-data and an --eval-limit above 0 (the pairs judged)")
    if args.global_batch < int(os.environ.get("WORLD_SIZE", 1)):
        ap.error(f"--global-batch {args.global_batch} leaves ranks with no sequences ({os.environ['WORLD_SIZE']} ranks)")
    if not args.toy and args.eval_limit and (args.val_data or args.eval_data):  # on a GPU: the judging's copy fits?
        check_split(ap, "judging --val-data / --eval-data", 1, args.model,
                    torch.float32 if args.precision == "fp32" else torch.bfloat16, JUDGE_CACHE_FRAC,
                    beside=0 if args.offload else state_shard_bytes(int(os.environ.get("WORLD_SIZE", 1))),
                    remedy="Judge the saved model with eval.py instead (--tp splits it)"
                    + ("" if args.offload else ", or add --offload"))
    args.tokenizer = args.tokenizer or args.model
    return args


def micro_batches(seqs, tokens_per_micro):
    """(ids, loss_mask) sequences -> micro-batches, each a list of rows, each row a list of sequences packed back to back.
    Rows are as long as the longest sequence (minus the next-token shift), filled first-fit in decreasing length, so no
    row wastes more than padding to the longest would; a micro-batch holds tokens_per_micro // row length rows (>= 1)."""
    row_len = max(len(ids) for ids, _ in seqs) - 1
    rows, room = [], []
    for s in sorted(seqs, key=lambda s: -len(s[0])):
        r = next((r for r, free in enumerate(room) if len(s[0]) - 1 <= free), len(rows))
        if r == len(rows):
            rows.append([])
            room.append(row_len)
        rows[r].append(s)
        room[r] -= len(s[0]) - 1
    per_micro = max(1, tokens_per_micro // row_len)
    return [rows[i:i + per_micro] for i in range(0, len(rows), per_micro)]


def pack_batch(rows, pad_id, device, dtype):
    """Rows of sequences -> input ids, positions, targets, loss mask (all [B, T]) and their layout (model.pack_rows):
    sequence (ids, mask) of a row becomes ids[:-1] with targets ids[1:] and loss mask mask[1:], positions from 0,
    attending only to itself; rows are right-padded to the longest."""
    return M.pack_rows([[(s[:-1], s[1:], m[1:], 0, j + 1) for j, (s, m) in enumerate(row)] for row in rows],
                       pad_id, device, dtype)


# ----------------------------------------------------------------------------- data

def encode_sft_rows(path, tokenizer, max_len, truncate, family=None):
    """-> list of (ids, loss_mask), the number dropped for length, and the reader's counts with "truncated" (the rows
    cut to max_len, with truncate). loss_mask is 1 on the assistant span (the answer's tokens and the end-of-turn
    token), 0 on the prompt. With a family, RM-R1 rows must hold its judge prompts. Both are arrays (array('i'),
    array('b')), as every rank holds every row for the run: 5 bytes a token, where lists took 42 (measured: the toy's
    traces in the Qwen2.5 tokenizer)."""
    out, dropped, truncated = [], 0, 0
    rows, counts = read_sft_rows(path, family)
    if tokenizer.end_of_turn_id is None:
        raise DataError("the tokenizer has no end-of-turn token (<|im_end|>, or an eos_token) to end each trace with")
    prompts = tokenizer.encode_batch([tokenizer.apply_chat_template(msgs[:-1], add_generation_prompt=True) for msgs in rows])
    for prompt, answer in zip(prompts, tokenizer.encode_batch([msgs[-1]["content"] for msgs in rows])):
        completion = answer + [tokenizer.end_of_turn_id]
        ids, mask = prompt + completion, [0] * len(prompt) + [1] * len(completion)
        if len(ids) > max_len:
            if not truncate or len(prompt) >= max_len - 1:
                dropped += 1
                continue
            ids, mask = ids[:max_len - 1] + [tokenizer.end_of_turn_id], mask[:max_len]
            truncated += 1
        out.append((array("i", ids), array("b", mask)))
    if not out:
        raise DataError(f"{path}: no usable rows ({dropped} longer than --max-len {max_len})")
    return out, dropped, {**counts, "truncated": truncated}


# ----------------------------------------------------------------------------- training

def count_steps(args, n_rows):
    """-> the run's optimizer steps: --epochs over n_rows in steps of --global-batch sequences, at most --max-steps."""
    steps_per_epoch = n_rows // args.global_batch
    if steps_per_epoch == 0:
        raise DataError(f"{args.data}: {n_rows} usable rows, fewer than --global-batch {args.global_batch}")
    total = min(int(steps_per_epoch * args.epochs), args.max_steps or float("inf"))
    if total == 0:
        raise SystemExit(f"sft.py: --epochs {args.epochs} of {steps_per_epoch} steps is less than one step")
    return total


def judge_sets(args, model, tokenizer, family, compile, rank, world, device):
    """The validation and held-out pairs (--val-data, --eval-data: the first --eval-limit of each) -> the names of those
    given ("val", "heldout"), and judge(name, stop_when=None) -> (accuracy %, unparsed) of the model's current weights
    on them, greedy, through a plain copy's sampler (eval.py's code path). The copy (in the compute dtype) and its KV
    cache (JUDGE_CACHE_FRAC of a GPU) stay on every rank for the whole run, beside its training shards (parse_args
    checks they fit)."""
    judges = {k: load_heldout(path, args.eval_format, tokenizer, args.eval_limit, args.seed, family)[:2] for k, path in
              (("val", args.val_data), ("heldout", args.eval_data)) if path and args.eval_limit}
    if (args.val_data or args.eval_data) and not args.eval_limit and rank == 0:
        print("sft: --eval-limit 0: no validation or held-out judging")
    longest = max((len(p) for _, ids in judges.values() for p in ids), default=0)
    engine = (Sampler.for_policy(model, device, 128, longest + args.eval_max_new_tokens, compile, memory_frac=JUDGE_CACHE_FRAC)
              if judges else None)

    def judge(which, stop_when=None):
        engine.load_weights(model)
        return heldout_accuracy(engine, tokenizer, *judges[which], args.eval_max_new_tokens, rank, world, args.seed, stop_when)

    return set(judges), judge


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.toy, args.precision, args.offload, args.dist_timeout)
    args.precision = precision_of(args.precision, device)  # run.json records what ran
    if args.toy:
        toy.setup(args.seed, rank)
    run = RunDir(args.out, args, rank, "sft.py", device)
    if (finished := run.start(args.resume, args.overwrite)) is not None:
        return done_already(args.out, finished, rank)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    tokenizer = load_tokenizer(args.tokenizer)
    check_vocab(tokenizer, args.model, args.tokenizer)
    family = args.family or default_judge_family(tokenizer)  # the judge prompts it learns, and is judged in
    rows, dropped, counts = encode_sft_rows(args.data, tokenizer, args.max_len, args.truncate, family)
    total = planned = count_steps(args, len(rows))
    run.check_disk(total)
    compile = compile_wanted(args.compile, device)
    if args.offload:
        check_host_memory(args.model, world)
    model = load_for_training(args.model, world, device, compile=compile, grad_ckpt=args.grad_ckpt, precision=args.precision,
                              offload=args.offload)
    optimizer = make_optimizer(model, args.lr, (0.9, 0.95), args.weight_decay)
    step = 0
    if run.resuming:
        step, extra = load_state(run.state, model, optimizer, rank)
        total = step if extra.get("target_met") else total  # a run that met --stop-at-accuracy stays finished
    if rank == 0:
        print(f"sft: {len(rows)} rows ({dropped} dropped as longer than {args.max_len}{describe_counts(counts)}), "
              f"{M.num_params(model) / 1e6:.2f}M params, {world} rank(s) on {device.type} in {args.precision}, {total} steps of "
              f"{args.global_batch} sequences, start at step {step}")
    judges, judge = judge_sets(args, model, tokenizer, family, compile, rank, world, device)
    warmup = max(1, int(args.warmup * total))
    run.open_metrics(step, total)
    bar = tqdm(total=total, initial=step, disable=rank != 0, desc="sft")
    rec, start, longest_micro = {}, step, max(args.tokens_per_micro, args.max_len)  # a longer row is a micro-batch alone
    stop_at = min(total, step + args.stop_after_steps) if args.stop_after_steps else total
    while step < stop_at and not run.stopping:
        lr = lr_at(step, total, args.lr, warmup, args.min_lr_ratio)
        rec = train_step(args, model, optimizer, rows, step, lr, tokenizer.pad_id or 0, rank, world, device, run.state)
        step += 1
        if (fitted := fit_recompute(model, args.grad_ckpt, step - start, longest_micro, device)) and rank == 0:
            tqdm.write(f"sft: {fitted}")
        if "val" in judges and step % args.val_every == 0:
            # given up on a stop signal (None) only where it decides nothing, so a resume runs as the run would have
            rec["val_accuracy"] = judge("val", None if args.stop_at_accuracy else stop_requested)[0]
            if args.stop_at_accuracy and rec["val_accuracy"] >= args.stop_at_accuracy:
                total = stop_at = run.total = step  # the target is met: this step is the last (RunDir's too)
                if rank == 0:
                    tqdm.write(f"sft: validation judge accuracy {rec['val_accuracy']:.1f}% >= {args.stop_at_accuracy:g}% "
                               f"at step {step}: stopping")
        run.log(rec, bar, loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}",
                **({"mfu": f"{rec['mfu']:.1%}"} if rec["mfu"] is not None else {}))
        run.save(model, optimizer, step, total, stop_at, extra={"target_met": step == total and total < planned})
    bar.close()
    if step < total:  # stopped early (on purpose, or on a signal): the state is saved, --resume continues
        return run.stopped_early({"steps": step})
    summary = {"steps": step, "final_loss": rec.get("loss"), "dropped": dropped}
    if args.truncate:
        summary["truncated"] = counts["truncated"]
    return finish(args, model, summary, (lambda: judge("heldout")) if "heldout" in judges else None, rank)


def finish(args, model, summary, judge_heldout, rank):
    """Save the model (Hugging Face layout, tokenizer beside it) and the summary, with held-out accuracy if asked."""
    out_model = os.path.join(args.out, "model")
    save_checkpoint(model, out_model, rank, args.save_dtype, args.tokenizer)
    if judge_heldout:
        acc, unparsed = judge_heldout()
        summary.update(heldout_accuracy=acc, heldout_unparsed=unparsed)
    if rank == 0:
        write_swapped(os.path.join(args.out, "summary.json"), json.dumps(summary, indent=2))  # its finish mark: whole or none
        print("sft done: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items())
              + f"\ncheckpoint: {out_model}")
    end_distributed()
    return summary


def train_step(args, model, optimizer, rows, step, lr, pad_id, rank, world, device, state_dir):
    """One optimizer step over --global-batch sequences of a seeded per-epoch permutation -> the step's record."""
    t0 = time.time()
    batch = [rows[i] for i in epoch_batch(len(rows), args.global_batch, step, args.seed)]
    n_step = sum(sum(m[1:]) for _, m in batch)  # supervised tokens in the whole global batch (all ranks)
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss_sum = 0.0
    # the whole batch is packed, then dealt: rank r runs micro-batches r, r + world, ... Rows come out longest first and
    # full, so at each forward (FSDP: every rank waits for the slowest) the ranks hold about as many tokens
    batch_micros = micro_batches(batch, args.tokens_per_micro)
    micros = batch_micros[rank::world]
    n_idle = -(-len(batch_micros) // world) - len(micros)  # FSDP: every rank runs as many forwards and backwards
    for k, rows in enumerate(micros):
        accumulate_gradients(model, last=k == len(micros) - 1)
        ids, positions, targets, weights, packed = pack_batch(rows, pad_id, device, M.compute_dtype(model))
        nll = -model(ids, positions, targets=targets, loss_weights=weights, packed=packed)  # sum of -log p, supervised tokens
        # FSDP averages gradients over ranks; * world turns that into the sum over the global batch
        (nll / n_step * world).backward()
        loss_sum = loss_sum + nll.detach().double()  # on the device: reading it would wait for each micro-batch's backward
    for _ in range(n_idle):
        idle_backward(model, device)
    grad_norm = clip_grad_norm(model, args.grad_clip)
    loss_sum, tokens = all_reduce_sum([float(loss_sum)], device)[0], sum(len(s) for s, _ in batch)
    stop_if_not_finite("sft.py", step + 1, state_dir, loss=loss_sum / n_step, grad_norm=grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds, flops_peak = time.time() - t0, gpu_peaks(device)[0]  # MFU: model FLOPs over the ranks' peak (on known GPUs)
    mfu = train_flops(model, [(0, len(s) - 1) for s, _ in batch]) / seconds / (world * flops_peak) if flops_peak else None
    return {"step": step + 1, "loss": loss_sum / n_step, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens / seconds,
            "mfu": mfu, "gpu_peak_gib": gpu_peak_gib(device)}


if __name__ == "__main__":
    cli(main)
