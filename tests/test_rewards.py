"""Tests for lora_rl.rewards: answer extraction and the GSM8K grader."""

import ast
import json
import re
import subprocess
import sys
import threading
import time

import pytest

from lora_rl import rewards, tasks
from lora_rl.rewards import REWARDS, extract_answer, get_reward, gsm8k_reward, has_final_answer, strict_reward


def _gsm8k_test_rows():
    path = tasks.default_gsm8k_dir() / "test.jsonl"
    if not path.is_file():
        pytest.skip(f"GSM8K data not found at {path}")
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _reference(answer):
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def test_every_gsm8k_gold_answer_scores_one():
    reward = get_reward("gsm8k")
    rows = _gsm8k_test_rows()
    assert len(rows) == 1319
    failures = [row["answer"] for row in rows if reward(row["answer"], _reference(row["answer"])) != 1.0]
    assert failures == []


def test_perturbed_gsm8k_answers_score_zero():
    reward = get_reward("gsm8k")
    for row in _gsm8k_test_rows():
        answer = row["answer"]
        reference = _reference(answer)
        body = answer.rsplit("####", 1)[0]
        plus_one = f"{body}#### {int(reference) + 1}"
        assert reward(plus_one, reference) == 0.0, plus_one
        # Replace the whole "#### n" line with a clearly wrong number.
        wrong_line = re.sub(r"#### .*$", "#### 987654321", answer)
        assert reward(wrong_line, reference) == 0.0, wrong_line


@pytest.mark.parametrize(
    ("completion", "reference"),
    [
        ("#### 1,234", "1234"),
        ("so the total is\n#### -7", "-7"),
        ("####-7", "-7"),
        ("\\boxed{42}", "42"),
        ("The answer is $\\boxed{\\frac{1}{2}}$.", "0.5"),
        ("The answer is 12.50.", "12.5"),
        ("#### $1,234.", "1234"),
        ("#### 12.0", "12"),
        ("#### 42 apples", "42"),
        ("First 3+4=7, then #### 9\nmore text 100", "9"),
        ("Step 1,000 then 5\n#### 1\n#### 2", "2"),  # last #### wins
        ("23+45-7=61\n#### 61", "61"),
        ("I think it is 5 then 6 and finally 7", "7"),  # lenient last-number fallback
        ("10-3", "3"),  # the minus is an operator, not a sign
        ("\\boxed{\\$1{,}234}", "1234"),
        ("\\boxed{42", "42"),  # unclosed box: the last-number fallback still finds 42
    ],
)
def test_hand_cases_score_one(completion, reference):
    assert get_reward("gsm8k")(completion, reference) == 1.0


@pytest.mark.parametrize(
    ("completion", "reference"),
    [
        ("I have no idea.", "3"),
        ("", "3"),
        ("#### 7\nthen 3", "3"),  # #### beats a later number
        ("#### 12.5", "12"),
        ("\\boxed{\\frac{1}{3}}", "0.5"),
        ("#### 1,234", "1.234"),
    ],
)
def test_wrong_or_missing_answers_score_zero(completion, reference):
    assert get_reward("gsm8k")(completion, reference) == 0.0


def test_extract_answer_normalises():
    assert extract_answer("#### 1,234") == "1234"
    assert extract_answer("#### -7") == "-7"
    assert extract_answer("The answer is 12.50.") == "12.5"
    assert extract_answer("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_answer("\\boxed{x^{2}} and 5") == "x^{2}"
    assert extract_answer("\\boxed{42} but later 7") == "42"
    assert extract_answer("cost $-0.00") == "0"
    assert extract_answer("no digits here") is None
    assert extract_answer("#### ") is None


@pytest.mark.parametrize(
    "weird",
    ["####", "#### #### ####", "\\boxed{}", "\\boxed{{{{", "}}}}", "\\boxed{9^{9^{9^{9}}}}", "#### 9^{999999999}",
     "\\boxed{\\frac{1}{0}}", "#### \\unknown{", "\x00\xff", "9" * 5000, "1," * 2000, "#### 1e400"],
)
def test_weird_output_never_raises(weird):
    start = time.perf_counter()
    assert get_reward("gsm8k")(weird, "0.5") in (0.0, 1.0)
    assert get_reward("gsm8k")(weird, "3") in (0.0, 1.0)
    assert time.perf_counter() - start < 5.0


def test_non_string_completion_scores_zero():
    assert get_reward("gsm8k")(None, "3") == 0.0  # type: ignore[arg-type]


def test_symbolic_answer_works_from_a_worker_thread():
    results = []

    def grade():
        results.append(get_reward("gsm8k")("\\boxed{\\frac{1}{2}}", "0.5"))
        results.append(get_reward("gsm8k")("\\boxed{\\frac{1}{3}}", "0.5"))

    worker = threading.Thread(target=grade)
    worker.start()
    worker.join(timeout=30)
    assert results == [1.0, 0.0]


def test_plain_number_path_is_fast():
    reward = get_reward("gsm8k")
    completion = "Tom has 23 apples and gets 45 more.\n23+45=68\n#### 68"
    start = time.perf_counter()
    for _ in range(5000):
        reward(completion, "68")
    assert time.perf_counter() - start < 2.0  # thousands per second, with a wide margin


def test_arithmetic_demands_the_answer_line():
    assert REWARDS["arithmetic"] is REWARDS["gsm8k-strict"]
    assert get_reward("arithmetic")("1+2=3\n#### 3", "3") == 1.0
    assert get_reward("arithmetic")("\\boxed{3}", "3") == 1.0
    # Right number, wrong format: the lenient grader accepts it, the strict one does not.
    for loose in ("1+2=3", "The answer is 3."):
        assert get_reward("gsm8k")(loose, "3") == 1.0
        assert get_reward("arithmetic")(loose, "3") == 0.0
        assert not has_final_answer(loose)
    assert has_final_answer("1+2=4\n#### 4")


def test_unknown_reward_lists_known_names():
    with pytest.raises(ValueError, match="gsm8k") as info:
        get_reward("nope")
    assert "'nope'" in str(info.value)
    assert "arithmetic" in str(info.value)


def test_math_verify_is_not_needed_for_numbers(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("math-verify should not run for plain numbers")

    monkeypatch.setattr(rewards, "_symbolic_equal", boom)
    assert get_reward("gsm8k")("#### 1,234", "1234") == 1.0


@pytest.mark.parametrize("reward", [gsm8k_reward, strict_reward])
@pytest.mark.parametrize("completion, right, wrong", [
    ("#### 38-43=-5", "-5", "38"),  # an equation on the answer line: its result counts, not its first operand
    ("2 * 12 = 24\n#### 2 * 12 = 24", "24", "2"),
    ("#### 5 + 3 = 8", "8", "5"),
    ("#### \u22125", "-5", "5"),  # a typeset minus sign
])
def test_the_answer_line_scores_its_result(reward, completion, right, wrong):
    assert reward(completion, right) == 1.0
    assert reward(completion, wrong) == 0.0


# Each of these made sympy compute a huge number while holding the GIL (9^99999999 has 95 million digits):
# outside the main thread math-verify has no timeout, so the reward never returned.
_EXPLOSIVE = ["#### 9^{(99999999)}", "#### 9^{ {99999999} }", "\\boxed{9^{ ( 99999999 ) }}",
              "\\boxed{9^{(999)(999)(999)}}", "\\boxed{9^{9 \\cdot 99999999}}", "#### 9**(99999999)",
              "\\boxed{\\binom{99999999}{49999999}}", "\\boxed{\\Gamma(99999999)}"]
_STILL_EQUAL = [("\\boxed{2^{10}}", "1024"), ("\\boxed{10^{-1}}", "0.1"), ("\\boxed{\\frac{1}{2}}", "0.5"),
                ("\\boxed{50\\%}", "50")]


def test_explosive_answers_score_zero_quickly_in_a_worker_thread():
    # A subprocess: a thread that holds the GIL would hang this process's own timeout too.
    script = f"""
import threading
from lora_rl.rewards import gsm8k_reward, strict_reward
scores = []
def grade():
    for completion in {_EXPLOSIVE!r}:
        scores.append((gsm8k_reward(completion, "9"), strict_reward(completion, "9")))
    for completion, reference in {_STILL_EQUAL!r}:
        scores.append((gsm8k_reward(completion, reference), strict_reward(completion, reference)))
worker = threading.Thread(target=grade)
worker.start()
worker.join()
print(scores)
"""
    try:
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the reward did not return within 60 s in a worker thread")
    assert result.returncode == 0, result.stderr[-2000:]
    scores = ast.literal_eval(result.stdout.strip().splitlines()[-1])
    assert scores == [(0.0, 0.0)] * len(_EXPLOSIVE) + [(1.0, 1.0)] * len(_STILL_EQUAL)


@pytest.mark.parametrize(("text", "expected"), [
    ("#### 1 234 567", "1234567"),  # spaces as thousands separators
    ("#### 1\u00a0234", "1234"),  # a no-break space
    ("#### 1\u202f234.5", "1234.5"),  # a narrow no-break space
    ("\\boxed{1\\,234}", "1234"),  # LaTeX's thin space
    ("#### $ 5", "5"),
    ("#### - 5", "-5"),
    ("#### 2 3", "2"),  # two numbers, not 23: the first, as GSM8K's strict match reads the line
    ("#### 10 20", "10"),
    ("#### 1 23", "1"),  # not a thousands group
    ("#### 1,234 567", "1234"),  # commas and spaces mixed
    ("\\boxed{10 20}", "10 20"),
])
def test_spaces_only_separate_thousands(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(("completion", "reference"), [
    ("#### 2 3", "23"), ("#### 2 3", "5"), ("#### 10 20", "1020"), ("#### 10 20", "30"),
    ("\\boxed{10 20}", "1020"), ("\\boxed{2\\,3}", "5"),
])
def test_numbers_apart_by_spaces_are_no_answer(completion, reference):
    # math-verify reads "2 3" as a mixed number, 5: it must not be asked.
    assert gsm8k_reward(completion, reference) == 0.0
    assert strict_reward(completion, reference) == 0.0


@pytest.mark.parametrize(("completion", "reference", "extracted"), [
    ("The answer is .5", "0.5", "0.5"),
    ("#### .5", "0.5", "0.5"),
    ("#### 1e3", "1000", "1000"),
    ("#### 1.5E-3", "0.0015", "0.0015"),
    ("so it is 2e5 apples", "200000", "200000"),
    ("version 1.2.3", "3", "3"),  # ".3" after a digit is not a bare decimal
])
def test_bare_decimals_and_exponents(completion, reference, extracted):
    assert extract_answer(completion) == extracted
    assert gsm8k_reward(completion, reference) == 1.0


def test_huge_exponent_notation_is_no_number():
    start = time.perf_counter()
    assert extract_answer("#### 1e99999999", strict=True) is None  # not misread as 1
    assert gsm8k_reward("#### 1e99999999", "1") == 0.0
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize(("completion", "reference", "score"), [
    ("#### 23+45", "68", 0.0),  # the question's operands copied: math-verify would work them out to 68
    ("#### 90-22", "68", 0.0),
    ("#### 5. The answer is 68.", "68", 0.0),  # the marker's number is 5
    ("#### 5. The answer is 68.", "5", 1.0),
    ("#### 68 The answer is 68", "68", 1.0),
    ("23+45=68\n#### 68 Question: Tom has 12", "68", 1.0),
    ("#### 24 (2 dozen)", "24", 1.0),
    ("#### 68 apples, 68 in total", "68", 1.0),
])
def test_the_marker_line_is_read_by_its_first_number(completion, reference, score):
    """A line after "####" scores by its first number, never as an expression math-verify evaluates: that
    would credit copied operands and numbers picked out of prose (a reward hack on the arithmetic task)."""
    assert gsm8k_reward(completion, reference) == score
    assert strict_reward(completion, reference) == score


@pytest.mark.parametrize(("completion", "reference"), [
    ("\\boxed{\\infty}", "\\infty"), ("\\boxed{30^\\circ}", "30^\\circ"), ("\\boxed{\\log 8}", "3\\log 2"),
    ("\\boxed{2^{1/2}}", "\\sqrt{2}"),
])
def test_harmless_latex_commands_still_reach_math_verify(completion, reference):
    assert gsm8k_reward(completion, reference) == 1.0


@pytest.mark.parametrize("completion", ["#### **18**", "#### **18**.", "**#### 18**", "#### **$18**", "#### **18** apples"])
def test_markdown_bold_on_the_answer_line_is_read(completion):
    # Chat models bold their final answer; "**" here is emphasis, not a power.
    assert extract_answer(completion, strict=True) == "18"
    assert gsm8k_reward(completion, "18") == 1.0
    assert strict_reward(completion, "18") == 1.0
    assert strict_reward(completion, "19") == 0.0


@pytest.mark.parametrize("completion", ["\\boxed{\\textbf{18}}", "#### \\mathbf{18}", "#### \\boxed{\\textbf{\\$18}}",
                                        "\\boxed{\\boldsymbol{\\mathbf{18}}}"])
def test_latex_bold_around_the_answer_is_read(completion):
    # "\\textbf" is no command math-verify is shown: a bolded box scored 0 whatever its number.
    assert extract_answer(completion, strict=True) == "18"
    assert strict_reward(completion, "18") == 1.0
    assert strict_reward(completion, "19") == 0.0


def test_latex_bold_on_parts_of_an_answer_is_not_unwrapped():
    assert extract_answer("\\boxed{\\textbf{1}+\\textbf{2}}") == "\\textbf{1}+\\textbf{2}"


@pytest.mark.parametrize("completion", ["#### \\boxed{18}", "#### $\\boxed{18}$", "#### \\(\\boxed{18}\\)",
                                        "#### \\boxed{18} apples", "#### $\\boxed{\\$18}$."])
def test_a_box_on_the_answer_line_is_read(completion):
    # "\\boxed" is no command math-verify is shown, so the whole line scored 0 whatever its number.
    assert extract_answer(completion, strict=True) == "18"
    assert gsm8k_reward(completion, "18") == 1.0
    assert strict_reward(completion, "18") == 1.0
    assert strict_reward(completion, "19") == 0.0


@pytest.mark.parametrize(("completion", "right", "wrong"), [
    ("#### 40 (total = 8 × 5)", "40", "8"),
    ("#### 12 (price = $3 each)", "12", "3"),
    ("#### 5 [x = 3 + 2]", "5", "3"),
    ("#### (38-43)=-5", "-5", "38"),  # an "=" outside brackets still gives the result
])
def test_an_equals_sign_in_a_bracketed_aside_is_not_the_result(completion, right, wrong):
    # "#### 40 (total = 8 × 5)" scored as 8: the "=" rule took what follows an "=" inside the aside.
    for reward in (gsm8k_reward, strict_reward):
        assert reward(completion, right) == 1.0
        assert reward(completion, wrong) == 0.0


@pytest.mark.parametrize("minus", ["\u2013", "\u2010", "\u2011", "\ufe63", "\uff0d"])  # en dash, hyphens, small and fullwidth
def test_dashes_typeset_as_a_minus_are_a_sign(minus):
    # "#### –5" was read as 5: a wrong answer graded right against 5, the right one graded 0 against -5.
    completion = f"#### {minus}5"
    for reward in (gsm8k_reward, strict_reward):
        assert reward(completion, "-5") == 1.0
        assert reward(completion, "5") == 0.0


def test_a_long_line_of_unclosed_bold_is_read_quickly():
    start = time.perf_counter()
    assert gsm8k_reward("#### " + " **a" * 8000, "1") == 0.0
    assert time.perf_counter() - start < 1.0
