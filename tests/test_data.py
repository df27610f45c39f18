"""data.py: tokenizer and chat templates vs transformers, judge prompts vs the reference files, readers."""
import gzip
import json
import os
import shutil
from array import array

import pytest

import data as D
import toy
from conftest import DATA, SHARED, TOKENIZER_DIR, need_shared

# The DeepSeek-R1-Distill-Qwen chat template as published (tool-call branches elided: judges never use tools).
DEEPSEEK_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}"
    "{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor -%}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}")

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>hmm</think>Hello!"},
     {"role": "user", "content": "Tell me a joke\n\nplease"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
]


def real_texts(limit=300):
    need_shared()
    texts = []
    for f in sorted(os.listdir(os.path.join(DATA, "rm-bench"))):
        for row in json.load(open(os.path.join(DATA, "rm-bench", f)))[:20]:
            texts += [row["prompt"]] + row["chosen"][:1] + row["rejected"][-1:]
    for line in list(open(os.path.join(DATA, "judgebench", "judgebench_gpt-4o-2024-05-13.jsonl")))[:40]:
        row = json.loads(line)
        texts += [row["question"], row["response_A"]]
    rmb = json.load(gzip.open(os.path.join(DATA, "rmb/RMB_dataset/Pairwise_set/Helpfulness/Translation/GeneralExcerpt Language Translation.json.gz")))
    texts += [r["conversation_input"][0]["content"] for r in rmb[:40]]  # non-English text too
    return texts[:limit]


def test_tokenizer_encodes_real_texts_like_transformers():
    import transformers
    need_shared(TOKENIZER_DIR)
    ours = D.load_tokenizer(TOKENIZER_DIR)
    # the reference is built from vocab.json + merges.txt, independently of the generated tokenizer.json
    vocab = json.load(open(os.path.join(TOKENIZER_DIR, "vocab.json")))
    merges = [tuple(l.split()) for l in open(os.path.join(TOKENIZER_DIR, "merges.txt")).read().split("\n")[1:] if l]
    ref = transformers.Qwen2Tokenizer(vocab=vocab, merges=merges)
    auto = transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    texts = real_texts()
    for text, batched in zip(texts, ours.encode_batch(texts, chunk=7)):  # in parallel, 7 texts per call
        ids = ours.encode(text)
        assert ids == batched == ref.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == text
    special = "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>"
    assert ours.encode(special) == auto.encode(special, add_special_tokens=False)
    # a rollout's traces decode in one batch: special tokens kept (a verdict may follow them), an empty trace empty,
    # and a trace cut mid-character as one by one
    traces = [ours.encode(special + t)[:n] for t, n in zip(texts, range(0, 400, 7))] + [[]]
    assert ours.decode_batch(traces) == [ours.decode(t) for t in traces] == [auto.decode(t) for t in traces]
    assert ours.decode_batch([array("i", t) for t in traces]) == ours.decode_batch(traces)  # GRPO's rollout: arrays
    assert (ours.eos_id, ours.pad_id, ours.im_end_id, ours.end_of_turn_id) == (151645, 151643, 151645, 151645)
    assert ours.vocab_size == 151665


def test_qwen_chat_template_matches_transformers():
    import transformers
    need_shared(TOKENIZER_DIR)
    ours = D.load_tokenizer(TOKENIZER_DIR)
    auto = transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    for conv in CONVERSATIONS:
        for gen in (True, False):
            assert ours.apply_chat_template(conv, gen) == auto.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)


def test_a_tokenizer_saved_by_transformers_today_keeps_its_template_beside_the_config(tmp_path):
    # transformers >= 4.50 saves the chat template as chat_template.jinja, not in tokenizer_config.json (refused before:
    # "unknown chat template"); a run's model/ copies it, and a template given as named ones is read as well
    import transformers
    import rundir
    need_shared(TOKENIZER_DIR)
    transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR).save_pretrained(tmp_path / "saved")
    assert os.path.exists(tmp_path / "saved/chat_template.jinja")
    assert "chat_template" not in json.load(open(tmp_path / "saved/tokenizer_config.json"))
    (tmp_path / "copy").mkdir()
    rundir.copy_tokenizer(str(tmp_path / "saved"), str(tmp_path / "copy"))
    auto = transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    for path in (tmp_path / "saved", tmp_path / "copy"):
        ours = D.load_tokenizer(str(path))
        assert (ours.family, ours.eos_id, ours.pad_id) == ("qwen2.5", 151645, 151643)
        assert all(ours.apply_chat_template(conv) == auto.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
                   for conv in CONVERSATIONS)
    cfg = json.load(open(os.path.join(TOKENIZER_DIR, "tokenizer_config.json")))
    named = [{"name": "tool_use", "template": "{{ messages }}"}, {"name": "default", "template": cfg["chat_template"]}]
    assert D.load_tokenizer(_tokenizer_dir(tmp_path, named)).family == "qwen2.5"
    (tmp_path / "chat_template.jinja").write_text("{{ messages }}")  # the file comes first, as in transformers
    with pytest.raises(ValueError, match="chat_template.jinja: unknown chat template"):
        D.load_tokenizer(str(tmp_path))


def _tokenizer_dir(tmp_path, template, **cfg):
    need_shared(TOKENIZER_DIR)
    shutil.copy(os.path.join(TOKENIZER_DIR, "tokenizer.json"), tmp_path / "tokenizer.json")
    json.dump({"chat_template": template, **cfg}, open(tmp_path / "tokenizer_config.json", "w"))
    return str(tmp_path)


def test_deepseek_chat_template_matches_transformers(tmp_path):
    import transformers
    path = _tokenizer_dir(tmp_path, DEEPSEEK_TEMPLATE, bos_token="<｜begin▁of▁sentence｜>", eos_token="<｜end▁of▁sentence｜>")
    ours = D.load_tokenizer(path)
    assert ours.family == "deepseek-r1" and D.default_judge_family(ours) == "reasoning"
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=path + "/tokenizer.json", bos_token="<｜begin▁of▁sentence｜>")
    ref.chat_template = DEEPSEEK_TEMPLATE
    for conv in CONVERSATIONS:
        for gen in (True, False):
            assert ours.apply_chat_template(conv, gen) == ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)


def test_toy_chatml_template_matches_transformers(tmp_path):
    import transformers
    path = _tokenizer_dir(tmp_path, toy.CHATML_JINJA, eos_token="<|im_end|>")
    ours = D.load_tokenizer(path)
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=path + "/tokenizer.json")
    ref.chat_template = toy.CHATML_JINJA
    for conv in CONVERSATIONS:
        assert ours.apply_chat_template(conv) == ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    texts = [ours.apply_chat_template(conv) for conv in CONVERSATIONS]
    assert list(ours.encode_batch(texts, chunk=2)) == [ours.encode(t) for t in texts] == [ref.encode(t) for t in texts]


QWEN3_CONVERSATIONS = CONVERSATIONS + [
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>\nstep 1\n</think>\n\nfinal"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>r1</think>b"}, {"role": "user", "content": "c"},
     {"role": "assistant", "content": "<think>r2</think>d"}, {"role": "assistant", "content": "plain"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"}, {"role": "system", "content": "late system"},
     {"role": "user", "content": "<tool_response>\nout\n</tool_response>"}, {"role": "assistant", "content": "<think>t</think>y"}],
]


def test_qwen3_chat_template_matches_transformers(tmp_path):
    # the official Qwen3 template (tests/qwen3_chat_template.jinja, from the Qwen3 tokenizer_config.json), with
    # its thinking switch: unset and True let the model think, False closes an empty think block
    import transformers
    template = open(os.path.join(os.path.dirname(__file__), "qwen3_chat_template.jinja")).read()
    path = _tokenizer_dir(tmp_path, template, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ours = D.load_tokenizer(path)
    assert ours.family == "qwen3" and D.default_judge_family(ours) == "instruct"
    assert ours.stop_ids == sorted({ours.im_end_id, ours.tok.token_to_id("<|endoftext|>")})
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=path + "/tokenizer.json")
    ref.chat_template = template
    for conv in QWEN3_CONVERSATIONS:
        for gen in (True, False):
            for thinking in (None, True, False):
                extra = {} if thinking is None else {"enable_thinking": thinking}
                assert ours.apply_chat_template(conv, gen, thinking) == \
                    ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen, **extra), (conv, gen, thinking)


def test_unknown_chat_template_is_refused(tmp_path):
    path = _tokenizer_dir(tmp_path, "{% for m in messages %}[INST]{{ m.content }}{% endfor %}")
    with pytest.raises(ValueError, match="unknown chat template"):
        D.load_tokenizer(path)


# ----------------------------------------------------------------------------- judge prompts

def prompt_file(name):
    path = os.path.join(SHARED, "rm-r1", "prompts", name)
    need_shared(path)
    return open(path, encoding="utf-8").read()


def test_prompt_constants_are_byte_identical_to_reference():
    for name, const in [("instruct_system.txt", D.INSTRUCT_SYSTEM), ("instruct_user_single.txt", D.INSTRUCT_USER_SINGLE),
                        ("instruct_user_multi.txt", D.INSTRUCT_USER_MULTI), ("reasoning_user_single.txt", D.REASONING_USER_SINGLE),
                        ("reasoning_user_multi.txt", D.REASONING_USER_MULTI)]:
        assert const.encode() == prompt_file(name).encode(), name


def test_single_turn_judge_messages_both_families():
    ctx = [{"role": "user", "content": "Sum {x}?"}]
    inst = D.judge_messages(ctx, "ans {answer_b}", "other", "instruct")
    assert inst[0] == {"role": "system", "content": prompt_file("instruct_system.txt")}
    expected = prompt_file("instruct_user_single.txt").replace("{question}", "Sum {x}?").replace(
        "{answer_a}", "ans {answer_b}").replace("[The End of Chatbot A's Response]\n\n[The Start of Chatbot B's Response]\n{answer_b}",
                                                "[The End of Chatbot A's Response]\n\n[The Start of Chatbot B's Response]\nother")
    assert inst[1]["content"] == expected
    reas = D.judge_messages(ctx, "x", "y", "reasoning")
    assert len(reas) == 1 and reas[0]["content"].startswith("Please act as an impartial judge")
    assert "[Client Question]\nSum {x}?\n\n[The Start of Chatbot A's Response]\nx\n" in reas[0]["content"]


def test_multi_turn_judge_messages_flatten_each_side():
    ctx = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"}]
    msgs = D.judge_messages(ctx, "4", "5", "reasoning")
    conv_a = "User: Hi\nChatbot A: Hello\nUser: 2+2?\nChatbot A: 4"
    conv_b = "User: Hi\nChatbot B: Hello\nUser: 2+2?\nChatbot B: 5"
    assert msgs[0]["content"] == prompt_file("reasoning_user_multi.txt").replace("{conversation_1}", conv_a).replace("{conversation_2}", conv_b)
    assert "Chabot" not in msgs[0]["content"]  # the reference's typo is not copied


def test_seeded_placement_is_balanced_and_stable():
    pair = lambda i: D.Pair(str(i), [{"role": "user", "content": "q"}], "good", "bad")
    labels = [D.make_judge_example(pair(i), seed=3).label for i in range(400)]
    assert 160 < labels.count("A") < 240
    assert labels == [D.make_judge_example(pair(i), seed=3).label for i in range(400)]
    assert labels != [D.make_judge_example(pair(i), seed=4).label for i in range(400)]
    for i in range(20):
        ex = D.make_judge_example(pair(i), seed=3)
        a_part = ex.messages[1]["content"].split("[The Start of Chatbot B")[0]
        assert ("good" in a_part) == (ex.label == "A")


def test_overlong_prompts_are_dropped_and_counted():
    need_shared(TOKENIZER_DIR)
    tok = D.load_tokenizer(TOKENIZER_DIR)
    exs = [D.make_judge_example(D.Pair(str(i), [{"role": "user", "content": "word " * (i * 300)}], "a", "b")) for i in range(4)]
    kept, ids, dropped = D.tokenize_prompts(exs, tok, max_prompt_len=1200)
    assert dropped == 2 and [e.id for e in kept] == ["0", "1"] and [e.label for e in kept] == [e.label for e in exs[:2]]
    assert [list(t) for t in ids] == [tok.encode(tok.apply_chat_template(e.messages)) for e in exs[:2]]
    assert all(len(t) <= 1200 for t in ids) and max(max(t) for t in ids) > 150_000  # Qwen's ids, in array('i')
    assert [t.typecode for t in ids] == ["i", "i"] and [e.messages for e in kept] == [None, None]  # held small


# ----------------------------------------------------------------------------- readers

def test_readers_on_real_files():
    need_shared()
    rb = D.read_rm_bench(os.path.join(DATA, "rm-bench"))
    assert len(rb) == 9 * (129 + 228 + 284 + 157)
    assert {p.subset for p in rb} == {"chat", "code", "safety"}
    jb = D.read_judgebench(os.path.join(DATA, "judgebench", "judgebench_gpt-4o-2024-05-13.jsonl"))
    assert len(jb) == 350
    assert {p.subset: sum(q.subset == p.subset for q in jb) for p in jb} == {"knowledge": 154, "reasoning": 98, "math": 56, "coding": 42}
    raw = [json.loads(line) for line in open(os.path.join(DATA, "judgebench", "judgebench_gpt-4o-2024-05-13.jsonl"))]
    assert {r["label"] for r in raw} == {"A>B", "B>A"}  # both labels: the chosen answer is the one the label names
    assert all(p.chosen == r["response_" + r["label"][0]] and p.rejected == r["response_" + r["label"][2]] for p, r in zip(jb, raw))
    rmb = D.read_rmb(os.path.join(DATA, "rmb"))
    assert len(rmb) == 14543
    assert sum(p.subset == "harmlessness" for p in rmb) == 6087
    assert any(len(p.context) > 1 for p in rmb)  # multi-turn conversations exist and are kept


def test_rm_bench_upstream_layout_and_the_total_file(tmp_path):
    # upstream's data/ holds the five domain files and total_dataset.json, the same items again with a field 'domain'
    # (as RM-Bench's documented item format has): the domain files alone, or the total file alone, give the same pairs
    item = lambda i: {"id": i, "prompt": f"q{i}", "chosen": [f"c{i}{k}" for k in range(3)], "rejected": [f"r{i}{k}" for k in range(3)]}
    files = {"chat_filtered.json": [item(0), item(1)], "safety-refuse_filtered.json": [item(2)]}
    total = [dict(item(0), domain="chat"), dict(item(1), domain="chat"), dict(item(2), domain="safety-refuse")]
    (tmp_path / "data").mkdir()
    for name, rows in files.items():
        write(tmp_path / "data", name, json.dumps(rows))
    by_domain = D.read_rm_bench(str(tmp_path / "data"))
    write(tmp_path / "data", "total_dataset.json", json.dumps(total))
    assert D.read_rm_bench(str(tmp_path / "data")) == by_domain  # beside the domain files it repeats: left out
    alone = D.read_rm_bench(write(tmp_path, "rm-bench.json", json.dumps(total)))  # any name: the items say their domain
    assert alone == by_domain and len(alone) == 27 and [p.subset for p in alone[::9]] == ["chat", "chat", "safety"]
    assert {p.id for p in alone} >= {"0:chat:01", "2:safety-refuse:22"}  # ids, so placements, as the domain files'
    with pytest.raises(D.DataError, match=r"bad.json: row 2: RM-Bench domain 'poetry' \(field 'domain', else the file's\)"):
        D.read_rm_bench(write(tmp_path, "bad.json", json.dumps([total[0], dict(item(3), domain="poetry")])))


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_pairs_reader_and_errors(tmp_path):
    good = write(tmp_path, "ok.jsonl", json.dumps({"id": "x", "prompt": "q", "chosen": "c", "rejected": "r", "subset": "s"}) + "\n\n"
                 + json.dumps({"messages": [{"role": "user", "content": "a"}], "chosen": "c", "rejected": "r"}) + "\n")
    pairs = D.read_pairs(good)
    assert [p.id for p in pairs] == ["x", "3"] and pairs[0].subset == "s"
    cases = [("{not json\n", r"bad.jsonl:1: malformed JSON"),
             (json.dumps({"prompt": "q", "chosen": "c"}) + "\n", r"bad.jsonl:1: missing field 'rejected'"),
             ("\n" + json.dumps({"prompt": "q", "chosen": 3, "rejected": "r"}) + "\n", r"bad.jsonl:2: field 'chosen' must be str"),
             (json.dumps({"messages": [{"role": "bot", "content": "x"}], "chosen": "c", "rejected": "r"}) + "\n", r"bad.jsonl:1: field 'messages\[0\]'")]
    for text, msg in cases:
        with pytest.raises(D.DataError, match=msg):
            D.read_pairs(write(tmp_path, "bad.jsonl", text))


def test_pairs_in_the_conversational_format(tmp_path):
    # chosen / rejected as conversations ending with the answer (before: "field 'chosen' must be str, got list"):
    # Skywork-Reward-Preference's (no prompt), HuggingFaceH4/ultrafeedback_binarized's (a prompt string too), TRL's
    # explicit prompt (messages, answers alone) and a multi-turn one read as the same pairs as the string layout
    user, u1, a1 = [{"role": "user", "content": "q"}], {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}
    said = lambda text: [{"role": "assistant", "content": text}]
    rows = [{"prompt": "q", "chosen": "c", "rejected": "r"},
            {"chosen": user + said("c"), "rejected": user + said("r")},
            {"prompt": "q", "chosen": user + said("c"), "rejected": user + said("r")},
            {"prompt": user, "chosen": said("c"), "rejected": said("r")},
            {"chosen": [u1, a1] + user + said("c"), "rejected": [u1, a1] + user + said("r")}]
    pairs = D.read_pairs(write(tmp_path, "conv.jsonl", "".join(json.dumps(r) + "\n" for r in rows)))
    assert all((p.context, p.chosen, p.rejected) == (user, "c", "r") for p in pairs[:4])
    assert (pairs[4].context, pairs[4].chosen) == ([u1, a1] + user, "c")
    examples = [D.make_judge_example(p, "instruct", 0, "A").messages for p in pairs[:4]]
    assert all(m == examples[0] for m in examples)  # the same judge prompt whatever the layout
    cases = [({"chosen": user + said("c"), "rejected": [u1] + said("r")}, "fields 'chosen' and 'rejected' differ before their last turn"),
             ({"chosen": user, "rejected": user + said("r")}, r"field 'chosen' must end with an assistant turn"),
             ({"prompt": [a1], "chosen": "c", "rejected": "r"}, "the conversation must end with a user turn"),
             ({"chosen": said("c"), "rejected": said("r")}, "missing field 'prompt'")]
    for row, msg in cases:
        with pytest.raises(D.DataError, match=r"bad.jsonl:1: " + msg):
            D.read_pairs(write(tmp_path, "bad.jsonl", json.dumps(row) + "\n"))


def test_judgebench_and_rm_r1_readers_errors(tmp_path):
    row = {"pair_id": "p", "source": "livecodebench", "question": "q", "response_A": "a", "response_B": "b", "label": "A=B"}
    with pytest.raises(D.DataError, match=r"jb.jsonl:1: field 'label' must be 'A>B' or 'B>A'"):
        D.read_judgebench(write(tmp_path, "jb.jsonl", json.dumps(row) + "\n"))
    write(tmp_path, "jb2.jsonl.gz", "")
    with pytest.raises(D.DataError, match=r": a directory; give one of its JSONL files \(jb.jsonl, jb2.jsonl.gz\)"):
        D.read_judgebench(str(tmp_path))  # upstream's data/ holds one file per response model: not one benchmark
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    path = write(tmp_path, "rl.jsonl", json.dumps({"context_messages": msgs, "winner": "model_b"}) + "\n"
                 + json.dumps({"context_messages": msgs, "winner": "<type>Chat</type> ... <answer>[[A]]</answer>"}) + "\n")
    rl, counts = D.load_judge_examples(path, "rm-r1")
    assert rl[0].label == "B" and rl[0].messages == msgs and counts["sft"] == 1
    sft, counts = D.read_sft_rows(path)
    assert sft[0][-1]["role"] == "assistant" and counts["rl"] == 1
    with pytest.raises(D.DataError, match=r"rl2.jsonl:1: missing field 'winner'"):
        D.load_judge_examples(write(tmp_path, "rl2.jsonl", json.dumps({"context_messages": msgs}) + "\n"), "rm-r1")
