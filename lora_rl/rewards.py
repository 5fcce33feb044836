"""Answer extraction and rewards for GSM8K-style math tasks, looked up by name.

A reward is a plain function ``reward(completion, reference) -> float``. The
graders here return 1.0 when the final answer in the completion equals the
reference answer and 0.0 otherwise; they never raise on odd model output.

Extraction (``extract_answer``) tries, in order:

1. the text after the LAST ``#### `` marker (the GSM8K answer format), up to the line's end;
   an equation there ("#### 38-43=-5") answers with what follows its last "=";
2. the content of the LAST ``\\boxed{...}``;
3. the LAST number anywhere in the text. This is a lenient fallback: a model
   that writes "so the answer is 42" without the marker still gets credit,
   which helps early in training when the format is not yet learned.

A plain number may carry "$", thousands commas, or spaces that separate
thousands ("1 234 567", also no-break and narrow no-break spaces); other
spaces between digits make it no number ("2 3" is not 23). Plain numbers are
compared exactly (with a 1e-6 tolerance for decimals), which is fast enough for
thousands of completions per second. Only answers that are not plain numbers
(e.g. ``\\frac{1}{2}``) go through math-verify, imported lazily because it pulls
in sympy, and only when short, with at most one power whose exponent is a
plain integer of up to 3 digits, and with the LaTeX commands of simple math:
outside the main thread math-verify cannot time out, and "9^{(99999999)}" or
"\\binom{99999999}{49999999}" would hold the GIL for hours. Others score 0.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from decimal import Decimal, InvalidOperation

from lora_rl.config import ConfigError

__all__ = ["REWARDS", "answers_match", "extract_answer", "get_reward", "gsm8k_reward", "has_final_answer",
           "normalize_answer", "strict_reward"]

# A number as people and models write it: optional sign and dollar sign,
# thousands commas only in well-formed groups ("1,234" but not "1,23"), an
# optional decimal part, or a bare decimal part (".5", not after a digit or
# word: "1.2.3" is not ".3"), and an optional exponent ("1e3"). A trailing
# sentence period is not consumed because the decimal part needs at least one
# digit after the dot. Exponents of any length match here so that "1e99999999"
# is read whole and then refused by normalize_answer, not misread as "1".
_NUMBER = re.compile(r"-?\$?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?<![\w.])\.\d+)(?:[eE][+-]?\d+)?")
# The whole of a plain number after decorations are gone: thousands grouped by
# commas or by single spaces ("1 234 567"), never a mix; at most a 3-digit
# exponent, so formatting the value cannot build a huge integer.
_FULL_NUMBER = re.compile(r"[+-]?(?:(?:\d{1,3}(?:,\d{3})+|\d{1,3}(?: \d{3})+|\d+)(?:\.\d+)?|\.\d+)"
                          r"(?:[eE][+-]?\d{1,3})?")
_MARKER = "####"
# Characters typeset for a minus sign: U+2212 minus, en dash, hyphen, non-breaking hyphen, small and
# fullwidth hyphen-minus. Read as "-" everywhere, so "10–3" stays an operator as "10-3" is.
_MINUS_SIGNS = str.maketrans(dict.fromkeys("\u2212\u2013\u2010\u2011\ufe63\uff0d", "-"))
# Markdown bold around an answer ("#### **18**"): emphasis, not a power. Bold opens after a space or a
# sign, not after a digit or a bracket ("2**3" is a power), and hugs its text, of at most 100 characters
# without "*" (bounded so that a long line of unclosed "**" is read in linear time).
_BOLD = re.compile(r"(?<![\w)}\]])\*\*(?=[^\s*])([^*]{1,100}?)(?<=\S)\*\*")
# LaTeX bold around a whole answer ("\\boxed{\\textbf{18}}", "#### \\mathbf{18}"): emphasis, as "**18**" is.
_LATEX_BOLD = re.compile(r"\\(?:textbf|mathbf|boldsymbol|bm)\{(.*)\}", re.DOTALL)
_BOXED = "\\boxed{"
# An answer line that opens with a box, maybe in math mode: "#### \\boxed{18}", "#### $\\boxed{18}$".
_LEADING_BOX = re.compile(r"(?:\$|\\\(|\\\[)?\s*\\boxed\{")

# Decorations that do not change a number's value; stripped before parsing.
# "\\!" is a LaTeX negative space.
_DECORATIONS = ("\\$", "$", "\\!")
# Spaces a number may be grouped with: LaTeX "\\," and "\\ ", and any Unicode
# space (\s covers no-break U+00A0 and narrow no-break U+202F). They read as a
# plain space, which may only separate thousands.
_SPACES = re.compile(r"(?:\\,|\\ |\s)+")
# A space not between two digits ("$ 5", "-5 .") is just layout.
_LAYOUT_SPACE = re.compile(r"(?<!\d) | (?!\d)")

# Answers longer than this are not sent to math-verify: GSM8K-style answers are
# short, and sympy can take unbounded time on long or adversarial expressions.
_MAX_SYMBOLIC_CHARS = 100
# An exponent must be a plain integer of at most this many digits: sympy
# evaluates powers exactly, and "9^{(99999999)}" holds the GIL for hours.
_MAX_EXPONENT_DIGITS = 3
_POWER = re.compile(r"\^|\*\*")
_OPENING, _CLOSING = "{([", "})]"
_BRACKETS_AND_SIGNS = re.compile(r"[\s{}()\[\]+-]")
# A small integer, or a small fraction or decimal of them ("2^{1/2}", "4^{0.5}"): nothing sympy computes long.
_SMALL_EXPONENT = re.compile(rf"\d{{1,{_MAX_EXPONENT_DIGITS}}}(?:[./]\d{{1,{_MAX_EXPONENT_DIGITS}}})?")
_DEGREES = re.compile(r"\{?\s*\\circ\s*\}?")
# The only LaTeX commands math-verify is shown: what GSM8K-style answers use.
# Others can be just as slow as a power ("\\binom{99999999}{49999999}",
# "\\Gamma(99999999)" never return); a non-letter escape ("\\%") is harmless.
_SAFE_COMMANDS = frozenset({"frac", "dfrac", "tfrac", "sqrt", "cdot", "times", "div", "pm", "left", "right", "pi",
                            "text", "mathrm", "mbox", "infty", "circ", "degree", "log", "ln"})
_COMMAND = re.compile(r"\\([A-Za-z]+)")
# Digits apart by space alone: not a number ("2 3" is not 23), and math-verify
# would read them as a mixed number's sum, 5.
_SPACED_DIGITS = re.compile(r"\d (?=\d)")
# math-verify's own timeout uses signal.alarm, which only works in the main
# thread; in other threads (widgets, thread pools) it must be disabled, and the
# checks above are all that bound its time.
_MAIN_THREAD_TIMEOUT_S = 5
_FLOAT_TOLERANCE = Decimal("1e-6")


def normalize_answer(text: str) -> str | None:
    """Return ``text`` as a canonical number string, or None if it is not a plain number.

    Removes "$", thousands commas or spaces, a trailing period and surrounding
    space; "12.50" becomes "12.5", "007" becomes "7", "-0" becomes "0", "1e3"
    becomes "1000". "2 3" is two numbers, not 23: None.
    """
    cleaned = text.replace("{,}", ",")  # LaTeX's thousands comma
    for decoration in _DECORATIONS:
        cleaned = cleaned.replace(decoration, "")
    cleaned = _LAYOUT_SPACE.sub("", _SPACES.sub(" ", cleaned).strip())
    cleaned = cleaned.rstrip(".")
    if cleaned.startswith("-$"):  # "-$7" reads as minus seven dollars
        cleaned = "-" + cleaned[2:]
    if not _FULL_NUMBER.fullmatch(cleaned):
        return None
    value = Decimal(cleaned.replace(",", "").replace(" ", ""))
    return _format_decimal(value)


def _format_decimal(value: Decimal) -> str:
    """Canonical string for a Decimal: no exponent, no trailing zeros, no "-0"."""
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _last_marker_answer(text: str) -> str | None:
    """The answer after the last "####", or None if there is no non-empty one."""
    index = text.rfind(_MARKER)
    if index < 0:
        return None
    # The answer is the rest of that line; models often keep writing after it.
    rest = text[index + len(_MARKER) :].lstrip("# \t")
    line = rest.split("\n", 1)[0].strip()
    # "#### **18**", and "**#### 18**" whose opening bold is before the marker
    line = _BOLD.sub(r"\1", line).strip("*").strip()
    line = _unbold(line)
    box = _LEADING_BOX.match(line)
    if box is not None:  # "#### \\boxed{18}": the box's content, as a box elsewhere is read
        boxed = _boxed_at(line, box.end() - len(_BOXED))
        if boxed is not None:
            return boxed
    equals = _last_top_level_equals(line)
    if equals >= 0:  # "#### 38-43=-5" or "#### 2 * 12 = 24": the result is what follows the last "="
        line = line[equals + 1 :].strip()  # not one in an aside: "#### 40 (total = 8 × 5)" is 40
    if not line:
        return None
    as_number = normalize_answer(line)
    if as_number is not None:
        return as_number
    # "#### 42 apples", "#### 24 (2 dozen)": the first number on the line, as GSM8K's strict match reads it.
    # Never the line as written when it has a number: math-verify would work out "#### 23+45" to 68 and
    # pick 68 out of "#### 5. The answer is 68.", credit for answers the format does not give.
    match = _NUMBER.search(line)
    if match is not None and not _looks_symbolic(line):
        return normalize_answer(match.group(0))
    return line.rstrip(".").strip() or None


def _unbold(text: str) -> str:
    """`text` without a LaTeX bold command that wraps all of it (one inside another too)."""
    while (match := _LATEX_BOLD.fullmatch(text)) is not None:
        inner, depth = match.group(1), 0
        for char in inner:  # "\\textbf{1}+\\textbf{2}" is two bold parts, not one around "1}+\\textbf{2"
            depth += (char == "{") - (char == "}")
            if depth < 0:
                return text
        text = inner.strip()
    return text


def _last_top_level_equals(line: str) -> int:
    """Index of the last "=" outside brackets, or -1."""
    depth, found = 0, -1
    for index, char in enumerate(line):
        if char in _OPENING:
            depth += 1
        elif char in _CLOSING:
            depth = max(0, depth - 1)
        elif char == "=" and depth == 0:
            found = index
    return found


def _looks_symbolic(text: str) -> bool:
    """True when text holds LaTeX or an operator, so a bare number grab would be wrong."""
    return "\\" in text or "/" in text or "^" in text or "**" in text


def _last_boxed_answer(text: str) -> str | None:
    """The content of the last \\boxed{...} (braces balanced), or None."""
    start = text.rfind(_BOXED)
    return None if start < 0 else _boxed_at(text, start)


def _boxed_at(text: str, start: int) -> str | None:
    """The content of the \\boxed{...} at `start` (braces balanced), or None."""
    depth = 1
    position = start + len(_BOXED)
    for index in range(position, len(text)):
        char = text[index]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                content = _unbold(text[position:index].strip())
                if not content:
                    return None
                as_number = normalize_answer(content)
                return as_number if as_number is not None else content
    return None  # unclosed brace: the model stopped mid-answer


def _last_number(text: str) -> str | None:
    """The last number anywhere in text (lenient fallback), or None."""
    last = None
    for match in _NUMBER.finditer(text):
        last = match
    if last is None:
        return None
    number = last.group(0)
    # In "10-3" the minus is an operator, not a sign: drop it.
    if number.startswith("-") and last.start() > 0 and text[last.start() - 1].isalnum():
        number = number[1:]
    return normalize_answer(number)


def extract_answer(text: str, strict: bool = False) -> str | None:
    """Extract the final answer from a completion, normalised; None if there is none.

    Order: the last "#### <answer>", else the last \\boxed{...}, else (unless
    `strict`) the last number in the text. Plain numbers come back canonical
    ("1,234" -> "1234", "$12.50." -> "12.5"); anything else (e.g. "\\frac{1}{2}")
    comes back as written.
    """
    if not isinstance(text, str):
        return None
    text = text.translate(_MINUS_SIGNS)  # a typeset minus sign ("#### −5", "#### –5") is still a sign
    extractors = (_last_marker_answer, _last_boxed_answer) if strict else (
        _last_marker_answer, _last_boxed_answer, _last_number)
    for extractor in extractors:
        answer = extractor(text)
        if answer is not None:
            return answer
    return None


def _numbers_equal(a: str, b: str) -> bool:
    """Compare two canonical number strings: exact for integers, 1e-6 tolerance otherwise."""
    try:
        x, y = Decimal(a), Decimal(b)
    except InvalidOperation:
        return False
    if "." not in a and "." not in b:
        return x == y
    return abs(x - y) <= _FLOAT_TOLERANCE


def _exponent_is_small(text: str) -> bool:
    """True when text, what follows a "^" or "**", starts with a small plain integer exponent.

    A bracketed exponent is read up to its matching bracket, so "{(99)(99)}" or
    "{9 \\cdot 99999999}" is judged whole; brackets, spaces and signs around the
    digits are dropped first, so nesting them cannot hide a long number.
    """
    text = text.lstrip()
    if text.startswith("\\circ"):  # "30^\\circ" is 30 degrees, not a power
        return True
    if text and text[0] in _OPENING:
        depth = 0
        for end, char in enumerate(text):
            depth += (char in _OPENING) - (char in _CLOSING)
            if depth == 0:
                break
        exponent = text[: end + 1]  # an unclosed group runs to the end of the text
    else:
        exponent = re.match(r"[\d\s+-]*", text).group()  # "2^3 5" reads whole: a parser may join the digits
    if _DEGREES.fullmatch(exponent):  # "30^{\\circ}"
        return True
    return _SMALL_EXPONENT.fullmatch(_BRACKETS_AND_SIGNS.sub("", exponent)) is not None


def _safe_for_math_verify(answer: str) -> bool:
    """Refuse inputs that could make sympy run (almost) forever.

    Outside the main thread math-verify has no timeout, so these checks are
    the only bound: short text, no factorial, at most one power and that with a
    small plain integer exponent, no digits apart by space alone, and only the
    LaTeX commands of simple math.
    """
    if len(answer) > _MAX_SYMBOLIC_CHARS or "!" in answer or _SPACED_DIGITS.search(_SPACES.sub(" ", answer)):
        return False
    powers = list(_POWER.finditer(answer))
    if len(powers) > 1:  # towers like 9^{9^{9}} explode
        return False
    if powers and not _exponent_is_small(answer[powers[0].end():]):
        return False
    return all(command in _SAFE_COMMANDS for command in _COMMAND.findall(answer))


def _symbolic_equal(predicted: str, reference: str) -> bool:
    """Compare with math-verify; False on any failure (never raises)."""
    if not (_safe_for_math_verify(predicted) and _safe_for_math_verify(reference)):
        return False
    from math_verify import parse, verify  # lazy: pulls in sympy

    # signal.alarm timeouts raise ValueError outside the main thread.
    in_main = threading.current_thread() is threading.main_thread()
    timeout = _MAIN_THREAD_TIMEOUT_S if in_main else None
    try:
        # Wrapping in \boxed{} makes math-verify read the whole answer as LaTeX.
        gold = parse(f"\\boxed{{{reference}}}", parsing_timeout=timeout)
        pred = parse(f"\\boxed{{{predicted}}}", parsing_timeout=timeout)
        if not gold or not pred:
            return False
        return bool(verify(gold, pred, timeout_seconds=timeout))
    except Exception:  # math-verify/sympy can fail in many ways on model output
        return False


def answers_match(predicted: str | None, reference: str) -> bool:
    """True if an extracted answer equals the reference answer."""
    if predicted is None:
        return False
    gold = normalize_answer(reference)
    pred = normalize_answer(predicted)
    if gold is not None and pred is not None:
        return _numbers_equal(pred, gold)
    return _symbolic_equal(predicted, reference.strip())


def gsm8k_reward(completion: str, reference: str) -> float:
    """1.0 if the completion's final answer equals ``reference``, else 0.0 (lenient extraction)."""
    try:
        return 1.0 if answers_match(extract_answer(completion), reference) else 0.0
    except Exception:  # a reward must never crash a training run on odd output
        return 0.0


def strict_reward(completion: str, reference: str) -> float:
    """Like gsm8k_reward, but only an answer on a "#### n" line or in \\boxed{} counts."""
    try:
        return 1.0 if answers_match(extract_answer(completion, strict=True), reference) else 0.0
    except Exception:  # a reward must never crash a training run on odd output
        return 0.0


def has_final_answer(completion: str) -> bool:
    """True when the completion states its answer in the required format (for format metrics)."""
    return extract_answer(completion, strict=True) is not None


REWARDS: dict[str, Callable[[str, str], float]] = {
    "gsm8k": gsm8k_reward,
    "gsm8k-strict": strict_reward,
    # Synthetic arithmetic demands the GSM8K answer line: "23+45=68" alone scores 0.
    "arithmetic": strict_reward,
}


def get_reward(name: str) -> Callable[[str, str], float]:
    """Look up a reward function by name (see REWARDS)."""
    if name not in REWARDS:
        known = ", ".join(sorted(REWARDS))
        raise ConfigError(f"task.reward={name!r} is unknown: choose one of {known}")
    return REWARDS[name]
