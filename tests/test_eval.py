"""eval.py: scoring on hand-built results, baselines on the real RM-Bench files checked by an independent
computation, an end-to-end run with a tiny random checkpoint and the real Qwen2.5 tokenizer, resume."""
import json
import os
import shutil

import pytest

import eval as E
import model as M
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


def test_the_table_shows_the_published_scores_of_the_judges_size(capsys):
    # the published size nearest each real config's parameter count (as eval.py counts the judge's), and the
    # table's published figures (SPEC section 6) beside the score they are, in the right column
    configs = os.path.join(need_shared(), "configs")
    config = lambda name: M.ModelConfig.from_hf(json.load(open(os.path.join(configs, f"{name}.config.json"))))
    names = ("Qwen2.5-0.5B-Instruct", "Qwen2.5-3B", "Qwen2.5-7B", "DeepSeek-R1-Distill-Qwen-7B", "Qwen2.5-14B", "Qwen2.5-32B")
    assert [E.published_size(M.num_params(config(name))) for name in names] == [7, 7, 7, 7, 14, 32]
    assert E.published_size(0) == 7  # a baseline
    four = {"chat": 80.0, "math": 70.0, "code": 75.0, "safety": 75.0, "total": 75.0}
    E.print_table(four, "rm-bench", "rm-bench", 14)
    header, chat, *_, total = capsys.readouterr().out.strip().splitlines()[1:]
    assert header.split() == ["this", "judge", "RM-R1-Qwen2.5-Instruct-14B", "RM-R1-DeepSeek-Distilled-Qwen-14B"]
    assert chat.split() == ["chat", "80.00"] and total.split() == ["total", "75.00", "76.1", "81.5"]
    # a total over fewer domains than the published four, or scores of a --limit's part: no published figures
    for scores, whole in (({k: v for k, v in four.items() if k != "math"}, True), (four, False)):
        E.print_table(scores, "rm-bench", "rm-bench", 14, whole)
        header, *rows, note = capsys.readouterr().out.strip().splitlines()[1:]
        assert header.split() == ["this", "judge"] and rows[-1].split() == ["total", "75.00"]
        assert note.strip() == "(RM-R1's published scores are left out: these are over a part of the benchmark)"
    E.print_table({"bon_helpfulness": 60.0}, "rmb", "rmb", 7)  # RMB without its pairwise set: no `rmb`
    header, row, note = capsys.readouterr().out.strip().splitlines()[1:]
    assert header.split() == ["this", "judge"] and "left out" in note
    E.print_table({"overall": 50.0}, "judgebench", "judgebench", 32)  # RM-R1 published no JudgeBench score
    lines = capsys.readouterr().out.strip().splitlines()[1:]
    assert [line.split() for line in lines] == [["this", "judge"], ["overall", "50.00"]]


def test_judgebench_rmb_pairs_and_rewardbench_scoring():
    jb = [row("1", "A", "A", "knowledge"), row("2", "B", "A", "knowledge"), row("3", "A", "A", "coding")]
    assert E.score("judgebench", jb) == {"knowledge": 50.0, "coding": 100.0, "overall": pytest.approx(200 / 3), "unparsed": 0,
                                        "truncated": 0, "too_long": 0, "judged": 3}
    pw = dict(set="pairwise")
    rmb = [row("1", "A", "A", "helpfulness", **pw), row("2", "A", "B", "harmlessness", **pw), row("3", "B", "B", "harmlessness", **pw)]
    s = E.score("rmb", rmb)
    assert (s["pairwise_helpfulness"], s["pairwise_harmlessness"], s["pairwise_mean"]) == (100.0, 50.0, 75.0)
    assert "rmb" not in s and "bon_mean" not in s  # best-of-N absent: no four-way score
    # best-of-N: an item is right only if every (best, loser) pair is; items u1 (2 of 2 right) and u2 (1 of 2)
    bon = lambda id, verdict, part, item: row(id, "A", verdict, part, set="bon", item=item)
    rmb += [bon("u1:0", "A", "helpfulness", "u1"), bon("u1:1", "A", "helpfulness", "u1"), bon("u2:0", "A", "helpfulness", "u2"),
            bon("u2:1", "B", "helpfulness", "u2"), bon("u3:0", "A", "harmlessness", "u3")]
    s = E.score("rmb", rmb)
    assert (s["bon_helpfulness"], s["bon_harmlessness"], s["bon_mean"]) == (50.0, 100.0, 75.0)
    assert s["pairwise_mean"] == 75.0 and s["rmb"] == 75.0 and s["judged"] == 8
    rb = []
    for sub, n, right in [("alpacaeval-easy", 4, 4), ("mt-bench-easy", 4, 2), ("mt-bench-hard", 2, 1), ("llmbar-natural", 2, 2),
                          ("refusals-dangerous", 2, 0), ("math-prm", 10, 5), ("hep-cpp", 2, 2), ("hep-go", 2, 1)]:
        rb += [row(f"{sub}{k}", "A", "A" if k < right else "B", sub) for k in range(n)]
    s = E.score("pairs", rb)
    assert s["rewardbench_chat"] == pytest.approx(75.0) and s["rewardbench_chat_hard"] == pytest.approx(75.0)
    assert s["rewardbench_safety"] == 0.0
    assert s["rewardbench_reasoning"] == pytest.approx((50.0 + 75.0) / 2)  # math-prm weighted as all hep together
    # (weighted by its own 10 pairs it would be 100 * 8 / 14)
    assert s["rewardbench"] == pytest.approx((75 + 75 + 0 + 62.5) / 4)
    assert s["overall"] == pytest.approx(100 * 17 / 28)


def test_both_orders_scoring():
    rows = [row("p1#A", "A", "A", pair="p1"), row("p1#B", "B", "B", pair="p1"),   # consistent, right
            row("p2#A", "A", "A", pair="p2"), row("p2#B", "B", "A", pair="p2")]   # always says A
    s = E.score("pairs", rows)
    assert s["overall"] == 50.0 and s["position_consistency"] == 50.0
    assert s["accuracy_label_A"] == 100.0 and s["accuracy_label_B"] == 50.0


def test_both_orders_judges_each_pair_in_both_placements(tmp_path):
    # pair 1: chosen longer; pair 2: chosen shorter. The "longer" judge picks the same answer in both placements
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"id": "p1", "prompt": "q", "chosen": "a long answer", "rejected": "short"}) + "\n"
                    + json.dumps({"id": "p2", "prompt": "q", "chosen": "ok", "rejected": "a wrong long one"}) + "\n")
    examples, _ = E.load_judge_examples(str(data), "pairs", both_orders=True)
    assert [(e.id, e.label, e.meta["pair"]) for e in examples] == [("p1#A", "A", "p1"), ("p1#B", "B", "p1"),
                                                                   ("p2#A", "A", "p2"), ("p2#B", "B", "p2")]
    for e in examples:  # the chosen answer sits at the labelled side
        chosen = "a long answer" if e.meta["pair"] == "p1" else "ok"
        assert f"[The Start of Chatbot {e.label}'s Response]\n{chosen}\n" in e.messages[-1]["content"]
    s = E.main(["--judge", "longer", "--bench", "pairs", "--data", str(data), "--out", str(tmp_path / "out"), "--both-orders"])
    assert s["judged"] == 4 and s["position_consistency"] == 100.0
    assert s["overall"] == 50.0  # p1 right in both placements, p2 wrong in both


def test_longer_baseline_on_real_rm_bench_matches_independent_computation(tmp_path, capsys):
    need_shared()
    scores = E.main(["--judge", "longer", "--bench", "rm-bench", "--data", os.path.join(DATA, "rm-bench"), "--out", str(tmp_path)])
    out = capsys.readouterr().out  # ../shared has no math file: said, and the published total is not set beside this one
    assert "RM-Bench math: no prompts of this domain; `total` is the mean of the others" in out
    assert "70.2" not in out and "left out" in out
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
    # the Hub's THU-KEG/RM-Bench exported by datasets' to_json: one JSONL file, each row naming its domain
    with open(tmp_path / "rm-bench.jsonl", "w") as f:
        for name in sorted(os.listdir(os.path.join(DATA, "rm-bench"))):
            for r in json.load(open(os.path.join(DATA, "rm-bench", name))):
                f.write(json.dumps(dict(r, domain=name.replace("_filtered.json", ""))) + "\n")
    hub = E.main(["--judge", "longer", "--bench", "rm-bench", "--data", str(tmp_path / "rm-bench.jsonl"), "--out", str(tmp_path / "h")])
    assert hub == scores


def tiny_judge_args(tmp_path, kind):
    """A random judge with Qwen2.5's vocabulary and tokenizer -> eval.py's flags to judge 4 JudgeBench pairs with it."""
    need_shared(TOKENIZER_DIR)
    ckpt = tmp_path / "judge"
    make_hf_checkpoint(str(ckpt), kind, vocab_size=151936)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER_DIR, f), ckpt / f)
    data = os.path.join(DATA, "judgebench", "judgebench_gpt-4o-2024-05-13.jsonl")
    return ["--judge", str(ckpt), "--bench", "judgebench", "--data", data, "--limit", "4", "--max-new-tokens", "6",
            "--batch-size", "3", "--max-prompt-len", "100000"]


def test_end_to_end_with_tiny_checkpoint_and_resume(tmp_path, capsys):
    args = tiny_judge_args(tmp_path, "qwen2-tied")
    full = E.main(args + ["--out", str(tmp_path / "full")])
    rows = [json.loads(l) for l in open(tmp_path / "full" / "outputs.jsonl")]
    assert len(rows) == 4 and all(r["prompt_len"] > 500 and r["output"] and r["output_tokens"] == 6 for r in rows)
    assert full["judged"] == 4 and full["unparsed"] == 4  # a random model writes no verdict: counted, and wrong
    assert full["truncated"] == 4 and "eval: 24 tokens generated in" in capsys.readouterr().out  # each cut off at 6
    # prompts over --max-prompt-len are not judged: unparsed (wrong) and counted in scores.json as too_long
    cap = sorted(r["prompt_len"] for r in rows)[1]  # two prompts at most this long (ties aside), the others over it
    short = E.main(args + ["--out", str(tmp_path / "short"), "--max-prompt-len", str(cap)])
    over = sum(r["prompt_len"] > cap for r in rows)
    assert full["too_long"] == 0 and short["too_long"] == over >= 1 and short["unparsed"] == short["judged"] == 4
    assert f"{over} prompts longer than --max-prompt-len {cap} are not judged" in capsys.readouterr().out
    # resume: keep 2 rows plus half a line (an interruption mid-write), rerun, same scores and outputs
    os.makedirs(tmp_path / "cut")
    shutil.copy(tmp_path / "full" / "run.json", tmp_path / "cut" / "run.json")  # claimed before the first output
    lines = open(tmp_path / "full" / "outputs.jsonl").read().splitlines(True)
    open(tmp_path / "cut" / "outputs.jsonl", "w").write("".join(lines[:2]) + lines[2][:30])
    resumed = E.main(args + ["--out", str(tmp_path / "cut")])
    assert resumed == full
    assert sorted(open(tmp_path / "cut" / "outputs.jsonl")) == sorted(lines)
    # a paged KV cache (pages of 16 positions) judges the same: the same outputs, token for token
    assert E.main(args + ["--out", str(tmp_path / "paged"), "--kv-page-size", "16"]) == full
    assert sorted(open(tmp_path / "paged" / "outputs.jsonl")) == sorted(lines)


def test_an_interrupted_run_keeps_every_finished_judgement(tmp_path, monkeypatch):
    # 4 prompts on 3 slots: the first 3 judgements finish at one host check, the 4th at a later one. A run killed just
    # after the first of them has their 3 rows on disk (rows are written as judgements finish, not per sampler call),
    # and the rerun judges only the 4th, ending with the uninterrupted run's rows
    import sampler

    class Killed(Exception):
        pass
    args = tiny_judge_args(tmp_path, "qwen2-tied")
    full = E.main(args + ["--out", str(tmp_path / "full")])
    lines = sorted(open(tmp_path / "full" / "outputs.jsonl"))
    generate, judged = sampler.Sampler.generate, []

    def killed_after_first_finish(self, *a, on_finish=None, **kw):
        def finish(indices, outs):
            on_finish(indices, outs)
            judged.extend(indices)
            raise Killed
        return generate(self, *a, on_finish=finish, **kw)
    monkeypatch.setattr(sampler.Sampler, "generate", killed_after_first_finish)
    with pytest.raises(Killed):
        E.main(args + ["--out", str(tmp_path / "cut")])
    kept = open(tmp_path / "cut" / "outputs.jsonl").readlines()
    assert len(judged) == len(kept) == 3 and set(kept) < set(lines)
    monkeypatch.setattr(sampler.Sampler, "generate", generate)
    assert E.main(args + ["--out", str(tmp_path / "cut")]) == full
    assert sorted(open(tmp_path / "cut" / "outputs.jsonl")) == lines


def test_sampled_judgements_do_not_depend_on_resumes_or_ranks(tmp_path):
    # --temperature 1: a prompt's draws are keyed by its place in the benchmark, so a run resumed after 2 prompts and a
    # run on 2 ranks sample what one uninterrupted process does, token for token
    from conftest import run_torchrun
    args = tiny_judge_args(tmp_path, "qwen2-tied") + ["--temperature", "1", "--max-new-tokens", "12"]
    E.main(args + ["--out", str(tmp_path / "whole")])
    lines = sorted(open(tmp_path / "whole" / "outputs.jsonl"))
    assert len({json.loads(line)["output"] for line in lines}) == 4  # four different samples
    E.main(args + ["--out", str(tmp_path / "cut"), "--limit", "2"])  # (--limit may change between runs)
    E.main(args + ["--out", str(tmp_path / "cut")])
    assert sorted(open(tmp_path / "cut" / "outputs.jsonl")) == lines
    run_torchrun("eval.py", args + ["--out", str(tmp_path / "two")])
    assert sorted(line for r in (0, 1) for line in open(tmp_path / "two" / f"outputs.rank{r}.jsonl")) == lines


@pytest.mark.slow
def test_a_tensor_parallel_judge_judges_as_the_whole_one(tmp_path):
    # eval.py --tp 2 under torchrun (gloo): the two ranks hold half the judge each (read from the safetensors one tensor at
    # a time, decode_model.load_for_decoding), judge the same prompts in lockstep, and the first writes them: the same
    # outputs as one process with the whole judge. The run takes up one that stopped after two of its four pairs
    from conftest import run_torchrun
    args = tiny_judge_args(tmp_path, "qwen2-untied")
    whole = E.main(args + ["--out", str(tmp_path / "whole")])
    lines = sorted(open(tmp_path / "whole" / "outputs.jsonl"))
    E.main(args + ["--out", str(tmp_path / "tp"), "--limit", "2"])
    assert len(open(tmp_path / "tp" / "outputs.jsonl").readlines()) == 2
    printed = run_torchrun("eval.py", args + ["--out", str(tmp_path / "tp"), "--tp", "2"]).stdout
    assert "2 already judged" in printed  # the tensor-parallel pair judged the other two
    assert json.load(open(tmp_path / "tp" / "scores.json")) == whole
    assert sorted(open(tmp_path / "tp" / "outputs.jsonl")) == lines and os.listdir(tmp_path / "tp").count("outputs.jsonl") == 1


def test_eval_resumes_on_another_number_of_ranks(tmp_path):
    # outputs of one process (outputs.jsonl, 4 of 6 prompts judged) are taken up by 2 ranks (outputs.rank0/1.jsonl: each
    # keeps its prompts' rows and judges only the others), and theirs, cut short, by one process again: the rows and
    # scores of an uninterrupted run, each prompt's row once, nothing of an earlier layout left behind
    from conftest import run_torchrun
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"q{i}", "chosen": "a" * (i % 3 + 1), "rejected": "bb"})
                            + "\n" for i in range(6)))
    args, out = ["--judge", "longer", "--bench", "pairs", "--data", str(data)], tmp_path / "run"
    whole = E.main(args + ["--out", str(tmp_path / "whole")])
    lines = sorted(open(tmp_path / "whole" / "outputs.jsonl"))
    E.main(args + ["--out", str(out), "--limit", "4"])
    printed = run_torchrun("eval.py", args + ["--out", str(out)]).stdout
    assert "6 prompts (instruct judge prompts, seed 0); 4 already judged" in printed
    assert sorted(os.listdir(out)) == ["outputs.rank0.jsonl", "outputs.rank1.jsonl", "run.json", "scores.json"]
    parts = [open(out / f"outputs.rank{r}.jsonl").readlines() for r in (0, 1)]
    assert sorted(parts[0] + parts[1]) == lines and json.load(open(out / "scores.json")) == whole
    open(out / "outputs.rank1.jsonl", "w").writelines(parts[1][:1])  # rank 1 cut short
    assert E.main(args + ["--out", str(out)]) == whole
    assert sorted(os.listdir(out)) == ["outputs.jsonl", "run.json", "scores.json"]
    assert sorted(open(out / "outputs.jsonl")) == lines


def rmb_layout(tmp_path):
    """Upstream's repository: RMB_dataset/{Pairwise_set,BoN_set}, with the two sets linked in from ../shared, and
    beside it eval/result/, a reward model's scores per pair (category_path, no conversation: not data to judge)."""
    need_shared(os.path.join(DATA, "rmb-bon"))
    os.makedirs(tmp_path / "RMB" / "RMB_dataset")
    for part, src in (("Pairwise_set", "rmb"), ("BoN_set", "rmb-bon")):
        os.symlink(os.path.join(DATA, src, "RMB_dataset", part), tmp_path / "RMB" / "RMB_dataset" / part)
    os.makedirs(tmp_path / "RMB" / "eval" / "result")
    (tmp_path / "RMB" / "eval" / "result" / "ArmoRM-Llama3-8B-v0.1_result.json").write_text(json.dumps([{
        "pair_uid": "9218", "category_path": "Pairwise_set/Helpfulness/Brainstorming/Idea Development",
        "chosen_reward": 0.18, "reject_reward": 0.17, "is_correct": 1}]))
    return str(tmp_path / "RMB")


def test_rmb_longer_baseline_reports_four_parts_equal_to_an_independent_computation(tmp_path, capsys):
    import gzip
    from collections import defaultdict
    layout = rmb_layout(tmp_path)
    scores = E.main(["--judge", "longer", "--bench", "rmb", "--data", layout, "--out", str(tmp_path / "out")])
    table = capsys.readouterr().out
    assert "RMB Pairwise_set: 14543 judge prompts" in table and "RMB BoN_set: 8714 judge prompts" in table
    rmb_line = next(line for line in table.splitlines() if line.strip().startswith("rmb "))
    assert f"{scores['rmb']:.2f}" in rmb_line and "66.4" in rmb_line and "55.1" in rmb_line  # the paper's RMB beside
    # independent: read the raw files, `longer` is right when the preferred answer has more characters
    right = defaultdict(list)
    for d, _, files in os.walk(os.path.join(layout, "RMB_dataset"), followlinks=True):
        for f in files:
            for item in json.load(gzip.open(os.path.join(d, f), "rt")):
                part = "helpfulness" if "Helpfulness" in item["category_path"] else "harmlessness"
                if "bon_best" in item:
                    best = len(item["bon_best"]["answer"])
                    right[f"bon_{part}"].append(all(best > len(l["answer"]) for l in item["loser_list"]))
                else:
                    right[f"pairwise_{part}"].append(len(item["chosen"]["answer"]) > len(item["reject"]["answer"]))
    assert len(right["bon_helpfulness"]) + len(right["bon_harmlessness"]) == 3786  # items, as the data README says
    expected = {k: 100.0 * sum(v) / len(v) for k, v in right.items()}
    for k, v in expected.items():
        assert scores[k] == pytest.approx(v), k
    four = [expected[f"{kind}_{part}"] for kind in ("pairwise", "bon") for part in ("helpfulness", "harmlessness")]
    assert scores["rmb"] == pytest.approx(sum(four) / 4)
    assert scores["judged"] == 14543 + 8714


def test_empty_answers_are_judged_in_eval_and_dropped_in_training(tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"id": "a", "prompt": "q1", "chosen": "a long answer", "rejected": ""},
            {"id": "b", "prompt": "q2", "chosen": "  ", "rejected": "something"},
            {"id": "c", "prompt": "q3", "chosen": "yes indeed", "rejected": "no"}]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scores = E.main(["--judge", "longer", "--bench", "pairs", "--data", str(pairs), "--out", str(tmp_path / "out")])
    assert scores["judged"] == 3 and scores["overall"] == pytest.approx(200 / 3)  # the empty answers were judged
    assert "pairs.jsonl: pairs, 2 with an empty or blank answer: they are judged as given" in capsys.readouterr().out
    import data as D
    examples, counts = D.load_judge_examples(str(pairs), "pairs", training=True)
    assert [e.id for e in examples] == ["c"] and counts["empty"] == 2
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"id": "x", "prompt": "q", "chosen": "a"}) + "\n")
    with pytest.raises(D.DataError, match="broken.jsonl:1: missing field 'rejected'"):
        E.main(["--judge", "longer", "--bench", "pairs", "--data", str(broken), "--out", str(tmp_path / "o2")])


def test_nothing_to_judge_is_an_error_and_linked_sets_are_followed(tmp_path):
    import data as D
    (tmp_path / "empty").mkdir()
    for bench in ("rmb", "rm-bench"):
        with pytest.raises(D.DataError, match="empty: no (RMB|RM-Bench) files"):
            E.main(["--judge", "longer", "--bench", bench, "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    with pytest.raises(D.DataError, match="missing.jsonl: no such file"):
        E.main(["--judge", "random", "--bench", "pairs", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")])
    (tmp_path / "blank.jsonl").write_text("\n")
    with pytest.raises(D.DataError, match="blank.jsonl: no pairs rows found"):
        E.main(["--judge", "random", "--bench", "pairs", "--data", str(tmp_path / "blank.jsonl"), "--out", str(tmp_path / "o")])
    need_shared(os.path.join(DATA, "rmb"))
    os.makedirs(tmp_path / "linked")
    os.symlink(os.path.join(DATA, "rmb", "RMB_dataset", "Pairwise_set", "Harmlessness"), tmp_path / "linked" / "H")
    scores = E.main(["--judge", "longer", "--bench", "rmb", "--data", str(tmp_path / "linked"), "--out", str(tmp_path / "o3")])
    assert scores["judged"] == 6087 and "pairwise_harmlessness" in scores


def test_qwen3_judge_end_to_end(tmp_path):
    # a Qwen3 judge (tiny random weights, the Qwen tokenizer with the Qwen3 template) is evaluated and trained
    need_shared(TOKENIZER_DIR)
    import sft
    ckpt = tmp_path / "judge"
    make_hf_checkpoint(str(ckpt), "qwen3", vocab_size=151936)
    shutil.copy(os.path.join(TOKENIZER_DIR, "tokenizer.json"), ckpt / "tokenizer.json")
    template = open(os.path.join(os.path.dirname(__file__), "qwen3_chat_template.jinja")).read()
    json.dump({"chat_template": template, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
              open(ckpt / "tokenizer_config.json", "w"))
    data = os.path.join(DATA, "judgebench", "judgebench_gpt-4o-2024-05-13.jsonl")
    scores = E.main(["--judge", str(ckpt), "--bench", "judgebench", "--data", data, "--limit", "2", "--max-new-tokens", "4",
                     "--out", str(tmp_path / "eval")])
    assert scores["judged"] == 2
    trace = "<type>Chat</type>\n\n<rubric>r</rubric>\n\n<eval>e</eval>\n\n<answer>[[A]]</answer>"
    rows = [{"context_messages": [{"role": "system", "content": "judge"}, {"role": "user", "content": f"pair {i}"}],
             "winner": trace} for i in range(4)]
    (tmp_path / "distill.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = sft.main(["--model", str(ckpt), "--data", str(tmp_path / "distill.jsonl"), "--out", str(tmp_path / "sft"),
                        "--global-batch", "2", "--epochs", "1", "--lr", "1e-4"])
    assert summary["steps"] == 2 and os.path.exists(tmp_path / "sft" / "model" / "model.safetensors")
