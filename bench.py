"""
bench.py: performance measured against transformers in the same run (ratios, not absolute claims).

    python bench.py train     # training step tokens/s vs transformers' Qwen2ForCausalLM (SFT, and a GRPO group
                              # with its prompt run once), peak memory of the loss: chunked head vs full logits
    python bench.py decode    # KV-cached greedy decode tokens/s vs transformers' generate (batch 1 and a
                              # GRPO-shaped batch)
    python bench.py gpu       # the GPU checks: bench_gpu.py (its flags after `gpu`)

Shapes are those of the released Qwen2.5-0.5B / 1.5B / 7B configs (written below, so a GPU machine needs only this
repository; --config reads another config.json); --layers cuts the depth so a CPU finishes in a minute;
weights are random (only speed and memory are measured). Memory on CPU is the peak resident-set growth of a
fresh subprocess per variant (on CUDA, torch.cuda.max_memory_allocated).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

import checkpoint
import head
import model as M
import toy
from training import check_flags

_QWEN25 = dict(model_type="qwen2", vocab_size=151936, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
               max_position_embeddings=32768, torch_dtype="bfloat16")
SHAPES = {"0.5B": dict(_QWEN25, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2),
          "1.5B": dict(_QWEN25, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2),
          "7B": dict(_QWEN25, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
          "smoke": dict(_QWEN25, vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)}


def load_cfg(args, shape="0.5B"):
    d = dict(SHAPES[shape])
    if args.config:
        if not os.path.exists(args.config):
            sys.exit(f"config not found: {args.config}")
        d = json.load(open(args.config))
    d["num_hidden_layers"] = args.layers or d["num_hidden_layers"]
    return d


def hf_qwen2(hf_cfg):
    """transformers' Qwen2 for a config of SHAPES, randomly initialised (under the caller's default device): the
    reference every ratio is against. The benchmarks reach transformers only through here and hf_version."""
    import transformers
    hf_kw = {k: v for k, v in hf_cfg.items() if k not in ("layer_types", "model_type", "torch_dtype")}
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**hf_kw))


def hf_version():
    import transformers
    return transformers.__version__


def build_pair(hf_cfg, device, dtype):
    """Our model and transformers' with identical random weights."""
    cfg = M.ModelConfig.from_hf(hf_cfg)
    torch.manual_seed(0)
    ours = toy.init_weights(M.Transformer(cfg)).to(device=device, dtype=dtype)
    hf = hf_qwen2(hf_cfg)
    hf.load_state_dict(ours.state_dict(), strict=False)
    hf.tie_weights()
    return ours, hf.to(device=device, dtype=dtype)


def random_model(shape, device, dtype=None):
    """One of SHAPES with random weights drawn on `device` (a host init of 1.5B parameters takes most of a
    GPU check's cap), in bf16 unless `dtype` says otherwise."""
    m = M.empty_model(M.ModelConfig(**SHAPES[shape]), device, dtype or torch.bfloat16)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    return m


def random_checkpoint(shape, device):
    """A random bf16 checkpoint of one of SHAPES, in the Hugging Face layout -> its directory."""
    path = os.path.join(tempfile.mkdtemp(), "model")
    checkpoint.save_model(random_model(shape, device), path)
    return path


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
    print(f"training step (forward+backward+loss), {hf_cfg['num_hidden_layers']} layers of {args.config or 'Qwen2.5-0.5B'}, "
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
    bench_sft_packed(args, ours, hf, device)
    bench_grpo_step(args, ours, hf, device)
    mem = {way: loss_memory(way, args) for way in ("chunked", "full")}
    print(f"peak memory of the loss alone ({args.loss_tokens} tokens x {hf_cfg['vocab_size']} vocab, hidden {hf_cfg['hidden_size']}, fp32):")
    print(f"  chunked head   {mem['chunked'] / 2**20:10.0f} MiB")
    print(f"  full logits    {mem['full'] / 2**20:10.0f} MiB")
    print(f"  ratio          {mem['chunked'] / mem['full']:10.3f}")


def bench_sft_packed(args, ours, hf, device):
    """SFT's forward+backward on 8 traces of ragged lengths (mean --seq / 4): this project packs them into rows as long as
    the longest (sft.micro_batches, one micro-batch); transformers runs them as rows padded to the longest."""
    import sft
    seqs = [(torch.randint(0, 151000, (n,)).tolist(), [1] * n) for n in ragged_lengths(args.seq // 4, 8)]
    rows, attn, _ = padded_rows([], [s for s, _ in seqs], device)
    n_loss = sum(len(s) - 1 for s, _ in seqs)

    def step_ours():
        for micro in sft.micro_batches(seqs, 10**9):
            ids, positions, targets, weights, packed = sft.pack_batch(micro, 0, device, M.compute_dtype(ours))
            (-ours(ids, positions, targets=targets, loss_weights=weights, packed=packed) / n_loss).backward()

    def step_hf():
        logits = hf(rows[:, :-1], attention_mask=attn[:, :-1]).logits.float()
        labels = rows[:, 1:].masked_fill(attn[:, 1:] == 0, -100)
        F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum").div(n_loss).backward()

    t_ours, t_hf = timeit(step_ours, args.reps, device), timeit(step_hf, args.reps, device)
    n = sum(len(s) for s, _ in seqs)
    lengths = [len(s) for s, _ in seqs]
    print(f"  SFT step, 8 traces of {min(lengths)}-{max(lengths)} tokens: this project (packed rows) {n / t_ours:8.0f} "
          f"tokens/s, transformers padded rows {n / t_hf:8.0f} tokens/s, ratio {t_hf / t_ours:.2f}x")


def ragged_lengths(mean, n):
    """n response lengths spread evenly around `mean` (1/n to 2 - 1/n times it), as a group's traces vary."""
    return [max(1, mean * (2 * j + 1) // n) for j in range(n)]


def padded_rows(prompt, responses, device):
    """transformers' way (as TRL's GRPOTrainer): [prompt, response] rows right-padded to the longest, with an attention
    mask and a mask of the response tokens -> (rows, attention mask, response mask [G, R])."""
    T = len(prompt) + max(map(len, responses))
    rows = torch.zeros(len(responses), T, dtype=torch.long)
    attn = torch.zeros(len(responses), T, dtype=torch.long)
    for i, r in enumerate(responses):
        rows[i, :len(prompt) + len(r)] = torch.tensor(prompt + r)
        attn[i, :len(prompt) + len(r)] = 1
    return rows.to(device), attn.to(device), attn[:, len(prompt):].to(device)


def bench_grpo_step(args, ours, hf, device):
    """GRPO's policy-gradient forward+backward for one group: G responses of ragged lengths to one prompt. This project
    packs the group into one row, the prompt once (grpo.response_logprobs); the per-row way (as TRL's GRPOTrainer) runs
    G rows of [prompt, response] through transformers, padded to the longest, and takes log-probs of the response tokens
    from full logits."""
    import grpo
    G, P, R = args.group, args.grpo_prompt, args.grpo_response
    prompt = torch.randint(0, 151000, (P,)).tolist()
    responses = [torch.randint(0, 151000, (n,)).tolist() for n in ragged_lengths(R, G)]
    rows, attn, resp_mask = padded_rows(prompt, responses, device)
    adv = torch.randn(G, 1, device=device)

    def step_ours():
        logp, _, mask = grpo.response_logprobs(ours, [prompt], responses, G, 0, device, 1.0)
        (-(adv * logp * mask).sum() / mask.sum()).backward()

    def step_hf():
        logits = hf(rows[:, :-1], attention_mask=attn[:, :-1]).logits[:, P - 1:].float()
        logp = torch.log_softmax(logits, -1).gather(-1, rows[:, P:, None]).squeeze(-1)
        (-(adv * logp * resp_mask).sum() / resp_mask.sum()).backward()

    t_ours, t_hf = timeit(step_ours, args.reps, device), timeit(step_hf, args.reps, device)
    n = G * P + sum(map(len, responses))  # the real tokens of the G rows [prompt, response]
    print(f"  GRPO step, a group of {G} responses of {min(map(len, responses))}-{max(map(len, responses))} tokens "
          f"(mean {R}) to one {P}-token prompt: this project {n / t_ours:8.0f} tokens/s, transformers padded rows "
          f"{n / t_hf:8.0f} tokens/s, ratio {t_hf / t_ours:.2f}x")


def loss_memory(way, args):
    """Peak memory growth of one loss forward+backward, measured in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "_loss", way, "--loss-tokens", str(args.loss_tokens)] +
                         (["--config", args.config] if args.config else []),
                         capture_output=True, text=True, check=True)
    return int(out.stdout.strip().split()[-1])


def _loss(way, args):
    d = load_cfg(args)
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
        head.ChunkedWeightedLogProbSum.apply(hidden, weight, tgt, weights, 1024, 1.0).backward()
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
    # GRPO-shaped: a few prompts, n sampled traces each (the n samples share one prefill here)
    P, n = args.rollout_batch // 4, 8
    prompts = torch.randint(0, 151000, (P, args.prompt_len), device=device)
    t_ours = timeit(lambda: generate(ours, prompts.tolist(), args.new_tokens, n=n, seed=0), 1, device)
    t_hf = timeit(lambda: hf.generate(prompts, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=True,
                                      num_return_sequences=n, pad_token_id=0), 1, device)
    N = P * n * args.new_tokens
    print(f"sampled rollout, {P} prompts x n={n}, prompt {args.prompt_len}, {args.new_tokens} new tokens, {dtype}, {device.type}: "
          f"this project {N / t_ours:.0f} tok/s, transformers {N / t_hf:.0f} tok/s, ratio {t_hf / t_ours:.2f}x")
    # the rollout copy's fused projections (GPUs' default) against the plain model, the same rollout
    from decode_model import copy_weights, fuse_projections
    fused = fuse_projections(M.empty_model(ours.config, device, dtype), devices=(device.type,))
    copy_weights(ours, fused)
    t_fused = timeit(lambda: generate(fused, prompts.tolist(), args.new_tokens, n=n, seed=0), 1, device)
    print(f"the same rollout, q/k/v and gate/up fused (decode_model.fuse_projections): {N / t_fused:.0f} tok/s, "
          f"{t_ours / t_fused:.2f}x unfused")
    # the same rollout through a paged KV cache (eager FlexAttention here: unfused, it scores the whole pool)
    from sampler import Sampler
    paged = Sampler(ours, P * n, args.prompt_len + args.new_tokens, page_size=16)
    t_paged = timeit(lambda: paged.generate(prompts.tolist(), args.new_tokens, n=n, seed=0), 1, device)
    print(f"the same rollout, paged KV cache (pages of 16 positions): {N / t_paged:.0f} tok/s, {t_ours / t_paged:.2f}x dense; "
          f"{paged.pages.peak * 16} positions in use at most (the prompts' full pages once a group), where the dense cache "
          f"reserves {P * n * (args.prompt_len + args.new_tokens)}")
    # both caches compiled (Inductor; on CPU FlexAttention's C++ kernel reads only each slot's pages), compile untimed
    # (timeit's warm-up call)
    times = {}
    for page_size in (0, 16):
        e = Sampler(ours, P * n, args.prompt_len + args.new_tokens, compile=True, page_size=page_size)
        times[page_size] = timeit(lambda: e.generate(prompts.tolist(), args.new_tokens, n=n, seed=0), 1, device)
    print(f"the same rollout compiled (Inductor): dense {N / times[0]:.0f} tok/s, paged {N / times[16]:.0f} tok/s, "
          f"{times[0] / times[16]:.2f}x dense")


def main():
    if sys.argv[1:2] == ["gpu"]:  # the GPU checks are bench_gpu.py's; this is their older name
        import bench_gpu
        return bench_gpu.main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["train", "decode", "_loss"])
    ap.add_argument("way", nargs="?", default=None)
    ap.add_argument("--config", default=None, help="a config.json to take the shapes from (default: Qwen2.5-0.5B's, built in)")
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
    check_flags(ap, args, positive=("layers", "batch", "seq", "reps", "loss_tokens", "group", "grpo_prompt", "grpo_response",
                                    "prompt_len", "new_tokens", "rollout_batch"))
    if not 0 <= args.prompt_frac < 1:  # (NaN too) some tokens must carry loss
        ap.error(f"--prompt-frac must be in [0, 1), got {args.prompt_frac}")
    if args.rollout_batch < 4:
        ap.error(f"--rollout-batch {args.rollout_batch}: the sampled rollout decodes --rollout-batch / 4 prompts x 8, so at least 4")
    if args.what == "_loss":
        return _loss(args.way, args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(0)
    {"train": bench_train, "decode": bench_decode}[args.what](args, device, dtype)


if __name__ == "__main__":
    main()
