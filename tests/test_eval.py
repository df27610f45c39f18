"""eval.py: scoring on hand-built results, baselines on the real RM-Bench files checked by an independent
computation, an end-to-end run with a tiny random checkpoint and the real Qwen2.5 tokenizer, resume."""
import json
import os
import shutil

import pytest

import eval as E
from conftest import DATA, TOKENIZER_DIR, make_hf_checkpoint, need_shared


def row(id, label, verdict, subset="", **meta):
    return {"id": id, "label": label, "subset": subset, "meta": meta, "verdict": verdict, "correct": verdict == label}


def test_rm_bench_scoring_by_hand():
    rows = []
    # chat: correct exactly when i >= j (lower triangle + diagonal); code: everything right except cell (0, 2)
    for item in range(2):
        for i in range(3):
            for j in range(3):
                rows.append(row(f"c{item}{i}{j}", "A", "A" if i >= j else "B", "chat", i=i, j=j))
                rows.append(row(f"d{item}{i}{j}", "B", None if (i, j) == (0, 2) else "B", "code", i=i, j=j))
    s = E.score("rm-bench", rows)
    assert s["chat"] == pytest.approx(600 / 9) and s["code"] == pytest.approx(800 / 9)
    assert s["hard"] == pytest.approx((0 + 200 / 3) / 2)    # chat upper triangle 0%, code 2 of 3 cells
    assert s["normal"] == pytest.approx(100) and s["easy"] == pytest.approx(100)
    assert s["total"] == pytest.approx((600 / 9 + 800 / 9) / 2)
    assert s["unparsed"] == 2


def test_judgebench_rmb_pairs_and_rewardbench_scoring():
    jb = [row("1", "A", "A", "knowledge"), row("2", "B", "A", "knowledge"), row("3", "A", "A", "coding")]
    assert E.score("judgebench", jb) == {"knowledge": 50.0, "coding": 100.0, "overall": pytest.approx(200 / 3), "unparsed": 0, "judged": 3}
    rmb = [row("1", "A", "A", "helpfulness"), row("2", "A", "B", "harmlessness"), row("3", "B", "B", "harmlessness")]
    s = E.score("rmb", rmb)
    assert (s["helpfulness"], s["harmlessness"], s["total"]) == (100.0, 50.0, 75.0)
    rb = []
    for sub, n, right in [("alpacaeval-easy", 4, 4), ("mt-bench-easy", 4, 2), ("mt-bench-hard", 2, 1), ("llmbar-natural", 2, 2),
                          ("refusals-dangerous", 2, 0), ("math-prm", 10, 5), ("hep-cpp", 2, 2), ("hep-go", 2, 0)]:
        rb += [row(f"{sub}{k}", "A", "A" if k < right else "B", sub) for k in range(n)]
    s = E.score("pairs", rb)
    assert s["rewardbench_chat"] == pytest.approx(75.0) and s["rewardbench_chat_hard"] == pytest.approx(75.0)
    assert s["rewardbench_safety"] == 0.0
    assert s["rewardbench_reasoning"] == pytest.approx((50.0 + 50.0) / 2)  # math-prm weighted as all hep together
    assert s["rewardbench"] == pytest.approx((75 + 75 + 0 + 50) / 4)
    assert s["overall"] == pytest.approx(100 * 16 / 28)


def test_both_orders_scoring():
    rows = [row("p1#A", "A", "A", pair="p1"), row("p1#B", "B", "B", pair="p1"),   # consistent, right
            row("p2#A", "A", "A", pair="p2"), row("p2#B", "B", "A", pair="p2")]   # always says A
    s = E.score("pairs", rows)
    assert s["overall"] == 50.0 and s["position_consistency"] == 50.0
    assert s["accuracy_label_A"] == 100.0 and s["accuracy_label_B"] == 50.0


def test_longer_baseline_on_real_rm_bench_matches_independent_computation(tmp_path):
    need_shared()
    scores = E.main(["--judge", "longer", "--bench", "rm-bench", "--data", os.path.join(DATA, "rm-bench"), "--out", str(tmp_path)])
    # independent: straight from the JSON, "longer wins" per (i, j) cell, no judge prompts involved
    per_domain = {}
    for f in sorted(os.listdir(os.path.join(DATA, "rm-bench"))):
        dom = "safety" if f.startswith("safety") else f.split("_")[0]
        for r in json.load(open(os.path.join(DATA, "rm-bench", f))):
            for i in range(3):
                for j in range(3):
                    per_domain.setdefault(dom, [[[] for _ in range(3)] for _ in range(3)])[i][j].append(
                        len(r["chosen"][i]) > len(r["rejected"][j]))
    cell = lambda d, i, j: 100 * sum(per_domain[d][i][j]) / len(per_domain[d][i][j])
    for d in per_domain:
        assert scores[d] == pytest.approx(sum(cell(d, i, j) for i in range(3) for j in range(3)) / 9)
    hard = sum(sum(cell(d, i, j) for i in range(3) for j in range(3) if j > i) / 3 for d in per_domain) / len(per_domain)
    assert scores["hard"] == pytest.approx(hard)
    assert scores["total"] == pytest.approx(sum(scores[d] for d in per_domain) / len(per_domain))
    assert json.load(open(tmp_path / "scores.json")) == pytest.approx(scores)
    short = E.main(["--judge", "shorter", "--bench", "rm-bench", "--data", os.path.join(DATA, "rm-bench"), "--out", str(tmp_path / "s")])
    ties = scores["unparsed"]
    assert short["unparsed"] == ties and short["total"] + scores["total"] < 100  # ties count as wrong for both


def test_end_to_end_with_tiny_checkpoint_and_resume(tmp_path):
    need_shared(TOKENIZER_DIR)
    ckpt = tmp_path / "judge"
    make_hf_checkpoint(str(ckpt), "qwen2-tied", vocab_size=151936)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER_DIR, f), ckpt / f)
    data = os.path.join(DATA, "judgebench", "judgebench_gpt-4o-2024-05-13.jsonl")
    args = ["--judge", str(ckpt), "--bench", "judgebench", "--data", data, "--limit", "4", "--max-new-tokens", "6",
            "--batch-size", "3", "--max-prompt-len", "100000"]
    full = E.main(args + ["--out", str(tmp_path / "full")])
    rows = [json.loads(l) for l in open(tmp_path / "full" / "outputs.jsonl")]
    assert len(rows) == 4 and all(r["prompt_len"] > 500 and r["output"] for r in rows)
    assert full["judged"] == 4 and full["unparsed"] == 4  # a random model writes no verdict: counted, and wrong
    # resume: keep 2 rows plus half a line (an interruption mid-write), rerun, same scores and outputs
    os.makedirs(tmp_path / "cut")
    lines = open(tmp_path / "full" / "outputs.jsonl").read().splitlines(True)
    open(tmp_path / "cut" / "outputs.jsonl", "w").write("".join(lines[:2]) + lines[2][:30])
    resumed = E.main(args + ["--out", str(tmp_path / "cut")])
    assert resumed == full
    assert sorted(open(tmp_path / "cut" / "outputs.jsonl")) == sorted(lines)
