"""
rewards.py: the rule-based verdict reward of RM-R1, used by GRPO and (as the parser) by evaluation.

The reference rule, kept exactly: look only at the last 80 characters of the decoded response (special
tokens kept, so a trailing <|im_end|> is part of the text). With T_y = "<answer>[[y]]</answer>":

    reward(text, label) = +1  if T_label is in text[-80:] and T_other is not
                          -1  otherwise (wrong verdict, no verdict, both verdicts, truncated response)

parse_verdict applies the same rule, so training and evaluation cannot disagree about what a verdict is
(the reference used a looser parser at evaluation: a bare [[A]] anywhere).

Cold-start RL (no distillation first) adds a format term: reward = format (0/1) + correct (0/1), where the
format is right when the trace has an <eval>...</eval> section and ends with exactly one verdict tag.
"""
TAIL_CHARS = 80
TAGS = {"A": "<answer>[[A]]</answer>", "B": "<answer>[[B]]</answer>"}


def parse_verdict(text):
    """-> "A", "B", or None (no verdict, or both, in the last 80 characters)."""
    tail = text[-TAIL_CHARS:]
    found = [side for side, tag in TAGS.items() if tag in tail]
    return found[0] if len(found) == 1 else None


def judge_reward(text, label, truncated=False):
    """+1 if the verdict matches the label ("A"/"B"), else -1. A truncated response (hit the token
    budget without an end-of-turn) is -1 whatever its tail says."""
    if label not in TAGS:
        raise ValueError(f"label must be 'A' or 'B', got {label!r}")
    return 1.0 if not truncated and parse_verdict(text) == label else -1.0


def format_reward(text, label, truncated=False):
    """Cold-start variant: format (0/1) + correct verdict (0/1)."""
    verdict = None if truncated else parse_verdict(text)
    well_formed = verdict is not None and "<eval>" in text and "</eval>" in text
    return float(well_formed) + float(verdict == label)
