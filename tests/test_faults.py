"""Bad inputs and faults: each case checks the exit and that the message names the file, field or flag, and
each fault case that nothing was lost (the previous state intact, metrics without duplicates)."""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import eval as E
import checkpoint
import grpo
import rundir
import sft
import toy
import training
from conftest import ROOT, make_hf_checkpoint, read_metrics, run_torchrun, torchrun_command
from data import DataError, judge_messages, load_judge_examples, load_tokenizer, read_jsonl, read_sft_rows


def sft_args(toy_paths, out, *extra):
    return ["--model", toy_paths["init"], "--tokenizer", toy_paths["tokenizer"], "--data", toy_paths["sft"],
            "--out", str(out), "--global-batch", "16", "--max-steps", "3", "--eval-limit", "0", "--save-every", "1", *extra]


def grpo_args(toy_paths, out, *extra):
    return ["--model", toy_paths["init"], "--tokenizer", toy_paths["tokenizer"], "--data", toy_paths["rl"],
            "--out", str(out), "--steps", "2", "--rollout-prompts", "4", "--minibatch-prompts", "2", "--gen-prompts", "2",
            "--group-size", "2", "--max-new-tokens", "6", "--save-every", "1", *extra]


def exit_message(excinfo):
    return str(excinfo.value.code)


# ----------------------------------------------------------------------------- run directories

def test_an_existing_run_directory_is_not_overwritten(toy_paths, tmp_path):
    sft.main(sft_args(toy_paths, tmp_path / "run"))
    before = open(tmp_path / "run" / "metrics.jsonl").read()
    with pytest.raises(SystemExit) as e:
        sft.main(sft_args(toy_paths, tmp_path / "run"))
    assert "already holds a run" in exit_message(e) and "--overwrite" in exit_message(e)
    assert open(tmp_path / "run" / "metrics.jsonl").read() == before
    sft.main(sft_args(toy_paths, tmp_path / "run", "--overwrite", "--max-steps", "2"))  # asked for: starts over
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]


def test_a_run_that_failed_before_its_first_step_does_not_block_the_directory(toy_paths, tmp_path):
    with pytest.raises(DataError, match="this is SFT data"):
        grpo.main(grpo_args(toy_paths, tmp_path / "run", "--data", toy_paths["sft"]))
    assert grpo.main(grpo_args(toy_paths, tmp_path / "run", "--steps", "1"))["steps"] == 1


def test_a_disk_without_room_for_a_save_is_refused_before_any_work(toy_paths, tmp_path, monkeypatch):
    # a save writes the state (fp32 weights and AdamW's two moments: 12 bytes a parameter) before the old copy goes, and
    # the run writes the model at the end (its save dtype's bytes) and every --save-model-every steps; counted by hand
    # for the toy's fp32 checkpoint, on a stand-in disk (sft_args' 3 steps with --save-model-every 1: 3 models)
    params = sum(p.numel() for p in checkpoint.load_model(toy_paths["init"]).parameters())
    usage = shutil.disk_usage(tmp_path)
    free = lambda n: monkeypatch.setattr(rundir.shutil, "disk_usage", lambda path: usage._replace(free=n))
    for main, args, need in ((sft.main, sft_args(toy_paths, tmp_path / "sft", "--max-steps", "1"), 16 * params),
                             (sft.main, sft_args(toy_paths, tmp_path / "bf16", "--save-dtype", "bfloat16"), 14 * params),
                             (sft.main, sft_args(toy_paths, tmp_path / "kept", "--save-model-every", "1"), 24 * params),
                             (grpo.main, grpo_args(toy_paths, tmp_path / "grpo", "--steps", "1"), 16 * params)):
        free(need - 1)
        with pytest.raises(SystemExit) as e:
            main(args)
        assert f"the run's saves need {need / 1e9:.3g} GB" in exit_message(e)
        assert f"its disk has {(need - 1) / 1e9:.3g} GB free" in exit_message(e)
        assert os.listdir(args[args.index("--out") + 1]) == ["run.json"]  # nothing saved, nothing to protect
    free(16 * params)  # exactly enough
    assert sft.main(sft_args(toy_paths, tmp_path / "sft", "--max-steps", "1"))["steps"] == 1
    free(24 * params)  # stopped after step 2 with the models of steps 1 and 2 kept: a resume writes only model/ more
    sft.main(sft_args(toy_paths, tmp_path / "kept", "--save-model-every", "1", "--stop-after-steps", "2"))
    free(16 * params)
    assert sft.main(sft_args(toy_paths, tmp_path / "kept", "--save-model-every", "1", "--resume"))["steps"] == 3


def test_save_model_every_keeps_the_models_of_those_steps(toy_paths, tmp_path):
    # --save-model-every 2 over 3 steps keeps step 2's model (the last step's is model/): the weights of a run stopped
    # after step 2, in Hugging Face layout with the tokenizer beside them; grpo.py keeps them the same way
    sft.main(sft_args(toy_paths, tmp_path / "kept", "--save-model-every", "2"))
    assert os.listdir(tmp_path / "kept" / "models") == ["step-2"]
    sft.main(sft_args(toy_paths, tmp_path / "cut", "--stop-after-steps", "2"))
    model = checkpoint.load_model(toy_paths["init"])
    rundir.load_state(str(tmp_path / "cut" / "state"), model, training.make_optimizer(model, 1, (0.9, 0.9), 0), 0)
    kept = checkpoint.load_model(str(tmp_path / "kept" / "models" / "step-2"))
    for (n, p), q in zip(model.state_dict().items(), kept.state_dict().values()):
        assert torch.equal(p, q), n
    assert os.path.exists(tmp_path / "kept" / "models" / "step-2" / "tokenizer.json")
    grpo.main(grpo_args(toy_paths, tmp_path / "grpo", "--save-model-every", "1"))
    assert os.listdir(tmp_path / "grpo" / "models") == ["step-1"]
    for f in ("state", "model", "metrics.jsonl", "rollouts.jsonl", "summary.json"):  # all but the kept models (kept off too)
        (shutil.rmtree if f in ("state", "model") else os.remove)(tmp_path / "grpo" / f)
    with pytest.raises(SystemExit, match=r"already holds a run \(models\)"):
        grpo.main(grpo_args(toy_paths, tmp_path / "grpo"))


def test_ranks_that_do_not_share_the_run_directory_or_their_inputs_are_refused(toy_paths, tmp_path):
    # every rank saves its shards into --out, and rank 0 swaps them in (eval.py: writes outputs, which rank 0 scores):
    # ranks on nodes that each see their own disk there (simulated: a relative --out, and each rank in a working
    # directory of its own) are refused on every rank before any work; ranks that share it pass, and the file rank 0
    # wrote to find out is gone. Every rank reads its inputs itself: a copy on rank 1's "node" that differs from rank
    # 0's (a relative --model or --data, each rank in its own directory again) is refused too, naming it
    script, pairs = tmp_path / "shared.py", _pairs(tmp_path)
    for r in (0, 1):
        shutil.copytree(toy_paths["init"], tmp_path / f"node{r}" / "ckpt")
        shutil.copy(pairs, tmp_path / f"node{r}" / "pairs.jsonl")
    with open(tmp_path / "node1" / "ckpt" / "config.json", "a") as f:  # a stale copy
        f.write(" ")
    with open(tmp_path / "node1" / "pairs.jsonl", "a") as f:
        f.write(json.dumps({"id": "extra", "prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    script.write_text(f"""import argparse, json, os, sys
sys.path.insert(0, {ROOT!r})
import torch, torch.distributed as dist
import eval as E
from rundir import RunDir
from training import end_distributed
dist.init_process_group("gloo")
r, results, top = dist.get_rank(), {{}}, sys.argv[1]
def train(out, model):  # a trainer's run directory
    args = argparse.Namespace(model=model, tokenizer=None, save_dtype=None, save_every=1, save_model_every=0,
                              stop_after_minutes=None)
    RunDir(out, args, r, "test", torch.device("cpu")).start(resume=False, overwrite=False)
    return sorted(os.listdir(out))
judge = lambda out, data: E.main(["--judge", "longer", "--bench", "pairs", "--data", data, "--out", out])
cases = {{"shared": ("shared", lambda: train("run", {toy_paths["init"]!r})),  # the same cwd: one directory
         "local": (f"node{{r}}", lambda: train("run", {toy_paths["init"]!r})),  # a cwd a rank: one each
         "eval": (f"node{{r}}", lambda: judge("ev", {pairs!r})),
         "model": (f"node{{r}}", lambda: train(os.path.join(top, "run"), "ckpt")),  # each rank's own copy
         "data": (f"node{{r}}", lambda: judge(os.path.join(top, "ev"), "pairs.jsonl"))}}
for case, (cwd, run) in cases.items():
    os.makedirs(os.path.join(top, cwd), exist_ok=True)
    os.chdir(os.path.join(top, cwd))
    try:
        results[case] = run()
    except SystemExit as e:
        results[case] = str(e.code)
json.dump(results, open(os.path.join(top, f"{{r}}.json"), "w"))
end_distributed()
""")
    run_torchrun(str(script), [str(tmp_path)])
    for r in range(2):
        seen = json.load(open(tmp_path / f"{r}.json"))
        assert seen["shared"] == ["run.json"]
        assert seen["local"].startswith("test: --out run: rank(s) 1 of 2 do not see the files rank 0 writes there "
                                        f"(this is rank {r} on "), seen["local"]
        assert seen["local"].endswith("so it must be a directory all nodes share")
        assert seen["eval"].startswith("eval.py: --out ev: rank(s) 1 of 2 do not see the files rank 0 writes there")
        assert seen["model"].startswith("test: an input differs from rank 0's copy on other ranks, or is missing there: "
                                        f"--model ckpt (rank(s) 1) (this is rank {r} on "), seen["model"]
        assert seen["data"].startswith("eval.py: an input differs from rank 0's copy on other ranks, or is missing there: "
                                       "--data pairs.jsonl (rank(s) 1) "), seen["data"]


def test_resume_auto_resumes_starts_or_starts_over_as_the_directory_says(toy_paths, tmp_path, monkeypatch, capsys):
    # `--resume auto`, for a job run again after a requeue: an empty --out starts; a run stopped after step 1 resumes, to
    # the uninterrupted run's summary and weights; a finished run is left alone; this run's files without a state (it
    # ended before its first save) start over; another run's settings are refused, with a state or without
    auto = lambda out, *extra: sft.main(sft_args(toy_paths, tmp_path / out, "--resume", "auto", *extra))
    full = sft.main(sft_args(toy_paths, tmp_path / "full"))
    assert auto("run", "--stop-after-steps", "1")["steps"] == 1
    assert auto("run") == full and auto("run") == full and "finished already" in capsys.readouterr().out
    weights = lambda out: open(tmp_path / out / "model" / "model.safetensors", "rb").read()
    assert weights("run") == weights("full")
    with pytest.raises(SystemExit, match="--resume with changed settings"):
        auto("run", "--lr", "0.5")
    real_save = rundir.save_state

    def crash_before_saving(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(rundir, "save_state", crash_before_saving)
    for out, extra in (("crashed", ()), ("other", ("--lr", "0.5"))):
        with pytest.raises(KeyboardInterrupt):
            sft.main(sft_args(toy_paths, tmp_path / out, *extra))  # step 1 logged, nothing saved
    monkeypatch.setattr(rundir, "save_state", real_save)
    assert auto("crashed") == full and [r["step"] for r in read_metrics(tmp_path / "crashed")] == [1, 2, 3]
    with pytest.raises(SystemExit, match="already holds a run"):
        auto("other")


def test_resume_needs_state_and_the_same_settings(toy_paths, tmp_path):
    with pytest.raises(SystemExit) as e:
        grpo.main(grpo_args(toy_paths, tmp_path / "none", "--resume"))
    assert "--resume: no saved state in" in exit_message(e)
    grpo.main(grpo_args(toy_paths, tmp_path / "run", "--stop-after-steps", "1"))
    with pytest.raises(SystemExit) as e:
        grpo.main(grpo_args(toy_paths, tmp_path / "run", "--resume", "--lr", "0.5"))
    assert "--lr 1e-06 -> 0.5" in exit_message(e)
    with pytest.raises(SystemExit) as e:
        sft.main(sft_args(toy_paths, tmp_path / "run", "--resume"))  # another script's settings
    assert "changed settings" in exit_message(e)
    run_json = tmp_path / "run" / "run.json"  # as written before --grad-ckpt could change on a resume: it held the flag
    json.dump(dict(json.load(open(run_json)), grad_ckpt=True), open(run_json, "w"))
    saved = json.load(open(run_json))
    del saved["eval_format"]  # as written before --eval-format existed: that run judged pairs, the flag's default
    json.dump(saved, open(run_json, "w"))
    with pytest.raises(SystemExit) as e:
        grpo.main(grpo_args(toy_paths, tmp_path / "run", "--resume", "--eval-format", "rm-r1"))
    assert "--eval-format 'pairs' -> 'rm-r1'" in exit_message(e)
    grpo.main(grpo_args(toy_paths, tmp_path / "run", "--resume", "--save-every", "5", "--grad-ckpt", "1",  # these may change
                        "--dist-timeout", "90"))
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]
    sft.main(sft_args(toy_paths, tmp_path / "sft", "--stop-after-steps", "1"))
    saved = json.load(open(tmp_path / "sft" / "run.json"))
    del saved["family"]  # as written before sft.py had --family: it judged in its template's family, the flag's default
    json.dump(saved, open(tmp_path / "sft" / "run.json", "w"))
    sft.main(sft_args(toy_paths, tmp_path / "sft", "--resume"))
    assert [r["step"] for r in read_metrics(tmp_path / "sft")] == [1, 2, 3]


def test_a_state_saved_by_any_number_of_ranks_resumes_on_any_other(tmp_path, monkeypatch):
    # FSDP2 gives rank r rows [r c, (r + 1) c) of each tensor, c = ceil(rows / world): a state saved by 3 ranks (shards of
    # 2, 2 and 1 rows; a 1-row tensor leaves ranks 1 and 2 empty) is read by 1, 2 and 4 ranks, each taking its rows
    import torch.distributed as dist
    full = {"a": torch.randn(5, 3), "b": torch.randn(1, 2)}
    shard = lambda t, k, w: torch.tensor_split(t, [min(len(t), i * -(-len(t) // w)) for i in range(1, w)])[k]
    for k in range(3):
        moments = {n: {"step": torch.tensor(2.0), "exp_avg": shard(t, k, 3) + 1, "exp_avg_sq": shard(t, k, 3) + 2}
                   for n, t in full.items()}
        torch.save({"step": 7, "extra": {"k": k}, "rng_cpu": torch.get_rng_state(), "optim": moments,
                    "model": {n: shard(t, k, 3) for n, t in full.items()}}, tmp_path / f"rank{k}.pt")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    for world in (1, 2, 4):
        monkeypatch.setattr(dist, "get_world_size", lambda: world)
        for rank in range(world):
            model = torch.nn.ParameterDict({n: torch.zeros_like(shard(t, rank, world)) for n, t in full.items()})
            optimizer = torch.optim.AdamW(model.parameters())
            extra = {"k": rank if rank < 3 else 0}  # its own rank's, or rank 0's
            assert rundir.load_state(str(tmp_path), model, optimizer, rank) == (7, extra)
            for n, t in full.items():
                assert torch.equal(model[n].detach(), shard(t, rank, world))
                assert torch.equal(optimizer.state[model[n]]["exp_avg_sq"], shard(t, rank, world) + 2)


def test_resume_after_a_crash_truncates_metrics_to_the_saved_step(toy_paths, tmp_path, monkeypatch):
    sft.main(sft_args(toy_paths, tmp_path / "full"))
    real_save = rundir.save_state

    def crash_at_step_3(path, model, optimizer, step, rank, extra=None):
        if step == 3:
            raise KeyboardInterrupt  # killed after step 3 was logged, before its state was saved
        real_save(path, model, optimizer, step, rank, extra)

    monkeypatch.setattr(rundir, "save_state", crash_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        sft.main(sft_args(toy_paths, tmp_path / "cut"))
    assert [r["step"] for r in read_metrics(tmp_path / "cut")] == [1, 2, 3]
    monkeypatch.setattr(rundir, "save_state", real_save)
    sft.main(sft_args(toy_paths, tmp_path / "cut", "--resume"))
    full, cut = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [r["step"] for r in cut] == [1, 2, 3]  # no duplicate step 3
    assert [r["loss"] for r in cut] == [r["loss"] for r in full]


def children(pid):
    """The processes whose parent is pid (from /proc/PID/stat: the parent is the field after the name's parentheses)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):  # (one that ended since the listing)
            if int(open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def run_and_signal(cmd, out, env=None, rank=None, timeout=120):
    """Start cmd, wait for its second step in out/metrics.jsonl, then SIGTERM it (a scheduler's stop, a preemption), or
    under torchrun only the worker of that rank -> (its exit status, what it printed). Past timeout seconds (ranks that
    disagree on where to stop wait for each other for ever), every process it started is killed and the test fails."""
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics, began, workers = os.path.join(out, "metrics.jsonl"), time.monotonic(), []
    try:
        while not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 2):
            assert p.poll() is None and time.monotonic() - began < timeout, "no second step"
            time.sleep(0.01)
        workers = children(p.pid)  # torchrun's workers; their environment names their rank
        pid = p.pid if rank is None else next(w for w in workers if f"RANK={rank}" in open(f"/proc/{w}/environ").read().split("\0"))
        os.kill(pid, signal.SIGTERM)
        printed = p.communicate(timeout=timeout)[0]
        return p.returncode, printed
    except (AssertionError, subprocess.TimeoutExpired):
        for pid in [p.pid] + workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        pytest.fail(f"{cmd[-1]}: {p.communicate()[0][-3000:]}")


@pytest.mark.slow
def test_a_stop_signal_saves_the_step_in_progress_and_resume_continues_exactly(toy_paths, tmp_path):
    # SIGTERM in the middle of a run: the step in progress ends and is saved (--save-every would save only at the end),
    # and the run exits with 143 (128 + 15), as the signal would have; --resume then gives the uninterrupted run
    steps = ("--global-batch", "4", "--max-steps", "24", "--save-every", "100")
    sft.main(sft_args(toy_paths, tmp_path / "full", *steps))
    status, printed = run_and_signal([sys.executable, "sft.py", *sft_args(toy_paths, tmp_path / "cut", *steps)], tmp_path / "cut")
    cut = read_metrics(tmp_path / "cut")
    assert status == 128 + signal.SIGTERM, printed[-3000:]
    assert 2 <= len(cut) < 24 and f"stopping after step {len(cut)} (SIGTERM received); --resume continues" in printed
    assert torch.load(tmp_path / "cut" / "state" / "rank0.pt", weights_only=True)["step"] == len(cut)
    sft.main(sft_args(toy_paths, tmp_path / "cut", *steps, "--resume"))
    assert [r["loss"] for r in read_metrics(tmp_path / "cut")] == [r["loss"] for r in read_metrics(tmp_path / "full")]
    a, b = (checkpoint.load_model(str(tmp_path / run / "model")).state_dict() for run in ("full", "cut"))
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.slow
def test_a_stop_signal_to_one_rank_stops_every_rank_after_the_same_step(toy_paths, tmp_path):
    # SIGTERM to rank 1 of 2 only: rank 0 learns of it at the step's end (an all-reduce), so both save their shards of the
    # same step and stop (torchrun then reports the ranks' exits as failures: the run did not finish)
    out = tmp_path / "two"
    cmd, env = torchrun_command("sft.py", sft_args(toy_paths, out, "--global-batch", "4", "--max-steps", "24",
                                                   "--save-every", "100"))
    status, printed = run_and_signal(cmd, out, env, rank=1)
    steps = [torch.load(out / "state" / f"rank{r}.pt", weights_only=True)["step"] for r in (0, 1)]
    assert 2 <= len(read_metrics(out)) < 24 and steps == [len(read_metrics(out))] * 2, printed[-3000:]
    assert f"stopping after step {steps[0]} (SIGTERM received)" in printed


@pytest.mark.parametrize("fail_at", range(4))
def test_state_swap_survives_a_crash_at_every_step(toy_paths, tmp_path, monkeypatch, fail_at):
    """replace_dir makes 3 renames and a removal; make each one fail in turn, then resume."""
    model = checkpoint.load_model(toy_paths["init"])
    opt = training.make_optimizer(model, 1e-3, (0.9, 0.95), 0.0)
    state = str(tmp_path / "state")
    rundir.save_state(state, model, opt, 1, 0)
    calls = []
    real_rename, real_rmtree = os.rename, shutil.rmtree

    def failing(real):
        def f(*a, **k):
            calls.append(a[0])
            if len(calls) - 1 == fail_at:
                raise OSError("simulated crash")
            return real(*a, **k)
        return f

    monkeypatch.setattr(rundir.os, "rename", failing(real_rename))
    monkeypatch.setattr(rundir.shutil, "rmtree", failing(real_rmtree))
    with pytest.raises(OSError, match="simulated crash"):
        rundir.save_state(state, model, opt, 2, 0)
    monkeypatch.undo()
    rundir.recover_dir(state)
    step, _ = rundir.load_state(state, model, opt, 0)
    assert step in (1, 2) and sorted(os.listdir(tmp_path)) == ["state"]  # a whole state, no leftovers


def test_the_output_model_is_written_whole_or_not_at_all(toy_paths, tmp_path, monkeypatch):
    model = checkpoint.load_model(toy_paths["init"])
    rundir.save_checkpoint(model, str(tmp_path / "model"), 0, tokenizer=toy_paths["tokenizer"])
    before = open(tmp_path / "model" / "model.safetensors", "rb").read()
    monkeypatch.setattr(checkpoint, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        rundir.save_checkpoint(model, str(tmp_path / "model"), 0, tokenizer=toy_paths["tokenizer"])
    assert open(tmp_path / "model" / "model.safetensors", "rb").read() == before



def test_a_runs_small_files_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    # run.json, summary.json (a finished run's mark), metrics and eval.py's kept rows and scores: a write that fails before
    # its swap (a full disk, a kill) leaves the file as it was, not half of the new one
    path = str(tmp_path / "summary.json")
    rundir.write_swapped(path, json.dumps({"steps": 3}))
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        rundir.write_swapped(path, json.dumps({"steps": 4, "heldout_end": 90.0}))
    assert json.load(open(path)) == {"steps": 3}
    monkeypatch.setattr(os, "replace", replace)
    rundir.write_swapped(path, json.dumps({"steps": 4}))
    assert json.load(open(path)) == {"steps": 4} and os.listdir(tmp_path) == ["summary.json"]

# ----------------------------------------------------------------------------- divergence

def test_divergence_stops_without_saving_and_keeps_the_last_good_state(toy_paths, tmp_path):
    with pytest.raises(SystemExit) as e:
        sft.main(sft_args(toy_paths, tmp_path / "sft", "--lr", "10", "--max-steps", "8"))
    msg = exit_message(e)
    assert "non-finite" in msg and "at step" in msg
    bad_step = int(msg.split("at step ")[1].split(":")[0])
    assert not os.path.exists(tmp_path / "sft" / "model")
    model = checkpoint.load_model(toy_paths["init"])
    step, _ = rundir.load_state(str(tmp_path / "sft" / "state"), model, training.make_optimizer(model, 1, (0.9, 0.9), 0), 0)
    assert step == bad_step - 1 and all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(SystemExit) as e:
        grpo.main(grpo_args(toy_paths, tmp_path / "grpo", "--lr", "1e6", "--steps", "6"))
    assert "non-finite" in exit_message(e) and not os.path.exists(tmp_path / "grpo" / "model")


def test_a_checkpoint_with_non_finite_weights_is_refused(toy_paths, tmp_path):
    model = checkpoint.load_model(toy_paths["init"])
    shutil.copytree(toy_paths["init"], tmp_path / "nan")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    from safetensors.torch import save_file
    save_file({n: t.contiguous() for n, t in model.state_dict().items() if n != "lm_head.weight"},
              str(tmp_path / "nan" / "model.safetensors"))
    with pytest.raises(ValueError, match="'model.layers.1.mlp.up_proj.weight' has non-finite values"):
        checkpoint.load_model(str(tmp_path / "nan"))
    with pytest.raises(ValueError, match="non-finite"):
        checkpoint.save_model(model, str(tmp_path / "out"))


# ----------------------------------------------------------------------------- data routing

def test_each_trainer_refuses_the_other_stages_data(toy_paths, tmp_path):
    with pytest.raises(DataError, match="this is GRPO data"):
        read_sft_rows(toy_paths["rl"])
    with pytest.raises(DataError, match="this is SFT data"):
        load_judge_examples(toy_paths["sft"], "rm-r1")
    rl = [json.loads(line) for line in open(toy_paths["rl"])][:4]
    trace = json.loads(open(toy_paths["sft"]).readline())
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rl[:2] + [{**rl[2], "winner": "tie"}]))
    with pytest.raises(DataError, match=r"bad.jsonl:3: field 'winner' must be 'model_a' / 'model_b'"):
        load_judge_examples(str(bad), "rm-r1")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps(r) + "\n" for r in rl + [trace]))
    examples, counts = load_judge_examples(str(mixed), "rm-r1")
    assert len(examples) == 4 and counts["sft"] == 1  # the trace row is counted, not silently dropped
    rows, counts = read_sft_rows(str(mixed))
    assert len(rows) == 1 and counts["rl"] == 4
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")  # no rows at all: said so, without calling it the other stage's data
    with pytest.raises(DataError, match=r"blank.jsonl: no RL rows \(winner model_a/model_b\)$"):
        load_judge_examples(str(blank), "rm-r1")
    with pytest.raises(DataError, match=r"blank.jsonl: no SFT rows$"):
        read_sft_rows(str(blank))


def test_rm_r1_rows_rendered_for_the_other_judge_family_are_refused(toy_paths, tmp_path, monkeypatch):
    # RM-R1's RL rows come with their judge prompt rendered: instruct (the chain-of-rubrics system message) for
    # Qwen2.5-Instruct judges, reasoning (no system message) for DeepSeek-R1-Distill ones, whose template picks it
    rl = [json.loads(line) for line in open(toy_paths["rl"])][:3]
    with pytest.raises(DataError, match=r"rl.jsonl:1: an RM-R1 instruct judge prompt, but this judge's prompts are "
                                        r"reasoning ones .* pass --family instruct"):
        load_judge_examples(toy_paths["rl"], "rm-r1", "reasoning")
    reasoning = tmp_path / "reasoning.jsonl"  # the same pairs as the Reasoning prompts render them, the third as given
    ctx = [{"role": "user", "content": "What is 2 + 2?"}]
    rl[:2] = [{**row, "context_messages": judge_messages(ctx, "4", "5", "reasoning")} for row in rl[:2]]
    reasoning.write_text("".join(json.dumps(r) + "\n" for r in rl))
    with pytest.raises(DataError, match=r"reasoning.jsonl:1: an RM-R1 reasoning judge prompt, .* instruct ones"):
        load_judge_examples(str(reasoning), "rm-r1", "instruct")
    with pytest.raises(DataError, match=r"reasoning.jsonl:3: an RM-R1 instruct judge prompt"):  # each row is checked
        load_judge_examples(str(reasoning), "rm-r1", "reasoning")
    own = [{**r, "context_messages": [{"role": "user", "content": "Which answer is better?"}]} for r in rl]
    reasoning.write_text("".join(json.dumps(r) + "\n" for r in own))  # another prompt: not RM-R1's, not checked
    assert [len(load_judge_examples(str(reasoning), "rm-r1", f)[0]) for f in ("instruct", "reasoning")] == [3, 3]
    with pytest.raises(DataError, match="--family instruct"):  # grpo.py: --family (or the template) is checked
        grpo.main(grpo_args(toy_paths, tmp_path / "run", "--family", "reasoning"))
    with pytest.raises(DataError, match="--family instruct"):  # and so is its held-out set in RM-R1's format
        grpo.main(grpo_args(toy_paths, tmp_path / "run", "--family", "reasoning", "--format", "pairs", "--data",
                            toy_paths["heldout"], "--eval-data", toy_paths["rl"], "--eval-format", "rm-r1"))
    with pytest.raises(DataError, match=r"sft.jsonl:1: an RM-R1 instruct judge prompt.* --family instruct"):
        sft.main(sft_args(toy_paths, tmp_path / "sft", "--family", "reasoning"))  # sft.py: its distillation rows too
    assert read_sft_rows(toy_paths["sft"], "instruct")[0] == read_sft_rows(toy_paths["sft"])[0]
    chat = tmp_path / "chat.jsonl"  # chat rows are the user's own prompts, not checked; held-out pairs take --family
    chat.write_text("".join(json.dumps({"messages": m}) + "\n" for m in read_sft_rows(toy_paths["sft"])[0][:16]))
    families = []
    monkeypatch.setattr(sft, "load_heldout", lambda *a: families.append(a[-1]) or E.load_heldout(*a))
    sft.main(sft_args(toy_paths, tmp_path / "chat", "--family", "reasoning", "--data", str(chat), "--max-steps", "1",
                      "--eval-limit", "2", "--eval-data", toy_paths["heldout"], "--eval-max-new-tokens", "4"))
    assert families == ["reasoning"]


def test_too_few_prompts_left_says_how_many_were_dropped(toy_paths, tmp_path):
    with pytest.raises(SystemExit) as e:
        grpo.main(grpo_args(toy_paths, tmp_path / "run", "--max-prompt-len", "10"))
    n_rows = sum(1 for _ in open(toy_paths["rl"]))
    assert exit_message(e).endswith(f"0 prompts ({n_rows} dropped as longer than 10): fewer than --rollout-prompts 4")


def test_typo_in_released_prompts_is_fixed_and_counted(toy_paths, tmp_path):
    rows = [json.loads(line) for line in open(toy_paths["rl"])][:3]
    rows[1]["context_messages"][1]["content"] = "[The Start of Chabot B's Response]\nx"
    path = tmp_path / "rl.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, counts = load_judge_examples(str(path), "rm-r1")
    assert counts["typo_fixed"] == 1 and "Chatbot B's Response" in examples[1].messages[1]["content"]
    assert not any("Chabot" in m["content"] for e in examples for m in e.messages)


def test_pairs_duplicates_and_identical_answers(tmp_path):
    rows = [{"id": "a", "prompt": "q", "chosen": "x", "rejected": "y"}, {"id": "b", "prompt": "q", "chosen": "z", "rejected": "z"}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, counts = load_judge_examples(str(path), "pairs", training=True)
    assert [e.id for e in examples] == ["a"] and counts["identical"] == 1  # training: nothing to learn, skipped
    examples, counts = load_judge_examples(str(path), "pairs")
    assert [e.id for e in examples] == ["a", "b"] and counts["identical"] == 1  # benchmarks: judged as given
    path.write_text("".join(json.dumps(r) + "\n" for r in rows + [rows[0]]))
    with pytest.raises(DataError, match="id 'a' appears more than once"):
        load_judge_examples(str(path), "pairs")


def test_the_users_format_flag_wins_in_toy_mode(tmp_path):
    assert grpo.parse_args(["--data", "pairs.jsonl", "--format", "pairs"]).format == "pairs"
    assert grpo.parse_args([]).format == "rm-r1"


def test_the_toy_refuses_another_seeds_files_and_continues_an_interrupted_sft(toy_paths, tmp_path, monkeypatch, capsys):
    # the toy's files belong to the seed that made them: another seed is refused, not trained on them
    with pytest.raises(SystemExit, match=r"holds the toy task of --seed 0 .*: delete .* for --seed 1's"):
        toy.prepare(os.path.dirname(toy_paths["init"]), seed=1)
    # grpo.py's toy runs SFT first with --resume auto (an interrupted SFT goes on), and its failure ends grpo.py in a line
    calls = []
    monkeypatch.setattr(toy.subprocess, "run", lambda cmd, env: calls.append(cmd) or subprocess.CompletedProcess(cmd, 1))
    with pytest.raises(SystemExit, match=r"toy: `python sft.py` ended with exit status 1 \(its error is above\); it runs "
                                         r"in .*sft: delete that to start the toy's SFT over"):
        toy.run_sft_first(str(tmp_path / "sft" / "model"), 0, 0, "fp32")
    assert calls[0][-2:] == ["--resume", "auto"] and "no SFT checkpoint yet" in capsys.readouterr().out
    # an SFT checkpoint already there is used, and said to be of another precision where it is
    os.makedirs(tmp_path / "sft" / "model")
    (tmp_path / "sft" / "model" / "model.safetensors").write_bytes(b"")
    (tmp_path / "sft" / "run.json").write_text(json.dumps({"precision": "fp32"}))
    toy.run_sft_first(str(tmp_path / "sft" / "model"), 0, 0, "fp32")
    assert capsys.readouterr().out == "" and len(calls) == 1
    toy.run_sft_first(str(tmp_path / "sft" / "model"), 0, 0, "bf16")
    assert "toy: GRPO in bf16 starts from the SFT checkpoint in " in capsys.readouterr().out and len(calls) == 1


# ----------------------------------------------------------------------------- flags

@pytest.mark.parametrize("script,extra,flag", [
    ("sft", ("--global-batch", "0"), "--global-batch must be > 0"),
    ("sft", ("--epochs", "-1"), "--epochs must be > 0"),
    ("sft", ("--save-every", "0"), "--save-every must be > 0"),
    ("sft", ("--stop-at-accuracy", "0.78"), "--stop-at-accuracy is a percentage (78 means 78%)"),
    ("sft", ("--stop-at-accuracy", "150"), "above 1 and at most 100, got 150"),
    ("sft", ("--max-steps", "-3"), "--max-steps must be >= 0"),
    ("sft", ("--eval-limit", "-5"), "--eval-limit must be >= 0"),
    ("sft", ("--tokens-per-micro", "0"), "--tokens-per-micro must be > 0"),
    ("grpo", ("--max-new-tokens", "0"), "--max-new-tokens must be > 0"),
    ("grpo", ("--micro-seqs", "-1"), "--micro-seqs must be > 0"),
    ("grpo", ("--save-every", "-1"), "--save-every must be > 0"),
    ("grpo", ("--kl", "-0.1"), "--kl must be >= 0"),
    ("grpo", ("--temperature", "inf"), "--temperature must be > 0 and finite"),
    ("grpo", ("--lr", "nan"), "--lr must be > 0"),
    ("grpo", ("--kv-cache-frac", "5"), "--kv-cache-frac is a fraction, at most 1"),
    ("sft", ("--eval-limit", "0", "--val-data", "v.jsonl", "--stop-at-accuracy", "50"), "--eval-limit above 0"),
    ("grpo", ("--eval-every", "2"), "--eval-every 2 judges --eval-data every 2 steps: give --eval-data"),
    ("sft", ("--resume", "--overwrite"), "--resume continues the run in --out and --overwrite starts over there"),
    ("grpo", ("--resume", "auto", "--overwrite"), "give one of them"),
    ("grpo", ("--save-model-every", "-2"), "--save-model-every must be >= 0"),
    ("sft", ("--dist-timeout", "0"), "--dist-timeout must be > 0"),
    ("grpo", ("--dist-timeout", "inf"), "--dist-timeout must be > 0 and finite"),
    ("grpo", ("--resume", "later"), "--resume takes no value, or auto")])
def test_bad_flags_are_refused_before_any_work(toy_paths, tmp_path, capsys, script, extra, flag):
    main, args = (sft.main, sft_args) if script == "sft" else (grpo.main, grpo_args)
    with pytest.raises(SystemExit) as e:
        main(args(toy_paths, tmp_path / "out", *extra))
    assert e.value.code == 2 and flag in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")  # refused before anything was written


def test_eval_flags_are_refused_before_any_work(toy_paths, tmp_path, capsys):
    for extra, flag in ((("--dist-timeout", "0"), "--dist-timeout must be > 0"), (("--batch-size", "0"), "--batch-size must be > 0")):
        with pytest.raises(SystemExit) as e:
            E.main(["--judge", "longer", "--bench", "pairs", "--data", toy_paths["heldout"], "--out", str(tmp_path / "ev"), *extra])
        assert e.value.code == 2 and flag in capsys.readouterr().err and not os.path.exists(tmp_path / "ev")


# ----------------------------------------------------------------------------- errors name their file

def test_broken_files_name_the_file(toy_paths, tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"prompt": "ok", "chosen": "a", "rejected": "b"}\n{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl:2: not UTF-8"):
        list(read_jsonl(str(bad)))
    parquet = tmp_path / "train-00000-of-00001.parquet"  # a dataset as the Hub serves it: said, not "not UTF-8"
    parquet.write_bytes(b"PAR1\x15\x04\x15\x80\x01\x15\x80\x01L\x15\x02\x15\x00\x12\x00\x00")
    with pytest.raises(DataError, match=r"parquet: a Parquet file, not JSON: export it to JSON Lines"):
        list(read_jsonl(str(parquet)))
    for fmt in ("rm-bench", "rmb"):  # JSON files
        with pytest.raises(DataError, match=r"parquet: a Parquet file, not JSON: export it to JSON Lines"):
            load_judge_examples(str(parquet), fmt)
        (tmp_path / "rows.json").write_text('[["not", "an", "object"]]')  # RM-Bench's was an AttributeError
        with pytest.raises(DataError, match=r"rows.json: row 1: expected a JSON object, got list"):
            load_judge_examples(str(tmp_path / "rows.json"), fmt)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(toy_paths["init"], ckpt)
    data = open(ckpt / "model.safetensors", "rb").read()
    open(ckpt / "model.safetensors", "wb").write(data[:len(data) // 2])  # truncated
    with pytest.raises(ValueError, match=r"model.safetensors"):
        checkpoint.load_model(str(ckpt))
    open(ckpt / "config.json", "w").write('{"model_type": "qwen2", ')
    with pytest.raises(ValueError, match=r"config.json: malformed JSON"):
        checkpoint.load_model(str(ckpt))
    make_hf_checkpoint(str(tmp_path / "sharded"), "qwen2-sharded")
    index = json.load(open(tmp_path / "sharded" / "model.safetensors.index.json"))
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../elsewhere.safetensors"
    json.dump(index, open(tmp_path / "sharded" / "model.safetensors.index.json", "w"))
    with pytest.raises(ValueError, match=r"shard '../elsewhere.safetensors' is not a file name inside"):
        checkpoint.load_model(str(tmp_path / "sharded"))
    tok = tmp_path / "tok"
    shutil.copytree(toy_paths["tokenizer"], tok)
    open(tok / "tokenizer_config.json", "w").write('{"chat_template": ')
    with pytest.raises(DataError, match=r"tokenizer_config.json: malformed JSON"):
        load_tokenizer(str(tok))
    open(tok / "tokenizer_config.json", "w").write('["chat_template"]')  # valid JSON, not an object
    with pytest.raises(DataError, match=r"tokenizer_config.json: expected a JSON object, got list"):
        load_tokenizer(str(tok))
    open(tmp_path / "rmb.json", "w").write('{"conversation_input": []}')  # a benchmark file holds a list of rows
    with pytest.raises(DataError, match=r"rmb.json: expected a JSON list of rows, got dict"):
        load_judge_examples(str(tmp_path / "rmb.json"), "rmb")


def test_a_tokenizer_larger_than_the_embedding_is_refused(toy_paths, tmp_path):
    tok = load_tokenizer(toy_paths["tokenizer"])
    make_hf_checkpoint(str(tmp_path / "small"), vocab_size=tok.vocab_size - 10)
    with pytest.raises(SystemExit) as e:
        sft.main(sft_args(toy_paths, tmp_path / "out", "--model", str(tmp_path / "small")))
    assert f"has {tok.vocab_size} tokens, more than the {tok.vocab_size - 10} rows" in exit_message(e)


# ----------------------------------------------------------------------------- evaluation outputs

def _pairs(tmp_path, n=6):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"q{i}", "chosen": "a" * (i + 2), "rejected": "b"}) + "\n"
                            for i in range(n)))
    return str(path)


def test_an_eval_directory_belongs_to_one_judge(tmp_path):
    data = _pairs(tmp_path)
    out = str(tmp_path / "out")
    assert E.main(["--judge", "longer", "--bench", "pairs", "--data", data, "--out", out])["overall"] == 100
    with pytest.raises(SystemExit) as e:
        E.main(["--judge", "shorter", "--bench", "pairs", "--data", data, "--out", out])
    assert "holds outputs of another judge or setting" in exit_message(e) and "'longer' -> 'shorter'" in exit_message(e)
    assert E.main(["--judge", "shorter", "--bench", "pairs", "--data", data, "--out", out, "--overwrite"])["overall"] == 0


def test_a_corrupt_output_line_keeps_the_rows_around_it(tmp_path, capsys):
    data = _pairs(tmp_path)
    out = tmp_path / "out"
    E.main(["--judge", "longer", "--bench", "pairs", "--data", data, "--out", str(out)])
    lines = open(out / "outputs.jsonl").read().splitlines()
    lines[2] = lines[2][:15]  # one damaged row in the middle
    open(out / "outputs.jsonl", "w").write("\n".join(lines) + "\n")
    capsys.readouterr()
    scores = E.main(["--judge", "longer", "--bench", "pairs", "--data", data, "--out", str(out)])
    printed = capsys.readouterr().out
    assert "corrupt line(s) [3]" in printed and "5 already judged" in printed
    assert scores["judged"] == 6 and scores["overall"] == 100


def test_one_line_errors_only_for_our_own_checks(tmp_path, capsys, monkeypatch):
    # bad input found by this project's checks: one line naming the file; a ValueError raised inside a library
    # (a bug, or an input nobody checked) keeps its traceback
    with pytest.raises(SystemExit, match=r"error: .*missing\.jsonl: no such file"):
        training.cli(lambda: load_judge_examples(str(tmp_path / "missing.jsonl"), "pairs"))
    with pytest.raises(json.JSONDecodeError):
        training.cli(lambda: json.loads("{"))
    with pytest.raises(SystemExit) as e:  # Ctrl-C: a line and the shell's status for it, not a traceback
        training.cli(lambda: (_ for _ in ()).throw(KeyboardInterrupt))
    assert e.value.code == 130 and ": interrupted; what it saved before is kept" in capsys.readouterr().err
    monkeypatch.setenv("LOCAL_RANK", "1")  # under torchrun every rank gets the terminal's Ctrl-C: the first one says it
    with pytest.raises(SystemExit) as e:
        training.cli(lambda: (_ for _ in ()).throw(KeyboardInterrupt))
    assert e.value.code == 130 and capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- nothing lost, nothing reused

def test_overwrite_never_deletes_the_checkpoint_it_reads(toy_paths, tmp_path):
    sft.main(sft_args(toy_paths, tmp_path / "run"))
    with pytest.raises(SystemExit) as e:  # the run's own output as --model, into the same --out
        sft.main(sft_args(toy_paths, tmp_path / "run", "--model", str(tmp_path / "run" / "model"), "--overwrite"))
    assert "--model" in exit_message(e) and "which --overwrite would delete" in exit_message(e)
    assert checkpoint.load_model(str(tmp_path / "run" / "model"))  # still there, whole


def test_resume_checks_the_inputs_contents_not_only_their_paths(toy_paths, tmp_path):
    data = tmp_path / "rl.jsonl"
    shutil.copy(toy_paths["rl"], data)
    grpo.main(grpo_args(toy_paths, tmp_path / "run", "--data", str(data), "--stop-after-steps", "1"))
    rows = open(data).read().splitlines(True)
    open(data, "w").writelines(rows[:3] + [rows[4], rows[3]] + rows[5:])  # same path, same size, two rows swapped
    with pytest.raises(SystemExit) as e:
        grpo.main(grpo_args(toy_paths, tmp_path / "run", "--data", str(data), "--resume"))
    assert f"--data {data}: its contents changed" in exit_message(e)


def test_a_fingerprint_sees_an_edit_in_the_middle_of_a_large_file(tmp_path):
    big = tmp_path / "weights.safetensors"
    data = bytearray(5 * 2**20)
    big.write_bytes(bytes(data))
    before = rundir.fingerprint(str(tmp_path))
    data[len(data) // 2] = 1  # size, first and last MiB unchanged
    big.write_bytes(bytes(data))
    assert rundir.fingerprint(str(tmp_path)) != before



def test_each_input_is_hashed_once_and_a_missing_one_not_at_all(tmp_path, monkeypatch):
    # --tokenizer defaults to --model (the trainers, eval.py's --judge): a 7B checkpoint's weights are hashed once
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    (tmp_path / "data.jsonl").write_text("{}\n")
    hashed, fingerprint = [], rundir.fingerprint
    monkeypatch.setattr(rundir, "fingerprint", lambda path: hashed.append(path) or fingerprint(path))
    ckpt, data = str(tmp_path / "ckpt"), str(tmp_path / "data.jsonl")
    prints = rundir.fingerprint_inputs({"model": ckpt, "tokenizer": ckpt, "data": data, "eval_data": str(tmp_path / "no")})
    assert sorted(hashed) == sorted([ckpt, data])
    assert prints == {"model": fingerprint(ckpt), "tokenizer": fingerprint(ckpt), "data": fingerprint(data)}

def test_resume_of_a_finished_run_changes_nothing(toy_paths, tmp_path, capsys):
    summary = sft.main(sft_args(toy_paths, tmp_path / "run"))
    before = {f: open(tmp_path / "run" / f).read() for f in ("summary.json", "metrics.jsonl", "run.json")}
    assert sft.main(sft_args(toy_paths, tmp_path / "run", "--resume")) == summary
    assert "finished already" in capsys.readouterr().out
    assert {f: open(tmp_path / "run" / f).read() for f in before} == before
    assert json.load(open(tmp_path / "run" / "summary.json"))["final_loss"] is not None


def test_system_errors_are_one_line_naming_the_path(toy_paths, tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit, match="--out .*afile is a file, not a directory"):
        sft.main(sft_args(toy_paths, tmp_path / "afile"))
    with pytest.raises(SystemExit, match=r"error: .*0: a directory; give one of its JSONL files \(it has none\)"):  # as --data
        training.cli(lambda: sft.main(sft_args(toy_paths, tmp_path / "out1", "--data", str(tmp_path))))
    read_only = lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied", str(tmp_path / "ro")))
    with monkeypatch.context() as m:  # a read-only --out (root ignores file modes, so the OS's refusal is simulated)
        m.setattr(rundir.os, "makedirs", read_only)
        with pytest.raises(SystemExit, match=r"error: \[Errno 13\] Permission denied: .*ro'"):
            training.cli(lambda: sft.main(sft_args(toy_paths, tmp_path / "ro")))
    full = OSError(28, "No space left on device")  # the disk fills while the state is saved: one line, nothing half-written
    monkeypatch.setattr(rundir.torch, "save", lambda obj, f: (_ for _ in ()).throw(OSError(28, full.strerror, f)))
    with pytest.raises(SystemExit, match=r"error: \[Errno 28\] No space left on device: .*rank0.pt"):
        training.cli(lambda: sft.main(sft_args(toy_paths, tmp_path / "out2")))
    assert not os.path.exists(tmp_path / "out2" / "state")


def test_eval_scores_nothing_while_a_prompt_has_no_output_row(tmp_path, monkeypatch):
    # every prompt gets a row (a verdict, or unparsed and wrong): outputs with a gap (one prompt's row never written, as
    # a rank on another node's disk would leave them) are not scored over fewer prompts; the same command then judges it
    data, out = _pairs(tmp_path), str(tmp_path / "out")
    real = E.judge_into
    monkeypatch.setattr(E, "judge_into", lambda f, args, model, tokenizer, mine, *rest: real(f, args, model, tokenizer,
                                                                                           mine[:-1], *rest))
    with pytest.raises(SystemExit) as e:
        E.main(["--judge", "longer", "--bench", "pairs", "--data", data, "--out", out])
    assert f"1 of 6 prompts have no row in the outputs in {out}: nothing is scored" in exit_message(e)
    assert not os.path.exists(os.path.join(out, "scores.json"))
    monkeypatch.undo()
    scores = E.main(["--judge", "longer", "--bench", "pairs", "--data", data, "--out", out])
    assert scores["judged"] == 6 and scores["overall"] == 100


def test_eval_never_reuses_verdicts_it_cannot_attribute(tmp_path, capsys):
    data, out = _pairs(tmp_path), tmp_path / "out"
    E.main(["--judge", "longer", "--bench", "pairs", "--data", data, "--out", str(out)])
    os.remove(out / "run.json")  # outputs whose judge is unknown
    with pytest.raises(SystemExit) as e:
        E.main(["--judge", "shorter", "--bench", "pairs", "--data", data, "--out", str(out)])
    assert "no run.json" in exit_message(e)
    assert E.main(["--judge", "shorter", "--bench", "pairs", "--data", data, "--out", str(out), "--overwrite"])["overall"] == 0
    open(out / "run.json", "w").write("{")  # corrupt
    with pytest.raises(SystemExit, match=r"run.json is unreadable"):
        E.main(["--judge", "shorter", "--bench", "pairs", "--data", data, "--out", str(out)])


def test_a_tied_config_with_a_different_head_in_the_file_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    make_hf_checkpoint(str(tmp_path), "qwen2-tied")
    file = str(tmp_path / "model.safetensors")
    tensors = load_file(file)
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()}, file, metadata={"format": "pt"})
    checkpoint.load_model(str(tmp_path))  # an equal copy of the head loads
    save_file({**tensors, "lm_head.weight": torch.zeros_like(tensors["model.embed_tokens.weight"])}, file,
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'lm_head.weight' differs .* tie_word_embeddings"):
        checkpoint.load_model(str(tmp_path))


def test_prompts_past_the_judges_context_are_judged_with_a_warning(toy_paths, tmp_path, capsys):
    # the toy's model with a context of 64 positions: its judge prompts (over 64 tokens) pass it
    judge = tmp_path / "judge"
    shutil.copytree(toy_paths["init"], judge)
    cfg = json.load(open(judge / "config.json"))
    json.dump({**cfg, "max_position_embeddings": 64}, open(judge / "config.json", "w"))
    E.main(["--judge", str(judge), "--tokenizer", toy_paths["tokenizer"], "--bench", "pairs", "--data",
            toy_paths["heldout"], "--out", str(tmp_path / "out"), "--limit", "2", "--max-new-tokens", "4"])
    assert "2 prompts plus --max-new-tokens 4 pass the judge's context of 64 positions" in capsys.readouterr().out


def test_eval_limit_zero_says_nothing_is_judged(toy_paths, tmp_path, capsys):
    grpo.main(grpo_args(toy_paths, tmp_path / "run", "--steps", "1", "--eval-data", toy_paths["heldout"], "--eval-limit", "0"))
    assert "--eval-limit 0: " + toy_paths["heldout"] + " is not judged" in capsys.readouterr().out
