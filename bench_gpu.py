"""
bench_gpu.py: the GPU checks, in one command that prints each figure the moment it is measured (and appends it to
$OUT/bench_gpu.log), each under a time cap, all within 5 minutes on one H100, compile included.

    python bench_gpu.py                    # #30's targets: the 1.5B SFT step's MFU, the 8 x 8 rollout, 7B batch-1 decode
    python bench_gpu.py --only slots7b,paged # paging: a 7B step's tokens/s dense vs a full page pool, batch-1, prefills
    python bench_gpu.py --only grpo1.5b    # grpo.py's 2 steps at 1.5B (#30's rollout target)
    python bench_gpu.py --only grpo,decode # grpo.py at 0.5B (the shape of the earlier figures), 0.5B decode vs transformers
    python bench_gpu.py --only ragged      # ragged rollouts, continuous vs static batching, dense and paged
    python bench_gpu.py --only offload     # grpo.py's 2 steps at 0.5B with --offload (compare with the grpo group's)
    python bench_gpu.py --smoke            # the same code on CPU with a tiny model, to check the script itself

(`python bench.py gpu ...` runs the same.) Weights are random, shapes those of bench.py's SHAPES; the GPU machine needs
only this repository. Ratios against transformers come from the same run; shares of the GPU's peak (MFU, HBM
bandwidth) from training.GPU_PEAKS.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import torch

import checkpoint
import head
import model as M
import toy
import training
from bench import (SHAPES, build_pair, hf_qwen2, hf_version, padded_rows, ragged_lengths, random_checkpoint, random_model,
                   timeit)


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout()


def check(log, name, cap_s, fn, deadline=None):
    """Run one check under its own time cap (cut to what is left before `deadline`, a time.time()); print (and
    log) its line the moment it is done."""
    cap_s = int(min(cap_s, deadline - time.time())) if deadline else cap_s
    signal.signal(signal.SIGALRM, _alarm)
    t = time.time()
    try:
        if cap_s < 5:
            raise _Timeout()
        signal.alarm(cap_s)
        result = fn()
    except Exception as e:  # report and go on: one broken check must not hide the others
        if isinstance(e, _Timeout) or "_Timeout()" in str(e):  # the alarm may land inside Dynamo, which wraps it
            result = f"not finished within its {cap_s} s cap" if cap_s >= 5 else "skipped: bench.py gpu's 5 minutes are spent"
        else:
            import traceback
            log.write(traceback.format_exc()[-3000:])
            result = f"failed: {type(e).__name__}: {str(e)[:300]}"
    finally:
        signal.alarm(0)
    line = f"{name:<40} {result}  [{time.time() - t:.0f} s]"
    print(line, flush=True)
    log.write(line + "\n")
    log.flush()


GPU_CHECKS = ("training", "rollout", "ragged", "decode", "paged", "decode7b", "slots7b", "grpo", "grpo1.5b", "offload")  # groups, in order
# #30's targets first, in what fits the 5 minutes (on an H100 the training rows took about 2 minutes, the 8 x 8 rollout
# 40 s; the 7B decode is not yet timed); then, a call each, in the docstring's order: paging at 7B (a simulation says it
# is the rollout's largest lever there), the 2-step grpo.py run at 1.5B (at 0.5B it took 139 s, most of it compiling),
# the 0.5B grpo.py run and decode against transformers, the ragged rollouts (8 decode graphs at 13-17 s each), --offload
DEFAULT_GPU_CHECKS = "training,rollout,decode7b"


def bench_gpu(args, device):
    """The GPU checks in order (--only's groups), each under a cap, 5 minutes in all on one H100 (compile included)."""
    if device.type != "cuda" and not args.smoke:
        sys.exit("bench_gpu.py needs a CUDA device (or --smoke, to run the checks on CPU with a tiny model)")
    smoke = args.smoke
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (smoke: tiny model, numbers meaningless)"
    flops_peak, bw_peak = training.gpu_peaks(device)
    out_dir = os.environ.get("OUT", ".")
    log = open(os.path.join(out_dir, "bench_gpu.log"), "a")
    title = f"{name}, torch {torch.__version__}, transformers {hf_version()}, {time.strftime('%Y-%m-%d %H:%M')}"
    print(title, flush=True)
    log.write(title + "\n")
    dtype = torch.float32 if smoke else torch.bfloat16
    small = SHAPES["smoke" if smoke else "0.5B"]
    ours, hf = build_pair(small, device, dtype)
    ours.eval(), hf.eval()
    from sampler import Sampler
    backend = "eager" if smoke else "inductor"
    deadline = time.time() + 300  # the whole check list: 5 minutes, compile included; a check past it is skipped
    want = set(args.only.split(","))

    def run(name, cap_s, fn, group=None):  # a check of one of --only's groups (None: always run)
        if group is None or group in want:
            check(log, name, cap_s, fn, deadline)
    run("bf16 logits vs transformers (0.5B)", 30, lambda: _parity(ours, hf, device))
    trainer = {}
    run("trainer model 1.5B (load_for_training)", 40, lambda: trainer.update(zip("mod", _trainer_model(smoke))) or "loaded",
        "training")
    if trainer:
        m, opt, dev = trainer["m"], trainer["o"], trainer["d"]
        run("SFT step 1.5B, 4k tokens", 90, lambda: _sft_mfu(m, opt, dev, flops_peak, smoke))
        run("  where its time goes (profiler)", 20, lambda: _sft_profile(m, dev, smoke))
        run("  the same, inside a step (accumulating)", 20, lambda: _sft_profile(m, dev, smoke, accumulating=True))
        run("  the head's chunks eager, not compiled", 20, lambda: _sft_head_eager(m, dev, flops_peak, smoke))
        run("  4 x 4k tokens a micro-batch (sft.py)", 40, lambda: _sft_mfu(m, opt, dev, flops_peak, smoke, 4, 2))
        group = {"inputs": _grpo_group_inputs(m, dev, smoke)}
        run("GRPO group 1.5B: 2k prompt + 7 responses of 146-1901", 30, lambda: _grpo_group(m, dev, smoke, group))
        del m, opt
        trainer.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        run("  transformers, the same 7 rows padded", 30, lambda: _grpo_group_hf(device, smoke, group))
        run("SFT fwd+bwd 1.5B, plain bf16 model, no FSDP", 30, lambda: _sft_plain(dev, flops_peak, smoke))
    if want & {"rollout", "ragged"}:  # one engine (and its graphs) for both rollouts
        rollout = Sampler(ours, 64, 2048, compile=True, backend=backend)
        run("rollout 8 prompts x n=8 vs transformers", 60, lambda: _rollout_8x8(hf, rollout, device, smoke), "rollout")
        run("ragged rollout: continuous vs static", 150, lambda: _ragged(rollout, device, smoke), "ragged")  # 400 stops: 8 graphs
        del rollout
    page = 16 if smoke else 128  # FlexAttention's block: a page is one block of the kernel's mask
    if "ragged" in want:  # the ragged rollout through pages: slots hold what their traces fill, a step reads only that
        paged = Sampler(ours, 64, 2048, compile=True, backend=backend, page_size=page)  # (on CPU: minutes, unfused)
        run("ragged rollout, paged KV cache", 150, lambda: _ragged(paged, device, smoke))
        del paged
    run("decode batch 1 vs transformers", 90, lambda: _decode_batch1(ours, hf, device, bw_peak, smoke, backend), "decode")
    run("decode batch 1, paged KV cache", 90, lambda: _decode_batch1(ours, hf, device, bw_peak, smoke, backend, page), "paged")
    run("judge prompts: a common opening", 60, lambda: _common_opening(ours, device, smoke, page), "paged")
    run("decode batch 1, 7B shape: dense | paged", 150, lambda: _decode_7b(device, bw_peak, smoke, backend, page), "decode7b")
    run("decode step 7B: dense vs a page pool", 150, lambda: _slots_7b(device, bw_peak, smoke, backend, page), "slots7b")
    if want & {"grpo", "offload"}:
        small_dir = os.path.join(tempfile.mkdtemp(), "model")
        checkpoint.save_model(ours, small_dir)
        run("grpo.py, 2 steps (0.5B shape)", 150, lambda: _grpo_two_steps(small_dir, smoke, deadline - time.time() - 5),
            "grpo")
        offload = ("--offload",) + (("--precision", "bf16") if smoke else ())  # the CPU's fp32 process has no FSDP
        run("grpo.py --offload, 2 steps (0.5B shape)", 150, lambda: _grpo_two_steps(
            small_dir, smoke, deadline - time.time() - 5, *offload), "offload")
    ours = hf = None  # frees them (not `del`: the checks above close over these names)
    if "grpo1.5b" in want:  # #30's rollout target is at this size; a call of its own (at 0.5B this run took 139 s)
        run("grpo.py, 2 steps (1.5B shape)", 285, lambda: _grpo_two_steps(
            random_checkpoint("smoke" if smoke else "1.5B", device), smoke, deadline - time.time() - 5))
    if torch.cuda.device_count() > 1:
        check(log, "FSDP + NCCL, 2 ranks vs 1", 30, _fsdp_check)
    check(log, "eager fallbacks in these checks", 5, _eager_fallbacks)


def _eager_fallbacks():
    """Code that Dynamo stopped compiling because it reached its recompile limit runs eager from then on, silently."""
    hits = {k.splitlines()[0]: v for k, v in torch._dynamo.utils.counters["unimplemented"].items() if "recompile limit" in k}
    return f"{sum(hits.values())} (Dynamo's recompile limit reached: {', '.join(hits) or 'never'})"


def _parity(ours, hf, device):
    ids = torch.randint(0, ours.config.vocab_size, (2, 256), device=device)
    with torch.no_grad():
        a, b = ours(ids).float(), hf(ids).logits.float()
    return (f"max |diff| {(a - b).abs().max():.3f} of max |logit| {b.abs().max():.1f}, "
            f"argmax agreement {(a.argmax(-1) == b.argmax(-1)).float().mean():.3f}")


def _decode_batch1(ours, hf, device, bw_peak, smoke, backend, page_size=0):
    """Greedy decode of 256 tokens after a 128-token prompt, one sequence: tok/s against transformers' generate (hf None:
    no comparison), and the weights' bytes read per second as a share of the GPU's HBM bandwidth."""
    from sampler import Sampler, generate
    V, n_new = ours.config.vocab_size, 32 if smoke else 256
    prompt = torch.randint(0, V, (1, 128), device=device)
    e = Sampler(ours, 1, 128 + n_new, compile=True, backend=backend, page_size=page_size)
    compile_s, shapes, graphs = _compile_graphs(e, 128, 128 + n_new, temperature=0)
    t_ours = timeit(lambda: e.generate(prompt.tolist(), n_new, temperature=0), 1, device)
    t_hf = None if hf is None else timeit(lambda: hf.generate(prompt, max_new_tokens=n_new, min_new_tokens=n_new,
                                                              do_sample=False, pad_token_id=0), 1, device)
    compiled = e.generate(prompt.tolist(), n_new, temperature=0)[0]
    eager = generate(ours, prompt.tolist(), n_new, temperature=0)[0]  # (a dense cache, of its own)
    agree = next((i for i, (x, y) in enumerate(zip(compiled, eager)) if x != y), len(eager))
    # the KV cache read (at most 384 positions here) is left out: 22 MB a step at 7B against 14 GB of weights
    frac = f", {_step_weight_bytes(ours) * n_new / t_ours / bw_peak:.0%} of HBM bandwidth" if bw_peak else ""
    skips = torch._dynamo.utils.counters["inductor"].get("cudagraph_skips", 0)
    versus = " tok/s" if hf is None else f" vs {n_new / t_hf:.0f} tok/s: {t_hf / t_ours:.1f}x"
    return (f"{n_new / t_ours:.0f}{versus}{frac}; cudagraph skips {skips}; "
            f"compile {compile_s:.0f} s ({graphs} graphs, {shapes} shapes); compiled = eager greedy for the first {agree} of {n_new} tokens")


def _step_weight_bytes(m):
    """The weight bytes a decode step reads: every weight once, but of an untied embedding table only a row."""
    emb = m.model.embed_tokens.weight
    return sum(p.numel() * p.element_size() for p in m.parameters() if p is not emb or m.config.tie_word_embeddings)


def _random_7b(device, smoke):
    """The 7B shape with random bf16 weights made on the GPU (15 GB; transformers' copy would double that), q/k/v and
    gate/up fused as eval.py and grpo.py's rollouts decode on GPUs."""
    from decode_model import fuse_projections
    return fuse_projections(random_model("smoke" if smoke else "7B", device, torch.float32 if smoke else None),
                            devices=(device.type,)).eval()


def _decode_7b(device, bw_peak, smoke, backend, page):
    """The 7B shape's batch-1 decode, dense and paged KV cache (#30's target: half the HBM bandwidth)."""
    m = _random_7b(device, smoke)
    res = " | ".join(_decode_batch1(m, None, device, bw_peak, smoke, backend, size) for size in (0, page))
    del m
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def _slots_7b(device, bw_peak, smoke, backend, page):
    """What paging buys a 7B rollout (docs/measurements.md's simulated schedule leaves it to a GPU): the sampled decode
    step's tokens/s in grpo.py's default KV cache, a quarter of the GPU (dense: the slots of 12,288 positions that fit, in
    groups of 7, each read up to the bucketed span of the longest), against a page pool of those bytes with as many of
    the same sequences as it holds (each reads its own pages), and those 28 paged. Each slot is mid-trace at a position of
    1,024-6,079 (a cache of zeros: a step's cost does not depend on the values); compiles are untimed."""
    from sampler import Sampler, kv_bytes, slots_that_fit
    m = _random_7b(device, smoke)
    cfg, dtype, V = m.config, m.lm_head.weight.dtype, m.config.vocab_size
    max_len, (lo, hi), steps = (512, (64, 240), 4) if smoke else (12288, (1024, 6080), 32)
    budget = 7.5 * kv_bytes(cfg, max_len, dtype) if smoke else 0.25 * torch.cuda.get_device_properties(device).total_memory
    pool = int(budget // kv_bytes(cfg, page, dtype))  # pages, as Sampler sizes them for grpo.py's --kv-cache-frac
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(lo, hi, (224,), generator=g).tolist()  # grpo.py's default slots: 32 prompts x 7
    need = [-(-(L + 2 * steps + 1) // page) for L in lengths]  # pages each slot holds by the last timed step
    fill = max(k for k in range(len(lengths) + 1) if sum(need[:k]) <= pool - 1)  # (page 0 is never handed out)
    dense = slots_that_fit(budget, cfg, max_len, dtype, 7)
    weights = _step_weight_bytes(m)
    res, rates = [], []
    for name, slots, size in (("paged", fill, page), ("paged", dense, page), ("dense", dense, 0)):  # pool reused
        e = Sampler(m, slots, max_len, compile=True, backend=backend, page_size=size, pages=pool if size else None)
        seconds, span = _steady_steps(e, lengths[:slots], steps, V)  # timed: positions L + steps .. L + 2 steps
        read = weights + kv_bytes(cfg, 1, dtype) * (sum(lengths[:slots]) + slots * 1.5 * steps if size else slots * span)
        share = f", {read / (seconds / steps) / bw_peak:.0%} of HBM" if bw_peak else ""
        rates.append(slots * steps / seconds)
        res.append(f"{name} {slots} slots{'' if size else f' (span {span})'}: {rates[-1]:.0f} tok/s, "
                   f"{seconds / steps * 1e3:.1f} ms a step{share}")
    del m, e  # (80 GB: 15 GB of weights beside both caches)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return " | ".join(res) + f": the full pool {rates[0] / rates[2]:.2f}x dense's tokens/s"


def _steady_steps(e, lengths, steps, vocab):
    """Slots 0.. of engine e mid-trace at positions `lengths` (paged: their pages taken), then `steps` sampled decode
    steps untimed (compile, CUDA graph) and `steps` timed -> (seconds, the dense span read)."""
    S, dev = len(lengths), e.tok.device
    e.pos[:S] = torch.tensor(lengths, device=dev)
    e.tok[:S], e.seq[:S], e.n_out[:S], e.done[:S] = 1000, torch.arange(S, device=dev), 1, False
    e.budget.fill_(e.max_len)
    if e.pages:
        assert all(e.pages.grow([s], L + 2 * steps + 1) for s, L in enumerate(lengths))
        e.pages.flush()
    stop, span = torch.tensor([-1], device=dev), e.kv_span(max(lengths) + 2 * steps + 1)
    with torch.no_grad():
        return timeit(lambda: [e.step(S, stop, 1.0, 1.0, 0, vocab, span) for _ in range(steps)], 1, dev), span


def _compile_graphs(e, lo, hi, stop_ids=(), temperature=1.0, buckets=None):
    """Compile and record, untimed, the decode step for every shape a generate call will use: each bucket of slots
    (all, or `buckets`) and cache span that positions lo..hi reach, for these stop ids and sampling mode. A graph
    (seconds) or a CUDA graph recording first met inside a timing would add to it. -> (seconds, shapes, compiles)."""
    stop = torch.tensor(sorted(set(stop_ids)) or [-1], device=e.tok.device)
    spans = sorted({e.kv_span(h) for h in range(lo + 1, min(hi, e.max_len) + 1)})
    buckets = buckets or e.buckets()
    t, graphs = time.perf_counter(), torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch.no_grad():  # as in generate: grad mode is part of what a graph is compiled for
        for b in buckets:
            for span in spans:
                e.step(b, stop, temperature, 1.0, 0, e.model.config.vocab_size, span)
    if e.tok.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t, len(buckets) * len(spans), torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs


def _rollout_8x8(hf, e, device, smoke):
    V, P, N = hf.config.vocab_size, 512, 32 if smoke else 256
    prompts = torch.randint(0, V, (8, P), device=device)
    compile_s, shapes, graphs = _compile_graphs(e, P, P + N, buckets=[e.slots])  # all 64 slots run to the end
    t_ours = timeit(lambda: e.generate(prompts.tolist(), N, n=8, seed=0), 1, device)
    t_hf = timeit(lambda: hf.generate(prompts, max_new_tokens=N, min_new_tokens=N, do_sample=True, num_return_sequences=8,
                                      pad_token_id=0), 1, device)
    return (f"{64 * N / t_ours:.0f} vs {64 * N / t_hf:.0f} tok/s: {t_hf / t_ours:.1f}x (512-token prompts, {N} new, sampled); "
            f"compile {compile_s:.0f} s ({graphs} graphs, {shapes} shapes)")


def _ragged(e, device, smoke):
    """64 prompts x n=8 through 64 slots, prompt lengths and trace lengths from long tails: a static batch waits for
    its longest trace, continuous batching refills finished slots. Random weights sample near-uniformly, so making
    400 ids stop ids gives geometric lengths (mean ~380 tokens, capped at 1024)."""
    V = SHAPES["smoke" if smoke else "0.5B"]["vocab_size"]
    g = torch.Generator().manual_seed(0)
    lengths = (32 * torch.exp(torch.randn(64, generator=g) * 0.8)).clamp(8, 1024).long().tolist()
    prompts = [torch.randint(1000, V, (n,), generator=g).tolist() for n in lengths]
    stop, N = (list(range(V // 16)), 64) if smoke else (list(range(V // 380)), 1024)
    compile_s, shapes, graphs = _compile_graphs(e, min(lengths), max(lengths) + N, stop)
    before, res = torch._dynamo.utils.counters["stats"]["unique_graphs"], {}
    for continuous in (True, False):
        t = time.perf_counter()
        outs = e.generate(prompts, N, n=8, stop_ids=stop, seed=1, continuous=continuous)
        if device.type == "cuda":
            torch.cuda.synchronize()
        res[continuous] = (sum(map(len, outs)), time.perf_counter() - t)
    (tok, tc), (_, ts) = res[True], res[False]
    during = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
    paged = f"; KV positions in use at most {e.pages.peak * e.pages.size}" if e.pages else ""
    return (f"continuous {tok / tc:.0f} tok/s, static {tok / ts:.0f} tok/s: {ts / tc:.2f}x ({tok} tokens, mean trace "
            f"{tok / 512:.0f}, slots 64); compile {compile_s:.0f} s ({graphs} graphs, {shapes} shapes), {during} more graphs "
            f"during the timings{paged}")


def _common_opening(ours, device, smoke, page):
    """16 judge-like prompts: an opening they all share (the RM-R1 template's 704 tokens, whole pages) and 300-1,200
    tokens of their own. The paged engine holds the opening once and prefills only the rest, attending to its cached
    pages (masked SDPA): its time and peak memory against the dense engine's full prefills (eager engines, 8 greedy
    tokens each; a peak far above the dense one would mean the masked attention materialised its scores)."""
    from sampler import Sampler
    V = SHAPES["smoke" if smoke else "0.5B"]["vocab_size"]
    g = torch.Generator().manual_seed(2)
    opening = torch.randint(1000, V, (48 if smoke else 704,), generator=g).tolist()
    prompts = [opening + torch.randint(1000, V, (int(n),), generator=g).tolist()
               for n in torch.randint(*((10, 40) if smoke else (300, 1200)), (16,), generator=g)]
    res = {}
    for name, page_size in (("dense", 0), ("paged", page)):  # one engine at a time: both use the model's cache
        e = Sampler(ours, 16, len(opening) + 1300, page_size=page_size)
        e.generate(prompts[:2], 1, temperature=0)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base, t = torch.cuda.memory_allocated() if device.type == "cuda" else 0, time.perf_counter()
        out = e.generate(prompts, 8, temperature=0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else float("nan")
        res[name] = (time.perf_counter() - t, peak, out, e.pages.peak * page if e.pages else 16 * (len(opening) + 1300))
        del e
    same = sum(a == b for a, b in zip(res["dense"][2], res["paged"][2]))
    return (f"dense {res['dense'][0]:.2f} s, +{res['dense'][1]:.2f} GiB at peak; paged {res['paged'][0]:.2f} s, "
            f"+{res['paged'][1]:.2f} GiB; KV positions {res['paged'][3]} vs {res['dense'][3]} reserved; the same greedy "
            f"tokens for {same} of 16 prompts (bf16 rounding can flip a near-tie)")


def _grpo_two_steps(model_dir, smoke, timeout_s, *flags):
    """A real-shape grpo.py run (a random checkpoint in model_dir, and flags) on the toy's prompts and tokenizer: 2 steps
    of 16 prompts x n=7, up to 512 new tokens (the toy tokenizer's 3 stop ids among 2048 sampled ids: long, ragged
    traces). Step 1's rollout pays the decode graphs' compile; step 2's is the steady rate. -> also the peak GPU memory."""
    root = os.path.dirname(os.path.abspath(__file__))
    tmp = tempfile.mkdtemp()
    paths = toy.prepare(os.path.join(tmp, "toy"), n_train=64, n_rl=64, n_heldout=8)
    cmd = [sys.executable, "grpo.py", "--model", model_dir, "--tokenizer", paths["tokenizer"], "--data",
           paths["rl"], "--out", os.path.join(tmp, "out"), "--steps", "2", "--rollout-prompts", "16", "--minibatch-prompts", "8",
           "--gen-prompts", "16", "--group-size", "7", "--max-new-tokens", "64" if smoke else "512", *flags] + \
        (["--no-compile"] if smoke else [])
    t, cut = time.time(), False
    try:
        p = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=max(timeout_s, 1))  # before the cap
        stderr = p.stderr
    except subprocess.TimeoutExpired as e:  # report the steps it finished: step 1's figures are worth the device time
        p, stderr, cut = None, (e.stderr or b"").decode(errors="replace"), True
    if p is not None and p.returncode:
        with open(os.path.join(os.environ.get("OUT", "."), "grpo_two_steps.stderr"), "w") as f:
            f.write(stderr[-20000:])
        errors = [line for line in stderr.splitlines() if "Error" in line] or stderr.strip().splitlines()[-1:]
        return "failed: " + errors[-1][:300]
    metrics = os.path.join(tmp, "out", "metrics.jsonl")
    recs = [json.loads(line) for line in open(metrics)] if os.path.exists(metrics) else []
    limit = sum("recompile_limit" in line for line in stderr.splitlines())  # Dynamo's warning: code runs eager from then
    parts = "; ".join(f"step {r['step']}: rollout {r['rollout_s']:.1f} s ({r['rollout_tokens_per_s']:.0f} tok/s, "
                      f"{r['rollout_decode_steps']} decode steps, slots {r['rollout_slot_use']:.0%} busy), old/ref "
                      f"log-probs {r['logprobs_s']:.1f} s, train {r['train_s']:.1f} s, sampler-trainer |d log p| mean "
                      f"{r['rollout_logp_diff_mean']:.1e} max {r['rollout_logp_diff_max']:.2f}, GPU peak "
                      f"{r['gpu_peak_gib']:.1f} GiB" for r in recs)
    ran = f"cut by its time limit after {time.time() - t:.0f} s" if cut else f"whole run {time.time() - t:.0f} s"
    return f"{parts or 'no step finished'}; {ran}; recompile-limit warnings {limit}"


def _trainer_model(smoke):
    """A random 1.5B-shape checkpoint loaded the way sft.py / grpo.py load one (training.load_for_training: FSDP2
    over a one-rank group on CUDA, bf16 compute, fp32 master weights, compiled blocks, activation checkpointing)."""
    _, world, device = training.setup_distributed()
    path = random_checkpoint("smoke" if smoke else "1.5B", device)
    model = training.load_for_training(path, world, device, compile=not smoke, grad_ckpt="all")
    return model, training.make_optimizer(model, 1e-5, (0.9, 0.95), 0.0), device


def _sft_fwd_bwd(model, device, smoke, seqs=1):
    """-> (one SFT forward+backward on `seqs` 4k-token sequences, its token count); the loss weighs tokens as sft.py.
    Every block recomputes, as in the README table's rows (_sft_mfu then takes --grad-ckpt auto's choice)."""
    import sft
    model.recompute_blocks = len(model.model.layers)
    T = 512 if smoke else 4096
    traces = [(torch.randint(0, model.config.vocab_size, (T + 1,)).tolist(), [1] * (T + 1)) for _ in range(seqs)]

    def fwd_bwd():  # sft.train_step's micro-batch: rows of one trace each, so plain causal attention (SDPA), no mask
        (rows,) = sft.micro_batches(traces, T * seqs)
        ids, positions, targets, weights, packed = sft.pack_batch(rows, 0, device, M.compute_dtype(model))
        (-model(ids, positions, targets=targets, loss_weights=weights, packed=packed) / (T * seqs)).backward()
    return fwd_bwd, T * seqs


def _mfu(model, T, seconds, flops_peak, seqs=1):  # T tokens in `seqs` equal sequences
    flops = training.train_flops(model, [(0, T // seqs)] * seqs)
    return f"MFU {flops / seconds / flops_peak:.1%}" if flops_peak else "MFU n/a"


def _sft_mfu(model, optimizer, device, flops_peak, smoke, seqs=1, micros=8):
    """SFT optimizer steps as sft.py runs them, on 4k-token sequences, `seqs` per micro-batch: steps recomputing every
    block (the last one timed), then --grad-ckpt auto's choice (training.fit_recompute), timed: `micros` micro-batches
    then AdamW (training.accumulate_gradients: one GPU reduces the gradients once, at the last micro-batch); one
    micro-batch then AdamW (the step this check timed before); forward+backward alone, reducing each time."""
    fwd_bwd, T = _sft_fwd_bwd(model, device, smoke, seqs)

    def sft_step(n):
        for k in range(n):
            training.accumulate_gradients(model, last=k == n - 1)
            fwd_bwd()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":  # the peak --grad-ckpt auto measures: this check's own
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    sft_step(1)
    first = time.perf_counter() - t
    t_all = timeit(lambda: sft_step(micros), 1, device) / micros  # a step, then one timed: every block recomputes
    fitted = training.fit_recompute(model, "auto", 2, T, device) or "every block recomputes (--grad-ckpt auto on CUDA only)"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_acc, t_one = timeit(lambda: sft_step(micros), 2, device) / micros, timeit(lambda: sft_step(1), 3, device)
    t_fb = timeit(fwd_bwd, 3, device)
    optimizer.zero_grad(set_to_none=True)
    mem = f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
    rate = lambda t: f"{T / t:.0f} tok/s, {_mfu(model, T, t, flops_peak, seqs)}"
    return (f"{micros} micro-batches + AdamW {rate(t_acc)}; 1 micro-batch + AdamW {rate(t_one)}; forward+backward alone "
            f"{rate(t_fb)} (model FLOPs, recompute not counted){mem}; first step {first:.0f} s; {fitted}; before that, "
            f"every block recomputing: {micros} micro-batches + AdamW {rate(t_all)}")


def _sft_head_eager(model, device, flops_peak, smoke):
    """The SFT step's forward+backward with the output head's per-chunk elementwise work eager (head.FUSED_HEAD_DEVICES
    emptied): about ten passes over a [1024, 152k] fp32 buffer per chunk instead of Inductor's fused kernels."""
    fwd_bwd, T = _sft_fwd_bwd(model, device, smoke)
    fused, head.FUSED_HEAD_DEVICES = head.FUSED_HEAD_DEVICES, ()
    try:
        t = timeit(fwd_bwd, 3, device)
    finally:
        head.FUSED_HEAD_DEVICES = fused
    return f"{T / t:.0f} tok/s, {_mfu(model, T, t, flops_peak)} (compare the forward+backward above)"


def _sft_profile(model, device, smoke, accumulating=False):
    """Where one forward+backward's time goes: kernel time by kind, and the kernels' share of the wall time
    (low: the GPU waits for the host). accumulating: a micro-batch inside an optimizer step, after the first
    (training.accumulate_gradients: on one GPU, no regathering and no reduction)."""
    from torch.profiler import ProfilerActivity, profile
    fwd_bwd, _ = _sft_fwd_bwd(model, device, smoke)
    if accumulating:
        training.accumulate_gradients(model, last=False)
        fwd_bwd()  # the step's first micro-batch gathers the weights
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        t = time.perf_counter()
        fwd_bwd()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
    training.accumulate_gradients(model, last=True)  # the next backward reduces what accumulated
    kinds = {"matmul": ("gemm", "cutlass", "xmma", "nvjet", "aten::mm", "aten::addmm", "aten::bmm"),
             "attention": ("flash", "fmha", "attention", "sdpa"), "compiled": ("triton", "cpp_fused"),
             "copy/collective": ("memcpy", "memset", "nccl", "copy", "cat")}
    by_kind, by_name = {}, {}
    for e in prof.key_averages():
        if cuda and e.device_type != torch.autograd.DeviceType.CUDA or getattr(e, "is_user_annotation", False):
            continue  # a CPU op's self device time, or a range such as FSDP::pre_forward, repeats its kernels' times
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        kind = next((k for k, keys in kinds.items() if any(x in e.key.lower() for x in keys)), "other")
        by_kind[kind] = by_kind.get(kind, 0) + us
        by_name[e.key] = by_name.get(e.key, 0) + us
    total = sum(by_kind.values()) or 1
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:6]
    return (f"kernels {total / 1e6 / wall:.0%} of the wall time ({wall * 1e3:.0f} ms, profiled); "
            + ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1]))
            + "; top: " + ", ".join(f"{k[:50]} {v / 1e3:.0f} ms" for k, v in top))


def _sft_plain(device, flops_peak, smoke):
    """The same forward+backward on a plain bf16 model with compiled blocks (no FSDP, no fp32 master weights):
    its gap to the SFT step's forward+backward is FSDP2's one-rank overhead."""
    cfg = M.ModelConfig(**SHAPES["smoke" if smoke else "1.5B"])
    with torch.device(device):
        model = M.Transformer(cfg).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    if not smoke:
        M.compile_blocks(model)
    fwd_bwd, T = _sft_fwd_bwd(model, device, smoke)
    t = timeit(fwd_bwd, 3, device)
    return f"{T / t:.0f} tok/s, {_mfu(model, T, t, flops_peak)} (activation checkpointing on)"


def _grpo_group_inputs(model, device, smoke):
    """A group: a 2k-token prompt and 7 responses of 146-1901 tokens, 1k on average (smoke: tiny), and advantages."""
    P, R, G = (64, 32, 7) if smoke else (2048, 1024, 7)
    V = model.config.vocab_size
    return [torch.randint(0, V, (P,)).tolist()], [torch.randint(0, V, (n,)).tolist() for n in ragged_lengths(R, G)], \
        torch.randn(G, 1, device=device)


def _grpo_group(model, device, smoke, group):
    """GRPO's forward+backward of one group through grpo.py's code (prompt run once, FSDP bf16, activation
    checkpointing). Returns the line and leaves the timing in group["t"] for the transformers comparison."""
    import grpo
    prompts, responses, adv = group["inputs"]
    model.recompute_blocks = len(model.model.layers)  # as transformers' rows below (not --grad-ckpt auto's choice)

    def ours():
        logp, _, mask = grpo.response_logprobs(model, prompts, responses, len(responses), 0, device, 1.0)
        (-(adv * logp * mask).sum() / mask.sum()).backward()

    t_first = time.perf_counter()
    ours()
    t_first = time.perf_counter() - t_first
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    group["t"] = timeit(ours, 2, device)
    n = len(responses) * len(prompts[0]) + sum(map(len, responses))
    mem = f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB (with fp32 weights, grads, AdamW state)" \
        if device.type == "cuda" else ""
    return f"{n / group['t']:.0f} tok/s (rows of prompt + response){mem}; first call {t_first:.0f} s"


def _grpo_group_hf(device, smoke, group):
    """transformers' forward+backward of the same 7 rows [prompt, response] in bf16, padded to the longest, with its gradient
    checkpointing (without it, 7 x 3k tokens of 1.5B activations do not fit 80 GB next to our trainer)."""
    prompts, responses, adv = group["inputs"]
    P = len(prompts[0])
    with torch.device(device):  # built on the GPU: a CPU init of 1.5B parameters takes most of the cap
        hf = hf_qwen2(SHAPES["smoke" if smoke else "1.5B"]).to(torch.bfloat16)
    hf.gradient_checkpointing_enable()
    hf.train()
    rows, attn, resp_mask = padded_rows(prompts[0], responses, device)

    def theirs():
        logits = hf(rows[:, :-1], attention_mask=attn[:, :-1]).logits[:, P - 1:].float()
        logp = torch.log_softmax(logits, -1).gather(-1, rows[:, P:, None]).squeeze(-1)
        (-(adv * logp * resp_mask).sum() / resp_mask.sum()).backward()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_hf = timeit(theirs, 2, device)
    mem = f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
    n = len(responses) * P + sum(map(len, responses))  # real tokens, as ours counts them
    ratio = f": ours {t_hf / group['t']:.2f}x" if "t" in group else ""
    return f"{n / t_hf:.0f} tok/s{mem}{ratio}"


def _fsdp_check():
    """Two ranks over NCCL on the toy task vs one process: the loss curves must agree."""
    root = os.path.dirname(os.path.abspath(__file__))
    out = tempfile.mkdtemp()
    common = ["--max-steps", "3", "--no-compile", "--eval-limit", "0", "--stop-at-accuracy", "0"]
    subprocess.run([sys.executable, "sft.py", "--out", f"{out}/one"] + common, cwd=root, check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "sft.py",
                    "--out", f"{out}/two"] + common, cwd=root, check=True, capture_output=True)
    one, two = ([json.loads(line)["loss"] for line in open(f"{out}/{d}/metrics.jsonl")] for d in ("one", "two"))
    diff = max(abs(a - b) for a, b in zip(one, two))
    return f"max loss difference {diff:.2e} over {len(one)} steps"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=DEFAULT_GPU_CHECKS, help=f"the checks to run, of {','.join(GPU_CHECKS)} (default "
                    f"{DEFAULT_GPU_CHECKS}: 5 minutes; then --only slots7b,paged, grpo1.5b, grpo,decode, ragged, offload; bf16 parity and the "
                    "eager-fallback count always run)")
    ap.add_argument("--smoke", action="store_true", help="run the checks on CPU with a tiny model (tests the script)")
    args = ap.parse_args(argv)
    unknown = set(args.only.split(",")) - set(GPU_CHECKS)
    if unknown:
        ap.error(f"--only: unknown check(s) {', '.join(sorted(unknown))}; the checks are {', '.join(GPU_CHECKS)}")
    torch.manual_seed(0)
    bench_gpu(args, torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))


if __name__ == "__main__":
    main()
