"""
grpo.py: stage 2 of RM-R1, GRPO with the verdict reward. The project's main job.

    python grpo.py                  # the toy judge task end to end on a laptop CPU (SFT first if needed)
    torchrun --nproc_per_node 8 grpo.py --model runs/sft-7b/model --data rl.jsonl --out runs/grpo-7b

The algorithm, per step:
1. Rollout. Take R = --rollout-prompts judge prompts q (a seeded permutation of the data, one epoch after
   another); rank r takes rollout positions r, r + world, ... (so every mini-batch is split evenly). The
   policy's weights are copied into a plain (unsharded) rollout model, in bf16 on GPUs, and the sampler
   (sampler.py: static KV cache, continuous batching, compiled decode step) draws a group of G = --n traces
   o_1..o_G per prompt (temperature 1, top-p 1; the prefill is shared by the group). The draws are keyed
   by (step, prompt, sample), so they do not depend on the number of ranks.
2. Reward. r_i = +1 if o_i ends with the verdict matching the label, -1 otherwise (rewards.judge_reward;
   a trace cut at --max-new-tokens gets -1). With --format-reward: format (0/1) + correct (0/1).
3. Advantage, per group: A_i = (r_i - mean(r)) / (std(r) + 1e-6) (unbiased std; --no-std-norm drops the
   division), the same for every token of o_i. A group whose rewards are all equal has A = 0: it gives no
   gradient, and is counted (zero_std_frac).
4. Old log-probs log pi_old(o_i,t) are computed once with the training forward (not the sampler's), and
   reference log-probs log pi_ref with the frozen starting policy when --kl > 0. Every training forward runs
   a group's prompt once for its G responses (model.SharedPrefix: each response attends to the prompt and to
   itself), which gives the same log-probs as G separate [prompt, o_i] rows at a fraction of the cost when
   prompts are long.
5. Update: the R prompts are split into mini-batches of --minibatch-prompts; one AdamW step each, so after
   the first step the policy differs from pi_old and the ratio and clip matter. Per response token:
       rho = exp(log pi - log pi_old)
       L_pg  = -min(rho A, clip(rho, 1 - clip, 1 + clip_high) A)
       L_kl  = k3 = exp(d) - d - 1,  d = clamp(log pi_ref - log pi, -20, 20), then clamp(k3, -10, 10)
       L_tok = L_pg + kl * L_kl
   aggregated over the mini-batch (all micro-batches, all ranks) as
       token-mean            sum L_tok / (number of response tokens)                    [reference]
       seq-mean-token-mean   mean over sequences of (mean over the sequence's tokens)
       dr-grpo               sum L_tok / (number of sequences * max_new_tokens)
   then grad-norm clipping and an AdamW step (constant LR as the paper; --lr-schedule cosine decays it to 0).

Prompts longer than --max-prompt-len are dropped and counted. Metrics go to metrics.jsonl and the
progress bar; held-out accuracy (greedy, eval.py's code path) runs every --eval-every steps. Checkpoints:
Hugging Face layout model + resumable state (training.py); --resume continues exactly.
"""
import argparse
import json
import os
import random
import subprocess
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import model as M
from data import default_judge_family, load_judge_examples, load_tokenizer, tokenize_prompts
from rewards import format_reward, judge_reward, parse_verdict
from sampler import Sampler
from eval import heldout_accuracy, load_heldout
from training import (_local, all_reduce_sum, copy_tokenizer, idle_backward, load_state, log_step, lr_at, make_optimizer,
                      save_state, setup_distributed, shard_model)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="GRPO with the verdict reward (RM-R1 stage 2)")
    ap.add_argument("--model", default=None, help="starting policy, HF dir (default: the toy SFT checkpoint)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir (default: --model)")
    ap.add_argument("--data", default=None, help="RM-R1 RL JSONL, or preference pairs with --format")
    ap.add_argument("--format", default="rm-r1", choices=["rm-r1", "pairs", "rm-bench", "judgebench", "rmb"])
    ap.add_argument("--family", default=None, choices=["instruct", "reasoning"], help="judge prompts for pair data")
    ap.add_argument("--out", default=None)
    # torchrun swallows a bare `--n` (it abbreviates its own --nnodes...), so -n / --group-size also work
    ap.add_argument("-n", "--n", "--group-size", dest="n", type=int, default=7, help="samples per prompt (the group)")
    ap.add_argument("--rollout-prompts", type=int, default=None, help="prompts per rollout [1024; toy 64]")
    ap.add_argument("--minibatch-prompts", type=int, default=None, help="prompts per optimizer step [128; toy 16]")
    ap.add_argument("--gen-prompts", type=int, default=None, help="prompts decoded at once: the sampler has gen-prompts x n slots [32; toy 64]")
    ap.add_argument("--micro-seqs", type=int, default=None, help="sequences per forward/backward, in whole groups [8; toy 112]")
    ap.add_argument("--steps", type=int, default=0, help="rollout steps (0 = one epoch over the data) [toy 180]")
    ap.add_argument("--lr", type=float, default=None, help="[1e-6; toy 2e-4]")
    ap.add_argument("--lr-schedule", default=None, choices=["constant", "cosine"],
                    help="constant, or cosine decay to 0 over the run's steps [constant; toy cosine]")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--clip", type=float, default=0.2)
    ap.add_argument("--clip-high", type=float, default=None, help="upper clip (default: --clip)")
    ap.add_argument("--kl", type=float, default=None, help="k3 KL coefficient; 0 loads no reference model [0.001; toy 0.05]")
    ap.add_argument("--loss-agg", default="token-mean", choices=["token-mean", "seq-mean-token-mean", "dr-grpo"])
    ap.add_argument("--no-std-norm", action="store_true", help="advantage r - mean(r), without / std")
    ap.add_argument("--format-reward", action="store_true", help="cold-start reward: format + correct")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--max-prompt-len", type=int, default=None, help="[4096; toy 512]")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="[8192; toy 48]")
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--eval-data", default=None, help="pairs JSONL for held-out accuracy")
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--eval-limit", type=int, default=200)
    ap.add_argument("--save-every", type=int, default=20)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the training blocks and the sampler's decode step (default: on with CUDA)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--stop-after-steps", type=int, default=0, help="stop (resumably) after this many steps in this run")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    import toy
    paths = toy.apply_defaults(args, dict(kl=(0.05, 0.001), gen_prompts=(64, 32), rollout_prompts=(64, 1024),
                                          minibatch_prompts=(16, 128), micro_seqs=(112, 8), lr=(2e-4, 1e-6),
                                          max_prompt_len=(512, 4096), max_new_tokens=(48, 8192),
                                          lr_schedule=("cosine", "constant")))
    if paths:
        args.model = "runs/toy/sft/model"
        args.data, args.format = args.data or paths["rl"], "rm-r1"
        args.eval_data = args.eval_data or paths["heldout"]
        args.out = args.out or "runs/toy/grpo"
        args.steps = args.steps or 180
    if args.data is None or args.out is None:
        ap.error("--data and --out are required with --model")
    if args.n < 2:
        ap.error(f"--n {args.n}: GRPO needs a group of at least 2 samples per prompt to compute advantages")
    if args.rollout_prompts % args.minibatch_prompts:
        ap.error("--rollout-prompts must be a multiple of --minibatch-prompts")
    args.tokenizer = args.tokenizer or args.model
    args.clip_high = args.clip if args.clip_high is None else args.clip_high
    return args, paths is not None


# ----------------------------------------------------------------------------- the math (tested by hand)

def group_advantages(rewards, n, std_norm=True, eps=1e-6):
    """rewards [P * n] (prompt-major) -> advantages [P * n], and the fraction of all-equal groups."""
    r = rewards.view(-1, n)
    a = r - r.mean(1, keepdim=True)
    if std_norm:
        a = a / (r.std(1, keepdim=True) + eps)  # unbiased std, as the reference
    zero_std = (r.max(1).values == r.min(1).values).float().mean()
    return a.reshape(-1), zero_std.item()


def k3_kl(logp, ref_logp):
    """Low-variance KL estimate of KL(pi || pi_ref) per token, clamped as the reference."""
    d = (ref_logp - logp).clamp(-20, 20)
    return (d.exp() - d - 1).clamp(-10, 10)


def policy_loss_terms(logp, old_logp, adv, clip_low, clip_high):
    """-> per-token clipped surrogate loss and clip indicator."""
    ratio = (logp - old_logp).clamp(-20, 20).exp()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def aggregate(loss_tok, mask, agg, n_tokens, n_seqs, max_new_tokens):
    """Sum of this micro-batch's share of the mini-batch loss. n_tokens / n_seqs are the mini-batch's
    global counts (all micro-batches, all ranks), so summing the shares gives the exact aggregate."""
    if agg == "token-mean":
        return (loss_tok * mask).sum() / n_tokens
    if agg == "seq-mean-token-mean":
        return ((loss_tok * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / n_seqs
    if agg == "dr-grpo":
        return (loss_tok * mask).sum() / (n_seqs * max_new_tokens)
    raise ValueError(f"unknown loss aggregation {agg!r}")


# ----------------------------------------------------------------------------- training

def group_batch(prompts, responses, n, pad_id, device):
    """G prompts and their G*n responses (prompt-major) -> one row per group, [prompt[:-1] | n segments], where
    segment j = [last prompt token, o_j[:-1]] with targets o_j: the prompt runs once for its whole group
    (model.SharedPrefix), and each response is scored exactly as in [prompt, o_j].
    Returns ids, positions, targets, response mask (all [G, P + n*R]), the SharedPrefix, and `unpack`,
    which turns a [G, P + n*R] result into per-response rows [G*n, R]."""
    G, P, R = len(prompts), max(len(p) for p in prompts) - 1, max(len(r) for r in responses)
    ids = torch.full((G, P + n * R), pad_id, dtype=torch.long)
    targets, mask = torch.full_like(ids, pad_id), torch.zeros(G, P + n * R)
    positions = torch.arange(P + n * R).repeat(G, 1)
    prefix_valid = torch.zeros(G, P, dtype=torch.bool)
    for g, p in enumerate(prompts):
        ids[g, :len(p) - 1] = torch.tensor(p[:-1])
        prefix_valid[g, :len(p) - 1] = True
        for j in range(n):
            o, c = responses[g * n + j], P + j * R
            ids[g, c:c + len(o)] = torch.tensor(p[-1:] + o[:-1])
            targets[g, c:c + len(o)] = torch.tensor(o)
            mask[g, c:c + len(o)] = 1
            positions[g, c:c + R] = torch.arange(len(p) - 1, len(p) - 1 + R)
    unpack = lambda t: t[:, P:].reshape(G * n, R)
    return (ids.to(device), positions.to(device), targets.to(device), mask.to(device),
            M.SharedPrefix(prefix_valid.to(device), n, R), unpack)


def response_logprobs(model, prompts, responses, n, pad_id, device, temperature):
    """-> log-probs, entropies and mask of the G*n responses, each [G*n, R] (one forward, prompts shared)."""
    ids, positions, targets, mask, shared, unpack = group_batch(prompts, responses, n, pad_id, device)
    logp, entropy = model(ids, positions, targets=targets, temperature=temperature, token_mask=mask, shared_prefix=shared)
    return unpack(logp), unpack(entropy), unpack(mask)


@torch.no_grad()
def batched_logprobs(model, prompts, responses, n, pad_id, device, micro, temperature):
    """Log-probs of the responses, `micro` groups per forward (a list of [micro * n, R] tensors). Under FSDP each
    forward all-gathers weights, so ranks holding fewer groups run idle forwards to match the busiest rank."""
    out, starts = [], range(0, len(prompts), micro)
    for _ in range(int(all_reduce_sum([len(starts)], device, op="max")[0]) - len(starts)):
        model(torch.zeros(1, 2, dtype=torch.long, device=device))
    for s in starts:
        out.append(response_logprobs(model, prompts[s:s + micro], responses[s * n:(s + micro) * n], n, pad_id, device,
                                     temperature)[0])
    return out


def main(argv=None):
    args, toy = parse_args(argv)
    rank, world, device = setup_distributed()
    if toy and not os.path.exists(os.path.join(args.model, "model.safetensors")):
        if rank == 0:  # stage 1 as its own script (one process), exactly as a user would run it
            print("toy: no SFT checkpoint yet, running `python sft.py` first", flush=True)
            env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
            subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "sft.py"),
                            "--seed", str(args.seed)], env=env, check=True)
        if dist.is_initialized():
            dist.barrier()
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    tokenizer = load_tokenizer(args.tokenizer)
    family = args.family or default_judge_family(tokenizer)
    examples, empty = load_judge_examples(args.data, args.format, family, args.seed, drop_empty=True)
    if empty and rank == 0:
        print(f"{args.data}: {empty} pairs with an empty or whitespace-only answer dropped (nothing to learn from them)")
    examples, prompt_ids, dropped = tokenize_prompts(examples, tokenizer, args.max_prompt_len)
    if len(examples) < args.rollout_prompts:
        raise ValueError(f"{args.data}: {len(examples)} usable prompts, fewer than --rollout-prompts {args.rollout_prompts}")
    per_epoch = len(examples) // args.rollout_prompts
    total = args.steps or per_epoch

    policy = M.load_model(args.model, dtype=torch.float32)
    policy.checkpoint_activations = args.grad_ckpt
    args.compile = args.compile if args.compile is not None else device.type == "cuda"
    if args.compile:
        M.compile_blocks(policy)
    policy = shard_model(policy, world, device)
    ref = None
    if args.kl > 0:
        ref = shard_model(M.load_model(args.model, dtype=torch.float32).requires_grad_(False).eval(), world, device)
    optimizer = make_optimizer(policy, args.lr, (0.9, 0.999), args.weight_decay)
    heldout = load_heldout(args.eval_data, tokenizer, args.eval_limit, args.seed) if args.eval_data else ([], [])
    longest = max(map(len, prompt_ids + heldout[1]))
    engine = Sampler.for_policy(policy, args.gen_prompts * args.n, longest + args.max_new_tokens, compile=args.compile)

    def judge_heldout():  # greedy held-out accuracy of the current policy, with the run's token budget
        engine.load_weights(policy)
        return heldout_accuracy(engine, tokenizer, *heldout, args.max_new_tokens, rank, world, args.seed)[0]

    state_dir, step, history = os.path.join(args.out, "state"), 0, {}
    if args.resume and os.path.exists(state_dir):
        step, history = load_state(state_dir, policy, optimizer, rank)
    os.makedirs(args.out, exist_ok=True)
    if rank == 0:
        print(f"grpo: {len(examples)} prompts ({dropped} dropped as longer than {args.max_prompt_len}), "
              f"{total} steps x {args.rollout_prompts} prompts x n={args.n}, {args.rollout_prompts // args.minibatch_prompts} "
              f"optimizer steps per rollout, kl {args.kl}, {world} rank(s) on {device.type}, start at step {step}")
    if args.eval_data and "heldout_start" not in history:
        history["heldout_start"] = judge_heldout()
        if rank == 0:
            print(f"held-out judge accuracy before GRPO: {history['heldout_start']:.1f}%")
    metrics = open(os.path.join(args.out, "metrics.jsonl"), "a" if step else "w") if rank == 0 else None
    bar = tqdm(total=total, initial=step, disable=rank != 0, desc="grpo")
    pad = tokenizer.pad_id or 0
    rec = {}
    stop_at = min(total, step + args.stop_after_steps) if args.stop_after_steps else total
    while step < stop_at:
        for group in optimizer.param_groups:
            group["lr"] = args.lr if args.lr_schedule == "constant" else lr_at(step, total, args.lr, 0, 0.0)
        rec = rollout_and_update(args, step, policy, ref, optimizer, engine, tokenizer, examples, prompt_ids, per_epoch, rank,
                                 world, device, pad)
        step += 1
        if args.eval_data and args.eval_every and step % args.eval_every == 0 and step < total:
            rec["heldout_accuracy"] = judge_heldout()
        if rank == 0:
            log_step(metrics, bar, rec, reward=f"{rec['reward_mean']:+.3f}", acc=f"{rec['accuracy']:.2f}", kl=f"{rec['kl']:.4f}")
        if step % args.save_every == 0 or step == stop_at:
            save_state(state_dir, policy, optimizer, step, rank, extra=history)
    bar.close()
    if step < total:  # stopped early on purpose: the state is saved, --resume continues
        return {"steps": step, **history}
    M.save_model(policy, os.path.join(args.out, "model"), rank=rank)
    if rank == 0:
        copy_tokenizer(args.tokenizer, os.path.join(args.out, "model"))
    summary = {"steps": step, **history}
    if args.eval_data:
        summary["heldout_end"] = judge_heldout()
    if rank == 0:
        json.dump(summary, open(os.path.join(args.out, "summary.json"), "w"), indent=2)
        curve = [json.loads(line) for line in open(os.path.join(args.out, "metrics.jsonl"))]
        print("reward curve (mean reward per step): " + " ".join(f"{r['reward_mean']:+.2f}" for r in curve[::max(1, len(curve) // 10)]))
        if args.eval_data:
            print(f"held-out judge accuracy: {summary['heldout_start']:.1f}% before GRPO -> {summary['heldout_end']:.1f}% after")
        print(f"checkpoint: {os.path.join(args.out, 'model')}")
        metrics.close()
    if dist.is_initialized():
        dist.destroy_process_group()
    return summary


def rollout_and_update(args, step, policy, ref, optimizer, engine, tokenizer, examples, prompt_ids, per_epoch, rank, world,
                       device, pad):
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(len(examples), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch)).tolist()
    batch = perm[k * args.rollout_prompts:(k + 1) * args.rollout_prompts]
    n = args.n

    # 1-2. rollout and rewards: this rank's rollout positions, every world-th, sampled by the engine from a copy of
    # the current weights; the draws are keyed by (step, position, sample), so they do not depend on the ranks
    t0 = time.time()
    mine = list(range(rank, len(batch), world))
    engine.load_weights(policy)
    responses = engine.generate([prompt_ids[batch[j]] for j in mine], args.max_new_tokens, args.temperature, args.top_p,
                                args.top_k, n, tokenizer.stop_ids, seed=args.seed * 100003 + step,
                                vocab_size=tokenizer.vocab_size, prompt_ids=mine)
    t_rollout = time.time() - t0
    prompts = [prompt_ids[batch[j]] for j in mine]  # one per group; responses are prompt-major
    owner = [j for j in mine for _ in range(n)]  # rollout-batch position of each sequence: its group
    truncated = [not r or r[-1] not in tokenizer.stop_ids for r in responses]
    texts = [tokenizer.decode(r) for r in responses]
    labels = [examples[batch[j]].label for j in owner]
    reward_fn = format_reward if args.format_reward else judge_reward
    rewards = torch.tensor([reward_fn(t, l, tr) for t, l, tr in zip(texts, labels, truncated)])
    correct = torch.tensor([judge_reward(t, l, tr) > 0 for t, l, tr in zip(texts, labels, truncated)], dtype=torch.float)
    adv, zero_std = group_advantages(rewards, n, std_norm=not args.no_std_norm)

    # 4. old and reference log-probs with the training forward
    t0 = time.time()
    micro = max(1, args.micro_seqs // n)  # groups per forward: a group's prompt is run once for its n responses
    old = batched_logprobs(policy, prompts, responses, n, pad, device, micro, args.temperature)
    refs = batched_logprobs(ref, prompts, responses, n, pad, device, micro, args.temperature) if ref is not None else None
    t_logprobs = time.time() - t0
    t0 = time.time()

    # 5. one optimizer step per mini-batch of prompts; global counts first so aggregation is exact
    n_mb = args.rollout_prompts // args.minibatch_prompts
    mb_of = [o // args.minibatch_prompts for o in owner]
    counts = [0.0] * (2 * n_mb)
    for i, r in enumerate(responses):
        counts[mb_of[i]] += len(r)
        counts[n_mb + mb_of[i]] += 1
    counts = all_reduce_sum(counts, device)
    parts = [[] for _ in range(n_mb)]  # micro-batches of local group indices, per mini-batch
    for g in range(len(mine)):
        m = mb_of[g * n]
        if not parts[m] or len(parts[m][-1]) == micro:
            parts[m].append([])
        parts[m][-1].append(g)
    n_micro = all_reduce_sum([len(p) for p in parts], device, op="max")  # ranks run equal counts (FSDP)
    stats = {"kl": 0.0, "clip": 0.0, "entropy": 0.0, "grad_norm": 0.0}
    train_tokens = 0
    for m in range(n_mb):
        n_tok, n_seq = max(counts[m], 1.0), max(counts[n_mb + m], 1.0)
        for _ in range(int(n_micro[m]) - len(parts[m])):
            idle_backward(policy, device)
        for part in parts[m]:
            seqs = [g * n + j for g in part for j in range(n)]
            logp, entropy, mask = response_logprobs(policy, [prompts[g] for g in part], [responses[i] for i in seqs], n,
                                                    pad, device, args.temperature)
            old_lp = torch.cat([_row(old, i, micro * n, mask.shape[1]) for i in seqs])
            a = adv[seqs].to(device)[:, None]
            loss_tok, clipped = policy_loss_terms(logp, old_lp, a, args.clip, args.clip_high)
            if refs is not None:
                kl = k3_kl(logp, torch.cat([_row(refs, i, micro * n, mask.shape[1]) for i in seqs]))
                loss_tok = loss_tok + args.kl * kl
                stats["kl"] += (kl.detach() * mask).sum().item() / counts[m] / n_mb if counts[m] else 0.0
            loss = aggregate(loss_tok, mask, args.loss_agg, n_tok, n_seq, args.max_new_tokens)
            (loss * world).backward()  # FSDP averages over ranks; the aggregate is already global
            stats["clip"] += (clipped * mask).sum().item() / n_tok / n_mb
            stats["entropy"] += (entropy.detach() * mask).sum().item() / n_tok / n_mb
            train_tokens += sum(len(prompts[g]) for g in part) + int(mask.sum())  # prompts run once per group
        gn = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip)
        stats["grad_norm"] += float(_local(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)) / n_mb
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    t_train = time.time() - t0

    lengths = [len(r) for r in responses]
    unparsed = [tr or parse_verdict(t) is None for t, tr in zip(texts, truncated)]
    sums = all_reduce_sum([rewards.sum().item(), correct.sum().item(), sum(unparsed), sum(lengths), sum(truncated),
                           zero_std * len(mine), len(responses), len(mine), sum(lengths), train_tokens,
                           stats["kl"], stats["clip"], stats["entropy"]], device)
    maxlen = torch.tensor(float(max(lengths, default=0)), device=device)
    if dist.is_initialized():
        dist.all_reduce(maxlen, op=dist.ReduceOp.MAX)
    n_seq_all, n_prompt_all = sums[6], sums[7]
    return {"step": step + 1, "reward_mean": sums[0] / n_seq_all, "accuracy": sums[1] / n_seq_all,
            "unparsed_rate": sums[2] / n_seq_all, "response_len_mean": sums[3] / n_seq_all, "response_len_max": maxlen.item(),
            "truncated_frac": sums[4] / n_seq_all, "zero_std_frac": sums[5] / n_prompt_all,
            "kl": sums[10], "clip_frac": sums[11], "entropy": sums[12], "grad_norm": stats["grad_norm"],
            "rollout_tokens_per_s": sums[8] / max(t_rollout, 1e-9), "train_tokens_per_s": sums[9] / max(t_train, 1e-9),
            "rollout_s": t_rollout, "logprobs_s": t_logprobs, "train_s": t_train}


def _row(chunks, i, micro, width):
    """Row i of log-probs stored in micro-batch chunks, padded/cut to `width` columns."""
    t = chunks[i // micro][i % micro: i % micro + 1]
    return torch.nn.functional.pad(t, (0, max(0, width - t.shape[1])))[:, :width]


if __name__ == "__main__":
    main()
