"""rewards.py on realistic traces: the reference's last-80-characters rule."""
import pytest

from rewards import format_reward, judge_reward, parse_verdict

TRACE = ("<type>Reasoning</type>\n\n<solution>3+4=7</solution>\n\n<eval>\n  <quote_A>3+4=7</quote_A> is right; "
         "<quote_B>3+4=8</quote_B> is off by one.\n</eval>\n\n")


@pytest.mark.parametrize("text,label,reward,verdict", [
    (TRACE + "<answer>[[A]]</answer>", "A", 1.0, "A"),                       # correct
    (TRACE + "<answer>[[A]]</answer>", "B", -1.0, "A"),                      # wrong
    (TRACE + "<answer>[[B]]</answer><|im_end|>", "B", 1.0, "B"),             # special token kept at the end
    (TRACE + "<answer>[[B]]</answer>\n\n  \n", "B", 1.0, "B"),               # trailing whitespace
    (TRACE + "<answer>[[A]]</answer> or <answer>[[B]]</answer>", "A", -1.0, None),  # both tags
    ("<answer>[[A]]</answer>\n" + TRACE + "I think A is better overall.", "A", -1.0, None),  # tag early, not at the end
    (TRACE + "<answer>[[", "A", -1.0, None),                                 # truncated mid-tag
    (TRACE + "[[A]]", "A", -1.0, None),                                      # bare verdict is not the format
    (TRACE + "<answer> [[A]] </answer>", "A", -1.0, None),                   # whitespace inside the tag
    ("", "B", -1.0, None),
])
def test_reference_rule(text, label, reward, verdict):
    assert judge_reward(text, label) == reward
    assert parse_verdict(text) == verdict


def test_last_80_characters_boundary():
    tag = "<answer>[[A]]</answer>"
    assert judge_reward(tag + "x" * (80 - len(tag)), "A") == 1.0        # tag fully inside the window
    assert judge_reward(tag + "x" * (80 - len(tag) + 1), "A") == -1.0   # first char pushed out
    assert judge_reward("<answer>[[B]]</answer>" + " " * 58 + tag, "A") == 1.0  # other tag just outside


def test_truncated_gets_minus_one_and_bad_label_raises():
    assert judge_reward(TRACE + "<answer>[[A]]</answer>", "A", truncated=True) == -1.0
    with pytest.raises(ValueError, match="label must be 'A' or 'B'"):
        judge_reward("x", "model_a")


def test_format_reward():
    assert format_reward(TRACE + "<answer>[[A]]</answer>", "A") == 2.0
    assert format_reward(TRACE + "<answer>[[A]]</answer>", "B") == 1.0
    assert format_reward("<answer>[[A]]</answer>", "A") == 1.0   # right verdict, no <eval>
    assert format_reward(TRACE.replace("</eval>", "") + "<answer>[[A]]</answer>", "A") == 1.0  # an <eval> never closed
    assert format_reward(TRACE, "A") == 0.0
