"""sft.py: loss masking, normalisation, distributed equivalence, resume, saved checkpoints, bad data."""
import argparse
import json

import pytest
import torch

import checkpoint
import model as M
import sft
from conftest import make_hf_checkpoint, read_metrics, run_torchrun
from data import DataError, describe_counts, load_tokenizer


def test_loss_mask_covers_only_the_assistant_span(toy_paths):
    tok = load_tokenizer(toy_paths["tokenizer"])
    rows, dropped, _ = sft.encode_sft_rows(toy_paths["sft"], tok, max_len=10**6, truncate=False)
    assert dropped == 0
    ids, mask = rows[0]
    row = json.loads(open(toy_paths["sft"]).readline())
    prompt_text = tok.apply_chat_template(row["context_messages"], add_generation_prompt=True)
    n_prompt = len(tok.encode(prompt_text))
    assert list(mask) == [0] * n_prompt + [1] * (len(ids) - n_prompt) and (ids.typecode, mask.typecode) == ("i", "b")
    # token by token: the supervised tokens decode to exactly the trace followed by <|im_end|>
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == row["winner"] + "<|im_end|>"
    assert tok.decode([t for t, m in zip(ids, mask) if not m]) == prompt_text
    assert prompt_text.endswith("<|im_start|>assistant\n")


def test_long_rows_dropped_or_truncated(toy_paths):
    tok = load_tokenizer(toy_paths["tokenizer"])
    full, _, _ = sft.encode_sft_rows(toy_paths["sft"], tok, 10**6, False)
    limit = sorted(len(i) for i, _ in full)[len(full) // 2]
    kept, dropped, counts = sft.encode_sft_rows(toy_paths["sft"], tok, limit, False)
    long = sum(len(i) > limit for i, _ in full)
    assert dropped == long > 0 and len(kept) + dropped == len(full) and counts["truncated"] == 0
    cut, dropped, counts = sft.encode_sft_rows(toy_paths["sft"], tok, limit, True)
    assert dropped == 0 and all(len(i) <= limit and i[-1] == tok.end_of_turn_id for i, _ in cut)
    # what was cut is counted, and the run's first line says so
    assert counts["truncated"] == long and f", {long} cut to --max-len by --truncate" in describe_counts(counts)


def test_packing_by_hand():
    # rows as long as the longest sequence minus the shift (9), each sequence taking its length minus 1, first-fit in
    # decreasing length: 10 | 7 (6), then 5 (4) opens a row, 4 (3) fills 7's, 3 and 2 join 5's; 18 // 9 = 2 rows a micro
    seqs = [([0] * n, [1] * n) for n in (3, 10, 2, 5, 7, 4)]
    micros = sft.micro_batches(seqs, tokens_per_micro=18)
    assert [[[len(s) for s, _ in row] for row in mb] for mb in micros] == [[[10], [7, 4]], [[5, 3, 2]]]
    ids, positions, targets, weights, packed = sft.pack_batch(micros[1], 0, "cpu", torch.float32)
    assert positions.tolist() == [[0, 1, 2, 3, 0, 1, 0]] and weights.tolist() == [[1] * 7]
    assert (packed.mask[0, 0, 5] == 0).tolist() == [0, 0, 0, 0, 1, 1, 0]  # the 2nd sequence sees only itself
    # a micro-batch of one sequence a row is plain causal attention: no layout (the packed rows' maths, tested below)
    assert sft.pack_batch([[seqs[1]], [seqs[4]]], 0, "cpu", torch.float32)[4] is None


def test_packed_micro_batches_give_the_loss_and_gradient_of_each_sequence_alone(toy_paths):
    tok = load_tokenizer(toy_paths["tokenizer"])
    rows, _, _ = sft.encode_sft_rows(toy_paths["sft"], tok, 10**6, False)
    batch = rows[:6]
    for i, cut in ((1, 45), (3, 40), (4, 3)):  # unequal lengths and supervised counts: rows hold 1 to 3 sequences
        batch[i] = (batch[i][0][:-cut], batch[i][1][:-cut])
    n_total = sum(sum(m[1:]) for _, m in batch)
    model = checkpoint.load_model(toy_paths["init"])

    def loss_and_grads(micro_batches):
        model.zero_grad()
        total = 0.0
        for mb in micro_batches:
            ids, positions, targets, weights, packed = sft.pack_batch(mb, 0, "cpu", torch.float32)
            loss = -model(ids, positions, targets=targets, loss_weights=weights, packed=packed) / n_total
            loss.backward()
            total += loss.item()
        return total, [p.grad.clone() for p in model.parameters()]

    micros = sft.micro_batches(batch, tokens_per_micro=200)
    assert len(micros) > 1 and max(len(row) for mb in micros for row in mb) > 1  # packed rows, several micro-batches
    packed_loss, packed_grads = loss_and_grads(micros)
    alone_loss, alone_grads = loss_and_grads([[[s]] for s in batch])  # each sequence its own row: plain causal
    assert packed_loss == pytest.approx(alone_loss, rel=1e-6)
    for a, b in zip(packed_grads, alone_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # and a row of one sequence is the plain causal forward
    s, m = batch[0]
    ids = torch.tensor([s])
    plain = -(model(ids[:, :-1], targets=ids[:, 1:])[0] * torch.tensor(m[1:])).sum() / n_total
    assert plain.item() == pytest.approx(loss_and_grads([[[batch[0]]]])[0], rel=1e-6)


def test_lr_schedule():
    lrs = [sft.lr_at(s, 100, 1.0, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.55)  # halfway through the cosine (45 of its 90 steps): halfway from 1 to 0.1
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3) and all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def sft_args(toy_paths, out, *extra):
    return ["--model", toy_paths["init"], "--tokenizer", toy_paths["tokenizer"], "--data", toy_paths["sft"],
            "--out", str(out), "--global-batch", "16", "--tokens-per-micro", "400", "--lr", "3e-3",
            "--max-steps", "4", "--eval-data", toy_paths["heldout"], "--eval-limit", "4", "--eval-max-new-tokens", "32", *extra]


def test_mfu_is_the_step_s_model_flops_over_the_gpu_s_peak(toy_paths, tmp_path, monkeypatch):
    import training
    # by hand for the tiny Qwen2 (hidden 64, intermediate 112, 2 layers, 4 heads of 16, 2 KV heads, vocab 128): weights a
    # layer 64*64+64 (q) + 2*(64*32+32) (k, v) + 64*64 (o) + 3*64*112 (MLP) + 2*64 (norms) = 34,048; with the final norm
    # and the head (128*64): 76,352, untied too (its input embedding is a lookup); attention 12*2*4*16 = 1,536 a query-key
    # pair, causal: sequences of 3 and 5 tokens 9/2 + 25/2 pairs; a prompt of 4, then responses of 2 and 3 that attend to
    # it and to themselves, 16/2 + (2*4 + 4/2) + (3*4 + 9/2)
    for kind in ("qwen2-tied", "qwen2-untied"):
        make_hf_checkpoint(str(tmp_path / kind), kind)
        model = checkpoint.load_model(str(tmp_path / kind))
        assert training.train_flops(model, [(0, 3), (0, 5)]) == 6 * 76_352 * 8 + 1536 * (9 / 2 + 25 / 2)
        assert training.train_flops(model, [(0, 4), (4, 2), (4, 3)]) == 6 * 76_352 * 9 + 1536 * (8 + 10 + 16.5)
    # sft.py's mfu: none on a CPU; on a stand-in GPU of 1 GFLOP/s, the step's batch's FLOPs over its seconds
    sft.main(sft_args(toy_paths, tmp_path / "cpu", "--max-steps", "1", "--eval-limit", "0"))
    assert read_metrics(tmp_path / "cpu")[0]["mfu"] is None
    monkeypatch.setattr(sft, "gpu_peaks", lambda device: (1e9, None))
    sft.main(sft_args(toy_paths, tmp_path / "gpu", "--max-steps", "1", "--eval-limit", "0"))
    rec = read_metrics(tmp_path / "gpu")[0]
    rows = sft.encode_sft_rows(toy_paths["sft"], load_tokenizer(toy_paths["tokenizer"]), 12288, False)[0]
    batch = [rows[i] for i in sft.epoch_batch(len(rows), 16, 0, 0)]
    seconds = sum(len(ids) for ids, _ in batch) / rec["tokens_per_s"]
    flops = training.train_flops(checkpoint.load_model(toy_paths["init"]), [(0, len(ids) - 1) for ids, _ in batch])
    assert rec["mfu"] == pytest.approx(flops / seconds / 1e9, rel=1e-9)


@pytest.mark.parametrize("target", [None, "100"])
def test_a_stop_signal_during_validation_gives_it_up_unless_it_decides_the_stop(toy_paths, tmp_path, monkeypatch, capsys,
                                                                                 target):
    # --val-every 1, and a stop signal as the validation judging after step 1 begins. Without --stop-at-accuracy the
    # judging is given up at its first host check (val_accuracy null); with it (100%: not met) the judging runs to its end,
    # since it decides whether to stop. Either way step 1 is saved, the run exits with 143, and --resume gives the
    # uninterrupted run's weights
    import signal
    import training
    from sampler import Sampler
    val = ["--val-data", toy_paths["heldout"], "--val-every", "1", "--save-every", "10"] + (["--stop-at-accuracy", target] if target else [])
    sft.main(sft_args(toy_paths, tmp_path / "full", *val))
    real, given = Sampler.generate, []  # given: the stop_when of the judging's calls

    def generate(self, *args, stop_when=None, **kw):  # the run's first judging: step 1's validation
        if not given:
            monkeypatch.setitem(training.stop_request, "signal", signal.SIGTERM)
            given.append(stop_when)
        return real(self, *args, stop_when=stop_when, **kw)

    monkeypatch.setattr(Sampler, "generate", generate)
    with pytest.raises(SystemExit) as stopped:
        sft.main(sft_args(toy_paths, tmp_path / "cut", *val))
    rows = read_metrics(tmp_path / "cut")
    assert stopped.value.code == 128 + signal.SIGTERM and [r["step"] for r in rows] == [1]
    assert (rows[0]["val_accuracy"] is None) == (target is None) and (given[0] is None) == (target is not None)
    assert "stopping after step 1 (SIGTERM received)" in capsys.readouterr().out
    monkeypatch.setitem(training.stop_request, "signal", 0)
    monkeypatch.setattr(Sampler, "generate", real)
    sft.main(sft_args(toy_paths, tmp_path / "cut", *val, "--resume"))
    assert [r["loss"] for r in read_metrics(tmp_path / "cut")] == [r["loss"] for r in read_metrics(tmp_path / "full")]
    a, b = (checkpoint.load_model(str(tmp_path / run / "model")).state_dict() for run in ("full", "cut"))
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_resume_gives_the_same_weights_and_checkpoint_loads_in_transformers(toy_paths, tmp_path, monkeypatch):
    import rundir
    import transformers
    full = sft.main(sft_args(toy_paths, tmp_path / "full"))
    assert full["steps"] == 4 and "heldout_accuracy" in full
    # cut by --stop-after-minutes 2 on a clock that moves 20 s a reading (the run's start, the steps' start, each step's
    # end, each save's start and end), saving every step: step 1 ends 40 s into the run, and another step (20 s) ends
    # before the limit; step 2 ends 100 s in (20 s of it step 1's save), and another step and a save (20 s each) would
    # end at 140 s, past it: it saves and stops there. A reserve of one step, without the save, would run step 3
    readings = iter(range(20, 10**4, 20))
    monkeypatch.setattr(rundir, "clock", lambda: next(readings))
    sft.main(sft_args(toy_paths, tmp_path / "cut", "--stop-after-minutes", "2", "--save-every", "1"))
    assert len(read_metrics(tmp_path / "cut")) == 2
    sft.main(sft_args(toy_paths, tmp_path / "cut", "--resume"))
    a = checkpoint.load_model(str(tmp_path / "full" / "model"))
    b = checkpoint.load_model(str(tmp_path / "cut" / "model"))
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n
    assert [r["loss"] for r in read_metrics(tmp_path / "full")] == [r["loss"] for r in read_metrics(tmp_path / "cut")]
    # the saved checkpoint is a Hugging Face one: transformers gives the same logits
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "full" / "model")).eval()
    ids = torch.randint(0, a.config.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, a(ids), atol=1e-4, rtol=0)
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "full" / "model")) is not None


@pytest.mark.slow
def test_torchrun_two_ranks_matches_one_process_and_resumes_in_one(toy_paths, tmp_path):
    # 3 sequences per step, 1 per micro-batch: rank 0 runs 2 micro-batches, rank 1 only 1 (and idles once). Two ranks run
    # steps 1-2 and save their shards; one process resumes that state (put together from both ranks' files) for 3-4. The
    # two ranks run with --offload (shards, gradients and AdamW in host memory, gradients summed there over micro-batches)
    uneven = ("--global-batch", "3", "--tokens-per-micro", "100", "--grad-ckpt", "all")  # recomputing: same maths
    one = sft.main(sft_args(toy_paths, tmp_path / "one", *uneven))
    run_torchrun("sft.py", sft_args(toy_paths, tmp_path / "two", *uneven, "--stop-after-steps", "2", "--offload"))
    assert len(list((tmp_path / "two" / "state").glob("rank*.pt"))) == 2
    sft.main(sft_args(toy_paths, tmp_path / "two", *uneven, "--resume"))
    l1, l2 = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(l1) == len(l2) == 4
    for a, b in zip(l1, l2):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    a, b = checkpoint.load_model(str(tmp_path / "one" / "model")), checkpoint.load_model(str(tmp_path / "two" / "model"))
    # Adam divides by sqrt(v): an element whose gradient is ~0 can move by ~lr on reduction-order noise alone,
    # so bound the worst element by a fraction of lr and the typical one tightly
    for p, q in zip(a.parameters(), b.parameters()):
        assert (p - q).abs().max() < 3e-4 and (p - q).abs().mean() < 1e-6
    assert json.load(open(tmp_path / "two" / "summary.json"))["heldout_accuracy"] == one["heldout_accuracy"]


@pytest.mark.slow
def test_one_rank_fsdp_path_matches_the_plain_process(toy_paths, tmp_path, one_rank_fsdp):
    # the single-GPU control flow (FSDP2 over a one-rank group; conftest.one_rank_fsdp) on CPU, stopped and resumed
    # as shards, gives the plain process's run; resumed with --offload too (host memory, AdamW fused on the CPU)
    sft.main(sft_args(toy_paths, tmp_path / "plain", "--eval-limit", "0"))
    sharded = one_rank_fsdp()
    sft.main(sft_args(toy_paths, tmp_path / "fsdp", "--eval-limit", "0", "--stop-after-steps", "2"))
    sft.main(sft_args(toy_paths, tmp_path / "fsdp", "--eval-limit", "0", "--resume", "--offload"))
    # on one rank the root is the only FSDP unit (no per-block hooks); offloaded, each block is one too
    layers = checkpoint.load_config(toy_paths["init"]).num_hidden_layers
    assert [policy for _, policy in sharded] == ["OffloadPolicy"] + ["CPUOffloadPolicy"] * (layers + 1)
    l1, l2 = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "fsdp")
    assert len(l1) == len(l2) == 4
    for a, b in zip(l1, l2):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    a, b = checkpoint.load_model(str(tmp_path / "plain" / "model")), checkpoint.load_model(str(tmp_path / "fsdp" / "model"))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=3e-4, rtol=1e-4)


def test_bad_data_names_file_line_and_field(toy_paths, tmp_path):
    tok = load_tokenizer(toy_paths["tokenizer"])
    cases = [('{"messages": [}\n', r"bad.jsonl:1: malformed JSON"),
             ('{"context_messages": [{"role": "user", "content": "q"}]}\n', r"bad.jsonl:1: missing field 'winner'"),
             ('\n{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}\n',
              r"bad.jsonl:2: field 'messages\[-1\].content' \(the assistant turn\) is empty"),
             ('{"messages": [{"role": "user", "content": "q"}]}\n', r"bad.jsonl:1: field 'messages' must end with the assistant turn"),
             ('{"prompt": "q"}\n', r"bad.jsonl:1: missing field 'context_messages'")]
    for text, msg in cases:
        (tmp_path / "bad.jsonl").write_text(text)
        with pytest.raises(DataError, match=msg):
            sft.encode_sft_rows(str(tmp_path / "bad.jsonl"), tok, 100, False)


def test_traces_end_with_the_chat_templates_end_of_turn(toy_paths, tmp_path):
    """A base Qwen2.5 tokenizer's eos is <|endoftext|>, but a judge's turn ends with <|im_end|>: SFT teaches that."""
    import shutil
    base = tmp_path / "base-tokenizer"
    shutil.copytree(toy_paths["tokenizer"], base)
    cfg = json.load(open(base / "tokenizer_config.json"))
    json.dump({**cfg, "eos_token": "<|endoftext|>"}, open(base / "tokenizer_config.json", "w"))
    tok = load_tokenizer(str(base))
    assert tok.eos_token == "<|endoftext|>" and tok.decode([tok.end_of_turn_id]) == "<|im_end|>"
    rows, _, _ = sft.encode_sft_rows(toy_paths["sft"], tok, 10**6, False)
    assert all(ids[-1] == tok.end_of_turn_id and ids[-1] != tok.eos_id for ids, _ in rows)


def test_resume_with_fused_adamw(toy_paths, tmp_path):
    """Fused AdamW keeps its step counter on the parameter's device; a resumed optimizer must too, and continue
    exactly like the uninterrupted one."""
    from rundir import load_state, save_state
    from training import make_optimizer
    torch.manual_seed(0)
    model = checkpoint.load_model(toy_paths["init"])
    ids = torch.randint(0, model.config.vocab_size, (2, 16))

    def step(m, opt):
        m(ids, targets=ids, loss_weights=torch.ones(2, 16)).neg().backward()
        opt.step()
        opt.zero_grad()

    opt = make_optimizer(model, 1e-3, (0.9, 0.95), 0.0, fused=True)
    for _ in range(2):
        step(model, opt)
    save_state(str(tmp_path / "state"), model, opt, 2, 0)
    resumed = checkpoint.load_model(toy_paths["init"])
    opt2 = make_optimizer(resumed, 1e-3, (0.9, 0.95), 0.0, fused=True)
    assert load_state(str(tmp_path / "state"), resumed, opt2, 0)[0] == 2
    for p in resumed.parameters():
        s = opt2.state[p]["step"]
        assert s.device == p.device and s.dtype == torch.float32 and s.item() == 2
    step(model, opt), step(resumed, opt2)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_saved_checkpoint_keeps_the_source_dtype(toy_paths, tmp_path):
    """Trained from a bf16 checkpoint, the output is bf16 with torch_dtype bfloat16 (transformers loads it so);
    --save-dtype float32 asks otherwise."""
    import transformers
    from safetensors.torch import load_file
    tok = load_tokenizer(toy_paths["tokenizer"])
    make_hf_checkpoint(str(tmp_path / "bf16"), dtype=torch.bfloat16, vocab_size=tok.vocab_size)
    for extra, dtype in [((), torch.bfloat16), (("--save-dtype", "float32"), torch.float32)]:
        out = tmp_path / f"out-{dtype}"
        sft.main(["--model", str(tmp_path / "bf16"), "--tokenizer", toy_paths["tokenizer"], "--data", toy_paths["sft"],
                  "--out", str(out), "--global-batch", "16", "--max-steps", "1", "--eval-limit", "0", "--grad-ckpt", "none", *extra])
        assert {t.dtype for t in load_file(str(out / "model" / "model.safetensors")).values()} == {dtype}
        assert json.load(open(out / "model" / "config.json"))["torch_dtype"] == str(dtype)[6:]
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(out / "model"), dtype="auto")
        assert hf.dtype == dtype


@pytest.mark.parametrize("bf16", [False, True])
def test_one_unit_accumulates_gathered_in_fp32_and_reduces_once(toy_paths, one_rank_fsdp, bf16):
    """One GPU (one FSDP2 unit) keeps the weights gathered between an optimizer step's micro-batches and reduces the
    gradients once, at the last; the gradients equal those of reducing after every micro-batch to fp32 rounding, also
    with bf16 compute (CUDA's policy, here on CPU), so the unsharded accumulation is in fp32. A step whose last
    micro-batch was not marked last is refused at clipping: its gradients were never reduced (the step would be a no-op)."""
    import torch.distributed as dist
    import torch.distributed.fsdp as fsdp
    from torch.distributed.tensor import DTensor
    import training
    one_rank_fsdp()
    _, world, device = training.setup_distributed()
    torch.manual_seed(0)
    ids = torch.randint(0, 200, (4, 3, 24))  # 4 micro-batches of 3 sequences

    def grads(gathered):
        model = training.load_for_training(toy_paths["init"], world, device)
        assert model.accumulate_gathered  # one rank, and the model fits: one unit
        if bf16:
            model = checkpoint.load_model(toy_paths["init"])
            mp = fsdp.MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            fsdp.fully_shard(model, mp_policy=mp, reshard_after_forward=False)
        model.accumulate_gathered = gathered
        for k, x in enumerate(ids):
            training.accumulate_gradients(model, last=k == len(ids) - 1)
            model(x, targets=x, loss_weights=torch.full(x.shape, -1.0)).backward()
            gathered_now = not isinstance(next(model.parameters()), DTensor)
            assert gathered_now == (gathered and k < len(ids) - 1)  # weights stay gathered until the last micro-batch
        return {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    try:
        once, each = grads(True), grads(False)
        model = training.load_for_training(toy_paths["init"], world, device)  # a step whose last backward is not marked
        training.accumulate_gradients(model, last=False)
        model(ids[0], targets=ids[0], loss_weights=torch.full(ids[0].shape, -1.0)).backward()
        with pytest.raises(AssertionError, match="last=True"):  # nothing was reduced: clipping (and the step) is refused
            training.clip_grad_norm(model, 1.0)
    finally:
        dist.destroy_process_group()
    for n in once:  # bf16 accumulation would be off by about 2^-9 of the gradient
        torch.testing.assert_close(once[n], each[n], rtol=1e-6, atol=1e-7, msg=lambda m: f"{n}: {m}")


def test_grad_ckpt_auto_keeps_as_many_blocks_as_the_measured_memory_fits(toy_paths, monkeypatch):
    # --grad-ckpt auto recomputes every block for two steps, then keeps the activations of as many blocks as fit
    # beside the measured peak: by hand at the 1.5B shape (28 blocks, hidden 1536, intermediate 8960) on an 80 GiB
    # GPU, 16,384 tokens a micro-batch: a kept block counts 16384 x 2 x (5 x 8960 + 8 x 1536) = 1,870,659,584 bytes,
    # the hidden states 16384 x 2 x 28 x 1536 = 1,409,286,144; 0.9 x 80 GiB - 40 GiB of peak - one block - the hidden
    # states = 31,079,792,640 bytes spare: 16 blocks kept, 12 recompute
    import training
    cfg = M.ModelConfig(vocab_size=64, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                        num_attention_heads=12, num_key_value_heads=2)
    with torch.device("meta"):
        model = M.Transformer(cfg)
    gpu, peak = torch.device("cuda"), [40 * 2**30]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (0, 80 * 2**30))  # (free, total)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda d: peak[0])
    monkeypatch.setattr(training, "all_reduce_max", lambda values, device: values)  # one rank
    model.recompute_blocks = 28
    for flag, steps, device in (("auto", 1, gpu), ("auto", 3, gpu), ("all", 2, gpu), (8, 2, gpu), ("auto", 2, "cpu")):
        assert training.fit_recompute(model, flag, steps, 16384, torch.device(device)) is None  # nothing decided
    assert model.recompute_blocks == 28
    line = training.fit_recompute(model, "auto", 2, 16384, gpu)
    assert model.recompute_blocks == 12 and line.startswith("--grad-ckpt auto: 12 of 28 blocks recompute"), line
    assert training.fit_recompute(model, "auto", 2, 4096, gpu) and model.recompute_blocks == 0  # 4k tokens: all fit
    peak[0] = 75 * 2**30  # past 90% already: every block recomputes
    assert training.fit_recompute(model, "auto", 2, 4096, gpu) and model.recompute_blocks == 28
    peak[0] = 40 * 2**30  # another rank has room for only 5 blocks (all_reduce_max of the negated counts): all keep 5
    monkeypatch.setattr(training, "all_reduce_max", lambda values, device: [max(values[0], -5.0)])
    assert training.fit_recompute(model, "auto", 2, 4096, gpu) and model.recompute_blocks == 23
    # the flag: all, none, auto or a number of blocks (more than the model has: all of them)
    s = sft.parse_args(["--model", "m", "--data", "d", "--out", "o", "--grad-ckpt", "3"])
    assert s.grad_ckpt == 3 and sft.parse_args(["--model", "m", "--data", "d", "--out", "o"]).grad_ckpt == "auto"
    with pytest.raises(SystemExit):
        sft.parse_args(["--model", "m", "--data", "d", "--out", "o", "--grad-ckpt", "half"])
    cpu = torch.device("cpu")
    blocks = lambda flag: training.load_for_training(toy_paths["init"], 1, cpu, grad_ckpt=flag).recompute_blocks
    layers = checkpoint.load_config(toy_paths["init"]).num_hidden_layers
    assert [blocks(f) for f in ("none", "all", "auto", 1, 99)] == [0, layers, layers, 1, layers]
    with pytest.raises(argparse.ArgumentTypeError, match="got .True."):  # the old bool API: an error, not one block (True == 1)
        blocks(True)


def test_sft_fits_recompute_after_its_second_step_for_its_longest_micro_batch(toy_paths, tmp_path, monkeypatch, capsys):
    # the trainer's side of --grad-ckpt auto (training.fit_recompute decides only on CUDA): asked after every step with
    # the steps this run has taken and the longest micro-batch the flags allow (a row up to --max-len 12288 runs alone,
    # over --tokens-per-micro 400); its line is printed
    calls = []
    monkeypatch.setattr(sft, "fit_recompute", lambda model, flag, steps_run, max_tokens, device: calls.append(
        (flag, steps_run, max_tokens, device.type)) or ("fitted: 1 of 2" if steps_run == 2 else None))
    sft.main(sft_args(toy_paths, tmp_path / "run", "--max-steps", "3", "--eval-limit", "0"))
    assert calls == [("auto", k, 12288, "cpu") for k in (1, 2, 3)]
    assert capsys.readouterr().out.count("sft: fitted: 1 of 2") == 1
