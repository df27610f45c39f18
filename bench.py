"""
bench.py: performance measured against transformers in the same run (ratios, not absolute claims).

    python bench.py train     # training step tokens/s vs transformers' Qwen2ForCausalLM (SFT, and a GRPO group
                              # with its prompt run once), peak memory of the loss: chunked head vs full logits
    python bench.py decode    # KV-cached greedy decode tokens/s vs transformers' generate (batch 1 and a
                              # GRPO-shaped batch)
    python bench.py gpu       # every GPU check in one table: bf16 parity, compiled vs eager, FSDP + NCCL,
                              # decode vs transformers and % of HBM bandwidth, GRPO rollout, SFT MFU

Shapes come from a real config (default ../shared/data/configs/Qwen2.5-0.5B-Instruct.config.json, or
--config); --layers cuts the depth so a CPU finishes in a minute; weights are random (only speed and
memory are measured). Memory on CPU is the peak resident-set growth of a fresh subprocess per variant (on
CUDA, torch.cuda.max_memory_allocated).
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import model as M

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data", "configs",
                              "Qwen2.5-0.5B-Instruct.config.json")


def load_cfg(args):
    if not os.path.exists(args.config):
        sys.exit(f"config not found: {args.config} (pass --config path/to/config.json)")
    d = json.load(open(args.config))
    d["num_hidden_layers"] = args.layers or d["num_hidden_layers"]
    return d


def build_pair(hf_cfg, device, dtype):
    """Our model and transformers' with identical random weights."""
    import transformers
    cfg = M.ModelConfig.from_hf(hf_cfg)
    torch.manual_seed(0)
    ours = M.init_weights(M.Transformer(cfg)).to(device=device, dtype=dtype)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{k: v for k, v in hf_cfg.items() if k != "layer_types"}))
    hf.load_state_dict(ours.state_dict(), strict=False)
    hf.tie_weights()
    return ours, hf.to(device=device, dtype=dtype)


def timeit(fn, reps, device):
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def bench_train(args, device, dtype):
    hf_cfg = load_cfg(args)
    ours, hf = build_pair(hf_cfg, device, dtype)
    ids = torch.randint(0, 151000, (args.batch, args.seq), device=device)
    tgt = torch.randint(0, 151000, (args.batch, args.seq), device=device)

    n = args.batch * args.seq
    print(f"training step (forward+backward+loss), {hf_cfg['num_hidden_layers']} layers of {os.path.basename(args.config)}, "
          f"{args.batch}x{args.seq} tokens, {dtype}, {device.type}:")
    for prompt_frac in (0.0, args.prompt_frac):
        supervised = torch.arange(args.seq, device=device)[None].expand(args.batch, -1) >= int(prompt_frac * args.seq)
        weights = -supervised.float() / supervised.sum()
        labels = tgt.masked_fill(~supervised, -100)

        def step_ours():  # the SFT path: mean token cross-entropy through the chunked head, loss tokens only
            ours(ids, targets=tgt, loss_weights=weights).backward()

        def step_hf():
            logits = hf(ids).logits
            F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100).backward()

        t_ours, t_hf = timeit(step_ours, args.reps, device), timeit(step_hf, args.reps, device)
        print(f"  loss on {100 - 100 * prompt_frac:.0f}% of tokens: this project {n / t_ours:8.0f} tokens/s, "
              f"transformers {n / t_hf:8.0f} tokens/s, ratio {t_hf / t_ours:.2f}x")
    bench_grpo_step(args, ours, hf, device)
    mem = {way: loss_memory(way, args) for way in ("chunked", "full")}
    print(f"peak memory of the loss alone ({args.loss_tokens} tokens x {hf_cfg['vocab_size']} vocab, hidden {hf_cfg['hidden_size']}, fp32):")
    print(f"  chunked head   {mem['chunked'] / 2**20:10.0f} MiB")
    print(f"  full logits    {mem['full'] / 2**20:10.0f} MiB")
    print(f"  ratio          {mem['chunked'] / mem['full']:10.3f}")


def bench_grpo_step(args, ours, hf, device):
    """GRPO's policy-gradient forward+backward for one group: G responses to one prompt. This project runs the
    prompt once for the group (grpo.response_logprobs); the per-row way (as TRL's GRPOTrainer) runs G rows of
    [prompt, response] through transformers and takes log-probs of the response tokens from full logits."""
    import grpo
    G, P, R = args.group, args.grpo_prompt, args.grpo_response
    prompt = torch.randint(0, 151000, (P,)).tolist()
    responses = [torch.randint(0, 151000, (R,)).tolist() for _ in range(G)]
    rows = torch.tensor([prompt + r for r in responses], device=device)
    adv = torch.randn(G, 1, device=device)

    def step_ours():
        logp, _, mask = grpo.response_logprobs(ours, [prompt], responses, G, 0, device, 1.0)
        (-(adv * logp * mask).sum() / mask.sum()).backward()

    def step_hf():
        logits = hf(rows[:, :-1]).logits[:, P - 1:].float()
        logp = torch.log_softmax(logits, -1).gather(-1, rows[:, P:, None]).squeeze(-1)
        (-(adv * logp).mean()).backward()

    t_ours, t_hf = timeit(step_ours, args.reps, device), timeit(step_hf, args.reps, device)
    n = G * (P + R)
    print(f"  GRPO step, a group of {G} responses of {R} tokens to one {P}-token prompt: this project {n / t_ours:8.0f} "
          f"tokens/s, transformers rows {n / t_hf:8.0f} tokens/s, ratio {t_hf / t_ours:.2f}x")


def loss_memory(way, args):
    """Peak memory growth of one loss forward+backward, measured in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "_loss", way, "--config", args.config, "--loss-tokens", str(args.loss_tokens)],
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().split()[-1])


def _loss(way, args):
    d = json.load(open(args.config))
    V, H, N = d["vocab_size"], d["hidden_size"], args.loss_tokens
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hidden = torch.randn(N, H, device=device).requires_grad_(True)
    weight = torch.randn(V, H, device=device).mul_(0.02).requires_grad_(True)  # in place: no temporary copy
    tgt = torch.randint(0, V, (N,), device=device)
    weights = torch.full((N,), -1.0 / N, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:  # the peak RSS (VmHWM), reset now: ru_maxrss would carry the parent's peak across exec
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _rss("VmRSS")
    if way == "chunked":
        M._ChunkedWeightedLogProbSum.apply(hidden, weight, tgt, weights, 1024, 1.0).backward()
    else:
        F.cross_entropy((hidden @ weight.t()).float(), tgt).backward()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _rss("VmHWM")
    print(peak - base)


def _rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024


@torch.no_grad()
def bench_decode(args, device, dtype):
    from sampler import generate
    hf_cfg = load_cfg(args)
    ours, hf = build_pair(hf_cfg, device, dtype)
    ours.eval(), hf.eval()
    for batch in (1, args.rollout_batch):
        prompt = torch.randint(0, 151000, (batch, args.prompt_len), device=device)
        t_ours = timeit(lambda: generate(ours, prompt.tolist(), args.new_tokens, temperature=0), 1, device)
        t_hf = timeit(lambda: hf.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                          do_sample=False, pad_token_id=0), 1, device)
        n = batch * args.new_tokens
        print(f"greedy decode, batch {batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, {dtype}, {device.type}: "
              f"this project {n / t_ours:.0f} tok/s, transformers {n / t_hf:.0f} tok/s, ratio {t_hf / t_ours:.2f}x")


# ----------------------------------------------------------------------------- GPU checks (one command)

PEAK = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12), "A100": (312e12, 2.0e12)}  # bf16 dense FLOP/s, HBM B/s


def bench_gpu(args, device, dtype):
    """Every GPU check in one table: parity, compiled vs eager, FSDP+NCCL, decode, rollout, SFT MFU."""
    import transformers
    from sampler import generate
    if device.type != "cuda":
        sys.exit("bench.py gpu needs a CUDA device")
    name = torch.cuda.get_device_name()
    flops_peak, bw_peak = next((v for k, v in PEAK.items() if k in name), (None, None))
    rows = [("device", name), ("torch / transformers", f"{torch.__version__} / {transformers.__version__}")]
    cfg_dir = os.path.dirname(args.config)
    small = json.load(open(os.path.join(cfg_dir, "Qwen2.5-0.5B-Instruct.config.json")))
    ours, hf = build_pair(small, device, torch.bfloat16)
    ours.eval(), hf.eval()
    ids = torch.randint(0, 151000, (2, 256), device=device)
    with torch.no_grad():
        a, b = ours(ids).float(), hf(ids).logits.float()
    rows.append(("bf16 logits vs transformers", f"max |diff| {(a - b).abs().max():.3f} of max |logit| {b.abs().max():.1f}, "
                 f"argmax agreement {(a.argmax(-1) == b.argmax(-1)).float().mean():.3f}"))
    prompts = torch.randint(0, 151000, (4, 64)).tolist()
    eager = generate(ours, prompts, 64, temperature=0)
    compiled = generate(ours, prompts, 64, temperature=0, compile=True)
    same = sum(x == y for e, c in zip(eager, compiled) for x, y in zip(e, c)) / sum(map(len, eager))
    rows.append(("compiled vs eager greedy decode", f"{same:.3f} of tokens equal (bf16; ties may flip late tokens)"))
    rows.append(("FSDP + NCCL", _fsdp_check() if torch.cuda.device_count() > 1 else "skipped: one GPU visible"))
    # decode at batch 1: tokens/s vs transformers, and the share of HBM bandwidth it reaches
    prompt = torch.randint(0, 151000, (1, 128), device=device)
    n_new = 256
    generate(ours, prompt.tolist(), 16, temperature=0, compile=True)  # compile outside the timing
    t_ours = timeit(lambda: generate(ours, prompt.tolist(), n_new, temperature=0, compile=True), 1, device)
    t_hf = timeit(lambda: hf.generate(prompt, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=0), 1, device)
    bytes_per_token = sum(p.numel() * p.element_size() for p in ours.parameters())
    frac = f", {bytes_per_token * n_new / t_ours / bw_peak:.0%} of HBM bandwidth" if bw_peak else ""
    rows.append(("decode batch 1 (0.5B, bf16)", f"{n_new / t_ours:.0f} vs {n_new / t_hf:.0f} tok/s: {t_hf / t_ours:.2f}x{frac}"))
    # GRPO-shaped rollout: 8 prompts x n 8, 1k-token prompts, 1k new tokens
    prompts = torch.randint(0, 151000, (8, 1024), device=device)
    t_ours = timeit(lambda: generate(ours, prompts.tolist(), 1024, n=8, seed=0), 1, device)
    t_hf = timeit(lambda: hf.generate(prompts, max_new_tokens=1024, min_new_tokens=1024, do_sample=True,
                                      num_return_sequences=8, pad_token_id=0), 1, device)
    rows.append(("GRPO rollout 8x8, 1k+1k (0.5B)", f"{64 * 1024 / t_ours:.0f} vs {64 * 1024 / t_hf:.0f} tok/s: {t_hf / t_ours:.2f}x"))
    del ours, hf
    # SFT step MFU at 4k tokens, Qwen2.5-1.5B shape
    mid = json.load(open(os.path.join(cfg_dir, "Qwen2.5-1.5B-Instruct.config.json")))
    cfg = M.ModelConfig.from_hf(mid)
    model = M.compile_blocks(M.init_weights(M.Transformer(cfg)).to(device))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(0, 151000, (1, 4096), device=device)
    weights = torch.full((1, 4096), -1 / 4096, device=device)

    def sft_step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, targets=ids, loss_weights=weights)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sft_step()
    torch.cuda.reset_peak_memory_stats()
    t = timeit(sft_step, 5, device)
    n = M.num_params(model)
    flops = 6 * n * 4096 + 12 * cfg.num_hidden_layers * cfg.hidden_size * 4096 ** 2 / 2  # causal attention
    mfu = f", MFU {flops / t / flops_peak:.1%}" if flops_peak else ""
    rows.append(("SFT step 1.5B, 4k tokens (bf16 autocast)", f"{4096 / t:.0f} tok/s{mfu}, peak memory "
                 f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


def _fsdp_check():
    """Two ranks over NCCL on the toy task vs one process: the loss curves must agree."""
    import tempfile
    root = os.path.dirname(os.path.abspath(__file__))
    out = tempfile.mkdtemp()
    common = ["--max-steps", "3", "--no-compile", "--eval-limit", "0"]
    subprocess.run([sys.executable, "sft.py", "--out", f"{out}/one"] + common, cwd=root, check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "sft.py",
                    "--out", f"{out}/two"] + common, cwd=root, check=True, capture_output=True)
    one, two = ([json.loads(line)["loss"] for line in open(f"{out}/{d}/metrics.jsonl")] for d in ("one", "two"))
    diff = max(abs(a - b) for a, b in zip(one, two))
    return f"2 ranks vs 1 process: max loss difference {diff:.2e} over {len(one)} steps"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["train", "decode", "gpu", "_loss"])
    ap.add_argument("way", nargs="?", default=None)
    ap.add_argument("--config", default=DEFAULT_CONFIG)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--loss-tokens", type=int, default=4096)
    ap.add_argument("--prompt-frac", type=float, default=0.6, help="share of prompt (no-loss) tokens in the second row")
    ap.add_argument("--group", type=int, default=7, help="GRPO row: responses per prompt")
    ap.add_argument("--grpo-prompt", type=int, default=512, help="GRPO row: prompt tokens")
    ap.add_argument("--grpo-response", type=int, default=128, help="GRPO row: tokens per response")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rollout-batch", type=int, default=16)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: bf16 on CUDA, fp32 on CPU")
    args = ap.parse_args()
    if args.what == "_loss":
        return _loss(args.way, args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(0)
    {"train": bench_train, "decode": bench_decode, "gpu": bench_gpu}[args.what](args, device, dtype)


if __name__ == "__main__":
    main()
