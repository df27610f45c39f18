"""
grpo.py: stage 2 of RM-R1, GRPO with the verdict reward. The project's main job.

    python grpo.py                  # the toy judge task end to end on a laptop CPU (SFT first if needed)
    torchrun --nproc_per_node 8 grpo.py --model runs/sft-7b/model --data rl.jsonl --out runs/grpo-7b

The algorithm, per step:
1. Rollout. Take R = --rollout-prompts judge prompts q (a seeded permutation of the data, one epoch after another);
   rank r samples rollout positions r, r + world, ... (rank_positions). The policy's weights are copied into a plain
   (unsharded) rollout model, in bf16 on GPUs (with --rollout-tp T, split over T ranks that decode their positions
   together: decode_model.py), and the sampler (sampler.py: static KV cache, continuous batching, compiled decode
   step) draws a group of G = --n traces o_1..o_G per prompt (temperature 1, top-p 1; the prefill is shared by the
   group). The draws are keyed by (step, prompt, sample), so they do not depend on the number of ranks. The sampler
   also returns each token's log-prob under its own forward, log mu(o_i,t) (other kernels, and bf16 on GPUs). The
   ranks then gather each other's traces: every rank holds the whole rollout, and the update shares it out by length.
2. Reward. r_i = +1 if o_i ends with the verdict matching the label, -1 otherwise (rewards.judge_reward; a trace cut
   at --max-new-tokens gets -1). With --format-reward: format (0/1) + correct (0/1).
3. Advantage, per group: A_i = (r_i - mean(r)) / (std(r) + 1e-6) (unbiased std; --no-std-norm drops the division), the
   same for every token of o_i. A group whose rewards are all equal has A = 0: no gradient (counted: zero_std_frac).
4. Old log-probs log pi_old(o_i,t) are computed once with the training forward (not the sampler's) on exactly the
   micro-batches the update will use (so the first mini-batch's ratio is exactly 1), and reference log-probs log
   pi_ref with the frozen starting policy when --kl > 0. Every training forward runs a group's prompt once for its G
   responses, packed back to back in one row (model.PackedRows: each response attends to the prompt and to itself; no
   padding between responses), which gives the same log-probs as G separate [prompt, o_i] rows at a fraction of the
   cost when prompts are long; with --micro-seqs < G, once per slice of the group's responses (less memory per
   forward). training.micro_batch_plan deals each mini-batch's micro-batches out to the ranks longest first, one each
   a round, so at each forward (where FSDP makes every rank wait for the slowest) the ranks hold about as many tokens
   (logged: train_balance). Logged too: the sampler-trainer mismatch log pi_old - log mu (mean, max |delta|, and k3
   KL(mu || pi_old)).
5. Update: the R prompts are split into mini-batches of --minibatch-prompts; one AdamW step each, so after
   the first step the policy differs from pi_old and the ratio and clip matter. Per response token:
       rho = exp(log pi - log pi_old)
       w   = min(exp(log pi_old - log mu), cap)       truncated importance sampling (--rollout-is token; sequence:
                                                      the sum over o_i's tokens in the exponent; none: w = 1)
       L_pg  = -w min(rho A, clip(rho, 1 - clip, 1 + clip_high) A)
       L_kl  = k3 = exp(d) - d - 1,  d = clamp(log pi_ref - log pi, -20, 20), then clamp(k3, -10, 10)
       L_tok = L_pg + kl * L_kl
   w corrects for the rollout coming from mu, not pi_old: the sampler's copy differs from the trainer's forward (in
   bf16 by far more than in fp32), and without w the update is off-policy by that much.
   Aggregated over the mini-batch (all micro-batches, all ranks) as
       token-mean            sum L_tok / (number of response tokens)                    [reference]
       seq-mean-token-mean   mean over sequences of (mean over the sequence's tokens)
       dr-grpo               sum L_tok / (number of sequences * max_new_tokens)
   then grad-norm clipping and an AdamW step (constant LR as the paper; --lr-schedule cosine decays it to 0).

Prompts longer than --max-prompt-len are dropped and counted (held-out ones too: they share the rollout's cache rows).
Metrics go to metrics.jsonl and the progress bar (train_mfu: the update's model FLOPs over its seconds and the GPUs'
peak); held-out accuracy (greedy, eval.py's code path) runs every --eval-every steps. A non-finite loss, gradient norm
or KL stops the run before the optimizer step, without saving. Checkpoints (rundir.py): the model in the Hugging Face
layout, in the starting checkpoint's dtype, and the resumable state; --resume continues exactly. A stop signal (SIGTERM)
gives up a step before its update (its rollout or log-probs: nothing has changed yet) and saves the last one, or lets an
update end and saves its step; a held-out judging is given up. --offload keeps the trainer's weights, gradients and
AdamW's moments in host memory (training.py).

Reading order: flags, maths, grpo_step's stages (rollout, score, old_and_ref_logprobs, update -> policy_update_step), main.
"""
import argparse
import json
import math
import os
import random
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import model as M
import toy
from data import FORMATS, default_judge_family, describe_counts, load_judge_examples, load_tokenizer, tokenize_prompts
from decode_model import check_split, tensor_parallel_group
from eval import heldout_accuracy, load_heldout
from rewards import format_reward, judge_reward, parse_verdict
from rundir import RunDir, done_already, load_state, save_checkpoint, write_swapped
from sampler import Sampler
from training import (accumulate_gradients, add_run_flags, all_gather_arrays, all_reduce_max, all_reduce_sum, check_flags,
                      check_host_memory, check_vocab, cli, clip_grad_norm, compile_wanted, end_distributed, epoch_batch,
                      fit_recompute, gpu_peak_gib, gpu_peaks, load_for_training, lr_at, make_optimizer, micro_batch_plan,
                      precision_of, setup_distributed, state_shard_bytes, stop_if_not_finite, stop_requested, train_balance,
                      train_flops)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="GRPO with the verdict reward (RM-R1 stage 2)")
    ap.add_argument("--model", default=None, help="starting policy, HF dir (default: the toy SFT checkpoint)")
    ap.add_argument("--data", default=None, help="RM-R1 RL JSONL, or preference pairs with --format")
    ap.add_argument("--format", default=None, choices=FORMATS, help="[rm-r1]")
    ap.add_argument("--family", default=None, choices=["instruct", "reasoning"], help="judge prompts for pairs (training, held-out)")
    # torchrun swallows a bare `--n` (it abbreviates its own --nnodes...), so -n / --group-size also work
    ap.add_argument("-n", "--n", "--group-size", dest="n", type=int, default=7, help="samples per prompt (the group)")
    ap.add_argument("--rollout-prompts", type=int, default=None, help="prompts per rollout [1024; toy 64]")
    ap.add_argument("--minibatch-prompts", type=int, default=None, help="prompts per optimizer step [128; toy 16]")
    ap.add_argument("--gen-prompts", type=int, default=None,
                    help="prompts decoded at once per rank: the sampler has gen-prompts x n slots [32, fewer if the KV "
                         "cache would pass --kv-cache-frac of the GPU; toy 64]")
    ap.add_argument("--kv-cache-frac", type=float, default=0.25, help="most of a GPU's memory the rollout KV cache may take")
    ap.add_argument("--kv-page-size", type=int, default=0, help="positions per page of a paged rollout KV cache (0: a dense "
                    "max-length row per slot): slots hold only the pages their sequences fill, and a step reads only those")
    ap.add_argument("--rollout-tp", type=int, default=1, help="consecutive ranks that decode together over a tensor-parallel "
                    "rollout copy, each holding 1/T of its blocks and KV cache (for a copy that does not fit one GPU)")
    ap.add_argument("--micro-seqs", type=int, default=None, help="sequences per forward/backward (below --n: slices of a group) [4; toy 112]")
    ap.add_argument("--steps", type=int, default=None, help="rollout steps [one epoch over the data; toy 180]")
    ap.add_argument("--lr", type=float, default=None, help="[1e-6; toy 2e-4]")
    ap.add_argument("--lr-schedule", default=None, choices=["constant", "cosine"],
                    help="constant, or cosine decay to 0 over the run's steps [constant; toy cosine]")
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--clip", type=float, default=0.2)
    ap.add_argument("--clip-high", type=float, default=None, help="upper clip (default: --clip)")
    ap.add_argument("--kl", type=float, default=None, help="k3 KL coefficient; 0 loads no reference model [0.001; toy 0.05]")
    ap.add_argument("--loss-agg", default="token-mean", choices=["token-mean", "seq-mean-token-mean", "dr-grpo"])
    ap.add_argument("--rollout-is", default="token", choices=["token", "sequence", "none"],
                    help="truncated importance sampling of the policy loss by pi_old / sampler, per token or sequence")
    ap.add_argument("--rollout-is-cap", type=float, default=2.0, help="the most an importance weight may be (>= 1)")
    ap.add_argument("--no-std-norm", action="store_true", help="advantage r - mean(r), without / std")
    ap.add_argument("--format-reward", action="store_true", help="cold-start reward: format + correct")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--max-prompt-len", type=int, default=None, help="[4096; toy 512]")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="[8192; toy 48]")
    ap.add_argument("--eval-data", default=None, help="held-out judge accuracy on these pairs (--eval-format)")
    ap.add_argument("--eval-format", default="pairs", choices=FORMATS, help="--eval-data's format (as --format)")
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--eval-limit", type=int, default=200)
    ap.add_argument("--log-rollouts", type=int, default=1, help="groups a step whose prompt and traces (with rewards, "
                    "advantages and verdicts) go to rollouts.jsonl in --out (0: none)")
    ap.add_argument("--save-every", type=int, default=None, help="save resumable state every N steps [5: a step is long; toy 20]")
    add_run_flags(ap, compiles="the training blocks and the sampler's decode step")
    args = ap.parse_args(argv)
    args.toy = toy.fill_defaults(args, dict(kl=(0.05, 0.001), gen_prompts=(64, 32), rollout_prompts=(64, 1024),
                                            minibatch_prompts=(16, 128), micro_seqs=(112, 4), lr=(2e-4, 1e-6), save_every=(20, 5),
                                            max_prompt_len=(512, 4096), max_new_tokens=(48, 8192), format=("rm-r1", "rm-r1"),
                                            lr_schedule=("cosine", "constant"), grad_ckpt=("none", "auto"), steps=(180, 0)))
    if args.toy:
        paths, args.model, args.out = toy.files(), "runs/toy/sft/model", args.out or "runs/toy/grpo"
        args.data, args.eval_data = args.data or paths["rl"], args.eval_data or paths["heldout"]
    if args.data is None or args.out is None:
        ap.error("--data and --out are required with --model")
    check_flags(ap, args, positive=("rollout_prompts", "minibatch_prompts", "gen_prompts", "micro_seqs", "lr", "temperature",
                                    "max_prompt_len", "max_new_tokens", "save_every"),
                nonnegative=("steps", "weight_decay", "grad_clip", "clip", "clip_high", "kl", "top_k", "eval_every", "eval_limit",
                             "stop_after_steps", "stop_after_minutes", "save_model_every", "kv_page_size", "log_rollouts"),
                fractions=("kv_cache_frac", "top_p"))
    if args.n < 2:
        ap.error(f"--n {args.n}: GRPO needs a group of at least 2 samples per prompt to compute advantages")
    if not args.rollout_is_cap >= 1:  # `not`: NaN too
        ap.error(f"--rollout-is-cap must be >= 1 (a weight below 1 everywhere only shrinks the step), got {args.rollout_is_cap}")
    if args.eval_every and not args.eval_data:
        ap.error(f"--eval-every {args.eval_every} judges --eval-data every {args.eval_every} steps: give --eval-data")
    if args.log_rollouts > args.rollout_prompts:
        ap.error(f"--log-rollouts {args.log_rollouts}: a step has only --rollout-prompts {args.rollout_prompts} groups")
    if args.rollout_prompts % args.minibatch_prompts:
        ap.error(f"--rollout-prompts {args.rollout_prompts} must be a multiple of --minibatch-prompts {args.minibatch_prompts}")
    world = int(os.environ.get("WORLD_SIZE", 1))
    state = 0 if args.offload else state_shard_bytes(world, reference_bytes(args))  # on the GPU, beside the copy
    check_split(ap, "--rollout-tp", args.rollout_tp, None if args.toy else args.model,  # (the toy's is not written yet)
                torch.float32 if args.precision == "fp32" else torch.bfloat16, args.kv_cache_frac, beside=state,
                remedy="Split it over more ranks with --rollout-tp, or lower --kv-cache-frac"
                + ("" if args.offload else ", or add --offload (the training state to host memory)"))
    if args.minibatch_prompts % world:
        ap.error(f"--minibatch-prompts {args.minibatch_prompts} must be a multiple of the {world} ranks, so that every "
                 "rank samples as many prompts and runs as many micro-batches of every mini-batch")
    args.tokenizer = args.tokenizer or args.model
    args.clip_high = args.clip if args.clip_high is None else args.clip_high
    return args


def reference_bytes(args):  # a parameter of the frozen reference (--kl > 0): in the compute dtype, bf16 on GPUs
    return (4 if args.precision == "fp32" else 2) * (args.kl > 0)


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


def rollout_is_weights(old_logp, rollout_logp, mask, mode, cap):
    """Truncated importance sampling: old_logp, rollout_logp (the sampler's), mask [S, R] -> weights of the policy
    loss, min(pi_old / mu, cap): [S, R] per token, [S, 1] per sequence (the product over its tokens), 1 for none."""
    if mode == "none":
        return torch.ones_like(old_logp[:, :1])
    d = (old_logp - rollout_logp) * mask
    d = d.sum(1, keepdim=True) if mode == "sequence" else d
    return d.clamp(-20, math.log(cap)).exp()


def rollout_mismatch(old_logp, rollout_logp, mask):
    """How far the sampler's log-probs are from the trainer's over the masked tokens -> on-device sums and max:
    |log pi_old - log mu| summed and maxed, k3 KL(mu || pi_old) summed (d = log pi_old - log mu, exp(d) - d - 1)."""
    d = (old_logp - rollout_logp) * mask
    return torch.stack([d.abs().sum(), d.abs().max(), (k3_kl(rollout_logp, old_logp) * mask).sum()]).double()


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


def rank_positions(rollout_prompts, world, rank, tp=1):
    """The rollout positions rank `rank` samples: r, r + world, ... (rollout_prompts / world of them: parse_args checks
    that --minibatch-prompts, and so --rollout-prompts, is a multiple of world); with a copy tensor parallel over tp
    consecutive ranks (--rollout-tp), those of all its group's ranks, which decode together. Training shares them anew."""
    return [p for p in range(rollout_prompts) if p % world // tp == rank // tp]


# ----------------------------------------------------------------------------- the training forward

def group_batch(prompts, responses, n, pad_id, device, dtype):
    """G prompts and their G*n responses (prompt-major) -> one packed row per group, [prompt[:-1] | seg_1 | ... | seg_n]
    where seg_j = [last prompt token, o_j[:-1]] with targets o_j, each exactly len(o_j) long: the prompt runs once for its
    whole group (model.PackedRows, doc 0; seg_j is doc j), and each response is scored exactly as in [prompt, o_j].
    Rows are right-padded to the longest, T = max_g (len(prompt_g) - 1 + sum_j len(o_gj)). Returns ids, positions,
    targets, response mask (all [G, T]), the layout, and `unpack`, which turns a [G, T] result into per-response rows
    [G*n, R] (R = the longest response; zero past each response's end)."""
    G, R = len(prompts), max(len(r) for r in responses)
    T = max(len(p) - 1 + sum(len(o) for o in responses[i * n:(i + 1) * n]) for i, p in enumerate(prompts))
    rows, where = [], torch.full((G * n, R), G * T)  # response token -> its flat index in a [G, T] result (G * T: a zero after it)
    for i, p in enumerate(prompts):
        P = c = len(p) - 1
        rows.append([(p[:-1], [pad_id] * P, [0] * P, 0, 0)])  # the prompt less its last token: doc 0, not scored
        for j in range(n):
            o = responses[i * n + j]
            rows[-1].append(([p[-1], *o[:-1]], o, [1] * len(o), P, j + 1))
            where[i * n + j, :len(o)] = torch.arange(i * T + c, i * T + c + len(o))
            c += len(o)
    where = where.to(device)
    unpack = lambda t: torch.cat([t.flatten(), t.new_zeros(1)])[where]
    return (*M.pack_rows(rows, pad_id, device, dtype), unpack)


def response_logprobs(model, prompts, responses, n, pad_id, device, temperature):
    """-> log-probs, entropies and mask of the G*n responses, each [G*n, R] (one forward, prompts shared)."""
    dtype = M.compute_dtype(model)
    ids, positions, targets, mask, packed, unpack = group_batch(prompts, responses, n, pad_id, device, dtype)
    logp, entropy = model(ids, positions, targets=targets, temperature=temperature, token_mask=mask, packed=packed)
    return unpack(logp), unpack(entropy), unpack(mask)


# ----------------------------------------------------------------------------- one GRPO step, in stages

@dataclass
class Job:  # what every step uses: settings, models, data, and where this rank stands
    args: argparse.Namespace
    policy: torch.nn.Module
    ref: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    engine: Sampler
    tokenizer: object
    examples: list
    prompt_ids: list  # every example's, each an array('i') (tokenize_prompts)
    rank: int
    world: int
    device: torch.device


@dataclass
class Rollout:  # the step's groups, every rank's, in rollout order: group g is prompts[g] with responses[g*n : (g+1)*n]
    prompts: list  # each an array('i') of token ids, as are the responses (a step's 7k traces: 4 bytes a token, not 36)
    responses: list
    rollout_logps: list  # the sampler's log-prob of each response token, an array('f') per response
    texts: list
    labels: list
    truncated: list
    seconds: float
    examples: list  # the data's row of each group (rollouts.jsonl names it)
    preempted: int = 0  # samples this rank's paged KV cache sent back to the queue (re-prefilled later)
    kv_pool_peak: float = 0.0  # this rank's paged KV cache's most pages in use at once, a share of its pool
    decode_steps: int = 0  # this rank's sampler's decode steps (the rollout's length in steps)
    slot_use: float = 0.0  # the tokens its decode steps made over decode steps x slots (1: every slot busy every step)


def grpo_step(job, step):
    """Rollout -> rewards and advantages -> old/reference log-probs -> one update per mini-batch -> (metrics, the groups
    rollouts.jsonl keeps), or None."""
    args = job.args
    if (ro := rollout(job, step)) is None:  # given up on a stop signal
        return None
    rewards, correct = score(job, ro)
    adv, zero_std = group_advantages(rewards, args.n, std_norm=not args.no_std_norm)
    prompt_lens, lengths = list(map(len, ro.prompts)), list(map(len, ro.responses))
    plans, t0 = micro_batch_plan(prompt_lens, lengths, args.n, args.minibatch_prompts, args.micro_seqs, job.world), time.time()
    if (logprobs := old_and_ref_logprobs(job, ro, plans[job.rank])) is None:  # given up on a stop signal, as the rollout
        return None
    old, refs, sampler_logp, mismatch = logprobs
    t_logprobs, t0 = time.time() - t0, time.time()
    updates = [update(job, step, ro, adv, part, old[m], refs[m] if refs else None, sampler_logp[m])
               for m, part in enumerate(plans[job.rank])]
    rec = step_metrics(job, step, ro, rewards, correct, zero_std, updates, mismatch, train_balance(prompt_lens, lengths, args.n, plans),
                       {"rollout_s": ro.seconds, "logprobs_s": t_logprobs, "train_s": time.time() - t0})
    return rec, logged_groups(job, step, ro, rewards, adv)


def rollout(job, step):
    """1. Sample n traces for each of this rank's prompts from a fresh copy of the policy's weights, then gather every
    rank's: each rank holds the step's whole rollout, so the update can share out its micro-batches (micro_batch_plan).
    None if a stop signal came first, to any rank: every rank gives up the step, which has changed nothing yet."""
    args, t0, n, world, tp = job.args, time.time(), job.args.n, job.world, job.engine.tp[0]
    batch = epoch_batch(len(job.examples), args.rollout_prompts, step, args.seed)
    mine = rank_positions(args.rollout_prompts, world, job.rank, tp)  # (with --rollout-tp, its group's too)
    job.engine.load_weights(job.policy)
    preempted, steps = job.engine.preemptions, job.engine.decode_steps
    # the draws are keyed by (step, position, sample), so they do not depend on the number of ranks
    drawn = job.engine.generate([job.prompt_ids[batch[p]] for p in mine], args.max_new_tokens, args.temperature, args.top_p,
                                args.top_k, n, job.tokenizer.stop_ids, seed=args.seed * 100003 + step, logprobs=True,
                                vocab_size=job.tokenizer.vocab_size, prompt_ids=mine, stop_when=stop_requested)
    if all_reduce_max([drawn is None], job.device)[0]:  # the ranks agree (those with no signal finished their share)
        return None
    responses, logps = drawn
    # the tokens its decode steps made (a trace's first comes from its prefill); with --rollout-tp, its group's
    steps, decoded = job.engine.decode_steps - steps, sum(len(r) - 1 for r in responses)
    own = [k * n + j for k, p in enumerate(mine) if p % world == job.rank for j in range(n)]  # its own positions
    responses, logps = [responses[i] for i in own], [logps[i] for i in own]
    # rank r sampled positions r, r + world, ...: its i-th group is position r + i * world
    responses, logps = all_gather_arrays(responses, job.device, "i"), all_gather_arrays(logps, job.device, "f")
    order = [(p % world, (p // world) * n + j) for p in range(args.rollout_prompts) for j in range(n)]
    responses, logps = [responses[r][i] for r, i in order], [logps[r][i] for r, i in order]
    labels = [job.examples[batch[p]].label for p in range(args.rollout_prompts) for _ in range(n)]
    return Rollout([job.prompt_ids[b] for b in batch], responses, logps, job.tokenizer.decode_batch(responses), labels,
                   [job.tokenizer.cut_off(r) for r in responses], time.time() - t0, [job.examples[b] for b in batch],
                   job.engine.preemptions - preempted,
                   job.engine.pages.peak / job.engine.pages.pool if job.engine.pages else 0.0,
                   steps, decoded / max(steps * job.engine.slots, 1))


def score(job, ro):
    """2. Rewards (the verdict reward, or format + correct with --format-reward) and correctness, per trace."""
    traces = list(zip(ro.texts, ro.labels, ro.truncated))
    verdict_rewards = torch.tensor([judge_reward(*t) for t in traces])  # +1 / -1
    rewards = torch.tensor([format_reward(*t) for t in traces]) if job.args.format_reward else verdict_rewards
    return rewards, (verdict_rewards > 0).float()


def logged_groups(job, step, ro, rewards, adv):
    """The step's first --log-rollouts groups, a row each for rollouts.jsonl: the prompt, and each trace with its reward,
    advantage, verdict (None: unparsed or cut off) and tokens, to read what the judge writes as it trains."""
    n = job.args.n
    trace = lambda i: {"text": ro.texts[i], "reward": rewards[i].item(), "advantage": adv[i].item(), "tokens": len(ro.responses[i]),
                       "verdict": None if ro.truncated[i] else parse_verdict(ro.texts[i]), "truncated": ro.truncated[i]}
    return [{"step": step + 1, "id": ro.examples[g].id, "label": ro.labels[g * n],
             "prompt": job.tokenizer.decode(ro.prompts[g]), "traces": [trace(i) for i in range(g * n, (g + 1) * n)]}
            for g in range(job.args.log_rollouts)]


def micro_rows(ro, seqs, n):
    """A micro-batch's rows -> its groups' prompts, its responses (prompt-major) and the responses per prompt."""
    groups = sorted({i // n for i in seqs})
    return [ro.prompts[g] for g in groups], [ro.responses[i] for i in seqs], len(seqs) // len(groups)


@torch.no_grad()
def old_and_ref_logprobs(job, ro, plan):
    """4. log pi_old and log pi_ref of every response, one tensor [groups * n, R] per micro-batch of the plan:
    the same packed rows (so the same kernels and rounding) as the update, so the first ratio is exactly 1. Also the
    sampler's log-probs laid out the same way, and its mismatch with pi_old (rollout_mismatch, summed over them).
    None if a stop signal came first, to any rank (the ranks agree before each forward): the step is given up, as in
    rollout, for nothing has changed yet."""
    args, pad, models = job.args, job.tokenizer.pad_id or 0, [m for m in (job.policy, job.ref) if m is not None]
    logps = [[[] for _ in plan] for _ in models]  # [model][mini-batch][micro-batch] -> [S, R]
    for out, model in zip(logps, models):
        for m, seqs in ((m, seqs) for m, micros in enumerate(plan) for seqs in micros):
            if all_reduce_max([stop_requested()], job.device)[0]:  # every rank asks before each forward
                return None
            out[m].append(response_logprobs(model, *micro_rows(ro, seqs, args.n), pad, job.device, args.temperature)[0])
    old, sampler_logp, mismatch = logps[0], [], []
    for micros, olds in zip(plan, old):
        sampler_logp.append([])
        for seqs, o in zip(micros, olds):
            rollout_logp, mask = sampler_logprobs(ro, seqs, o.shape[1], job.device)
            sampler_logp[-1].append(rollout_logp)
            mismatch.append(rollout_mismatch(o, rollout_logp, mask))
    return old, logps[1] if job.ref is not None else None, sampler_logp, mismatch


def sampler_logprobs(ro, seqs, width, device):
    """The sampler's log-probs of responses seqs -> [S, width] fp32 (zero-padded on the right) and their mask."""
    logp, mask = torch.zeros(len(seqs), width), torch.zeros(len(seqs), width)
    for row, i in enumerate(seqs):
        if k := len(ro.rollout_logps[i]):  # (frombuffer takes no empty buffer)
            logp[row, :k], mask[row, :k] = torch.frombuffer(ro.rollout_logps[i], dtype=torch.float32), 1
    return logp.to(device), mask.to(device)


def update(job, step, ro, adv, micros, old, refs, sampler_logp):
    """5. One optimizer step on one mini-batch (this rank's micro-batches of it) -> its statistics."""
    # the mini-batch's global token and sequence counts, so the loss aggregation over micro-batches and ranks is exact
    mb_tokens, mb_seqs = all_reduce_sum([sum(len(ro.responses[i]) for s in micros for i in s), sum(map(len, micros))], job.device)
    n_tok, n_seq = max(mb_tokens, 1.0), max(mb_seqs, 1.0)
    totals = {"loss": 0.0, "kl": 0.0, "clipped": 0.0, "entropy": 0.0, "is_capped": 0.0, "tokens": 0, "flops": 0}
    for k, seqs in enumerate(micros):
        accumulate_gradients(job.policy, last=k == len(micros) - 1)
        part = policy_update_step(job, ro, seqs, adv[seqs].to(job.device)[:, None], old[k],
                                  refs[k] if refs is not None else None, sampler_logp[k], n_tok, n_seq)
        totals = {key: totals[key] + part[key] for key in totals}
    totals = {key: float(value) for key, value in totals.items()}  # the device's sums, read once after the backwards
    totals.update(zip(("loss", "kl"), all_reduce_sum([totals["loss"], totals["kl"]], job.device)))
    grad_norm = clip_grad_norm(job.policy, job.args.grad_clip)
    stop_if_not_finite("grpo.py", step + 1, os.path.join(job.args.out, "state"), loss=totals["loss"], grad_norm=grad_norm, kl=totals["kl"])
    job.optimizer.step()
    job.optimizer.zero_grad(set_to_none=True)
    return {**totals, "grad_norm": grad_norm, "n_tok": n_tok}


def policy_update_step(job, ro, seqs, adv, old_logp, ref_logp, rollout_logp, n_tok, n_seq):
    """The PPO loss of one micro-batch, backpropagated: w x clipped surrogate + kl * k3, aggregated as --loss-agg.
    adv [S, 1] for its S sequences; old_logp, ref_logp, rollout_logp [S, R] from old_and_ref_logprobs."""
    args = job.args
    prompts, responses, per_prompt = micro_rows(ro, seqs, args.n)
    logp, entropy, mask = response_logprobs(job.policy, prompts, responses, per_prompt, job.tokenizer.pad_id or 0,
                                            job.device, args.temperature)  # [S, R] each
    loss_tok, clipped = policy_loss_terms(logp, old_logp, adv, args.clip, args.clip_high)
    is_weight = rollout_is_weights(old_logp, rollout_logp, mask, args.rollout_is, args.rollout_is_cap)  # [S, R] or [S, 1]
    kl = k3_kl(logp, ref_logp) if ref_logp is not None else torch.zeros_like(logp)  # --kl 0 loads no reference model
    loss = aggregate(is_weight * loss_tok + args.kl * kl, mask, args.loss_agg, n_tok, n_seq, args.max_new_tokens)
    (loss * job.world).backward()  # FSDP averages over ranks; the aggregate is already global
    # the statistics stay on the device (fp64), unread: the host builds the next micro-batch while this one runs
    per_token = lambda t: (t.detach() * mask).sum().double() / n_tok
    return {"loss": loss.detach().double(), "kl": per_token(kl), "clipped": per_token(clipped),
            "entropy": per_token(entropy), "is_capped": per_token((is_weight >= args.rollout_is_cap).expand_as(mask))
            if args.rollout_is != "none" else torch.zeros((), dtype=torch.float64, device=job.device),
            "tokens": sum(map(len, prompts + responses)),  # a prompt: once per micro-batch
            "flops": train_flops(job.policy, [(0, len(p) - 1) for p in prompts] +  # group_batch's rows
                                 [(len(prompts[i // per_prompt]) - 1, len(r)) for i, r in enumerate(responses)])}


def step_metrics(job, step, ro, rewards, correct, zero_std, updates, mismatch, balance, seconds):
    """The rollout's statistics (every rank holds it all) and sums over ranks of the training's -> the step's record."""
    lengths = [len(r) for r in ro.responses]
    logp_diff, logp_diff_max, rollout_kl = torch.stack(mismatch).T.tolist() if mismatch else ([0.0], [0.0], [0.0])
    unparsed = [tr or parse_verdict(t) is None for t, tr in zip(ro.texts, ro.truncated)]
    local = {k: sum(u[k] for u in updates) for k in ("tokens", "flops", "clipped", "entropy", "is_capped")}
    local.update(logp_diff=sum(logp_diff), rollout_kl=sum(rollout_kl), preempted=ro.preempted, slot_use=ro.slot_use)
    total = dict(zip(local, all_reduce_sum(list(local.values()), job.device)))
    n_mb, traces, length, peak = len(updates), len(lengths), sum(lengths), gpu_peaks(job.device)[0]
    return {"step": step + 1, "reward_mean": rewards.sum().item() / traces, "accuracy": correct.sum().item() / traces,
            "unparsed_rate": sum(unparsed) / traces, "response_len_mean": length / traces, "response_len_max": max(lengths),
            "truncated_frac": sum(ro.truncated) / traces, "zero_std_frac": zero_std,
            "kl": sum(u["kl"] for u in updates) / n_mb, "clip_frac": total["clipped"] / n_mb,
            "entropy": total["entropy"] / n_mb, "grad_norm": sum(u["grad_norm"] for u in updates) / n_mb,
            # the sampler vs the trainer (pi_old), per response token: mean and max |delta log-prob|, k3 KL(mu || pi_old)
            "rollout_logp_diff_mean": total["logp_diff"] / max(length, 1),
            "rollout_logp_diff_max": all_reduce_max([max(logp_diff_max)], job.device)[0],
            "rollout_kl": total["rollout_kl"] / max(length, 1), "rollout_is_capped_frac": total["is_capped"] / n_mb,
            "rollout_preempted": int(total["preempted"]),
            "rollout_kv_pool_peak": all_reduce_max([ro.kv_pool_peak], job.device)[0],  # paged; 0 with the dense cache
            # the slowest rank's decode steps (what the rollout waits for), and the ranks' mean share of slots in use
            "rollout_decode_steps": int(all_reduce_max([ro.decode_steps], job.device)[0]),
            "rollout_slot_use": total["slot_use"] / job.world,
            "gpu_peak_gib": gpu_peak_gib(job.device),  # the run's so far, the most of any rank's
            "rollout_tokens_per_s": length / max(seconds["rollout_s"], 1e-9), "train_balance": balance,
            "train_tokens_per_s": total["tokens"] / max(seconds["train_s"], 1e-9),
            "train_mfu": total["flops"] / max(seconds["train_s"], 1e-9) / job.world / peak if peak else None, **seconds}


# ----------------------------------------------------------------------------- the run

def setup_job(args, run, rank, world, device):
    """The run's prompts, policy (and frozen reference when --kl > 0), optimizer and sampler -> (Job, the held-out
    set or None, a line saying what was loaded, the run's steps). The disk and host memory are checked before loading."""
    tokenizer = load_tokenizer(args.tokenizer)
    check_vocab(tokenizer, args.model, args.tokenizer)
    family = args.family or default_judge_family(tokenizer)
    examples, counts = load_judge_examples(args.data, args.format, family, args.seed, training=True)
    examples, prompt_ids, dropped = tokenize_prompts(examples, tokenizer, args.max_prompt_len)
    described = f"{len(examples)} prompts ({dropped} dropped as longer than {args.max_prompt_len}{describe_counts(counts)})"
    if len(examples) < args.rollout_prompts:
        raise SystemExit(f"grpo.py: {args.data}: {described}: fewer than --rollout-prompts {args.rollout_prompts}")
    heldout = None
    if args.eval_data and args.eval_limit:  # its prompts share the sampler's cache rows: as long as the rollout's at most
        *heldout, too_long = load_heldout(args.eval_data, args.eval_format, tokenizer, args.eval_limit, args.seed, family,
                                          max_prompt_len=args.max_prompt_len)
        what = f"{len(heldout[0]) + too_long} held-out pairs (--eval-limit) in {args.eval_data}"
        if not heldout[0]:
            raise SystemExit(f"grpo.py: all {what} are longer than --max-prompt-len {args.max_prompt_len}")
        if too_long and rank == 0:
            print(f"grpo: {too_long} of the {what} dropped as longer than --max-prompt-len {args.max_prompt_len}")
    elif args.eval_data and rank == 0:
        print(f"grpo: --eval-limit 0: {args.eval_data} is not judged")
    total = args.steps or len(examples) // args.rollout_prompts
    run.check_disk(total)
    compile = compile_wanted(args.compile, device)
    load = lambda **kw: load_for_training(args.model, world, device, compile=compile, precision=args.precision, offload=args.offload, **kw)
    if args.offload:
        check_host_memory(args.model, world, frozen_bytes=reference_bytes(args))
    policy, ref = load(grad_ckpt=args.grad_ckpt), load(trainable=False) if args.kl > 0 else None
    optimizer = make_optimizer(policy, args.lr, (0.9, 0.999), args.weight_decay)
    max_len = max(map(len, prompt_ids + (heldout[1] if heldout else []))) + args.max_new_tokens
    engine = Sampler.for_policy(policy, device, args.gen_prompts * args.n, max_len, compile, memory_frac=args.kv_cache_frac, group=args.n,
                                page_size=args.kv_page_size, tp_group=tensor_parallel_group(args.rollout_tp, rank))
    if engine.pages and not engine.pages.can_progress(args.n, max_len - args.max_new_tokens, engine.sync_every, max_len):
        raise SystemExit(f"grpo.py: --kv-cache-frac {args.kv_cache_frac} holds {len(engine.pages.free)} KV pages of "
                         f"{args.kv_page_size} positions: too few for one group's prompts or one {max_len}-position sequence")
    if engine.slots < args.n:
        raise SystemExit(f"grpo.py: one prompt's {args.n} x {max_len}-position KV cache exceeds --kv-cache-frac {args.kv_cache_frac}")
    if engine.slots < args.gen_prompts * args.n and rank == 0:
        print(f"grpo: decoding {engine.slots // args.n} prompts at a time (not {args.gen_prompts}): their KV cache fills "
              f"--kv-cache-frac {args.kv_cache_frac} of the GPU")
    return Job(args, policy, ref, optimizer, engine, tokenizer, examples, prompt_ids, rank, world, device), heldout, described, total


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.toy, args.precision, args.offload, args.dist_timeout)
    args.precision = precision_of(args.precision, device)  # run.json records what ran
    if args.toy:
        toy.setup(args.seed, rank)
        toy.run_sft_first(args.model, args.seed, rank, args.precision)
    run = RunDir(args.out, args, rank, "grpo.py", device)
    if (finished := run.start(args.resume, args.overwrite)) is not None:
        return done_already(args.out, finished, rank)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    job, heldout, described, total = setup_job(args, run, rank, world, device)
    policy, optimizer, engine, tokenizer = job.policy, job.optimizer, job.engine, job.tokenizer

    def judge_heldout(stop_when=None):  # greedy held-out accuracy of the current policy, with the run's token budget
        engine.load_weights(policy)
        return heldout_accuracy(engine, tokenizer, *heldout, args.max_new_tokens, rank, world, args.seed, stop_when)[0]

    step, history = load_state(run.state, policy, optimizer, rank) if run.resuming else (0, {})
    if rank == 0:
        print(f"grpo: {described}, {total} steps x {args.rollout_prompts} prompts x n={args.n}, {args.rollout_prompts // args.minibatch_prompts} "
              f"optimizer steps per rollout, kl {args.kl}, {world} rank(s) on {device.type} in {args.precision}, start at step {step}")
    if heldout and "heldout_start" not in history:
        history["heldout_start"] = judge_heldout()
        if rank == 0:
            print(f"held-out judge accuracy before GRPO: {history['heldout_start']:.1f}%")
    run.open_metrics(step, total)
    bar = tqdm(total=total, initial=step, disable=rank != 0, desc="grpo")
    start, stop_at = step, (min(total, step + args.stop_after_steps) if args.stop_after_steps else total)
    longest_micro = max(1, args.micro_seqs // args.n) * args.max_prompt_len + args.micro_seqs * args.max_new_tokens
    while step < stop_at and not run.stopping:
        for group in optimizer.param_groups:
            group["lr"] = args.lr if args.lr_schedule == "constant" else lr_at(step, total, args.lr, 0, 0.0)
        if (done := grpo_step(job, step)) is None:  # given up on a stop signal before its update: save the last step, stop
            run.cut_short(policy, optimizer, step, extra=history)
            break
        rec, groups = done
        step += 1
        if (fitted := fit_recompute(policy, args.grad_ckpt, step - start, longest_micro, device)) and rank == 0:
            tqdm.write(f"grpo: {fitted}")
        if heldout and args.eval_every and step % args.eval_every == 0 and step < total:
            rec["heldout_accuracy"] = judge_heldout(stop_requested)  # None: given up on a stop signal (the run stops)
        run.log(rec, bar, rollouts=groups, reward=f"{rec['reward_mean']:+.3f}", acc=f"{rec['accuracy']:.2f}", kl=f"{rec['kl']:.4f}")
        run.save(policy, optimizer, step, total, stop_at, extra=history)
    bar.close()
    if step < total:  # stopped early (on purpose, or on a signal): the state is saved, --resume continues
        return run.stopped_early({"steps": step, **history})
    return finish(args, run, policy, step, history, judge_heldout if heldout else None, rank)


def finish(args, run, policy, step, history, judge_heldout, rank):
    """Save the model (Hugging Face layout, tokenizer beside it), the summary, and print the reward curve."""
    out_model = os.path.join(args.out, "model")
    save_checkpoint(policy, out_model, rank, args.save_dtype, args.tokenizer)
    summary = {"steps": step, **history}
    if judge_heldout:
        summary["heldout_end"] = judge_heldout()
    if rank == 0:
        write_swapped(os.path.join(args.out, "summary.json"), json.dumps(summary, indent=2))  # its finish mark: whole or none
        curve = [json.loads(line) for line in open(run.metrics_path)]
        print("reward curve (mean reward per step): " + " ".join(f"{r['reward_mean']:+.2f}" for r in curve[::max(1, len(curve) // 10)]))
        if judge_heldout:
            print(f"held-out judge accuracy: {summary['heldout_start']:.1f}% before GRPO -> {summary['heldout_end']:.1f}% after")
        print(f"checkpoint: {out_model}")
    end_distributed()
    return summary


if __name__ == "__main__":
    cli(main)
