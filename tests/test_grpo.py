"""grpo.py: the loss math against hand-computed values, distributed equivalence, resume, argument checks."""
import json
import math
import os
import struct

import pytest
import torch

import grpo
import checkpoint
import head
import model as M
import toy
import training
from conftest import ROOT, read_metrics, run_torchrun


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, 1.0])
    adv, zero_std = grpo.group_advantages(r, 3)
    std = math.sqrt(((4 / 3) ** 2 + 2 * (2 / 3) ** 2) / 2)  # unbiased
    expected = [(4 / 3) / (std + 1e-6), (-2 / 3) / (std + 1e-6), (-2 / 3) / (std + 1e-6), 0, 0, 0]
    torch.testing.assert_close(adv, torch.tensor(expected), atol=1e-6, rtol=0)
    assert zero_std == 0.5  # the all-equal group contributes nothing and is counted
    adv, _ = grpo.group_advantages(r, 3, std_norm=False)
    torch.testing.assert_close(adv, torch.tensor([4 / 3, -2 / 3, -2 / 3, 0, 0, 0]))


def test_clipped_surrogate_by_hand():
    old = torch.zeros(6)
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5, 1.0, 1.5]))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0, 1.0])
    loss, clipped = grpo.policy_loss_terms(logp, old, adv, 0.2, 0.2)
    torch.testing.assert_close(loss, torch.tensor([-1.2, 1.5, -0.5, 0.8, -2.0, -1.2]))
    assert clipped.tolist() == [1, 0, 0, 1, 0, 1]
    loss, _ = grpo.policy_loss_terms(logp, old, adv, 0.2, 0.28)  # asymmetric clip-high
    torch.testing.assert_close(loss[[0, 5]], torch.tensor([-1.28, -1.28]))


def test_k3_kl_by_hand_with_clamping():
    kl = grpo.k3_kl(torch.tensor([-1.0, -2.0, -60.0, 0.0, -3.0]), torch.tensor([-2.0, -2.0, -10.0, -50.0, -1.0]))
    expected = [math.exp(-1) + 1 - 1, 0.0, 10.0, 10.0, math.exp(2) - 2 - 1]
    # third: d = 50 -> clamped to 20 -> e^20 - 21 -> clamped to 10; fourth: d = -50 -> -20 -> 19 -> 10
    torch.testing.assert_close(kl, torch.tensor(expected), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(grpo.k3_kl(torch.tensor([-1e4]), torch.tensor([0.0]))).all()


def test_truncated_importance_weights_and_mismatch_by_hand():
    # w = min(pi_old / mu, cap): per token, or per sequence from the sum of its tokens' log-ratios (padding left out)
    old = torch.log(torch.tensor([[0.5, 0.9, 0.2], [0.4, 0.8, 0.7]]))
    mu = torch.log(torch.tensor([[1.0, 0.3, 0.2], [0.8, 0.4, 0.1]]))
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 1's last token is padding
    tok = grpo.rollout_is_weights(old, mu, mask, "token", 2.0)
    torch.testing.assert_close(tok, torch.tensor([[0.5, 2.0, 1.0], [0.5, 2.0, 1.0]]))  # 3 -> 2; padding: 1
    seq = grpo.rollout_is_weights(old, mu, mask, "sequence", 2.0)
    torch.testing.assert_close(seq, torch.tensor([[1.5], [1.0]]))  # 0.5 x 3 x 1; 0.5 x 2
    torch.testing.assert_close(grpo.rollout_is_weights(old, mu, mask, "sequence", 1.2), torch.tensor([[1.2], [1.0]]))
    assert grpo.rollout_is_weights(old, mu, mask, "none", 2.0).tolist() == [[1.0], [1.0]]
    total_abs, max_abs, kl = grpo.rollout_mismatch(old, mu, mask).tolist()
    d = [math.log(0.5), math.log(3), 0.0, math.log(0.5), math.log(2)]
    assert total_abs == pytest.approx(sum(map(abs, d)), rel=1e-6) and max_abs == pytest.approx(math.log(3), rel=1e-6)
    assert kl == pytest.approx(sum(math.exp(x) - x - 1 for x in d), rel=1e-5)  # k3 of KL(mu || pi_old), samples from mu


def test_three_aggregations_by_hand_and_over_micro_batches():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    for agg, value in [("token-mean", 10 / 4), ("seq-mean-token-mean", (2 + 4) / 2), ("dr-grpo", 10 / (2 * 5))]:
        whole = grpo.aggregate(loss, mask, agg, n_tokens=4, n_seqs=2, max_new_tokens=5)
        assert whole.item() == pytest.approx(value)
        split = sum(grpo.aggregate(loss[i:i + 1], mask[i:i + 1], agg, 4, 2, 5) for i in range(2))
        assert split.item() == pytest.approx(value)  # micro-batches (or ranks) sum to the mini-batch value


def test_score_by_hand_with_and_without_the_format_reward():
    from types import SimpleNamespace
    trace = "<eval>quotes</eval> the better answer is <answer>[[{}]]</answer><|im_end|>"
    ro = SimpleNamespace(texts=[trace.format("A"), trace.format("A"), "<answer>[[B]]</answer>", trace.format("B")],
                         labels=["A", "B", "B", "B"], truncated=[False, False, False, True])
    for format_reward, expected in [(False, [1.0, -1.0, 1.0, -1.0]), (True, [2.0, 1.0, 1.0, 0.0])]:
        rewards, correct = grpo.score(SimpleNamespace(args=SimpleNamespace(format_reward=format_reward)), ro)
        assert rewards.tolist() == expected  # format (0/1) + correct (0/1); a truncated trace gets neither
        assert correct.tolist() == [1.0, 0.0, 1.0, 0.0]  # accuracy is the verdict's, whatever the reward


@pytest.mark.parametrize("prompt_lens", [(5, 9, 1), (1, 1)])
def test_shared_prompt_forward_equals_separate_rows(prompt_lens):
    # each group's prompt runs once for its n responses; log-probs, entropies and gradients must equal
    # those of every [prompt, response] run alone (ragged prompts and responses, a 1-token prompt, GQA)
    cfg = M.ModelConfig(model_type="qwen2", vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=False,
                        max_position_embeddings=256, torch_dtype="float32")
    model = toy.init_weights(M.Transformer(cfg), seed=0)
    g, n = torch.Generator().manual_seed(1), 3
    prompts = [torch.randint(1, 97, (L,), generator=g).tolist() for L in prompt_lens]
    responses = [torch.randint(1, 97, (L,), generator=g).tolist() for L in (1, 4, 7, 3, 3, 2, 6, 1, 2)[:n * len(prompts)]]
    logp, entropy, mask = grpo.response_logprobs(model, prompts, responses, n, 0, "cpu", temperature=0.7)
    (logp * mask).sum().backward()
    shared_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    total = 0
    for i, o in enumerate(responses):
        p = prompts[i // n]
        ids = torch.tensor([p + o])
        lp, ent = model(ids[:, :-1], targets=ids[:, 1:], temperature=0.7)
        torch.testing.assert_close(logp[i, :len(o)], lp[0, len(p) - 1:], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(entropy[i, :len(o)], ent[0, len(p) - 1:], atol=1e-5, rtol=1e-5)
        assert mask[i].sum() == len(o) and not logp[i, len(o):].any()
        total = total + lp[0, len(p) - 1:].sum()
    total.backward()
    for a, p in zip(shared_grads, model.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="session")  # read only: made once per run, by the first worker (pytest.ini) that needs it
def policy(toy_paths, tmp_path_factory):
    """A briefly distilled toy judge: its rollouts get mixed rewards, so the policy gradient is exercised."""
    import sft
    from filelock import FileLock  # (torch's own dependency)
    base = tmp_path_factory.getbasetemp()  # a worker's: the run's is its parent
    out = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "distilled-policy"
    with FileLock(str(out) + ".lock"):  # the other workers wait for it (17 s of CPU here), then read it
        if not (out / "model" / "model.safetensors").exists():
            sft.main(["--model", toy_paths["init"], "--tokenizer", toy_paths["tokenizer"], "--data", toy_paths["sft"],
                      "--out", str(out), "--global-batch", "16", "--epochs", "10", "--lr", "3e-3", "--warmup", "0.1"])
    return str(out / "model")


def grpo_args(toy_paths, out, *extra, policy=None):
    return ["--model", policy or toy_paths["init"], "--tokenizer", toy_paths["tokenizer"], "--data", toy_paths["rl"],
            "--out", str(out), "--steps", "3", "--rollout-prompts", "8", "--minibatch-prompts", "4", "--gen-prompts", "2",
            "--micro-seqs", "9", "--group-size", "3", "--max-new-tokens", "12", "--lr", "1e-3", "--eval-data", toy_paths["heldout"],
            "--eval-limit", "4", *extra]


def assert_same_run(one, two, batched_alike=True):
    """Two runs of the same GRPO job: identical rollouts, the same losses and weights up to reduction order."""
    m1, m2 = read_metrics(one), read_metrics(two)
    assert len(m1) == len(m2) == 3
    for a, b in zip(m1, m2):
        for k in ("reward_mean", "accuracy", "response_len_mean", "zero_std_frac"):
            assert a[k] == pytest.approx(b[k], abs=1e-6), k  # identical rollouts
        for k in ("kl", "clip_frac", "entropy", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-3, abs=1e-6), k
    a, b = checkpoint.load_model(str(one / "model")), checkpoint.load_model(str(two / "model"))
    start = checkpoint.load_model(json.load(open(one / "run.json"))["model"])
    for s, p, q in zip(start.parameters(), a.parameters(), b.parameters()):
        if batched_alike:
            torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)
        else:  # Adam divides by sqrt(v): an element whose gradient is ~0 moves by ~lr on the rounding of another
            # batching alone, and later steps carry that on; so the gap is measured against how far training moved
            assert (p - q).norm() < 0.05 * (p - s).norm()


@pytest.mark.parametrize("during,saves", [("rollout", 20), ("rollout", 1), ("logprobs", 20), ("judging", 20)])
def test_a_stop_signal_gives_up_a_rollout_or_judging_and_resume_continues_exactly(toy_paths, tmp_path, policy, monkeypatch,
                                                                                  capsys, during, saves):
    # a stop signal noted during step 2's rollout: the sampler gives up at its next host check, the step changes nothing,
    # and the run saves step 1's state (--save-every 20 would not; with --save-every 1 it is saved already, and not
    # again) and exits with 143. During the 2nd of step 2's 4 old log-prob forwards: the step is given up before the 3rd,
    # as it is in the rollout. During the held-out judging after step 1 (--eval-every 1): the judging is given up (its
    # accuracy null), and step 1 is saved. --resume gives the uninterrupted run either way (judging changes no weight)
    import signal
    import rundir
    import training
    from sampler import Sampler
    grpo.main(grpo_args(toy_paths, tmp_path / "full", policy=policy))
    judged = (["--eval-every", "1"] if during == "judging" else []) + ["--save-every", str(saves)]
    real, asked, checks, saved, save_state = Sampler.generate, [], [], [], rundir.save_state
    passes, forwards, logprobs, forward = [], [], grpo.old_and_ref_logprobs, grpo.response_logprobs

    def counted_save(path, model, optimizer, step, *args):  # the steps whose state is written
        saved.append(step)
        save_state(path, model, optimizer, step, *args)

    def generate(self, *args, stop_when=None, **kw):  # the 2nd call that may be given up: step 2's rollout, or the judging
        asked.append(stop_when is not None)
        if sum(asked) == 2 and stop_when is not None and during != "logprobs":
            def stop_when(ask=stop_when):  # SIGTERM arrives as the first host check comes
                checks.append(len(checks) + 1)
                monkeypatch.setitem(training.stop_request, "signal", signal.SIGTERM)
                return ask()
        return real(self, *args, stop_when=stop_when, **kw)

    def old_and_ref_logprobs(*args):  # step 2's (the 2nd call) counts its forwards
        passes.append(1)
        return logprobs(*args)

    def response_logprobs(*args):  # SIGTERM arrives during step 2's 2nd old log-prob forward
        if len(passes) == 2 and during == "logprobs":
            forwards.append(1)
            if len(forwards) == 2:
                monkeypatch.setitem(training.stop_request, "signal", signal.SIGTERM)
        return forward(*args)

    monkeypatch.setattr(Sampler, "generate", generate)
    monkeypatch.setattr(grpo, "old_and_ref_logprobs", old_and_ref_logprobs)
    monkeypatch.setattr(grpo, "response_logprobs", response_logprobs)
    monkeypatch.setattr(rundir, "save_state", counted_save)
    with pytest.raises(SystemExit) as stopped:
        grpo.main(grpo_args(toy_paths, tmp_path / "cut", *judged, policy=policy))
    assert stopped.value.code == 128 + signal.SIGTERM  # given up at the first host check, or before the next forward
    assert len(checks) == 1 if during != "logprobs" else len(forwards) == 2
    assert ("SIGTERM received: step 2 given up before it changed anything, stopping after step 1" if during != "judging" else
            "stopping after step 1 (SIGTERM received)") in capsys.readouterr().out
    rows = read_metrics(tmp_path / "cut")
    assert [r["step"] for r in rows] == [1] and rows[0].get("heldout_accuracy", "none asked") is (
        None if during == "judging" else "none asked")
    assert torch.load(tmp_path / "cut" / "state" / "rank0.pt", weights_only=True)["step"] == 1 and saved == [1]
    monkeypatch.setitem(training.stop_request, "signal", 0)
    grpo.main(grpo_args(toy_paths, tmp_path / "cut", *judged, "--resume", policy=policy))
    full, cut = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [r["reward_mean"] for r in cut] == [r["reward_mean"] for r in full] and len(full) == 3
    assert during != "judging" or cut[1]["heldout_accuracy"] is not None  # (the last step's is the summary's)
    a, b = (checkpoint.load_model(str(tmp_path / run / "model")).state_dict() for run in ("full", "cut"))
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_resume_reproduces_an_uninterrupted_run(toy_paths, tmp_path, policy, monkeypatch, capsys):
    full = grpo.main(grpo_args(toy_paths, tmp_path / "full", policy=policy))
    assert full["steps"] == 3 and "heldout_end" in full
    capsys.readouterr()
    grpo.main(grpo_args(toy_paths, tmp_path / "cut", "--stop-after-steps", "1", policy=policy))
    assert "grpo.py: stopped after step 1 of 3 (--stop-after-steps); --resume continues" in capsys.readouterr().out
    grpo.main(grpo_args(toy_paths, tmp_path / "cut", "--resume", policy=policy))
    # --stop-after-minutes 2 on a clock that moves 20 s a reading (the run's start, the steps' start, each step's end, each
    # save's start and end): after step 1, 40 s in, another 20 s step ends at 60 s, and no save is measured yet; step 1
    # then saves (with --stop-after-minutes the first step does, whatever --save-every), 20 s; after step 2, 100 s in,
    # another step and a save, 20 s each, would end at 140 s: stop there. Without step 1's save, the same rule would
    # have run step 3, the last, ending at 100 s
    import rundir
    readings = iter(range(20, 10**4, 20))
    monkeypatch.setattr(rundir, "clock", lambda: next(readings))
    assert grpo.main(grpo_args(toy_paths, tmp_path / "timed", "--stop-after-minutes", "2", policy=policy))["steps"] == 2
    out = capsys.readouterr().out  # the stop said once, why and where
    assert "stopping after step 2 (1.7 minutes, --stop-after-minutes 2); --resume continues" in out
    assert "(--stop-after-steps)" not in out
    grpo.main(grpo_args(toy_paths, tmp_path / "timed", "--resume", policy=policy))  # saved at step 2 (--save-every 20)
    a = checkpoint.load_model(str(tmp_path / "full" / "model"))
    for cut in ("cut", "timed"):
        b = checkpoint.load_model(str(tmp_path / cut / "model"))
        for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(p, q), (cut, n)
    m1, m2 = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [r["reward_mean"] for r in m1] == [r["reward_mean"] for r in m2]
    keys = {"reward_mean", "accuracy", "unparsed_rate", "response_len_mean", "response_len_max", "truncated_frac",
            "zero_std_frac", "kl", "clip_frac", "entropy", "grad_norm", "rollout_tokens_per_s", "train_tokens_per_s",
            "train_balance", "train_mfu", "rollout_decode_steps", "rollout_slot_use"}
    assert keys <= set(m1[0]) and m1[0]["train_mfu"] is None  # on a CPU
    assert any(-1 < r["reward_mean"] < 1 and r["zero_std_frac"] < 1 for r in m1)  # mixed groups: real gradients
    assert all(r["clip_frac"] > 0 and r["kl"] > 0 for r in m1)  # mini-batch steps after the first move the policy


def test_rollouts_jsonl_by_hand_and_after_a_crash(toy_paths, tmp_path, policy, monkeypatch):
    # rollouts.jsonl keeps each step's first --log-rollouts groups: the step's first prompts (epoch_batch), rewards by the
    # verdict rule, advantages as group_advantages gives them. A run killed after step 2 was logged, before its save,
    # resumes from step 1: step 2's rows are dropped and written again, as the uninterrupted run wrote them
    import rundir
    from data import load_judge_examples
    args = lambda out, *extra: grpo_args(toy_paths, tmp_path / out, "--log-rollouts", "2", "--save-every", "1", *extra,
                                         policy=policy)
    grpo.main(args("full"))
    lines = open(tmp_path / "full" / "rollouts.jsonl").readlines()
    rows, examples = [json.loads(line) for line in lines], load_judge_examples(toy_paths["rl"], "rm-r1")[0]
    batches = [training.epoch_batch(len(examples), 8, step, 0) for step in range(3)]
    assert [(r["step"], r["id"]) for r in rows] == [(s + 1, examples[batches[s][g]].id) for s in range(3) for g in range(2)]
    traces = [t for r in rows for t in r["traces"]]
    assert len({t["reward"] for t in traces}) == 2 and all(0 < t["tokens"] <= 12 and t["text"] for t in traces)
    for r in rows:
        rewards = [1.0 if t["verdict"] == r["label"] and not t["truncated"] else -1.0 for t in r["traces"]]
        assert [t["reward"] for t in r["traces"]] == rewards and r["label"] in "AB" and "<|im_start|>" in r["prompt"]
        assert [t["advantage"] for t in r["traces"]] == pytest.approx(grpo.group_advantages(torch.tensor(rewards), 3)[0].tolist())
    save_state = rundir.save_state

    def killed_at_step_2(path, model, optimizer, step, *rest):
        if step == 2:
            raise KeyboardInterrupt
        save_state(path, model, optimizer, step, *rest)
    monkeypatch.setattr(rundir, "save_state", killed_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        grpo.main(args("cut"))
    assert [json.loads(line)["step"] for line in open(tmp_path / "cut" / "rollouts.jsonl")] == [1, 1, 2, 2]
    monkeypatch.setattr(rundir, "save_state", save_state)
    grpo.main(args("cut", "--resume"))
    assert open(tmp_path / "cut" / "rollouts.jsonl").readlines() == lines
    grpo.main(args("none", "--log-rollouts", "0"))
    assert not os.path.exists(tmp_path / "none" / "rollouts.jsonl")


@pytest.mark.slow
def test_one_rank_fsdp_path_matches_the_plain_process(toy_paths, tmp_path, policy, one_rank_fsdp):
    # one GPU runs FSDP2 over a one-rank process group (training.setup_distributed): the control flow of a single-GPU
    # run (sharded policy and reference, DTensor grad norm, the rollout copy gathered from shards, state saved and
    # resumed as shards) is run here on CPU (gloo, fp32) and must give the plain process's run. Its last step resumes
    # with --offload (shards, gradients and AdamW in host memory, AdamW fused on the CPU, a unit per block)
    import torch.distributed as dist
    grpo.main(grpo_args(toy_paths, tmp_path / "plain", policy=policy))
    sharded = one_rank_fsdp()
    grpo.main(grpo_args(toy_paths, tmp_path / "fsdp", "--stop-after-steps", "2", policy=policy))
    assert not dist.is_initialized()  # the run left its group
    grpo.main(grpo_args(toy_paths, tmp_path / "fsdp", "--resume", "--offload", policy=policy))
    # policy and reference: one rank's root is its only FSDP unit; offloaded, each block is one too
    layers = checkpoint.load_config(policy).num_hidden_layers
    assert [kind for _, kind in sharded] == ["OffloadPolicy"] * 2 + ["CPUOffloadPolicy"] * 2 * (layers + 1)
    assert_same_run(tmp_path / "plain", tmp_path / "fsdp")


@pytest.mark.slow
def test_the_single_gpu_code_path_runs_compiled_on_cpu(toy_paths, tmp_path, policy, one_rank_fsdp, monkeypatch):
    # what one GPU runs, end to end on CPU: FSDP2 over a one-rank group with the GPU's precision policy (bf16 compute
    # over fp32 master weights), blocks compiled by Inductor with the checkpoint inside, the output head's chunks
    # compiled, the rollout's decode step compiled (one block's code for every layer). Each step's first mini-batch
    # has a ratio of exactly 1: its old log-probs ran Inductor's no-grad graph, its update the training graph, which
    # recomputes in backward, and bf16 rounding would show if the two fused differently
    from torch._dynamo.utils import counters
    monkeypatch.setattr(head, "FUSED_HEAD_DEVICES", ("cpu",))
    torch._dynamo.reset()
    counters.clear()
    one_rank_fsdp()
    log_ratios, update, loss_terms = [], grpo.update, grpo.policy_loss_terms  # per update: max |log ratio| per micro
    monkeypatch.setattr(grpo, "update", lambda job, step, *a: log_ratios.append([]) or update(job, step, *a))
    monkeypatch.setattr(grpo, "policy_loss_terms", lambda logp, old, *a: log_ratios[-1].append(
        (logp - old).abs().max().item()) or loss_terms(logp, old, *a))
    grpo.main(grpo_args(toy_paths, tmp_path / "run", "--compile", "--grad-ckpt", "all", "--eval-limit", "0", "--steps", "2",
                        "--precision", "bf16", policy=policy))
    assert not any("recompile limit" in k for k in counters["unimplemented"])  # nothing fell back to eager
    metrics = read_metrics(tmp_path / "run")
    assert len(metrics) == 2 and any(-1 < r["reward_mean"] < 1 for r in metrics)
    assert all(r["kl"] > 0 and math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in metrics)
    assert len(log_ratios) == 4 and all(len(micros) == 2 for micros in log_ratios)  # 2 steps x 2 mini-batches, 2 micro each
    assert log_ratios[0] == log_ratios[2] == [0.0, 0.0]  # each step's first mini-batch: ratio exactly 1
    assert min(log_ratios[1] + log_ratios[3]) > 0  # after an optimizer step it is not


def test_precision_bf16_runs_the_gpus_policy_on_the_cpu(toy_paths, tmp_path, policy):
    # --precision bf16 on CPU: one-rank FSDP2 with bf16 compute over fp32 master weights, a bf16 rollout copy. The
    # sampler-trainer gap it logs is bf16's (kernels and rounding), far above fp32's (kernels only), and the run learns
    # as fp32 does: the same rollouts to start with, losses close
    runs = {p: read_metrics(grpo.main(grpo_args(toy_paths, tmp_path / p, "--precision", p, "--steps", "1", "--eval-limit",
                                                "0", policy=policy)) and tmp_path / p) for p in ("fp32", "bf16")}
    assert json.load(open(tmp_path / "bf16" / "run.json"))["precision"] == "bf16"
    fp32, bf16 = runs["fp32"][0], runs["bf16"][0]
    assert fp32["rollout_logp_diff_mean"] < 1e-6 and 30 * fp32["rollout_logp_diff_mean"] < bf16["rollout_logp_diff_mean"] < 0.1
    assert 0 <= fp32["rollout_kl"] < bf16["rollout_kl"]
    saved = checkpoint.load_model(str(tmp_path / "bf16" / "model"))
    assert saved.lm_head.weight.dtype == torch.float32  # the fp32 master weights were trained and saved


def test_a_paged_rollout_cache_gives_the_dense_caches_run(toy_paths, tmp_path, policy):
    # --kv-page-size: the rollouts are the dense cache's token for token (tests/test_model.py: preemption, log-probs),
    # so the step's rewards and lengths are equal, and its losses equal up to the log-probs' rounding
    runs = {name: read_metrics(grpo.main(grpo_args(toy_paths, tmp_path / name, *extra, "--steps", "1", "--eval-limit", "0",
                                                   policy=policy)) and tmp_path / name)[0]
            for name, extra in (("dense", ()), ("paged", ("--kv-page-size", "16")))}
    for k in ("reward_mean", "accuracy", "response_len_mean", "response_len_max", "zero_std_frac"):
        assert runs["paged"][k] == runs["dense"][k], k
    for k in ("kl", "entropy", "grad_norm"):
        assert runs["paged"][k] == pytest.approx(runs["dense"][k], rel=1e-4), k
    assert runs["paged"]["rollout_preempted"] == runs["dense"]["rollout_preempted"] == 0
    assert 0 < runs["paged"]["rollout_kv_pool_peak"] < 1 and runs["dense"]["rollout_kv_pool_peak"] == 0  # the pool's use


@pytest.mark.parametrize("offload", [False, True])
def test_the_frozen_reference_frees_its_gathered_weights_after_each_forward(toy_paths, one_rank_fsdp, offload):
    # FSDP2 keeps a root unit's weights gathered from its forward to its backward; the reference has no backward, so its
    # root (embeddings and head, 3.1 GB at 14B) must be freed after each forward, with a unit per block (--offload, or
    # more ranks) as with one unit. The policy's root stays gathered until its backward frees it
    import training
    one_rank_fsdp()
    training.setup_distributed(precision="bf16")
    load = lambda trainable: training.load_for_training(toy_paths["init"], 1, torch.device("cpu"), trainable=trainable,
                                                        precision="bf16", offload=offload)
    ref, policy = load(False), load(True)
    ids = torch.randint(0, 50, (1, 8))
    with torch.no_grad():  # the trainers' call, with targets: (log-probs, entropies)
        ref(ids, targets=ids)
    logp = policy(ids, targets=ids)[0]
    assert hasattr(ref.lm_head.weight, "full_tensor") and hasattr(ref.model.embed_tokens.weight, "full_tensor")  # sharded
    assert not hasattr(policy.lm_head.weight, "full_tensor")  # gathered for its backward
    logp.sum().backward()
    assert hasattr(policy.lm_head.weight, "full_tensor")


def test_train_mfu_counts_the_packed_rows_model_flops(toy_paths, tmp_path, monkeypatch):
    # train_mfu: the update's model FLOPs (training.train_flops, tested by hand in test_sft) over its seconds and a
    # stand-in GPU's 1 GFLOP/s; each micro-batch counted as group_batch packs it: every response once, after its prompt
    calls, real = [], grpo.train_flops
    monkeypatch.setattr(grpo, "train_flops", lambda model, segments: calls.append(segments) or real(model, segments))
    monkeypatch.setattr(grpo, "gpu_peaks", lambda device: (1e9, None))
    grpo.main(grpo_args(toy_paths, tmp_path / "run", "--steps", "1", "--eval-limit", "0"))
    rec, model = read_metrics(tmp_path / "run")[0], checkpoint.load_model(toy_paths["init"])
    assert rec["train_mfu"] == pytest.approx(sum(real(model, s) for s in calls) / rec["train_s"] / 1e9, rel=1e-9)
    assert sum(n for s in calls for context, n in s if context) == round(rec["response_len_mean"] * 8 * 3)


def test_kl_zero_loads_no_reference_and_n1_is_refused(toy_paths, tmp_path, monkeypatch):
    calls = []
    orig = checkpoint.load_model
    monkeypatch.setattr(checkpoint, "load_model", lambda *a, **k: calls.append(a) or orig(*a, **k))
    grpo.main(grpo_args(toy_paths, tmp_path / "nokl", "--kl", "0", "--steps", "1"))
    assert len(calls) == 1
    calls.clear()
    grpo.main(grpo_args(toy_paths, tmp_path / "kl", "--steps", "1"))
    assert len(calls) == 2
    with pytest.raises(SystemExit):
        grpo.parse_args(grpo_args(toy_paths, tmp_path / "n1", "--n", "1"))
    assert grpo.parse_args(grpo_args(toy_paths, tmp_path / "n1", "-n", "5")).n == 5


def test_held_out_judging_reads_rm_r1_rows_and_benchmarks_too(toy_paths, tmp_path, monkeypatch):
    # --eval-format: held-out accuracy on RM-R1's own RL rows (their rendered prompts and winner labels), not only on
    # pairs JSONL, which RM-R1's rows cannot be turned into; the same reader as --format
    from data import DataError, load_judge_examples, load_tokenizer, tokenize_prompts
    from eval import load_heldout
    tok = load_tokenizer(toy_paths["tokenizer"])
    examples, ids, _ = load_heldout(toy_paths["rl"], "rm-r1", tok, 5, 0)
    rows, row_ids, _ = tokenize_prompts(load_judge_examples(toy_paths["rl"], "rm-r1")[0], tok, 10**9)
    assert ids == row_ids[:5] and [e.label for e in examples] == [e.label for e in rows[:5]]
    with pytest.raises(DataError):
        load_heldout(toy_paths["rl"], "pairs", tok, 5, 0)
    summary = grpo.main(grpo_args(toy_paths, tmp_path / "g", "--steps", "1", "--kl", "0", "--eval-data", toy_paths["rl"],
                                  "--eval-format", "rm-r1", "--eval-limit", "5"))
    assert summary["heldout_start"] in {20.0 * k for k in range(6)}  # 5 rows judged: a multiple of 20%
    # pairs are judged in the prompts of --family, as the training pairs are
    instruct, reasoning = (load_heldout(toy_paths["heldout"], "pairs", tok, 2, 0, family)[1] for family in ("instruct", "reasoning"))
    assert instruct == load_heldout(toy_paths["heldout"], "pairs", tok, 2, 0)[1] != reasoning  # the toy's template: instruct
    families = []
    monkeypatch.setattr(grpo, "load_heldout", lambda *a, **kw: families.append(a[-1]) or load_heldout(*a, **kw))
    grpo.main(grpo_args(toy_paths, tmp_path / "r", "--steps", "1", "--kl", "0", "--family", "reasoning", "--format", "pairs",
                        "--data", toy_paths["heldout"]))
    assert families == ["reasoning"]


def test_held_out_prompts_past_max_prompt_len_are_dropped_and_said(toy_paths, tmp_path, monkeypatch, capsys):
    # held-out judging shares the rollout's sampler, whose KV cache rows are as long as the longest prompt it holds: a
    # held-out prompt longer than every training prompt would lengthen them all (fewer sequences in flight on a GPU)
    from data import load_tokenizer
    from eval import load_heldout
    lengths = load_heldout(toy_paths["heldout"], "pairs", load_tokenizer(toy_paths["tokenizer"]), 8, 0)[1]
    cap = sorted(map(len, lengths))[4]
    rows = []
    for_policy = grpo.Sampler.for_policy
    monkeypatch.setattr(grpo.Sampler, "for_policy", lambda *a, **kw: rows.append(a[3]) or for_policy(*a, **kw))
    grpo.main(grpo_args(toy_paths, tmp_path / "g", "--steps", "1", "--kl", "0", "--eval-limit", "8", "--max-prompt-len", str(cap)))
    longer = sum(len(p) > cap for p in lengths)
    assert 0 < longer < 8 and rows[0] <= cap + 12  # the sampler's rows: the longest kept prompt + --max-new-tokens
    assert (f"grpo: {longer} of the 8 held-out pairs (--eval-limit) in {toy_paths['heldout']} dropped as longer than "
            f"--max-prompt-len {cap}") in capsys.readouterr().out
    long_pair = tmp_path / "long.jsonl"
    long_pair.write_text(json.dumps({"id": "1", "prompt": "7 + 8 " * 500, "chosen": "15", "rejected": "16"}) + "\n")
    with pytest.raises(SystemExit, match=r"all 1 held-out pairs \(--eval-limit\) in .*long.jsonl are longer than"):
        grpo.main(grpo_args(toy_paths, tmp_path / "l", "--eval-data", str(long_pair), "--max-prompt-len", "600"))


@pytest.mark.slow
def test_torchrun_two_ranks_matches_one_process_and_resumes_a_one_rank_state(toy_paths, tmp_path, policy):
    # the same job, run differently: one process; and a run that does step 1 in one process, then 2 ranks resume its
    # state (each keeps its shard of the one rank's tensors) for steps 2-3: each rank takes every other rollout position
    # (2 groups of each 4-prompt mini-batch), with its first block recomputing. Both train on slices of a group
    # (--micro-seqs 2 < n = 3), as micro-batches of whole groups round differently, and at this LR AdamW turns the
    # rounding of near-zero gradients into visible weight differences by step 3 (test_slices_of_a_group_give_the_update_
    # of_whole_groups compares the two layouts on one update). The two ranks decode together over a tensor-parallel
    # rollout copy (--rollout-tp 2: half its heads and MLP columns each) and judge the held-out pairs with it, and keep
    # their shards, gradients and AdamW moments in host memory (--offload)
    sliced = ("--gen-prompts", "3", "--micro-seqs", "2")
    grpo.main(grpo_args(toy_paths, tmp_path / "one", *sliced, policy=policy))
    sliced += ("--grad-ckpt", "1")  # the first block recomputes: same maths
    grpo.main(grpo_args(toy_paths, tmp_path / "two", *sliced, "--stop-after-steps", "1", policy=policy))
    run_torchrun("grpo.py", grpo_args(toy_paths, tmp_path / "two", *sliced, "--resume", "--rollout-tp", "2", "--offload",
                                      policy=policy))
    assert_same_run(tmp_path / "one", tmp_path / "two", batched_alike=False)
    # the two ranks gathered each other's traces and shared out the slices: 8 a mini-batch, 4 each
    assert [r["train_balance"] for r in read_metrics(tmp_path / "one")] == [1.0] * 3
    assert all(0.5 < r["train_balance"] < 1 for r in read_metrics(tmp_path / "two")[1:])
    s1, s2 = (json.load(open(tmp_path / d / "summary.json")) for d in ("one", "two"))
    assert s1["heldout_end"] == s2["heldout_end"]
    # rollouts.jsonl: the same groups as one process's, each once (rank 0 writes them; every rank holds the rollout)
    groups = [[(r["step"], r["id"]) for r in map(json.loads, open(tmp_path / d / "rollouts.jsonl"))] for d in ("one", "two")]
    assert groups[0] == groups[1] and [step for step, _ in groups[0]] == [1, 2, 3]


def test_a_grpo_steps_compiled_blocks_stay_within_the_recompile_limit():
    # a real GRPO step runs the compiled blocks three ways (the update with checkpointing, the policy's no-grad old
    # log-probs, the frozen reference), each micro-batch with new lengths and, in slices of a group (--micro-seqs 4 of
    # n = 7), 3 or 4 responses per prompt. Past Dynamo's recompile limit a block silently runs eager on a GPU (static
    # first graphs, then one per size that went dynamic, reached it); counted here with the eager backend
    from torch._dynamo.utils import counters
    cfg = M.ModelConfig(model_type="qwen2", vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=False,
                        max_position_embeddings=256, torch_dtype="float32")
    policy, ref = (M.compile_blocks(toy.init_weights(M.Transformer(cfg), seed=0), backend="eager") for _ in range(2))
    policy.recompute_blocks = 2  # of 3: the update runs blocks that recompute and a block that keeps its activations
    ref.requires_grad_(False)
    torch._dynamo.reset()
    counters.clear()
    g = torch.Generator().manual_seed(0)
    for P, R, per_prompt in [(40, 30, 3), (40, 50, 4), (60, 12, 3), (60, 64, 4), (51, 33, 7), (18, 20, 3)]:
        prompts = [torch.randint(1, 97, (P,), generator=g).tolist()]
        responses = [torch.randint(1, 97, (int(L),), generator=g).tolist()
                     for L in torch.randint(1, R + 1, (per_prompt,), generator=g)]
        with torch.no_grad():
            old = grpo.response_logprobs(policy, prompts, responses, per_prompt, 0, "cpu", 1.0)[0]
            grpo.response_logprobs(ref, prompts, responses, per_prompt, 0, "cpu", 1.0)
        logp, _, mask = grpo.response_logprobs(policy, prompts, responses, per_prompt, 0, "cpu", 1.0)
        ((logp - old) * mask).sum().backward()
    assert not any("recompile limit" in k for k in counters["unimplemented"])  # no block fell back to eager
    assert counters["stats"]["unique_graphs"] <= 4  # one graph per way (the update's two), whatever the lengths and slices


@pytest.mark.parametrize("world", [1, 2, 8, 32])
def test_every_rank_holds_an_equal_share_of_every_minibatch(world):
    for rollout, minibatch in [(1024, 128), (64, 16), (256, 32)]:  # the paper's defaults, the toy's, another
        if minibatch % world:
            continue
        held = [grpo.rank_positions(rollout, world, r) for r in range(world)]
        assert sorted(p for h in held for p in h) == list(range(rollout))  # a partition of the rollout
        for r in range(world):
            per_minibatch = [sum(p // minibatch == m for p in held[r]) for m in range(rollout // minibatch)]
            assert per_minibatch == [minibatch // world] * (rollout // minibatch), (world, r)


def test_flag_combinations_are_refused_up_front(toy_paths, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "8")
    with pytest.raises(SystemExit):  # 4 prompts per mini-batch cannot be split evenly over 8 ranks
        grpo.parse_args(grpo_args(toy_paths, tmp_path / "x"))
    assert "--minibatch-prompts 4 must be a multiple of the 8 ranks" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"split over 4 ranks \(--rollout-tp\) needs .*num_key_value_heads 2"):
        grpo.parse_args(grpo_args(toy_paths, tmp_path / "x", "--rollout-tp", "4"))  # the toy's 2 KV heads: before any work
    monkeypatch.setenv("WORLD_SIZE", "1")
    for extra, flag in [(("--minibatch-prompts", "3"), "--rollout-prompts 8 must be a multiple of --minibatch-prompts 3"),
                        (("--temperature", "0"), "--temperature must be > 0"), (("--top-p", "0"), "--top-p"),
                        (("--rollout-prompts", "0"), "--rollout-prompts must be > 0"),
                        (("--eval-limit", "-1"), "--eval-limit must be >= 0"), (("--steps", "-2"), "--steps must be >= 0"),
                        (("--rollout-is-cap", "0.5"), "--rollout-is-cap must be >= 1"),
                        (("--rollout-is-cap", "nan"), "--rollout-is-cap must be >= 1"),
                        (("--kv-page-size", "-8"), "--kv-page-size must be >= 0"), (("--top-p", "1.5"), "--top-p is a fraction"),
                        (("--log-rollouts", "9"), "--log-rollouts 9: a step has only --rollout-prompts 8 groups"),
                        (("--log-rollouts", "-1"), "--log-rollouts must be >= 0"),
                        (("--stop-after-minutes", "nan"), "--stop-after-minutes must be >= 0"),
                        (("--offload",), "--offload keeps FSDP's shards in host memory, and one fp32 process"),
                        (("--rollout-tp", "2"), "--rollout-tp 2 must divide the 1 ranks"),
                        (("--rollout-tp", "0"), "--rollout-tp must be > 0, got 0")]:
        with pytest.raises(SystemExit):
            grpo.parse_args(grpo_args(toy_paths, tmp_path / "x", *extra))
        assert flag in capsys.readouterr().err


def test_offload_refuses_a_host_without_memory_for_its_ranks_shards(toy_paths, tmp_path, monkeypatch, one_rank_fsdp):
    # --offload keeps 16 bytes a parameter (fp32 weights, gradients, AdamW's two moments) over the ranks in host memory,
    # and the frozen reference's bf16 shards (2): a host short of that for its ranks is refused before loading, where it
    # would otherwise fail at the first step (pinning, or the OOM killer ending a rank without a message)
    import sft
    import training
    from test_sft import sft_args
    params = M.num_params(checkpoint.load_model(toy_paths["init"]))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # 2 of 4 ranks on this host: half the shards
    monkeypatch.setattr(training, "host_memory_available", lambda: 18 * params * 2 / 4)
    training.check_host_memory(toy_paths["init"], 4, frozen_bytes=2)  # exactly enough
    with pytest.raises(SystemExit, match=r"--offload: the 2 rank\(s\) on this host need .* \(18 bytes each over 2 ranks\)"):
        training.check_host_memory(toy_paths["init"], 2, frozen_bytes=2)  # 2 of 2 ranks here: all the shards
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setattr(training, "host_memory_available", lambda: 16 * params - 1)  # one short of the policy's state
    one_rank_fsdp()
    for main, args in [(grpo.main, grpo_args(toy_paths, tmp_path / "g", "--kl", "0")), (sft.main, sft_args(toy_paths, tmp_path / "s"))]:
        with pytest.raises(SystemExit, match=r"\(16 bytes each over 1 ranks\)"):
            main(args + ["--precision", "bf16", "--offload"])
        assert not (tmp_path / "g" / "state").exists() and not (tmp_path / "s" / "state").exists()


def first_rollout(toy_paths, policy, *extra, dtype=None):
    """A one-process GRPO job on the distilled toy policy, with SGD at LR 0 (an update leaves the weights as they
    are), and its first rollout."""
    from data import load_judge_examples, load_tokenizer, tokenize_prompts
    from sampler import Sampler
    args = grpo.parse_args(grpo_args(toy_paths, "unused", "--max-new-tokens", "24", *extra))
    tok = load_tokenizer(toy_paths["tokenizer"])
    examples, ids, _ = tokenize_prompts(load_judge_examples(toy_paths["rl"], "rm-r1")[0], tok, 512)
    model = checkpoint.load_model(policy, dtype=dtype)
    job = grpo.Job(args, model, None, torch.optim.SGD(model.parameters(), lr=0.0), Sampler(model, 6, 600), tok, examples,
                   ids, 0, 1, torch.device("cpu"))
    return job, grpo.rollout(job, 0)


def one_rank_plan(ro, args, micro_seqs):
    return training.micro_batch_plan(list(map(len, ro.prompts)), list(map(len, ro.responses)), args.n, args.minibatch_prompts,
                                 micro_seqs, 1)[0]


@pytest.mark.parametrize("dtype,micro_seqs", [(torch.float32, 6), (torch.bfloat16, 6), (torch.bfloat16, 2)])
def test_first_minibatch_ratio_is_exactly_one(toy_paths, policy, dtype, micro_seqs):
    """Old log-probs come from the same micro-batches as the update, so before the first optimizer step the ratio
    is exactly 1 and nothing is clipped, in fp32 and in bf16 (where different padding would change the numbers),
    and with groups cut into slices of their responses (--micro-seqs 2 < n = 3). With Inductor-compiled blocks, the
    GPU's path: test_the_single_gpu_code_path_runs_compiled_on_cpu."""
    job, ro = first_rollout(toy_paths, policy, "--micro-seqs", str(micro_seqs), dtype=dtype)
    args, model = job.args, job.policy
    assert len({len(r) for r in ro.responses}) > 1  # ragged traces: micro-batches are padded differently
    plan = one_rank_plan(ro, args, args.micro_seqs)
    assert len(plan[0]) == (2 if micro_seqs == 6 else 8)  # 4 groups: 2 per micro-batch, or each in 2 slices
    old, _, sampler_logp, _ = grpo.old_and_ref_logprobs(job, ro, plan)
    rewards, _ = grpo.score(job, ro)
    adv, _ = grpo.group_advantages(rewards, args.n)
    for k, seqs in enumerate(plan[0]):
        logp, _, mask = grpo.response_logprobs(model, *grpo.micro_rows(ro, seqs, args.n), 0, "cpu", 1.0)
        assert torch.equal(logp.detach(), old[0][k])  # ratio exp(logp - old) == 1 exactly
    stats = grpo.update(job, 0, ro, adv, plan[0], old[0], None, sampler_logp[0])
    assert stats["clipped"] == 0


def test_importance_weights_scale_the_policy_loss(toy_paths, policy):
    # the update's loss with --rollout-is: the policy term of each token times its weight, from the sampler's log-probs
    # as the rollout returned them; with mu = pi_old every weight is 1 and the loss is that of --rollout-is none
    job, ro = first_rollout(toy_paths, policy)
    args = job.args
    adv, _ = grpo.group_advantages(grpo.score(job, ro)[0], args.n)
    plan = one_rank_plan(ro, args, args.micro_seqs)
    old, _, sampler_logp, mismatch = grpo.old_and_ref_logprobs(job, ro, plan)
    assert all(m[0] > 0 and m[1] < 1e-4 for m in mismatch)  # fp32: the sampler's kernels differ, barely
    losses = []
    for mode, shift in (("none", None), ("token", 0.0), ("token", -0.05), ("token", 0.05), ("token", -1.0), ("sequence", -0.01)):
        args.rollout_is = mode
        rollout_logp = sampler_logp[0] if shift is None else [o + shift for o in old[0]]  # mu = pi_old + shift
        losses.append(grpo.update(job, 0, ro, adv, plan[0], old[0], None, rollout_logp)["loss"])
    lengths = torch.tensor([len(ro.responses[i]) for seqs in plan[0] for i in seqs], dtype=torch.float)
    assert losses[1] == losses[0] != 0  # mu = pi_old: every weight is exactly 1
    assert losses[2] == pytest.approx(losses[0] * math.exp(0.05), rel=1e-5)
    assert losses[3] == pytest.approx(losses[0] * math.exp(-0.05), rel=1e-5)
    assert losses[4] == pytest.approx(losses[0] * 2.0, rel=1e-5)  # e^1 capped at 2
    # ratio 1 (SGD at LR 0), token-mean: sequence s adds -A_s x len_s / tokens; per sequence it is weighted by
    # min(e^(0.01 x len_s), 2) (the sum of its tokens' log-ratios)
    per_seq = -adv[[i for seqs in plan[0] for i in seqs]] * lengths / lengths.sum()
    assert losses[0] == pytest.approx(per_seq.sum().item(), rel=1e-5)
    assert losses[5] == pytest.approx((per_seq * (0.01 * lengths).exp().clamp(max=2)).sum().item(), rel=1e-5)


def test_micro_batch_plan_by_hand():
    # 4 groups of n = 3 (prompts of 3 tokens) in 2 mini-batches of 2 prompts; sequence g * 3 + j is response j of group g,
    # of length L[g * 3 + j]. A packed row costs 2 prompt tokens + its responses: groups 25, 8, 8 and 23 tokens
    P, L = [3] * 4, [5, 9, 9, 1, 2, 3, 3, 2, 1, 7, 7, 7]
    plan = lambda minibatch, micro_seqs, world: training.micro_batch_plan(P, L, 3, minibatch, micro_seqs, world)
    assert plan(2, 6, 1) == [[[[0, 1, 2, 3, 4, 5]], [[6, 7, 8, 9, 10, 11]]]]
    assert plan(2, 5, 1) == [[[[0, 1, 2], [3, 4, 5]], [[9, 10, 11], [6, 7, 8]]]]  # most tokens first
    # slices of a group, near-equal in tokens (longest first, each to the slice with fewer tokens; ties to the first):
    # group 0 (5, 9, 9) -> 14 + 9 tokens, not 5 + 18; group 3 (7, 7, 7) -> [9, 11] and [10]
    assert training.group_slices(0, 3, 2, L) == [[0, 1], [2]] and training.group_slices(3, 3, 2, L) == [[9, 11], [10]]
    assert plan(2, 2, 1) == [[[[0, 1], [2], [5], [3, 4]], [[9, 11], [10], [6], [7, 8]]]]
    # two ranks: the same micro-batches, dealt in turn, so each rank's i-th is about as long as the other's
    assert plan(2, 2, 2) == [[[[0, 1], [5]], [[9, 11], [6]]], [[[2], [3, 4]], [[10], [7, 8]]]]
    # 3 groups a micro-batch, two ranks, one mini-batch: one round, each rank one micro-batch of 2 groups; the longest
    # first, each to the rank with fewer tokens: 25 -> rank 0, 23 -> rank 1, 8 -> rank 1 (31), 8 -> rank 0 (33)
    assert plan(4, 9, 2) == [[[[0, 1, 2, 6, 7, 8]]], [[[3, 4, 5, 9, 10, 11]]]]
    assert [len(s) for s in training.group_slices(0, 7, 2, [1] * 7)] == [4, 3]  # at most ceil(7 / 2) a slice
    assert training.group_slices(0, 7, 2, [9, 1, 1, 8, 1, 1, 1]) == [[0, 2, 5], [1, 3, 4, 6]]  # 11 + 11 tokens


@pytest.mark.parametrize("world", [1, 2, 8, 32])
def test_every_rank_runs_as_many_micro_batches_and_together_every_sequence_once(world):
    # RM-R1's traces are long-tailed: lengths drawn log-normal (median 900, capped at 8192), prompts around 1,300 tokens
    gen = torch.Generator().manual_seed(world)
    for rollout, minibatch, n, micro_seqs in [(1024, 128, 7, 4), (64, 16, 7, 112), (256, 32, 4, 8), (256, 32, 3, 4)]:
        if minibatch % world:
            continue
        P = (1300 * torch.empty(rollout).log_normal_(0, 0.35, generator=gen)).int().clamp(200, 4096).tolist()
        L = (900 * torch.empty(rollout * n).log_normal_(0, 0.8, generator=gen)).int().clamp(1, 8192).tolist()
        plans = training.micro_batch_plan(P, L, n, minibatch, micro_seqs, world)
        for m in range(rollout // minibatch):
            micros = [seqs for r in range(world) for seqs in plans[r][m]]
            assert sorted(i for seqs in micros for i in seqs) == list(range(m * minibatch * n, (m + 1) * minibatch * n))
            assert len({len(plans[r][m]) for r in range(world)}) == 1  # FSDP: every rank runs as many forwards
            k = -(-n // micro_seqs)  # slices of a group
            assert all(len(seqs) <= (n * (micro_seqs // n) if k == 1 else -(-n // k)) for seqs in micros)
        balance = training.train_balance(P, L, n, plans)
        assert balance == 1 if world == 1 else 1 / world < balance < 1
        if rollout == 1024 and world > 1:  # the paper's settings: 0.98 on 8 ranks, 0.90 on 32; each rank training the
            assert balance > 0.85, balance  # groups it sampled, in order: 0.69 and 0.58 (docs/measurements.md)


def test_all_gather_arrays_on_two_ranks_with_uneven_and_empty_lists(tmp_path):
    # how GRPO's ranks gather each other's traces (training.all_gather_arrays): any number of sequences of any lengths
    # per rank, none included; int32 token ids (the largest too) and fp32 log-probs (-inf, a subnormal) come back bit
    # for bit, as arrays, in rank order; one process gets its own back, as arrays too
    script = tmp_path / "gather.py"
    script.write_text(f"""import json, struct, sys
sys.path.insert(0, {ROOT!r})
import torch, torch.distributed as dist
from training import all_gather_arrays, end_distributed
dist.init_process_group("gloo")
r, cpu = dist.get_rank(), torch.device("cpu")
ids = [[1, 2, 3], [], [2 ** 31 - 1]] if r == 0 else []
logps = torch.randn(2, 5, generator=torch.Generator().manual_seed(r)).tolist() if r else [[-1 / 3, float("-inf"), 1e-45]]
seen = [all_gather_arrays(ids, cpu, "i"), all_gather_arrays(logps, cpu, "f")]
assert all(a.typecode == code for got, code in zip(seen, "if") for rank in got for a in rank)
bits = lambda x: [[[struct.pack("f", v).hex() for v in a] for a in rank] for rank in x]  # fp32 bits, as JSON can hold
json.dump([ids, bits([logps]), [[a.tolist() for a in rank] for rank in seen[0]], bits(seen[1])], open(sys.argv[1] + f"/{{r}}.json", "w"))
end_distributed()
""")
    run_torchrun(str(script), [str(tmp_path)])
    (ids0, (logps0,), *seen0), (ids1, (logps1,), *seen1) = (json.load(open(tmp_path / f"{r}.json")) for r in (0, 1))
    assert seen0 == seen1 == [[ids0, ids1], [logps0, logps1]] and ids1 == [] and len(logps1) == 2
    assert ids0[2] == [2 ** 31 - 1] and logps0[0][1:] == [struct.pack("f", float("-inf")).hex(), "01000000"]
    (alone,) = training.all_gather_arrays([[5, 6], []], torch.device("cpu"), "i")  # no process group
    assert [a.typecode for a in alone] == ["i", "i"] and [a.tolist() for a in alone] == [[5, 6], []]


def test_the_rollout_counts_its_decode_steps_and_the_slots_they_kept_busy(toy_paths, policy, monkeypatch):
    # rollout_decode_steps and rollout_slot_use: the decode steps the sampler ran (counted here at the call) and the
    # tokens they made (a trace's first comes from its prefill) over steps x slots
    from sampler import Sampler
    calls, step = [], Sampler.decode_step
    monkeypatch.setattr(Sampler, "decode_step", lambda self, *a: calls.append(1) or step(self, *a))
    job, ro = first_rollout(toy_paths, policy)
    made = sum(len(r) - 1 for r in ro.responses)
    assert ro.decode_steps == len(calls) >= max(map(len, ro.responses)) - 1
    assert ro.slot_use == made / (len(calls) * job.engine.slots) and 0.5 < ro.slot_use <= 1  # 6 slots, 8 prompts x 3 traces


def test_slices_of_a_group_give_the_update_of_whole_groups(toy_paths, policy):
    """--micro-seqs below the group size runs each prompt once per slice of its responses: less memory per forward,
    the same log-probs and the same update (loss and gradient norm) as whole groups."""
    job, ro = first_rollout(toy_paths, policy)
    args = job.args
    adv, _ = grpo.group_advantages(grpo.score(job, ro)[0], args.n)
    runs = {}
    for micro_seqs in (9, 2, 1):
        plan = one_rank_plan(ro, args, micro_seqs)
        old, _, sampler_logp, _ = grpo.old_and_ref_logprobs(job, ro, plan)
        per_seq = {i: logp[row, :len(ro.responses[i])] for micros, olds in zip(plan, old)
                   for seqs, logp in zip(micros, olds) for row, i in enumerate(seqs)}
        runs[micro_seqs] = per_seq, grpo.update(job, 0, ro, adv, plan[0], old[0], None, sampler_logp[0])
    whole, stats = runs[9]
    assert len(whole) == len(ro.responses)
    for micro_seqs in (2, 1):
        for i, logp in runs[micro_seqs][0].items():
            torch.testing.assert_close(logp, whole[i], atol=1e-5, rtol=1e-5)
        for key in ("loss", "grad_norm", "entropy"):
            assert runs[micro_seqs][1][key] == pytest.approx(stats[key], rel=1e-5, abs=1e-7), key


def test_update_reads_the_device_once_a_minibatch_not_once_a_micro_batch(toy_paths, policy, monkeypatch):
    """A host read of a device value (.item(), float(), .tolist()) waits for the GPU. Inside the micro-batch loop it
    would idle the GPU while the host builds the next micro-batch: the update's reads do not grow with micro-batches."""
    job, ro = first_rollout(toy_paths, policy)
    args = job.args
    adv, _ = grpo.group_advantages(grpo.score(job, ro)[0], args.n)
    reads = {}
    for micro_seqs in (9, 1):
        plan = one_rank_plan(ro, args, micro_seqs)
        old, _, sampler_logp, _ = grpo.old_and_ref_logprobs(job, ro, plan)
        count = []
        for name in ("item", "__float__", "tolist"):
            read = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, lambda t, *a, read=read: count.append(1) or read(t, *a))
        grpo.update(job, 0, ro, adv, plan[0], old[0], None, sampler_logp[0])
        monkeypatch.undo()
        reads[len(plan[0])] = len(count)
    assert len(reads) == 2 and len(set(reads.values())) == 1, reads  # {micro-batches: host reads}


class StopAtSetup(Exception):
    pass


def setup_calls(monkeypatch, runs):
    """Run each (script, argv) up to its call of setup_distributed -> the (cpu, timeout_minutes) of each call."""
    seen = []

    def record(cpu=False, precision=None, offload=False, timeout_minutes=60.0):
        seen.append((cpu, timeout_minutes))
        raise StopAtSetup  # main stops here: nothing else runs
    for script, argv in runs:
        monkeypatch.setattr(script, "setup_distributed", record)
        with pytest.raises(StopAtSetup):
            script.main(argv)
    return seen


def test_the_toy_stays_on_the_cpu_where_cuda_is_available(monkeypatch):
    # the toy's numbers are tuned in fp32 on CPU kernels (--precision bf16 simulates the GPU's policy there, toy.py's
    # grid); real runs (--model) take the GPU
    import decode_model
    import sft
    import training
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(decode_model, "gpu_memory", lambda: 0)  # (a GPU that is not there has no memory to check)
    assert training.setup_distributed(cpu=True)[2] == torch.device("cpu")
    runs = [(script, argv) for script in (sft, grpo) for argv in ([], ["--model", "m", "--data", "d", "--out", "o"])]
    assert [cpu for cpu, _ in setup_calls(monkeypatch, runs)] == [True, False, True, False]


def test_the_ranks_wait_for_each_other_as_long_as_dist_timeout_says(monkeypatch):
    # the ranks wait for the slowest after work whose length differs by rank (a rollout's or a judging's share of long
    # traces, rank 0's save), which can pass NCCL's own default of 10 minutes at the paper's lengths: the process group
    # gets --dist-timeout (60 minutes unless given) from sft.py, grpo.py and eval.py
    import torch.distributed as dist
    import eval as E
    import sft
    import training
    from datetime import timedelta
    timeouts = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout=None, **kw: timeouts.append(timeout))
    training.setup_distributed(precision="bf16")  # one process under bf16: FSDP2 over a one-rank group
    training.setup_distributed(precision="bf16", timeout_minutes=90)
    assert timeouts == [timedelta(minutes=60), timedelta(minutes=90)]
    real, judge = ["--model", "m", "--data", "d", "--out", "o"], ["--judge", "longer", "--bench", "pairs", "--data", "d", "--out", "o"]
    runs = [(script, argv + extra) for script, argv in ((sft, real), (grpo, real), (E, judge))
            for extra in ([], ["--dist-timeout", "90"])]
    assert [minutes for _, minutes in setup_calls(monkeypatch, runs)] == [60.0, 90.0] * 3


def test_real_runs_default_to_the_papers_settings():
    # SPEC section 3: a run given --model takes RM-R1's GRPO settings unless a flag says otherwise; SFT, section 4
    import sft
    a = grpo.parse_args(["--model", "m", "--data", "d", "--out", "o"])
    assert (a.n, a.temperature, a.top_p, a.top_k, a.rollout_prompts, a.minibatch_prompts, a.clip, a.clip_high, a.kl,
            a.loss_agg, a.lr, a.lr_schedule, a.weight_decay, a.grad_clip, a.max_prompt_len, a.max_new_tokens) == \
        (7, 1.0, 1.0, 0, 1024, 128, 0.2, 0.2, 0.001, "token-mean", 1e-6, "constant", 0.01, 1.0, 4096, 8192)
    # what fits 8 x 80 GB at 7B (README's arithmetic), and a save every 5 of the ~62 long steps of an epoch
    assert (a.grad_ckpt, a.micro_seqs, a.gen_prompts, a.kv_cache_frac, a.save_every) == ("auto", 4, 32, 0.25, 5)
    assert grpo.parse_args([]).save_every == 20  # the toy's
    s = sft.parse_args(["--model", "m", "--data", "d", "--out", "o"])
    assert (s.epochs, s.global_batch, s.lr, s.warmup, s.min_lr_ratio, s.grad_clip, s.max_len, s.grad_ckpt) == \
        (1.0, 128, 5e-6, 0.03, 0.1, 1.0, 12288, "auto")


def test_grpo_fits_recompute_after_its_second_step_for_its_longest_micro_batch(toy_paths, tmp_path, monkeypatch, capsys):
    # as sft.py: a micro-batch holds --micro-seqs 9 // n 3 = 3 groups, each a prompt of up to --max-prompt-len 4096 and
    # 3 responses of up to --max-new-tokens 12: at most 3 x 4096 + 9 x 12 = 12,396 tokens
    calls = []
    monkeypatch.setattr(grpo, "fit_recompute", lambda model, flag, steps_run, max_tokens, device: calls.append(
        (flag, steps_run, max_tokens)) or ("fitted: 1 of 2" if steps_run == 2 else None))
    grpo.main(grpo_args(toy_paths, tmp_path / "run", "--eval-limit", "0"))
    assert calls == [("auto", k, 12396) for k in (1, 2, 3)]
    assert capsys.readouterr().out.count("grpo: fitted: 1 of 2") == 1
