"""
bench.py: performance measured against transformers in the same run (ratios, not absolute claims).

    python bench.py train     # training step tokens/s vs transformers' Qwen2ForCausalLM, and peak memory of
                              # the loss: chunked output head vs full [tokens, vocab] logits
    python bench.py decode    # KV-cached greedy decode tokens/s vs transformers' generate (batch 1 and a
                              # GRPO-shaped batch)

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
    mem = {way: loss_memory(way, args) for way in ("chunked", "full")}
    print(f"peak memory of the loss alone ({args.loss_tokens} tokens x {hf_cfg['vocab_size']} vocab, hidden {hf_cfg['hidden_size']}, fp32):")
    print(f"  chunked head   {mem['chunked'] / 2**20:10.0f} MiB")
    print(f"  full logits    {mem['full'] / 2**20:10.0f} MiB")
    print(f"  ratio          {mem['chunked'] / mem['full']:10.3f}")


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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["train", "decode", "_loss"])
    ap.add_argument("way", nargs="?", default=None)
    ap.add_argument("--config", default=DEFAULT_CONFIG)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--loss-tokens", type=int, default=4096)
    ap.add_argument("--prompt-frac", type=float, default=0.6, help="share of prompt (no-loss) tokens in the second row")
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
    {"train": bench_train, "decode": bench_decode}[args.what](args, device, dtype)


if __name__ == "__main__":
    main()
