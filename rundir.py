"""
rundir.py: what a training run writes, and how it resumes (sft.py and grpo.py; eval.py uses its fingerprints).

  RunDir          a run directory: run.json (the settings), metrics.jsonl, rollouts.jsonl (grpo.py's logged groups),
                  state/ (resumable), model/ (the output), models/step-N/ (--save-model-every). It refuses to clobber
                  another run, checks a resume's settings and inputs' contents (fingerprint), checks before any work
                  that every rank reads the same inputs and sees the directory (check_same_inputs, check_shared) and
                  that its disk holds the run's saves (check_disk), keeps the logs, saves after each step what is due
                  (save), and stops a run in time (--stop-after-minutes) or, saved, on a stop signal (SIGTERM,
                  SIGUSR1: training.cli notes it)
  save/load_state each rank's shards of weights and AdamW moments; any number of ranks resumes them
  save_checkpoint the output model and tokenizer, in the Hugging Face layout
  replace_dir     every save is written beside the old copy and swapped in by renames; recover_dir finishes a swap a
                  crash interrupted, so a crash at any instant leaves one complete copy; write_swapped does the same
                  for one small file (run.json, summary.json, the JSONL logs cut back; eval.py's kept rows and scores)

A saved state is 12 bytes a parameter over all ranks (fp32 weights and AdamW's two fp32 moments, whatever the compute
precision), plus the step and RNG; the output model is in its save dtype (2 bytes a parameter in bf16). Each is written
before its old copy is removed, so the disk needs room for one more of each.
"""
import hashlib
import itertools
import json
import math
import os
import random
import shutil
import signal
import socket
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import model as M
from training import all_reduce_max, all_reduce_sum, barrier, catch_stop_signals, end_distributed, local_tensor, stop_request

# flags that only say when to stop, how often to save, or how fast to run: a resume may change them
RESUME_MAY_CHANGE = {"resume", "overwrite", "stop_after_steps", "stop_after_minutes", "save_every", "compile", "grad_ckpt",
                     "eval_every", "val_every", "kv_page_size", "offload", "rollout_tp", "save_model_every", "log_rollouts",
                     "dist_timeout"}
INPUTS = ("model", "tokenizer", "data", "eval_data", "val_data")  # flags naming files a run reads: --resume checks contents
# flags added after runs began to be saved, with the default that does what the code did before them: a run.json
# without one ran that way, so --resume at that default continues it (add each new flag here)
ADDED_FLAG_DEFAULTS = {"eval_format": "pairs", "family": None}  # (family: sft.py's; grpo.py always had it)
clock = time.monotonic  # RunDir's clock for --stop-after-minutes (tests replace it)


def fingerprint(path):
    """sha256 of a file's bytes, or of a directory's weight, JSON and data files (names and bytes): any edit, anywhere in
    a file, changes it. About 10 s for 15 GB of weights, once per run start."""
    files = [path] if os.path.isfile(path) else sorted(os.path.join(d, f) for d, _, fs in os.walk(path, followlinks=True)
                                                       for f in fs if f.endswith((".json", ".jsonl", ".gz", ".safetensors", ".jinja")))
    h = hashlib.sha256()
    for file in files:
        h.update(os.path.relpath(file, path).encode())
        with open(file, "rb") as f:
            while chunk := f.read(2**24):
                h.update(chunk)
    return "sha256:" + h.hexdigest()[:16]


def fingerprint_inputs(paths):
    """{flag: path} -> {flag: fingerprint} of the paths that exist, each path hashed once (--tokenizer is often --model:
    a 7B checkpoint's weights take about 10 s)."""
    hashed = {p: fingerprint(p) for p in set(paths.values()) if os.path.exists(p)}
    return {k: hashed[p] for k, p in paths.items() if p in hashed}


class RunDir:
    """A run directory: run.json (the settings), metrics.jsonl, state/ (resumable), model/ (the output) and models/ (kept
    ones). A new run refuses a directory that holds another run's files unless --overwrite; --resume needs the saved
    state and the same settings (RESUME_MAY_CHANGE aside), truncates metrics to the resumed step, and finishes a state
    swap a crash interrupted; --resume auto resumes what there is, else starts. The trainers call, in order: start,
    check_disk, open_metrics, then log and save each step, and stopped_early if the run stops before its last."""

    def __init__(self, out, args, rank, script, device):
        self.out, self.rank, self.script, self.device = out, rank, script, device
        self.started, self.minutes, self.stopping, self.longest_save = clock(), args.stop_after_minutes, False, 0.0
        self.stop_signal, self.state_saved = 0, False  # the signal a run stops on (log); whether this run saved a state
        self.model_path, self.save_dtype, self.tokenizer = args.model, args.save_dtype, args.tokenizer
        self.state_every, self.model_every = args.save_every, args.save_model_every
        self.state, self.metrics_path = os.path.join(out, "state"), os.path.join(out, "metrics.jsonl")
        self.rollouts_path = os.path.join(out, "rollouts.jsonl")  # grpo.py's logged groups
        self.settings = {k: v for k, v in sorted(vars(args).items()) if k not in RESUME_MAY_CHANGE}
        self.inputs = {k: v for k, v in self.settings.items() if k in INPUTS and v}

    def start(self, resume, overwrite):
        """Check the directory (every rank), then prepare it (rank 0). Call before any training work. resume: True, False
        or "auto" (resume if there is a saved state or a finished run, else start; a start that ended before its first
        save, with these settings, starts over). Sets self.resuming. -> the summary of a finished run that --resume
        finds (nothing left to do), else None."""
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise SystemExit(f"{self.script}: --out {self.out} is a file, not a directory")
        # a run.json alone is a run that stopped before its first step (bad data, say): not worth protecting
        ours = [f for f in ("metrics.jsonl", "rollouts.jsonl", "state", "state.new", "state.old", "model", "models", "summary.json")
                if os.path.exists(os.path.join(self.out, f))]
        self.fingerprints = fingerprint_inputs(self.inputs)
        check_same_inputs({f"--{k.replace('_', '-')} {v}": self.fingerprints.get(k) for k, v in self.inputs.items()},
                          self.rank, self.device, self.script)
        if resume == "auto":
            resume, again = self._auto(ours)
            overwrite = overwrite or again
        under = lambda path, top: os.path.commonpath([os.path.realpath(path), os.path.realpath(top)]) == os.path.realpath(top)
        inside = [f"--{k.replace('_', '-')} {v}" for k, v in self.inputs.items() for f in ours if under(v, os.path.join(self.out, f))]
        if overwrite and inside:
            raise SystemExit(f"{self.script}: {', '.join(inside)} lies inside {self.out}, which --overwrite would delete "
                             "before reading it: copy it elsewhere first, or use another --out")
        self.resuming = bool(resume)
        if resume and os.path.exists(os.path.join(self.out, "summary.json")):
            self._check_settings()
            return read_json_file(os.path.join(self.out, "summary.json"), self.script)
        if resume:
            recovered = recover_dir(self.state) if self.rank == 0 else None
            barrier()
            if recovered:
                print(recovered)
            if not os.path.exists(self.state):
                raise SystemExit(f"{self.script}: --resume: no saved state in {self.state}")
            self._check_settings()
        elif ours and not overwrite:
            raise SystemExit(f"{self.script}: {self.out} already holds a run ({', '.join(ours)}): pass --resume to continue "
                             "it, --overwrite to start over there, or another --out")
        barrier()  # every rank has looked before rank 0 changes anything
        if self.rank == 0 and not resume:
            for f in ours:
                p = os.path.join(self.out, f)
                shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
            os.makedirs(self.out, exist_ok=True)
            write_swapped(os.path.join(self.out, "run.json"), json.dumps({**self.settings, "inputs": self.fingerprints}, indent=2))
        barrier()
        check_shared(self.out, self.rank, self.device, self.script)
        return None

    def _auto(self, ours):
        """--resume auto -> (resume, start over), rank 0's reading of --out: resume a saved state (a swap a crash
        interrupted counts) or a finished run; start over where it holds only this run's files from before a first save."""
        found = any(os.path.exists(os.path.join(self.out, f)) for f in ("state", "state.new", "state.old", "summary.json"))
        again = not found and bool(ours) and os.path.exists(os.path.join(self.out, "run.json")) and not self._changed_settings()
        return tuple(bool(x) for x in rank0s([found, again], self.rank, self.device))

    def kept_models(self, total):  # --save-model-every: the steps whose model is kept (the last step's is model/)
        return range(self.model_every, total, self.model_every) if self.model_every else range(0)

    def kept(self, step):  # where --save-model-every keeps a step's model
        return os.path.join(self.out, "models", f"step-{step}")

    def check_disk(self, total):
        """Call before loading. A save writes a state (12 bytes a parameter) beside the one --out holds, and removes the
        old one only after; the run ends by writing the model (in --save-dtype), and --save-model-every keeps one every
        N steps. A disk without room for them would fail at a save, after hours of steps: refused now, with the
        figures. Other writers to the disk are not foreseen."""
        cfg = checkpoint.load_config(self.model_path)
        params = M.num_params(cfg)
        save_dtype = getattr(torch, self.save_dtype) if self.save_dtype else checkpoint.saved_dtype(cfg)
        models = 1 + sum(not os.path.exists(self.kept(s)) for s in self.kept_models(total))  # not written yet
        need = params * (12 + models * save_dtype.itemsize)
        free = rank0s([shutil.disk_usage(self.out).free if self.rank == 0 else 0], self.rank, self.device)[0]
        if need > free:
            raise SystemExit(f"{self.script}: --out {self.out}: the run's saves need {need / 1e9:.3g} GB ({params / 1e9:.2f}B"
                             f" parameters: 12 bytes each for the training state, {save_dtype.itemsize} for each of {models}"
                             f" model(s) in {str(save_dtype).replace('torch.', '')}), and its disk has {free / 1e9:.3g} GB "
                             "free: free some space, or use another --out")

    def _changed_settings(self):  # run.json's settings against these -> what changed (RESUME_MAY_CHANGE aside)
        file = os.path.join(self.out, "run.json")
        try:
            saved = json.load(open(file))
        except (OSError, json.JSONDecodeError):
            raise SystemExit(f"{self.script}: --resume: cannot check the settings, {file} is missing or unreadable") from None
        saved_inputs = saved.pop("inputs", {}) if isinstance(saved, dict) else {}
        keys = sorted((set(saved) | set(self.settings)) - RESUME_MAY_CHANGE)  # an older run.json may hold such a flag
        was = lambda k: saved.get(k, ADDED_FLAG_DEFAULTS.get(k, "(unset)"))
        changed = [f"--{k.replace('_', '-')} {was(k)!r} -> {self.settings.get(k, '(unset)')!r}"
                   for k in keys if was(k) != self.settings.get(k, "(unset)")]
        return changed + [f"--{k.replace('_', '-')} {self.inputs[k]}: its contents changed ({saved_inputs.get(k)} -> {v})"
                          for k, v in self.fingerprints.items() if saved_inputs.get(k) not in (None, v)]

    def _check_settings(self):
        if changed := self._changed_settings():
            raise SystemExit(f"{self.script}: --resume with changed settings ({'; '.join(changed)}); the saved run in "
                             f"{self.out} used the old ones. Resume with them, or start a new --out")

    def open_metrics(self, step, total):
        """metrics.jsonl and rollouts.jsonl (grpo.py) for appending, keeping only the steps <= step (a resume drops what came
        after). The steps start, and a stop signal now stops the run after the step in progress, saved
        (training.catch_stop_signals), until the last."""
        self.total, self.step_started, self.longest_step, self.state_step = total, clock(), 0.0, step  # (state/'s step)
        catch_stop_signals(step < total)
        self.rollouts = None  # opened at the first rows logged (sft.py logs none)
        if self.rank == 0:
            keep_steps(self.metrics_path, step)
            keep_steps(self.rollouts_path, step)
            self.metrics = open(self.metrics_path, "a")

    def log(self, rec, bar, rollouts=(), **postfix):
        """One step's record to metrics.jsonl and its rollouts' rows (grpo.py) to rollouts.jsonl (flushed: a crash keeps
        them), and the progress bar (rank 0). Then whether the run stops here, saving (self.stopping): after a stop signal
        (cli), or when --stop-after-minutes says so."""
        if self.rank == 0:
            if rollouts and self.rollouts is None:
                self.rollouts = open(self.rollouts_path, "a")
            for file, rows in ((self.metrics, [rec]), (self.rollouts, rollouts)):
                if rows:
                    file.writelines(json.dumps(row) + "\n" for row in rows)
                    file.flush()
            bar.set_postfix(**postfix)
            bar.update(1)
        ends = 0.0
        if self.minutes:  # --stop-after-minutes: would another step and a save (the longest of each so far) end past?
            now = clock()
            self.longest_step, self.step_started = max(self.longest_step, now - self.step_started), now
            ends = now - self.started + self.longest_step + self.longest_save
        # the latest clock and any rank's signal, so every rank stops at the same step (a signal may reach one rank first)
        ends, signum = all_reduce_max([ends, float(stop_request["signal"])], self.device)
        late = bool(self.minutes) and ends > 60 * self.minutes
        self.stopping = (late or signum > 0) and rec["step"] < self.total
        self.stop_signal = int(signum) if self.stopping else 0
        if self.stopping and self.rank == 0:  # the trainer saves and stops
            why = (f"{signal.Signals(self.stop_signal).name} received" if self.stop_signal else  # (late: now was read)
                   f"{(now - self.started) / 60:.1f} minutes, --stop-after-minutes {self.minutes:g}")
            bar.write(f"{self.script}: stopping after step {rec['step']} ({why}); --resume continues")

    def save(self, model, optimizer, step, total, stop_at, extra=None):
        """After each step (every rank): the model in Hugging Face layout if --save-model-every keeps this step's, then
        the resumable state (save_state into state/) every --save-every steps and when the run stops here. In that
        order: a crash between the two runs the step again and writes its model again. Timed: --stop-after-minutes keeps
        room for the longest save so far, and a step's time leaves its saves out; with it, the state is also saved after
        the first step (of a run, or of a resume), so that there is a save to measure before the limit draws near."""
        keep = step in self.kept_models(total)
        state_due = step % self.state_every == 0 or step == stop_at or self.stopping or (self.minutes and not self.state_saved)
        if not (keep or state_due):
            return
        began = clock()
        if keep:
            save_checkpoint(model, self.kept(step), self.rank, self.save_dtype, self.tokenizer)
        if state_due:
            save_state(self.state, model, optimizer, step, self.rank, extra)
            self.state_saved, self.state_step = True, step
        self.step_started = clock()
        self.longest_save = max(self.longest_save, self.step_started - began)
        if step == stop_at or self.stopping:  # the steps end: a stop signal from here on ends the process at once
            catch_stop_signals(False)

    def cut_short(self, model, optimizer, step, extra=None):
        """A stop signal gave up the step after `step` before it changed anything (every rank agreeing: grpo.py's
        rollout or log-prob passes): save `step`'s state as a step that stops on a signal does, unless state/ holds it (or step is 0)."""
        self.stopping, self.stop_signal = True, int(all_reduce_max([float(stop_request["signal"])], self.device)[0])
        if self.rank == 0:
            tqdm.write(f"{self.script}: {signal.Signals(self.stop_signal).name} received: step {step + 1} given up before "
                       f"it changed anything, stopping after step {step}; --resume continues")  # (under the progress bar)
        if step != self.state_step:  # (a save takes time the signal's sender may not give)
            save_state(self.state, model, optimizer, step, self.rank, extra)
        catch_stop_signals(False)

    def stopped_early(self, summary):
        """The end of a run stopped before its last step (--stop-after-steps, --stop-after-minutes, a stop signal), its
        state saved: every rank leaves the group -> summary. A stop signal's run exits as the signal would have (status
        128 + its number), so a job script sees that it did not finish."""
        if not self.stopping and self.rank == 0:  # (a signal or --stop-after-minutes said why as it stopped)
            print(f"{self.script}: stopped after step {summary['steps']} of {self.total} (--stop-after-steps); "
                  "--resume continues")
        end_distributed()
        if self.stop_signal:
            raise SystemExit(128 + self.stop_signal)
        return summary


def keep_steps(path, step):
    """Cut a run's JSONL log (rows with a "step"), if there is one, back to the rows of steps <= step: a resume drops
    what came after the saved step. Swapped in whole: a crash here loses no row."""
    if os.path.exists(path):
        write_swapped(path, "".join(line for line in open(path) if line.strip() and json.loads(line)["step"] <= step))


def check_shared(out, rank, device, script):
    """Every rank writes into --out (a trainer's state shards, which rank 0 swaps in; eval.py's outputs, which rank 0
    scores): with ranks on several nodes it must be one directory they all see. A node-local path (the same name on
    each node's own disk) would leave the other nodes' files where no resume or score finds them; it is refused before
    any work. Rank 0 writes a file of a random name, and every rank looks for it."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1:
        return
    token = int(rank0s([random.SystemRandom().getrandbits(52) if rank == 0 else 0], rank, device)[0])
    probe = os.path.join(out, f".rank0-{token:x}")
    if rank == 0:
        open(probe, "w").close()
    barrier()
    blind = ranks_where([not os.path.exists(probe)], rank, device)[0]
    if rank == 0:
        os.remove(probe)
    barrier()
    if blind:
        raise SystemExit(f"{script}: --out {out}: rank(s) {blind} of {world} do not see the files rank 0 writes there "
                         f"(this is rank {rank} on {socket.gethostname()}): every rank writes into --out, so it must be a "
                         "directory all nodes share")


def check_same_inputs(fingerprints, rank, device, script):
    """Every rank reads its inputs itself (its shards of the model, the data): a copy on one node's disk that differs from
    rank 0's (a stale checkpoint, say) would train or judge with a mix of two models or two data sets, silently. It is
    refused, naming the input and the ranks. fingerprints: {what: fingerprint, or None where missing}, alike in order."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world == 1 or not fingerprints:
        return
    # each digest as two 32-bit numbers (exact in the collectives' fp64), against rank 0's
    halves = [[int(f[7:15], 16), int(f[15:23], 16)] if f else [-1, -1] for f in fingerprints.values()]
    rank0 = rank0s([h for pair in halves for h in pair], rank, device)
    differ = ranks_where([pair != rank0[2 * i:2 * i + 2] for i, pair in enumerate(halves)], rank, device)
    bad = [f"{what} (rank(s) {ranks})" for what, ranks in zip(fingerprints, differ) if ranks]
    if bad:
        raise SystemExit(f"{script}: an input differs from rank 0's copy on other ranks, or is missing there: "
                         f"{'; '.join(bad)} (this is rank {rank} on {socket.gethostname()}): every rank must read the same "
                         "files")


def rank0s(values, rank, device):  # rank 0's list of numbers, on every rank (the same length on each)
    return all_reduce_max([v if rank == 0 else -math.inf for v in values], device)


def ranks_where(conditions, rank, device):
    """Each rank's list of booleans (the same length on each) -> for each, the ranks where it holds ("1, 3"; "" if none)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    held = all_reduce_sum([float(r == rank and c) for c in conditions for r in range(world)], device)
    return [", ".join(str(r) for r in range(world) if held[i * world + r]) for i in range(len(conditions))]


def done_already(out, summary, rank):
    """--resume on a run that finished: nothing to do, and nothing rewritten. -> its summary."""
    if rank == 0:
        print(f"{out} finished already (its summary.json: {json.dumps(summary)}): nothing to resume")
    end_distributed()
    return summary


def read_json_file(path, script):
    """A JSON file this project wrote (run.json, summary.json) -> its contents, or a one-line error naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"{script}: {path} is unreadable ({str(e)[:100]}): move it aside, or use another --out") from None


def write_swapped(path, text):
    """Write a file beside path, then swap it in (os.replace is atomic): a crash at any instant leaves the old file or
    the new one whole, never half of one (run.json, summary.json, metrics, eval.py's kept rows and scores)."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def save_state(path, model, optimizer, step, rank, extra=None):
    """This rank's shards of weights and AdamW moments + step + RNG, as plain tensors (loadable with
    weights_only=True). Every rank writes into path.tmp; rank 0 then swaps it in (replace_dir), so a
    crash at any instant leaves one complete state."""
    tmp = f"{path}.tmp"
    if rank == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)
    barrier()
    os.makedirs(tmp, exist_ok=True)
    params = dict(model.named_parameters())
    state = {"step": step, "rng_cpu": torch.get_rng_state(), "extra": extra or {},
             "model": {n: local_tensor(p.detach()).clone() for n, p in params.items()},
             "optim": {n: {k: local_tensor(v).clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
                       for n, p in params.items() if p in optimizer.state}}
    state["rng_cuda"] = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    torch.save(state, os.path.join(tmp, f"rank{rank}.pt"))
    barrier()
    if rank == 0:
        replace_dir(tmp, path)
    barrier()


def load_state(path, model, optimizer, rank):
    """-> (step, extra). Weights go into this rank's shards; AdamW's state through optimizer.load_state_dict, which puts
    `step` where the optimizer needs it (on the parameter's device for fused AdamW). Any number of ranks may resume: the
    rank files are memory-mapped and a rank reads, of each saved tensor (its shards in rank order), the rows FSDP2 gives
    it (torch.chunk on dim 0): with as many ranks as saved, exactly its own file's."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    saved_world = len([f for f in os.listdir(path) if f.startswith("rank") and f.endswith(".pt")]) or 1
    states = []
    for file in [os.path.join(path, f"rank{k}.pt") for k in range(saved_world)]:
        try:  # weights only: never unpickle arbitrary objects
            states.append(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:
            raise SystemExit(f"{file}: unreadable training state ({str(e)[:150]})") from None
    state = states[rank if rank < saved_world else 0]  # this rank's step, RNG and extra
    params = dict(model.named_parameters())
    if set(state["model"]) != set(params):
        raise SystemExit(f"{path}: saved parameters do not match the model ({len(state['model'])} vs {len(params)})")

    def part(name, get):  # this rank's rows of the saved tensor whose shards are get(each rank's state)
        shards, here = [get(s) for s in states], local_tensor(params[name])
        starts = list(itertools.accumulate(map(len, shards), initial=0))  # each saved shard's first row, then the total
        lo = rank * -(-starts[-1] // world)  # FSDP2's rows per rank: ceil(rows / world)
        saved = torch.cat([t[max(lo - a, 0):max(lo + len(here) - a, 0)] for t, a in zip(shards, starts)])
        if saved.shape != here.shape:
            raise SystemExit(f"{path}: tensor {name!r}: the saved state has {starts[-1]} rows in {saved_world} shard(s), "
                             f"this rank's shard of the model is {list(here.shape)} (another model?)")
        return saved
    with torch.no_grad():
        for n, p in params.items():
            saved = part(n, lambda s: s["model"][n])
            if not torch.isfinite(saved).all():
                raise SystemExit(f"{path}: tensor {n!r} has non-finite values")
            local_tensor(p).copy_(saved)
    index = {id(p): i for i, p in enumerate(optimizer.param_groups[0]["params"])}
    optim = {index[id(params[n])]: {k: (_local_like(params[n], part(n, lambda s: s["optim"][n][k])) if k != "step" else v)
                                    for k, v in moments.items()} for n, moments in state["optim"].items()}
    optimizer.load_state_dict({"state": optim, "param_groups": optimizer.state_dict()["param_groups"]})
    torch.set_rng_state(state["rng_cpu"])
    if state.get("rng_cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng_cuda"])
    return state["step"], state["extra"]


def _local_like(param, saved):
    t = torch.zeros_like(param)
    local_tensor(t).copy_(saved)
    return t


def save_checkpoint(model, path, rank, save_dtype=None, tokenizer=None):
    """The output model: Hugging Face layout in save_dtype (a name; default the starting checkpoint's dtype) with
    the tokenizer files beside it, written into path.tmp and swapped in: never a half-written model directory."""
    tmp = path.rstrip("/") + ".tmp"
    if rank == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)
    checkpoint.save_model(model, tmp, dtype=getattr(torch, save_dtype) if save_dtype else None, rank=rank)  # all ranks gather
    if rank == 0:
        copy_tokenizer(tokenizer, tmp)
        replace_dir(tmp, path)


def replace_dir(tmp, path):
    """Swap the fully written directory tmp in as path so that every instant leaves a usable copy: tmp is
    renamed to path.new (now known complete), the old path aside to path.old, path.new into place, then
    path.old is removed. recover_dir finishes a swap a crash interrupted."""
    new, old = path.rstrip("/") + ".new", path.rstrip("/") + ".old"
    for leftover in [p for p in (new, old) if os.path.exists(p)]:  # a crash's leftovers
        shutil.rmtree(leftover)
    os.rename(tmp, new)
    if os.path.exists(path):
        os.rename(path, old)
    os.rename(new, path)
    if os.path.exists(old):
        shutil.rmtree(old)


def recover_dir(path):
    """Finish an interrupted replace_dir: with path missing, path.new (complete), else path.old, is put in place;
    a half-written path.tmp is never used. Leftovers are removed. -> what was recovered, or None."""
    tmp, new, old = (path.rstrip("/") + ext for ext in (".tmp", ".new", ".old"))
    found = None if os.path.exists(path) else next((c for c in (new, old) if os.path.exists(c)), None)
    if found:
        os.rename(found, path)
    for leftover in [p for p in (tmp, new, old) if os.path.exists(p)]:
        shutil.rmtree(leftover)
    return f"{path}: recovered {os.path.basename(found)} after an interrupted save" if found else None


def copy_tokenizer(src, dst):
    """Put the tokenizer files beside the weights, so the checkpoint is self-contained for eval/vLLM."""
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "vocab.json", "merges.txt",
              "special_tokens_map.json", "added_tokens.json", "generation_config.json"):
        if os.path.exists(os.path.join(src, f)) and os.path.abspath(src) != os.path.abspath(dst):
            shutil.copy(os.path.join(src, f), os.path.join(dst, f))
