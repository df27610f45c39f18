"""bench_gpu.py is what a GPU session runs, with minutes of device time and no second try: its checks must run. Here
they run on CPU with a tiny model (--smoke), every group but the ragged rollouts (the paged one scores its whole page
pool unfused on CPU: minutes) and the two grpo.py runs that differ from the grpo group's only in their flags or
checkpoint (grpo1.5b, offload: 35 s of CPU; --offload itself runs in test_grpo.py). A check that raises prints `failed: ...`
instead of its figure, and that fails this."""
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

SMOKED = "training,rollout,decode,paged,decode7b,slots7b,grpo"
CHECKS = ["bf16 logits vs transformers", "trainer model 1.5B", "SFT step 1.5B, 4k tokens", "where its time goes",
          "the same, inside a step (accumulating)", "the head's chunks eager", "4 x 4k tokens a micro-batch",
          "GRPO group 1.5B", "transformers, the same 7 rows padded", "SFT fwd+bwd 1.5B, plain bf16",
          "rollout 8 prompts x n=8", "decode batch 1 vs transformers", "decode batch 1, paged KV cache",
          "judge prompts: a common opening", "decode batch 1, 7B shape",
          "decode step 7B: dense vs a page pool", "grpo.py, 2 steps (0.5B shape)", "eager fallbacks in these checks"]


@pytest.mark.slow
def test_bench_gpu_smoke_runs_every_check(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    env.pop("WORLD_SIZE", None)
    p = subprocess.run([sys.executable, "bench_gpu.py", "--smoke", "--only", SMOKED], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [line for line in p.stdout.splitlines() if line.endswith(" s]")]  # one line a check: "name  result  [n s]"
    for name in CHECKS:
        line = next((line for line in lines if line.lstrip().startswith(name)), None)
        assert line is not None, f"no line for {name!r} in:\n{p.stdout[-3000:]}"
        assert not any(bad in line for bad in ("failed:", "not finished", "skipped", "cut by its time limit", "no step finished")), line
    assert len(lines) == len(CHECKS), p.stdout[-3000:]
    assert "0 (Dynamo's recompile limit reached: never)" in lines[-1], lines[-1]  # (grpo.py's runs: --no-compile here)
    assert os.path.getsize(tmp_path / "bench_gpu.log") > 0


@pytest.mark.parametrize("argv, message", [
    (["decode", "--rollout-batch", "2"], "--rollout-batch 2: the sampled rollout decodes"),
    (["decode", "--layers", "0"], "--layers must be > 0"), (["train", "--reps", "-1"], "--reps must be > 0"),
    (["train", "--prompt-frac", "1"], r"--prompt-frac must be in \[0, 1\), got 1.0"),
    (["train", "--prompt-frac", "nan"], r"--prompt-frac must be in \[0, 1\), got nan")])
def test_bench_refuses_bad_flags_before_any_work(argv, message, monkeypatch, capsys):
    import bench
    monkeypatch.setattr(sys, "argv", ["bench.py", *argv])
    monkeypatch.setattr(bench, "load_cfg", lambda args: pytest.fail("the bench started"))  # (each bench's first work)
    with pytest.raises(SystemExit) as exit:
        bench.main()
    assert exit.value.code == 2 and re.search(message, capsys.readouterr().err)
