"""
data.py: tokenizer and chat templates, RM-R1 judge prompts, and readers for preference data.

Tokenizer: the `tokenizers` library reads tokenizer.json; tokenizer_config.json gives the special tokens and the chat
template (or chat_template.jinja), from which we pick one of three hand-written template families (no jinja at run time):
  qwen2.5   ChatML: <|im_start|>{role}\n{content}<|im_end|>\n per message, the default system message
            "You are Qwen, created by Alibaba Cloud. You are a helpful assistant." when none is given,
            generation prompt <|im_start|>assistant\n
  qwen3     ChatML with no default system message; assistant turns after the last user message carry their
            reasoning as <think>\n..\n</think>\n\n; enable_thinking=False puts an empty think block in the
            generation prompt (the official template's switch)
  deepseek-r1   <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>{answer after </think>}
            <｜end▁of▁sentence｜>, generation prompt <｜Assistant｜><think>\n
An unknown template is an error, never a guess.

Judge prompts (RM-R1, byte for byte): a pair (conversation, chosen, rejected) becomes a judge prompt with
the chosen answer placed at A or B by a seeded coin per pair id; the label names the side of the chosen
answer. "instruct" family: system = chain-of-rubrics instructions, user = the pair; "reasoning" family
(DeepSeek-R1-Distill): user message only. Single-turn (one user message) fills {question}, {answer_a},
{answer_b}; anything longer flattens each side's whole conversation as "{Role}: {content}" lines
(User / Chatbot A or Chatbot B / System).

Readers (each reports bad rows as file:line: field: problem):
  rm-r1   RM-R1 RL/distillation rows: context_messages (the rendered judge messages) + winner
          (model_a / model_b for RL; the teacher trace for distillation)
  pairs   generic JSONL: id, prompt (string) or messages (list), chosen, rejected (strings, or conversations ending
          with the answer: TRL's conversational format), optional subset
  rm-bench  RM-Bench JSON or JSONL (3 chosen x 3 rejected styles: all 9 pairings), domain from the row or the file name
  judgebench  JudgeBench JSONL (label A>B / B>A), category from the source
  rmb     RMB pairwise and best-of-N JSON (.gz too; a file, a directory or the upstream layout), helpfulness / harmlessness
Answers are taken as given: an empty or whitespace-only answer is judged (a legitimate bad answer), counted;
GRPO drops such pairs and counts them. Structurally broken rows are errors naming file, row and field.
"""
import gzip
import json
import os
import random
from array import array
from collections import Counter
from dataclasses import dataclass, field, replace

from tokenizers import Tokenizer


INSTRUCT_SYSTEM = """Please act as an impartial judge and evaluate the quality of the responses provided by two AI Chatbots to the Client's question displayed below.

First, classify the task into one of two categories: <type>Reasoning</type> or <type>Chat</type>.
- Use <type>Reasoning</type> for tasks that involve math, coding, or require domain knowledge, multi-step inference, logical deduction, or combining information to reach a conclusion.
- Use <type>Chat</type> for tasks that involve open-ended or factual conversation, stylistic rewrites, safety questions, or general helpfulness requests without deep reasoning.

If the task is Reasoning:
1. Solve the Client's question yourself and present your final answer within <solution>...</solution> tags.
2. Evaluate the two Chatbot responses based on correctness, completeness, and reasoning quality, referencing your own solution.
3. Include your evaluation inside <eval>...</eval> tags, quoting or summarizing the Chatbots using the following tags:
   - <quote_A>...</quote_A> for direct quotes from Chatbot A
   - <summary_A>...</summary_A> for paraphrases of Chatbot A
   - <quote_B>...</quote_B> for direct quotes from Chatbot B
   - <summary_B>...</summary_B> for paraphrases of Chatbot B
4. End with your final judgment in the format: <answer>[[A]]</answer> or <answer>[[B]]</answer>

If the task is Chat:
1. Generate evaluation criteria (rubric) tailored to the Client's question and context, enclosed in <rubric>...</rubric> tags.
2. Assign weights to each rubric item based on their relative importance.
3. Inside <rubric>, include a <justify>...</justify> section explaining why you chose those rubric criteria and weights.
4. Compare both Chatbot responses according to the rubric.
5. Provide your evaluation inside <eval>...</eval> tags, using <quote_A>, <summary_A>, <quote_B>, and <summary_B> as described above.
6. End with your final judgment in the format: <answer>[[A]]</answer> or <answer>[[B]]</answer>

Important Notes:
- Be objective and base your evaluation only on the content of the responses.
- Do not let response order, length, or Chatbot names affect your judgment.
- Follow the response format strictly depending on the task type.

Your output must follow one of the two formats below:

For Reasoning:
<type>Reasoning</type>

<solution> your own solution for the problem </solution>

<eval>
  include direct comparisons supported by <quote_A>...</quote_A> or <summary_A>...</summary_A>, and <quote_B>...</quote_B>, or <summary_B>...</summary_B>
</eval>

<answer>[[A/B]]</answer>

For Chat:
<type>Chat</type>

<rubric>
  detailed rubric items
  <justify> justification for the rubric </justify>
</rubric>

<eval>
  include direct comparisons supported by <quote_A>...</quote_A> or <summary_A>...</summary_A>, and <quote_B>...</quote_B>, or <summary_B>...</summary_B> tags
</eval>

<answer>[[A/B]]</answer>"""

INSTRUCT_USER_SINGLE = """[Client Question]
{question}

[The Start of Chatbot A's Response]
{answer_a}
[The End of Chatbot A's Response]

[The Start of Chatbot B's Response]
{answer_b}
[The End of Chatbot B's Response]"""

INSTRUCT_USER_MULTI = """[The Start of the Conversation between Chatbot A and the Client]
{conversation_1}
[The End of the Conversation between Chatbot A and the Client]

[The Start of the Conversation between Chatbot B and the Client]
{conversation_2}
[The End of the Conversation between Chatbot B and the Client]"""

# the DeepSeek-R1-Distill family: the same user messages between a head and the verdict's format (no system message)
_REASONING_HEAD = ("Please act as an impartial judge and evaluate the quality of the responses provided by two AI "
                   "Chatbots to the Client question displayed below. \n")
_VERDICT_FORMAT = ("Output your final verdict at last by strictly following this format: '<answer>[[A]]</answer>' if "
                   "Chatbot A is better, or '<answer>[[B]]</answer>' if Chatbot B is better.")
REASONING_USER_SINGLE = _REASONING_HEAD + "\n" + INSTRUCT_USER_SINGLE + "\n\n" + _VERDICT_FORMAT
REASONING_USER_MULTI = _REASONING_HEAD + "\n" + INSTRUCT_USER_MULTI + "\n\n" + _VERDICT_FORMAT

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
DS_BOS, DS_EOS, DS_USER, DS_ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"


class DataError(ValueError):
    """Bad input data; the message names file, line (or row) and field."""


def chat_family(path, cfg, cfg_file) -> str:
    """The chat template's family. It is read where transformers reads it: chat_template.jinja (which transformers >= 4.50
    saves) before tokenizer_config.json's chat_template (a string, or named templates: the "default")."""
    template, source = cfg.get("chat_template"), cfg_file
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    if os.path.exists(jinja := os.path.join(path, "chat_template.jinja")):
        with open(jinja, encoding="utf-8") as f:
            template, source = f.read(), jinja
    template = template if isinstance(template, str) else ""
    if "<|im_start|>" in template and QWEN_DEFAULT_SYSTEM in template:
        return "qwen2.5"
    if "<|im_start|>" in template and "enable_thinking" in template and "<think>" in template:
        return "qwen3"
    if DS_ASSISTANT in template and DS_USER in template:
        return "deepseek-r1"
    raise ValueError(f"{source}: unknown chat template (supported: Qwen2.5 ChatML with its default system "
                     "message, Qwen3 with its thinking switch, DeepSeek-R1-Distill); refusing to guess how to render prompts")


class ChatTokenizer:
    """encode/decode with no special tokens added, special-token ids, and the chat template."""

    def __init__(self, path):
        tok_file, cfg_file = os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer_config.json")
        for f in (tok_file, cfg_file):
            if not os.path.exists(f):
                raise FileNotFoundError(f"{f} not found (a tokenizer directory needs tokenizer.json and tokenizer_config.json)")
        self.tok = Tokenizer.from_file(tok_file)
        cfg = read_json(cfg_file, dict)
        self.family = chat_family(path, cfg, cfg_file)
        token = lambda v: v.get("content") if isinstance(v, dict) else v
        self.eos_token, self.pad_token = token(cfg.get("eos_token")), token(cfg.get("pad_token"))
        self.eos_id = self.tok.token_to_id(self.eos_token) if self.eos_token else None
        self.pad_id = self.tok.token_to_id(self.pad_token) if self.pad_token else self.eos_id
        self.im_end_id = self.tok.token_to_id("<|im_end|>")
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)  # ids beyond it are padding rows
        chatml = self.family in ("qwen2.5", "qwen3")
        # the token that closes an assistant turn (what SFT teaches a trace to end with); generation stops there too
        self.end_of_turn_id = self.im_end_id if chatml else self.eos_id  # DeepSeek-R1 ends a turn with its eos
        stops = [self.eos_id, self.end_of_turn_id] + ([self.im_end_id, self.tok.token_to_id("<|endoftext|>")] if chatml else [])
        self.stop_ids = sorted({s for s in stops if s is not None})

    def cut_off(self, ids):
        """A generation that ended without a stop id: cut at the token budget (its verdict counts as missing)."""
        return not ids or ids[-1] not in self.stop_ids

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts, chunk=1024):
        """encode for many texts on all cores (the library's batch encoder), yielded a chunk at a time: each of its
        results also holds token strings and offsets, and a caller may keep fewer ids than it reads (sft.py)."""
        for s in range(0, len(texts), chunk):
            yield from (e.ids for e in self.tok.encode_batch(texts[s:s + chunk], add_special_tokens=False))

    def decode(self, ids, skip_special_tokens=False):
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, seqs):
        """decode for many sequences of ids (lists, or arrays, read as they are) on all cores: 7k traces, 1.2 s (2.8 s one by one)."""
        return self.tok.decode_batch(list(seqs), skip_special_tokens=False)

    def apply_chat_template(self, messages, add_generation_prompt=True, enable_thinking=None):
        """enable_thinking (Qwen3's switch): None or True lets the judge think; False closes an empty <think></think>."""
        check_messages(messages, "apply_chat_template")
        if self.family == "qwen3":
            return qwen3_chat(messages, add_generation_prompt, enable_thinking)
        if self.family == "qwen2.5":
            out = "" if messages and messages[0]["role"] == "system" else f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}<|im_end|>\n"
            out += "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
            return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")
        system = [m["content"] for m in messages if m["role"] == "system"]
        out = DS_BOS + (system[-1] if system else "")
        for m in messages:
            if m["role"] == "user":
                out += DS_USER + m["content"]
            elif m["role"] == "assistant":
                out += DS_ASSISTANT + m["content"].split("</think>")[-1] + DS_EOS
        return out + (DS_ASSISTANT + "<think>\n" if add_generation_prompt else "")


def qwen3_chat(messages, add_generation_prompt, enable_thinking):
    """Qwen3's template without its tool branches: no default system message; an assistant turn after the
    last user message shows its reasoning as <think>..</think> (taken from the content), earlier ones drop it."""
    is_query = lambda m: m["role"] == "user" and not (m["content"].startswith("<tool_response>")
                                                     and m["content"].endswith("</tool_response>"))
    last_query = max((i for i, m in enumerate(messages) if is_query(m)), default=len(messages) - 1)
    out = ""
    for i, m in enumerate(messages):
        content = m["content"]
        if m["role"] != "assistant":
            out += f"<|im_start|>{m['role']}\n{content}<|im_end|>\n"
            continue
        reasoning = ""
        if "</think>" in content:
            reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
            content = content.split("</think>")[-1].lstrip("\n")
        if i > last_query and (i == len(messages) - 1 or reasoning):
            content = "<think>\n" + reasoning.strip("\n") + "\n</think>\n\n" + content.lstrip("\n")
        out += f"<|im_start|>assistant\n{content}<|im_end|>\n"
    if add_generation_prompt:
        out += "<|im_start|>assistant\n" + ("<think>\n\n</think>\n\n" if enable_thinking is False else "")
    return out


load_tokenizer = ChatTokenizer  # load_tokenizer(directory) -> ChatTokenizer


# ----------------------------------------------------------------------------- judge prompts

@dataclass
class Pair:
    """A preference pair: `context` is the conversation up to (not including) the two answers."""
    id: str
    context: list
    chosen: str
    rejected: str
    subset: str = ""
    meta: dict = field(default_factory=dict)

    def has_empty_answer(self) -> bool:  # empty or whitespace-only: judged as given (a bad answer), dropped by GRPO
        return not self.chosen.strip() or not self.rejected.strip()


@dataclass
class JudgeExample:
    id: str
    messages: list          # judge messages, ready for the chat template (None in the examples tokenize_prompts returns)
    label: str              # "A" or "B": the side holding the chosen answer
    subset: str = ""
    meta: dict = field(default_factory=dict)


def default_judge_family(tokenizer) -> str:
    return "reasoning" if tokenizer.family == "deepseek-r1" else "instruct"


def _flatten(context, answer, side):
    names = {"user": "User", "assistant": f"Chatbot {side}", "system": "System"}
    return "\n".join(f"{names[m['role']]}: {m['content']}" for m in context + [{"role": "assistant", "content": answer}])


def judge_messages(context, answer_a, answer_b, family="instruct"):
    """The RM-R1 judge messages for answers placed at A and B."""
    if family not in ("instruct", "reasoning"):
        raise ValueError(f"unknown judge family {family!r} (instruct or reasoning)")
    if len(context) == 1 and context[0]["role"] == "user":
        tmpl = INSTRUCT_USER_SINGLE if family == "instruct" else REASONING_USER_SINGLE
        user = tmpl.format(question=context[0]["content"], answer_a=answer_a, answer_b=answer_b)
    else:
        tmpl = INSTRUCT_USER_MULTI if family == "instruct" else REASONING_USER_MULTI
        user = tmpl.format(conversation_1=_flatten(context, answer_a, "A"), conversation_2=_flatten(context, answer_b, "B"))
    msgs = [{"role": "user", "content": user}]
    return ([{"role": "system", "content": INSTRUCT_SYSTEM}] + msgs) if family == "instruct" else msgs


def check_prompt_family(msgs, family, where):
    """Refuse an RM-R1 row rendered for the other judge family: RM-R1 trains DeepSeek-R1-Distill judges on
    RM-R1-Reasoning-RLVR and Qwen2.5-Instruct ones on its instruct sets, and a row's prompt comes rendered (the judge's
    own family would be ignored). instruct: the chain-of-rubrics system message; reasoning: no system message, a user
    turn that opens with the Reasoning judge's head; another prompt is not checked."""
    system, text = msgs[0]["role"] == "system", msgs[0]["content"]
    found = ("instruct" if system and text == INSTRUCT_SYSTEM else
             "reasoning" if not system and text.startswith(_REASONING_HEAD) else None)
    if found not in (None, family):
        raise DataError(f"{where}: an RM-R1 {found} judge prompt, but this judge's prompts are {family} ones (from its "
                        "chat template, or --family): RM-R1 trains DeepSeek-R1-Distill judges on gaotang/RM-R1-"
                        f"Reasoning-RLVR and Qwen2.5-Instruct ones on its instruct sets; pass --family {found} to use "
                        "these rows as they are")


def placement(pair_id, seed) -> str:
    """Seeded A/B coin per pair id: independent of order, ranks and resumption (the reference's eval shuffle is unseeded)."""
    return "A" if random.Random(f"{seed}:{pair_id}").random() < 0.5 else "B"


def make_judge_example(pair: Pair, family="instruct", seed=0, label=None) -> JudgeExample:
    label = label or placement(pair.id, seed)
    a, b = (pair.chosen, pair.rejected) if label == "A" else (pair.rejected, pair.chosen)
    meta = dict(pair.meta, len_a=len(a), len_b=len(b))  # answer lengths: for the no-model baseline judges
    return JudgeExample(pair.id, judge_messages(pair.context, a, b, family), label, pair.subset, meta)


def tokenize_prompts(examples, tokenizer, max_prompt_len):
    """Render + encode judge prompts, dropping and counting those over max_prompt_len (the reference's
    filter_overlong_prompts) -> (kept examples, their ids, dropped count), small as grpo.py holds them on every rank: ids
    as array('i'), 4 bytes a token (a list: 34), and the examples without their messages (the ids are the prompt)."""
    ids = []
    for s in range(0, len(examples), 1024):  # rendered and encoded a chunk at a time
        texts = [tokenizer.apply_chat_template(ex.messages, add_generation_prompt=True) for ex in examples[s:s + 1024]]
        ids += [array("i", t) for t in tokenizer.encode_batch(texts)]
    kept = [k for k, t in enumerate(ids) if len(t) <= max_prompt_len]
    return [replace(examples[k], messages=None) for k in kept], [ids[k] for k in kept], len(examples) - len(kept)


# ----------------------------------------------------------------------------- readers

def read_jsonl(path):
    """Yield (line number, row dict); malformed lines are a DataError naming file and line."""
    if os.path.isdir(path):  # e.g. JudgeBench's data/: one file per response model, which are not one benchmark
        files = sorted(f for f in os.listdir(path) if f.endswith((".jsonl", ".jsonl.gz")))
        raise DataError(f"{path}: a directory; give one of its JSONL files ({', '.join(files[:4]) or 'it has none'})")
    with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise not_text(path, f"{path}:{n}", f"byte {raw[e.start]:#04x} at column {e.start + 1}") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            yield n, row


def read_json(path, kind=list):
    """A whole-file JSON value of type kind (benchmark files: a list of rows; tokenizer_config.json: an object)."""
    with gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8") as f:
        try:
            value = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
        except UnicodeDecodeError as e:
            raise not_text(path, path, f"byte offset {e.start}") from None
    if not isinstance(value, kind):
        raise DataError(f"{path}: expected a JSON {'list of rows' if kind is list else 'object'}, got {type(value).__name__}")
    return value


def not_text(path, where, detail):
    """The error for a file that is not UTF-8 text: a Parquet file (how the Hub stores datasets) is said to be one."""
    with open(path, "rb") as f:
        if f.read(4) == b"PAR1":
            return DataError(f"{path}: a Parquet file, not JSON: export it to JSON Lines (README, step 1)")
    return DataError(f"{where}: not UTF-8 ({detail})")


def benchmark_rows(path):
    """A benchmark file's rows -> (row number, where, row): a JSON list of objects, or JSON Lines (a .jsonl file, as
    datasets' to_json writes a Hub dataset: THU-KEG/RM-Bench's rows are upstream's)."""
    if path.endswith((".jsonl", ".jsonl.gz")):
        yield from ((n, f"{path}:{n}", row) for n, row in read_jsonl(path))
        return
    for n, row in enumerate(read_json(path), 1):
        if not isinstance(row, dict):
            raise DataError(f"{path}: row {n}: expected a JSON object, got {type(row).__name__}")
        yield n, f"{path}: row {n}", row


def need(row, key, where, kind=str, nonempty=True):
    """Fetch a required field, or raise a DataError naming file:line and the field."""
    if key not in row:
        raise DataError(f"{where}: missing field '{key}'")
    v = row[key]
    if not isinstance(v, kind):
        raise DataError(f"{where}: field '{key}' must be {getattr(kind, '__name__', kind)}, got {type(v).__name__}")
    if nonempty and (v.strip() == "" if isinstance(v, str) else len(v) == 0):
        raise DataError(f"{where}: field '{key}' is empty")
    return v


def answer(row, key, where):
    """An answer to judge, taken as given: an empty or blank one is a legitimate bad answer (judged; GRPO drops it)."""
    return need(row, key, where, nonempty=False)


def check_messages(msgs, where, key="messages"):
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise DataError(f"{where}: field '{key}[{i}]' needs role system/user/assistant")
        if not isinstance(m.get("content"), str):
            raise DataError(f"{where}: field '{key}[{i}].content' must be a string")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def read_pairs(path):
    """Preference pairs: an answer is a string, or a conversation ending with it (TRL's conversational format, and
    Skywork-Reward-Preference's, RM-R1's source): its turns before the answer, the same on both sides, are the context,
    else `messages`, else `prompt` (a string, or messages)."""
    out = []
    for n, row in read_jsonl(path):
        where = f"{path}:{n}"
        (chosen, before), (rejected, other) = (conversation_answer(row, k, where) for k in ("chosen", "rejected"))
        if before != other:
            raise DataError(f"{where}: fields 'chosen' and 'rejected' differ before their last turn (the answers)")
        if before:
            context = before
        elif "messages" in row or isinstance(row.get("prompt"), list):
            key = "messages" if "messages" in row else "prompt"
            context = check_messages(need(row, key, where, list), where, key)
        else:
            context = [{"role": "user", "content": need(row, "prompt", where)}]
        if context[-1]["role"] != "user":
            raise DataError(f"{where}: the conversation must end with a user turn (the answers follow it)")
        out.append(Pair(str(row.get("id", n)), context, chosen, rejected, str(row.get("subset", ""))))
    return out


def conversation_answer(row, key, where):
    """A pair's answer -> (its text, the turns before it): a string (no turns), or messages ending with the assistant's."""
    if not isinstance(row.get(key), list):
        return answer(row, key, where), []
    msgs = check_messages(need(row, key, where, list), where, key)
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: field '{key}' must end with an assistant turn (the answer)")
    return msgs[-1]["content"], msgs[:-1]


def read_rm_bench(path):
    """RM-Bench: each item gives 9 pairs (chosen style i, rejected style j; meta i/j for the 3x3 matrix), of its field
    'domain' or else its file's domain. A directory's total_dataset.json is left out beside the domain files it repeats."""
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".json")) if os.path.isdir(path) else [path]
    files = [f for f in files if len(files) == 1 or os.path.basename(f) != "total_dataset.json"]
    if not files:
        raise DataError(f"{path}: no RM-Bench files (*.json) in this directory")
    out = []
    for file in files:
        for n, where, row in benchmark_rows(file):
            name = row.get("domain") or os.path.basename(file).replace("_filtered.json", "").replace(".json", "")
            domain = "safety" if str(name).startswith("safety") else name
            if domain not in ("chat", "math", "code", "safety"):
                raise DataError(f"{where}: RM-Bench domain {name!r} (field 'domain', else the file's) is not chat/math/code/safety-*")
            chosen, rejected = need(row, "chosen", where, list), need(row, "rejected", where, list)
            if len(chosen) != 3 or len(rejected) != 3:
                raise DataError(f"{where}: fields 'chosen'/'rejected' must hold 3 styled answers each")
            for k, a in enumerate(chosen + rejected):
                if not isinstance(a, str):
                    raise DataError(f"{where}: field '{'chosen' if k < 3 else 'rejected'}[{k % 3}]' is not a string")
            ctx = [{"role": "user", "content": need(row, "prompt", where)}]
            for i in range(3):
                for j in range(3):
                    out.append(Pair(f"{row.get('id', n)}:{name}:{i}{j}", ctx, chosen[i], rejected[j], domain,
                                    {"i": i, "j": j, "item": f"{name}:{row.get('id', n)}"}))
    return out


def judgebench_category(source):
    return "knowledge" if source.startswith("mmlu-pro") else (
        {"livebench-reasoning": "reasoning", "livebench-math": "math", "livecodebench": "coding"}.get(source))


def read_judgebench(path):
    out = []
    for n, row in read_jsonl(path):
        where = f"{path}:{n}"
        label, source = need(row, "label", where), need(row, "source", where)
        if label not in ("A>B", "B>A"):
            raise DataError(f"{where}: field 'label' must be 'A>B' or 'B>A', got {label!r}")
        if judgebench_category(source) is None:
            raise DataError(f"{where}: field 'source' has unknown value {source!r}")
        a, b = answer(row, "response_A", where), answer(row, "response_B", where)
        chosen, rejected = (a, b) if label == "A>B" else (b, a)
        out.append(Pair(str(row.get("pair_id", n)), [{"role": "user", "content": need(row, "question", where)}],
                        chosen, rejected, judgebench_category(source)))
    return out


def read_rmb(path):
    """RMB: a file, a directory of files, or upstream's repository (its RMB_dataset/, holding Pairwise_set and/or BoN_set;
    not its eval/result/), .json or .json.gz, searched recursively with links followed. A pairwise row gives one pair
    (meta set=pairwise); a best-of-N row ({bon_uid, bon_best, loser_list}) one pair per loser (meta set=bon, item=bon_uid):
    the item counts only if the judge prefers bon_best to every loser. Blank answers are judged as given (RMB S5 has two)."""
    path = os.path.join(path, "RMB_dataset") if os.path.isdir(os.path.join(path, "RMB_dataset")) else path
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path, followlinks=True) for f in fs if f.endswith((".json", ".json.gz")))
    if not files:
        raise DataError(f"{path}: no RMB files (*.json or *.json.gz, searched recursively, links followed)")
    out = []
    for file in files:
        for n, where, row in benchmark_rows(file):
            cat = need(row, "category_path", where)
            subset = "helpfulness" if "Helpfulness" in cat else "harmlessness" if "Harmlessness" in cat else None
            if subset is None:
                raise DataError(f"{where}: field 'category_path' is neither Helpfulness nor Harmlessness: {cat!r}")
            context = check_messages(need(row, "conversation_input", where, list), where, "conversation_input")
            if "bon_best" in row:
                best, uid = rmb_answer(row, "bon_best", where), str(need(row, "bon_uid", where))
                losers = need(row, "loser_list", where, list)
                for k in range(len(losers)):
                    out.append(Pair(f"{uid}:{k}", context, best, rmb_answer(losers, k, f"{where}: field 'loser_list'"),
                                    subset, {"category": cat, "set": "bon", "item": uid}))
            else:
                out.append(Pair(str(row.get("pair_uid", f"{file}:{n}")), context, rmb_answer(row, "chosen", where),
                                rmb_answer(row, "reject", where), subset, {"category": cat, "set": "pairwise"}))
    return out


def rmb_answer(container, key, where):
    """RMB's {llm_name, answer} -> the answer text."""
    ans = container[key] if isinstance(container, list) else need(container, key, where, dict)
    if not isinstance(ans, dict) or not isinstance(ans.get("answer"), str):
        raise DataError(f"{where}: field '{key}.answer' is missing or not a string")
    return ans["answer"]


def rm_r1_row(row, where, counts):
    """One RM-R1 row: context_messages are the judge messages already rendered with the answers placed, and
    winner says which stage the row is for: 'model_a'/'model_b' -> ("rl", JudgeExample); a judge trace (text with
    an <answer> tag) -> ("sft", [*context_messages, assistant trace]); anything else is an error naming the row.
    counts (a Counter) gets "rl"/"sft" for the kinds. The released prompts carry the reference's "Chabot B" typo: fixed here,
    and counted in counts["typo_fixed"]."""
    msgs = check_messages(need(row, "context_messages", where, list), where, "context_messages")
    if any(TYPO in m["content"] for m in msgs):
        msgs = [dict(m, content=m["content"].replace(TYPO, "Chatbot B")) for m in msgs]
        counts["typo_fixed"] += 1
    winner = need(row, "winner", where)
    if winner in ("model_a", "model_b"):
        counts["rl"] += 1
        return "rl", JudgeExample(str(row.get("id", where.rsplit(":", 1)[-1])), msgs, "A" if winner == "model_a" else "B")
    if "<answer>" not in winner:
        raise DataError(f"{where}: field 'winner' must be 'model_a' / 'model_b' (RL rows) or a judge trace with "
                        f"an <answer> tag (distillation rows), got {winner[:40]!r}")
    counts["sft"] += 1
    return "sft", msgs + [{"role": "assistant", "content": winner}]


def read_sft_rows(path, family=None):
    """SFT data: RM-R1 distillation rows (context_messages + winner = the trace) or chat rows (messages ending with the
    turn to learn) -> (message lists ending with it, counts). RL rows (no trace) are counted in counts["rl"] and skipped (a
    file of only those is refused). With a judge family, a row in the other's prompt is an error (check_prompt_family)."""
    out, counts = [], Counter()
    for n, row in read_jsonl(path):
        where = f"{path}:{n}"
        if "context_messages" in row:
            kind, item = rm_r1_row(row, where, counts)
            if kind == "sft":
                if family:
                    check_prompt_family(item, family, where)
                out.append(item)
        elif "messages" in row:
            msgs = check_messages(need(row, "messages", where, list), where)
            if msgs[-1]["role"] != "assistant":
                raise DataError(f"{where}: field 'messages' must end with the assistant turn to learn")
            if not msgs[-1]["content"].strip():
                raise DataError(f"{where}: field 'messages[-1].content' (the assistant turn) is empty")
            out.append(msgs)
        else:
            raise DataError(f"{where}: missing field 'context_messages' (RM-R1 format) or 'messages' (chat format)")
    if not out:
        raise DataError(f"{path}: no SFT rows" + (f": {counts['rl']} RM-R1 RL rows (winner model_a/model_b, no trace "
                                                  "to learn); this is GRPO data" if counts["rl"] else ""))
    return out, {"rl": counts["rl"], "typo_fixed": counts["typo_fixed"]}


TYPO = "Chabot B"
READERS = {"pairs": read_pairs, "rm-bench": read_rm_bench, "judgebench": read_judgebench, "rmb": read_rmb}
FORMATS = ["rm-r1", *READERS]  # what load_judge_examples reads (the trainers' --format and --eval-format)


def load_judge_examples(path, fmt, family="instruct", seed=0, training=False, both_orders=False):
    """Any supported preference format -> (judge examples with seeded placement, counts): "empty" pairs (an empty or blank
    answer) and "identical" ones (two equal answers), judged as given (benchmark data) or dropped with training=True, and
    for RM-R1 files "sft" rows (skipped: not RL data) and "typo_fixed". Placement is seeded by pair id: a repeated id is an
    error. family: the judge prompts pairs are rendered with; an RM-R1 row rendered for the other is an error
    (check_prompt_family). both_orders: each pair twice, chosen at A then at B (ids "{id}#A", "{id}#B", meta["pair"])."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or directory")
    if fmt == "rm-r1":  # RM-R1 rows (rm_r1_row): RL rows become judge examples, distillation rows are counted
        rl, counts = [], Counter()
        for n, row in read_jsonl(path):
            kind, item = rm_r1_row(row, f"{path}:{n}", counts)
            if kind == "rl":
                check_prompt_family(item.messages, family, f"{path}:{n}")
                rl.append(item)
        if not rl:
            raise DataError(f"{path}: no RL rows (winner model_a/model_b)" + (f": {counts['sft']} distillation rows "
                            "(judge traces) found instead; this is SFT data" if counts["sft"] else ""))
        refuse_duplicate_ids(path, [e.id for e in rl])
        return rl, {"sft": counts["sft"], "typo_fixed": counts["typo_fixed"]}
    if fmt not in READERS:
        raise ValueError(f"unknown data format {fmt!r} (one of rm-r1, {', '.join(READERS)})")
    pairs = READERS[fmt](path)
    if not pairs:
        raise DataError(f"{path}: no {fmt} rows found")
    refuse_duplicate_ids(path, [p.id for p in pairs])
    counts = {"empty": sum(p.has_empty_answer() for p in pairs), "identical": sum(p.chosen == p.rejected for p in pairs)}
    if training:
        pairs = [p for p in pairs if p.chosen != p.rejected and not p.has_empty_answer()]
    if not pairs:
        raise DataError(f"{path}: no pairs left to judge ({counts})")
    labels = "AB" if both_orders else [None]  # None: the seeded placement
    examples = [make_judge_example(p, family, seed, label) for p in pairs for label in labels]
    if both_orders:
        for ex in examples:
            ex.meta["pair"], ex.id = ex.id, f"{ex.id}#{ex.label}"
    return examples, counts


COUNTED = {"empty": "with an empty or blank answer", "identical": "with identical answers", "typo_fixed": "prompts with 'Chabot B' fixed",
           "rl": "RM-R1 RL rows skipped (no trace)", "sft": "RM-R1 distillation rows skipped (not RL)",
           "truncated": "cut to --max-len by --truncate (each loses the end of its trace and verdict)"}


def describe_counts(counts):
    """A reader's counts for a log line: ", 3 with an empty or blank answer, ..." (zeros left out)."""
    return "".join(f", {counts[k]} {what}" for k, what in COUNTED.items() if counts.get(k))


def refuse_duplicate_ids(path, ids):
    repeated = next((i for i, count in Counter(ids).items() if count > 1), None)
    if repeated is not None:
        raise DataError(f"{path}: id {repeated!r} appears more than once (A/B placement and results are keyed by id)")
