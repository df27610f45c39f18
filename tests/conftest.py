"""Shared fixtures: tiny random-weight Hugging Face checkpoints written by transformers, and the path to
the real data in ../shared (tests that need it skip with a clear reason when it is absent)."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.environ.get("RMR1_SHARED", os.path.join(ROOT, "..", "shared"))
DATA = os.path.join(SHARED, "data")
TOKENIZER_DIR = os.path.join(DATA, "qwen2.5-tokenizer")

# pytest.ini runs the tests in two worker processes (pytest-xdist): each takes its share of the cores, and so do the
# scripts its tests start (they inherit OMP_NUM_THREADS; the toy reads it too). More threads than cores in all would
# make every job several times slower, not share them.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // WORKERS))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(items):
    """The README's main command end to end (minutes, two threads: test_toy_e2e) goes last, when the other tests are
    done and it has the cores to itself; the other slow tests go first, so that none is still running beside it
    (pytest.ini hands the tests out one at a time)."""
    order = lambda item: (2 if item.name == "test_default_pipeline_meets_its_targets" else
                          0 if item.get_closest_marker("slow") else 1)
    items.sort(key=order)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch. Dynamo counts a function's graphs per process, so tests that compile the same
    code (model.py's blocks, the decode step) in one worker would add up to its recompile limit, after which the
    function runs eagerly: a compiled-against-eager comparison then fails, or passes without compiling."""
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()


def need_shared(path=DATA):
    if not os.path.exists(path):
        pytest.skip(f"real data not found at {path} (a fresh clone has no ../shared; CI provides it)")
    return path


def make_hf_checkpoint(path, kind="qwen2-tied", dtype=torch.float32, seed=0, vocab_size=128, **over):
    """Write a tiny random checkpoint with transformers' own classes and save_pretrained."""
    import transformers
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-6, rope_theta=10000.0)
    common.update(over)
    if kind.startswith("qwen3"):
        cfg = transformers.Qwen3Config(head_dim=24, tie_word_embeddings=False, **common)
        model = transformers.Qwen3ForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(tie_word_embeddings=(kind == "qwen2-tied"), **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():  # HF init leaves biases/norms at 0/1; randomise them so they are tested too
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model = model.to(dtype)
    shard = "20KB" if kind.endswith("sharded") else "5GB"
    model.save_pretrained(path, max_shard_size=shard)
    return model.eval()


@pytest.fixture(scope="session")
def toy_paths(tmp_path_factory):
    """A small copy of the toy task (data, tokenizer, random-init checkpoint) made by toy.prepare."""
    import toy
    return toy.prepare(str(tmp_path_factory.mktemp("toy")), seed=0, n_train=96, n_rl=96, n_heldout=16)


def torchrun_command(script, args, nproc=2):
    """`torchrun --nproc_per_node nproc script args` on CPU (gloo) -> its command and environment."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.join(ROOT, script)] + args
    return cmd, dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")


def run_torchrun(script, args, nproc=2, timeout=600):
    """Run `torchrun --nproc_per_node nproc script args` on CPU (gloo); fail with its output."""
    import subprocess
    cmd, env = torchrun_command(script, args, nproc)
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return p


def read_metrics(out_dir):
    import json
    return [json.loads(l) for l in open(os.path.join(out_dir, "metrics.jsonl"))]


@pytest.fixture
def one_rank_fsdp(monkeypatch):
    """enable() switches this process to the single-GPU control flow, on CPU: FSDP2 over a one-rank process group
    (gloo, fp32) whatever the world size; it returns the list of (module, offload policy's class name) fully_shard is
    applied to."""
    import torch.distributed as dist
    import torch.distributed.fsdp as fsdp
    import training
    sharded, fully_shard = [], fsdp.fully_shard

    def enable():
        monkeypatch.setattr(fsdp, "fully_shard", lambda module, **kw: sharded.append(
            (module, type(kw.get("offload_policy")).__name__)) or fully_shard(module, **kw))
        monkeypatch.setattr(training, "uses_fsdp", lambda *args: True)
        return sharded
    yield enable
    if dist.is_initialized():  # a run that failed before leaving its group
        dist.destroy_process_group()
