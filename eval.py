"""
eval.py: run a judge on a pairwise benchmark and score it the way the published numbers are computed.

    python eval.py --judge MODEL_DIR --bench rm-bench|judgebench|rmb|pairs --data PATH --out DIR

Each pair becomes an RM-R1 judge prompt (data.py; seeded A/B placement, or both placements with
--both-orders), the judge generates (greedy by default, batched KV-cached sampler) and the verdict is read
with rewards.parse_verdict, the rule GRPO trains with. An unparseable verdict counts as wrong and is also
counted (`unparsed`; `truncated`: those cut off at --max-new-tokens, a budget too small if many; `too_long`: prompts
over --max-prompt-len, not judged). Baseline judges that need no model: `longer`, `shorter` (by the answers' character
counts; a tie gives no verdict) and `random` (seeded).

Scoring (percentages):
  rm-bench   per domain a 3x3 matrix acc[i][j] over (chosen style i, rejected style j); domain = mean of the
             9 cells; hard = strict upper triangle (j > i), normal = diagonal, easy = strict lower triangle,
             each averaged over domains; total = mean of the domains found (chat, math, code, safety)
  judgebench knowledge (mmlu-pro), reasoning, math, coding, overall
  rmb        pairwise_helpfulness / _harmlessness (pair accuracy), bon_helpfulness / _harmlessness (best-of-N:
             an item is right only if the judge prefers the best answer to every loser), pairwise_mean, bon_mean,
             and rmb = the mean of the four (RMB's and RM-R1's published score); parts not found are left out
  pairs      overall and one key per subset; if subsets carry RewardBench names, the four RewardBench
             sections (count-weighted, math-prm weighted equal to the HumanEvalPack subsets together)
             and their mean `rewardbench`
Empty or whitespace-only answers are judged as given (and counted); a path with nothing to judge is an error.
Outputs: DIR/outputs.jsonl (one row per judged prompt, written as its judgement finishes; a rerun resumes from it, on any
number of ranks), DIR/scores.json, a table that shows RM-R1's published scores of the judge's size (7B, 14B or 32B,
the nearest; 7B for a baseline) beside the matching number where it covers the same (not after --limit, nor for an
RM-Bench total without all four domains), and the tokens generated per second.
Under torchrun the prompts are split across ranks and rank 0 merges the results. With --tp T, groups of T consecutive
ranks judge together over one tensor-parallel copy of the judge (decode_model.py), each rank holding 1/T of its blocks
and KV cache: for a judge too large to leave one GPU room for its cache. A group judges one share of the prompts, and
its first rank writes them, to DIR/outputs.rank{share}.jsonl when there are several shares.
"""
import argparse
import json
import math
import os
import random
import time
from collections import defaultdict

import torch
from tqdm import tqdm

import checkpoint
import model as M
from data import READERS, default_judge_family, describe_counts, load_judge_examples, load_tokenizer, tokenize_prompts
from decode_model import check_split, load_for_decoding, tensor_parallel_group
from rewards import parse_verdict
from rundir import check_same_inputs, check_shared, fingerprint_inputs, read_json_file, write_swapped
from training import (add_dist_timeout_flag, all_reduce_max, all_reduce_sum, barrier, check_flags, check_vocab, cli,
                      compile_wanted, end_distributed, setup_distributed)

BASELINES = ("longer", "shorter", "random")
REWARDBENCH_SECTIONS = {
    "chat": ["alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"],
    "chat_hard": ["mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
                  "llmbar-adver-GPTOut", "llmbar-adver-manual"],
    "safety": ["refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond", "donotanswer"],
    "reasoning": ["math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"],
}


def baseline_verdict(judge, ex, rng):
    if judge == "random":
        return rng.choice("AB")
    la, lb = ex.meta["len_a"], ex.meta["len_b"]
    return None if la == lb else "A" if (la > lb) == (judge == "longer") else "B"  # a tie is no verdict


def judge_examples(engine, tokenizer, examples, prompt_ids, max_new_tokens, on_rows, temperature=0.0, seed=0, keys=None,
                   stop_when=None):
    """Generate one judgement per example with a sampler.Sampler, in one call (continuous batching over every prompt,
    shortest first), handing on_rows the result rows of the judgements that finished at each host check: outputs are
    written as they come, so an interrupted run loses only the judgements still running. The random draws are keyed by
    keys[i] (default: the example's index here), whatever the batching. stop_when: as Sampler.generate's; once it says
    True, no more rows come. -> False if the call was given up."""
    order = sorted(range(len(examples)), key=lambda i: len(prompt_ids[i]))

    def finished(indices, outs):  # indices into order: these judgements are final
        texts, cut = tokenizer.decode_batch([outs[j] for j in indices]), [tokenizer.cut_off(outs[j]) for j in indices]
        on_rows([result_row(examples[order[j]], len(prompt_ids[order[j]]), text, None if c else parse_verdict(text), c,
                            len(outs[j])) for j, text, c in zip(indices, texts, cut)])  # cut off: no verdict
    return not order or engine.generate(
        [prompt_ids[i] for i in order], max_new_tokens, temperature=temperature, stop_ids=tokenizer.stop_ids, seed=seed,
        vocab_size=tokenizer.vocab_size, prompt_ids=[keys[i] for i in order] if keys else order, stop_when=stop_when,
        on_finish=finished) is not None


def load_heldout(path, fmt, tokenizer, limit, seed, family=None, max_prompt_len=10**9):
    """The first `limit` pairs of a file in a judge format (data.FORMATS) as judge prompts of `family` (default: the
    tokenizer's template's) -> (examples, prompt ids, how many were dropped as longer than max_prompt_len)."""
    examples = load_judge_examples(path, fmt, family or default_judge_family(tokenizer), seed)[0][:limit]
    return tokenize_prompts(examples, tokenizer, max_prompt_len)


def heldout_accuracy(engine, tokenizer, examples, prompt_ids, max_new_tokens, rank=0, world=1, seed=0, stop_when=None):
    """Greedy judge accuracy (%) and unparsed count on held-out pairs (the trainers' progress check, through
    the evaluation code path); ranks judge every world-th pair and the counts are summed. The ranks of a tensor-parallel
    engine's group (engine.tp: consecutive ranks) judge the same pairs together, and count them once. (None, None) if
    stop_when (the trainers: a stop signal) ended any rank's share early."""
    tp = engine.tp[0]
    mine = range(rank // tp, len(examples), world // tp)
    rows = []  # this share's judgements
    judge_examples(engine, tokenizer, [examples[i] for i in mine], [prompt_ids[i] for i in mine], max_new_tokens,
                   rows.extend, 0.0, seed, stop_when=stop_when)
    counts = [sum(r["correct"] for r in rows), sum(r["verdict"] is None for r in rows), len(rows) < len(mine)]
    correct, unparsed, short = (total / tp for total in all_reduce_sum(counts, engine.tok.device))
    return (None, None) if short else (100.0 * correct / max(len(examples), 1), int(unparsed))


def result_row(ex, prompt_len, output, verdict, truncated=False, output_tokens=0):
    return {"id": ex.id, "label": ex.label, "subset": ex.subset, "meta": {k: v for k, v in ex.meta.items() if not k.startswith("len_")},
            "prompt_len": prompt_len, "output": output, "output_tokens": output_tokens, "verdict": verdict,
            "correct": verdict == ex.label, "truncated": truncated}


# ----------------------------------------------------------------------------- scoring

def pct(xs):
    xs = list(xs)
    return 100.0 * sum(xs) / len(xs) if xs else float("nan")


def pair_results(rows):
    """-> {pair id: (correct, subset, meta)}; with both orders a pair is correct only if both are."""
    pairs = {}
    for r in rows:
        key = r["meta"].get("pair", r["id"])
        ok = pairs.get(key, (True,))[0] and r["correct"]
        pairs[key] = (ok, r["subset"], r["meta"])
    return pairs


def score(bench, rows):
    pairs = pair_results(rows)
    s = {}
    if bench == "rm-bench":
        domains = {}
        for d in sorted({sub for _, sub, _ in pairs.values()}):
            cells = [[pct(ok for ok, sub, m in pairs.values() if sub == d and m["i"] == i and m["j"] == j)
                      for j in range(3)] for i in range(3)]
            domains[d] = cells
            s[d] = sum(map(sum, cells)) / 9
        mean = lambda vals: sum(vals) / len(vals)
        s["easy"] = mean([mean([c[i][j] for i in range(3) for j in range(3) if i > j]) for c in domains.values()])
        s["normal"] = mean([mean([c[i][i] for i in range(3)]) for c in domains.values()])
        s["hard"] = mean([mean([c[i][j] for i in range(3) for j in range(3) if i < j]) for c in domains.values()])
        s["total"] = mean([s[d] for d in domains])
    elif bench == "judgebench":
        for cat in ("knowledge", "reasoning", "math", "coding"):
            if any(sub == cat for _, sub, _ in pairs.values()):
                s[cat] = pct(ok for ok, sub, _ in pairs.values() if sub == cat)
        s["overall"] = pct(ok for ok, _, _ in pairs.values())
    elif bench == "rmb":
        s.update(rmb_scores(pairs))
    else:
        s["overall"] = pct(ok for ok, _, _ in pairs.values())
        for sub in sorted({sub for _, sub, _ in pairs.values() if sub}):
            s[sub] = pct(ok for ok, sb, _ in pairs.values() if sb == sub)
        s.update(rewardbench_sections(pairs))
    # truncated: cut off at --max-new-tokens (so unparsed too): many of them say the token budget is too small;
    # too_long: prompts over --max-prompt-len, not judged (unparsed too, so the benchmark keeps its size)
    s.update(unparsed=sum(r["verdict"] is None for r in rows), truncated=sum(r.get("truncated", False) for r in rows),
             too_long=sum(r.get("prompt_len", 0) < 0 for r in rows), judged=len(rows))
    if any("pair" in r["meta"] for r in rows):  # --both-orders: placement bias and consistency
        for label in "AB":
            s[f"accuracy_label_{label}"] = pct(r["correct"] for r in rows if r["label"] == label)
        by_pair = defaultdict(dict)
        for r in rows:
            by_pair[r["meta"]["pair"]][r["label"]] = r["verdict"]
        # consistent = the judge picked the same *answer* in both placements (verdicts differ)
        s["position_consistency"] = pct(v.get("A") is not None and v.get("B") is not None and v["A"] != v["B"]
                                        for v in by_pair.values() if len(v) == 2)
    return s


def rmb_scores(pairs):
    """RMB: pairwise accuracy per part; best-of-N accuracy per part over items (an item is right only if every
    one of its (best, loser) pairs is); `rmb` = the mean of the four, RMB's (and RM-R1's) published score."""
    s = {}
    for part in ("helpfulness", "harmlessness"):
        pairwise = [ok for ok, sub, m in pairs.values() if sub == part and m.get("set", "pairwise") == "pairwise"]
        items = defaultdict(lambda: True)
        for ok, sub, m in pairs.values():
            if sub == part and m.get("set") == "bon":
                items[m["item"]] &= ok
        if pairwise:
            s[f"pairwise_{part}"] = pct(pairwise)
        if items:
            s[f"bon_{part}"] = pct(items.values())
    for kind in ("pairwise", "bon"):
        if f"{kind}_helpfulness" in s and f"{kind}_harmlessness" in s:
            s[f"{kind}_mean"] = (s[f"{kind}_helpfulness"] + s[f"{kind}_harmlessness"]) / 2
    if "pairwise_mean" in s and "bon_mean" in s:
        s["rmb"] = (s["pairwise_mean"] + s["bon_mean"]) / 2
    return s


def rewardbench_sections(pairs):
    counts, correct = defaultdict(int), defaultdict(int)
    for ok, sub, _ in pairs.values():
        counts[sub] += 1
        correct[sub] += ok
    out = {}
    for section, subsets in REWARDBENCH_SECTIONS.items():
        present = [x for x in subsets if counts[x]]
        if not present:
            continue
        weight = {x: counts[x] for x in present}
        if section == "reasoning" and "math-prm" in weight and len(present) > 1:
            weight["math-prm"] = sum(counts[x] for x in present if x != "math-prm")  # PRM = all code together
        out[f"rewardbench_{section}"] = sum(100.0 * correct[x] / counts[x] * weight[x] for x in present) / sum(weight.values())
    if len(out) == 4:
        out["rewardbench"] = sum(out.values()) / 4
    return out


# the published RM-R1 scores (SPEC section 6), by size in billions of parameters, under the score key that computes
# the same figure
PUBLISHED = {7: {"RM-R1-Qwen2.5-Instruct-7B": {"rewardbench": 85.2, "total": 70.2, "rmb": 66.4},
                 "RM-R1-DeepSeek-Distilled-Qwen-7B": {"rewardbench": 80.1, "total": 72.4, "rmb": 55.1}},
             14: {"RM-R1-Qwen2.5-Instruct-14B": {"rewardbench": 88.2, "total": 76.1, "rmb": 69.2},
                  "RM-R1-DeepSeek-Distilled-Qwen-14B": {"rewardbench": 88.9, "total": 81.5, "rmb": 68.5}},
             32: {"RM-R1-Qwen2.5-Instruct-32B": {"rewardbench": 91.4, "total": 79.1, "rmb": 73.0},
                  "RM-R1-DeepSeek-Distilled-Qwen-32B": {"rewardbench": 90.9, "total": 83.9, "rmb": 69.8}}}
PUBLISHED_KEYS = {"pairs": "rewardbench", "rm-bench": "total", "rmb": "rmb"}
RM_BENCH_DOMAINS = ("chat", "math", "code", "safety")  # RM-Bench's total, the published one, is the mean of these four


def published_size(params):
    """The published size (7, 14 or 32) nearest a judge of params parameters (Qwen2.5-7B has 7.6B); 7 for a smaller
    judge or a baseline (params 0)."""
    return min(PUBLISHED, key=lambda b: abs(math.log(max(params, 1e9) / 1e9 / b)))


def print_table(scores, title, bench, size=7, whole=True):
    """The scores, with RM-R1's published figures of the size beside the score they are, where that score covers what
    the published one does: the whole benchmark (whole: no --limit cut it), the published score's parts all found
    (RMB's four, RewardBench's four sections) and, for RM-Bench, all four domains."""
    key = PUBLISHED_KEYS.get(bench)
    whole = whole and key in scores and (bench != "rm-bench" or all(d in scores for d in RM_BENCH_DOMAINS))
    papers = PUBLISHED[size] if whole else {}
    print(f"\n{title}")
    print(f"  {'':<24} {'this judge':>10}" + "".join(f"  {p:>34}" for p in papers))
    for k, v in scores.items():
        paper = "".join(f"  {figures[k]:>34.1f}" for figures in papers.values()) if k == key else ""
        print((f"  {k:<24} {v:>10.2f}" if isinstance(v, float) else f"  {k:<24} {v:>10}") + paper)
    if not whole and (key in scores or bench in ("rm-bench", "rmb")):  # (pairs: RewardBench's, if its subsets are named)
        print("  (RM-R1's published scores are left out: these are over a part of the benchmark)")


# ----------------------------------------------------------------------------- main

def describe_data(bench, path, examples, counts):
    """Say what was found: pairs with empty answers or two identical answers (judged as given), RM-Bench's domains with
    no prompts, and which of RMB's sets are present."""
    if counted := describe_counts(counts):  # pairs with an empty (or whitespace-only) answer, or two identical ones
        print(f"{path}: pairs{counted}: they are judged as given")
    if bench == "rm-bench" and (missing := [d for d in RM_BENCH_DOMAINS if all(ex.subset != d for ex in examples)]):
        print(f"RM-Bench {', '.join(missing)}: no prompts of {'this domain' if len(missing) == 1 else 'these domains'}; "
              "`total` is the mean of the others, not the published total over all four")
    if bench == "rmb":
        for kind, name in (("pairwise", "Pairwise_set"), ("bon", "BoN_set")):
            n = sum(ex.meta.get("set") == kind for ex in examples)
            print(f"RMB {name}: {n} judge prompts" if n else
                  f"RMB {name}: missing (no such rows under {path}); its scores and the four-way `rmb` are not computed")


def take_share(args, examples, rank, world):
    """This rank's share of the prompts (with --tp, its group's: groups judge as one) -> its output file, the prompts of
    the share still to judge, and every share's output file. The share's rows from earlier runs are rewritten into its
    file first, and files of an earlier layout (other ranks or --tp) removed once every share is written."""
    unit, units = rank // args.tp, world // args.tp
    parts = [os.path.join(args.out, "outputs.jsonl" if units == 1 else f"outputs.rank{u}.jsonl") for u in range(units)]
    rows, judged = earlier_rows(args.out, examples, unit, units, rank)
    done = {r["id"] for r in rows}
    if rank == 0:
        print(f"{len(examples)} prompts ({args.family} judge prompts, seed {args.seed}); {judged} already judged")
    if rank % args.tp == 0:
        write_swapped(parts[unit], "".join(json.dumps(r) + "\n" for r in rows))  # its share of the valid rows
    barrier()  # every share is written: an earlier run's files under other names can go
    if rank == 0:
        for f in set(output_files(args.out)) - set(map(os.path.basename, parts)):
            os.remove(os.path.join(args.out, f))
    return parts[unit], [ex for i, ex in enumerate(examples) if i % units == unit and ex.id not in done], parts


def earlier_rows(out, examples, unit, units, rank):
    """The rows of earlier runs in out (any outputs.*.jsonl: they may have run on another number of ranks or --tp) that
    this share keeps: its prompts' (every units-th from unit), and in unit 0's also those of prompts not judged now
    (another --limit), so that every row is kept once. Read by every rank before any rewrites its share. -> (the rows,
    how many of the prompts have one)."""
    rows = {}
    for f in output_files(out):
        found, corrupt = read_rows(os.path.join(out, f))
        rows.update((r["id"], r) for r in found)
        if corrupt and rank == 0:
            print(f"{os.path.join(out, f)}: corrupt line(s) {corrupt[:10]} skipped (their prompts are judged again); "
                  f"{len(found)} valid rows kept")
    share = {ex.id: i % units for i, ex in enumerate(examples)}
    barrier()  # every rank has read the parts before any is rewritten
    return [r for i, r in rows.items() if share.get(i, 0) == unit], sum(i in share for i in rows)


def output_files(out):  # the names of the output files in out, whichever ranks and --tp wrote them
    return sorted(f for f in os.listdir(out) if f.startswith("outputs.") and f.endswith(".jsonl"))


def read_rows(path):
    """Earlier results of an output file -> (rows, corrupt line numbers). A corrupt line (an interrupted write)
    is reported and its row judged again; the valid rows around it are kept."""
    rows, corrupt = [], []
    if os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                if isinstance(row, dict) and "id" in row and "correct" in row:
                    rows.append(row)
                else:
                    corrupt.append(n)
    return rows, corrupt


# the settings that decide a verdict; --limit, --batch-size and --compile may change between runs
PROVENANCE = ("bench", "family", "seed", "max_new_tokens", "max_prompt_len", "temperature", "both_orders", "dtype")


def claim_out_dir(args, rank, device):
    """An output directory belongs to one judge, data set and setting (recorded in run.json): a rerun with the
    same ones resumes from the outputs, another is refused (with --overwrite, the old outputs are removed)."""
    read = {"judge": args.judge if args.judge not in BASELINES else None, "tokenizer": args.tokenizer, "data": args.data}
    prints = fingerprint_inputs({k: path for k, path in read.items() if path})  # every rank reads them: the same files?
    check_same_inputs({f"--{k} {read[k]}": f for k, f in prints.items()}, rank, device, "eval.py")
    identity = lambda k: f"{os.path.abspath(read[k])} {prints[k]}"  # where, and the contents' hash
    run = {"judge": args.judge if args.judge in BASELINES else identity("judge"),
           "tokenizer": identity("tokenizer") if args.tokenizer else None, "data": identity("data"),
           **{k: getattr(args, k) for k in PROVENANCE}}
    file = os.path.join(args.out, "run.json")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise SystemExit(f"eval.py: --out {args.out} is a file, not a directory")
    outputs = [f for f in os.listdir(args.out) if f.startswith("outputs.")] if os.path.isdir(args.out) else []
    if outputs and not os.path.exists(file) and not args.overwrite:  # whose verdicts they are is unknown
        raise SystemExit(f"eval.py: {args.out} holds {', '.join(sorted(outputs))} but no run.json saying which judge and "
                         "data made them: use another --out, or --overwrite to discard them")
    saved = read_json_file(file, "eval.py") if os.path.exists(file) and not args.overwrite else run  # every rank checks
    changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in run.items() if saved.get(k) != v]
    if changed:
        raise SystemExit(f"eval.py: {args.out} holds outputs of another judge or setting ({'; '.join(changed)}): "
                         "use another --out, or --overwrite to discard them")
    barrier()  # every rank has read run.json before rank 0 rewrites it
    if rank == 0:
        if args.overwrite and os.path.exists(args.out):
            for f in os.listdir(args.out):
                if f in ("run.json", "scores.json") or f.startswith("outputs."):
                    os.remove(os.path.join(args.out, f))
        os.makedirs(args.out, exist_ok=True)
        write_swapped(file, json.dumps(run, indent=2))
    barrier()  # rank 0 has claimed the directory
    check_shared(args.out, rank, device, "eval.py")  # rank 0 scores every rank's outputs


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--judge", required=True, help="model directory (HF layout) or one of: " + ", ".join(BASELINES))
    ap.add_argument("--bench", required=True, choices=sorted(READERS))
    ap.add_argument("--data", required=True, help="benchmark file or directory")
    ap.add_argument("--out", required=True)
    ap.add_argument("--overwrite", action="store_true", help="discard earlier outputs in --out (of any judge)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the judge directory)")
    ap.add_argument("--family", choices=["instruct", "reasoning"], default=None, help="default: from the chat template")
    ap.add_argument("--limit", type=int, default=0, help="judge only the first N prompts (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=8192)
    ap.add_argument("--max-prompt-len", type=int, default=16384)
    ap.add_argument("--batch-size", type=int, default=None,
                    help="sequences decoded at once (the sampler's slots) [8 on CPU; on a GPU as many as fit, at most 256]")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.compile the sampler's decode step (default: on with CUDA)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--both-orders", action="store_true", help="judge each pair in both placements")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    ap.add_argument("--kv-page-size", type=int, default=0, help="positions per page of a paged KV cache (0: a dense "
                    "max-length row per sequence): sequences hold only the pages they fill, and a step reads only those")
    ap.add_argument("--tp", type=int, default=1, help="consecutive ranks that judge together over a tensor-parallel copy "
                    "of the judge, each holding 1/T of its blocks and KV cache")
    add_dist_timeout_flag(ap)
    args = ap.parse_args(argv)
    args.torch_dtype = getattr(torch, args.dtype) if args.dtype else None  # (None: the checkpoint's)
    check_split(ap, "--tp", args.tp, None if args.judge in BASELINES else args.judge, args.torch_dtype)
    check_flags(ap, args, positive=("max_new_tokens", "max_prompt_len", "batch_size"),
                nonnegative=("limit", "temperature", "kv_page_size"))
    return args


def main(argv=None):
    args = parse_args(argv)
    rank, world, device = setup_distributed(timeout_minutes=args.dist_timeout)
    model = tokenizer = None
    if args.judge not in BASELINES:
        tokenizer = load_tokenizer(args.tokenizer or args.judge)
        check_vocab(tokenizer, args.judge, args.tokenizer or args.judge)
        model = load_for_decoding(args.judge, device, args.torch_dtype, tensor_parallel_group(args.tp, rank))  # fused on GPUs
    args.family = args.family or (default_judge_family(tokenizer) if tokenizer else "instruct")
    examples, counts = load_judge_examples(args.data, args.bench, args.family, args.seed, both_orders=args.both_orders)
    whole = len(examples) <= (args.limit or len(examples))  # --limit cut nothing
    examples = examples[:args.limit] if args.limit else examples
    if rank == 0:
        describe_data(args.bench, args.data, examples, counts)
    claim_out_dir(args, rank, device)
    part, mine, parts = take_share(args, examples, rank, world)
    index = {ex.id: i for i, ex in enumerate(examples)}  # a prompt's draws are keyed by its place in the benchmark
    with open(part if rank % args.tp == 0 else os.devnull, "a") as f:  # a --tp group's first rank writes
        judge_into(f, args, model, tokenizer, mine, rank, world, index)
    end_distributed()  # every rank's outputs are on disk; the ranks leave the group together
    if rank != 0:
        return None
    rows = [r for p in parts for r in read_rows(p)[0]]
    wanted = {ex.id for ex in examples}
    rows = list({r["id"]: r for r in rows if r["id"] in wanted}.values())
    if len(rows) < len(wanted):  # every prompt is judged or counted wrong: a gap means outputs went missing
        raise SystemExit(f"eval.py: {len(wanted) - len(rows)} of {len(wanted)} prompts have no row in the outputs in "
                         f"{args.out}: nothing is scored; the same command judges them")
    scores = score(args.bench, rows)
    write_swapped(os.path.join(args.out, "scores.json"), json.dumps(scores, indent=2))
    size = published_size(M.num_params(checkpoint.load_config(args.judge)) if model is not None else 0)
    print_table(scores, f"{args.bench}: judge {args.judge} ({len(rows)} prompts)", args.bench, size, whole)
    return scores


def judge_into(f, args, model, tokenizer, mine, rank, world, index):
    """Judge this rank's prompts, appending one row per prompt to f as each judgement finishes. A prompt's random draws
    (--temperature > 0) are keyed by index[its id], its place in the whole benchmark: they do not depend on the number
    of ranks, nor on what an earlier run judged."""
    progress = tqdm(total=len(mine), disable=rank != 0, desc="judging")
    if model is None:
        rng = random.Random(args.seed)
        for ex in mine:
            f.write(json.dumps(result_row(ex, 0, "", baseline_verdict(args.judge, ex, rng))) + "\n")
        progress.update(len(mine))
    else:
        kept, ids, dropped = tokenize_prompts(mine, tokenizer, args.max_prompt_len)
        if dropped:
            print(f"rank {rank}: {dropped} prompts longer than --max-prompt-len {args.max_prompt_len} are not judged "
                  "and count as wrong (unparsed), so the benchmark keeps its size")
        context = model.config.max_position_embeddings
        beyond = sum(len(p) + args.max_new_tokens > context for p in ids)
        if beyond:  # judged as given: RoPE past the trained length degrades, it does not fail
            print(f"rank {rank}: {beyond} prompts plus --max-new-tokens {args.max_new_tokens} pass the judge's context of "
                  f"{context} positions (max_position_embeddings): judged as given, past what it was trained on")
        kept_ids = {ex.id for ex in kept}  # the others are too long to judge: unparsed (wrong), never silently dropped
        f.writelines(json.dumps(result_row(ex, -1, "", None)) + "\n" for ex in mine if ex.id not in kept_ids)
        from sampler import Sampler
        free, total = torch.cuda.mem_get_info() if model.lm_head.weight.is_cuda else (0, 1)  # this rank's GPU
        if model.tp[0] > 1:  # a group's ranks decode in lockstep: the same slots on each (its GPUs' least free memory)
            free = -all_reduce_max([-free], model.lm_head.weight.device)[0]
        engine = Sampler(model, args.batch_size or (min(256, len(ids) or 1) if free else 8),
                         max(map(len, ids), default=0) + args.max_new_tokens, memory_frac=None if args.batch_size else 0.7 * free / total,
                         compile=compile_wanted(args.compile, model.lm_head.weight.device), page_size=args.kv_page_size)
        if free and not args.batch_size and rank == 0:  # the default on a GPU: as many as 70% of its free memory holds
            print(f"eval: {engine.slots} sequences decoded at once (their KV cache fits 70% of the free GPU memory)"
                  if not engine.pages else f"eval: up to {engine.slots} sequences at once in {len(engine.pages.free)} KV "
                  f"pages of {args.kv_page_size} positions (70% of the free GPU memory)")
        generated, t0 = 0, time.time()

        def write(rows):  # as each judgement finishes
            nonlocal generated
            f.writelines(json.dumps(r) + "\n" for r in rows)
            f.flush()
            progress.update(len(rows))
            generated += sum(r["output_tokens"] for r in rows)
        judge_examples(engine, tokenizer, kept, ids, args.max_new_tokens, write, args.temperature, args.seed,
                       keys=[index[ex.id] for ex in kept])
        seconds = all_reduce_max([time.time() - t0], engine.tok.device)[0]  # the slowest rank's
        tokens = all_reduce_sum([generated / model.tp[0]], engine.tok.device)[0]  # a --tp group's ranks count the same
        if rank == 0:
            tqdm.write(f"eval: {int(tokens):,} tokens generated in {seconds:.1f} s ({tokens / max(seconds, 1e-9):,.0f} "
                       f"tokens/s over {world} rank(s))")
    progress.close()


if __name__ == "__main__":
    cli(main)
