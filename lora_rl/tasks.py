"""Problems for RL training and supervised warm-start, loaded by task name.

Two tasks:

* ``arithmetic``: synthetic, GSM8K-formatted word problems with a difficulty
  knob (1..5). Deterministic for a given seed. Train and test are disjoint by
  construction: a problem belongs to the test split iff a stable hash of its
  operands and operators falls in a fixed 10% bucket.
* ``gsm8k``: the GSM8K jsonl files (``train.jsonl`` / ``test.jsonl``).

Every problem carries its question text (no prompt template), the gold final
answer as a plain number string, and a full target completion ending with
``#### <answer>`` for warm-start. ``format_prompt`` turns a question into the
model's prompt; the warm-start target is ``format_prompt(q) + solution``.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import zlib
from dataclasses import dataclass

from lora_rl.config import ConfigError
from lora_rl.rewards import extract_answer, get_reward

__all__ = [
    "ARITHMETIC_SIZES",
    "INSTRUCTION",
    "SPLITS",
    "TASKS",
    "Problem",
    "default_gsm8k_dir",
    "format_prompt",
    "load_gsm8k",
    "load_problems",
    "make_arithmetic",
]

TASKS = ("arithmetic", "gsm8k")
SPLITS = ("train", "test")
GSM8K_DIR_ENV = "LORA_RL_GSM8K_DIR"

# How many arithmetic problems load_problems makes per split when no limit is given.
ARITHMETIC_SIZES = {"train": 5000, "test": 500}

# Test bucket: crc32(problem key) % 10 == 0, i.e. about 10% of all problems.
_TEST_BUCKETS = 10

# Sent to chat models before the question so the answer lands where the reward looks.
INSTRUCTION = (
    'Solve the problem. Give the final answer on its own last line as "#### <number>".\n\n'
)

# The plain prompt (no chat template). The trailing space is deliberate: the
# solution is appended directly, giving "Answer: 23+45=68\n#### 68".
_PLAIN_PROMPT = "Question: {question}\nAnswer: "

# (name, item, phrase for "+ n", phrase for "- n"). Short on purpose: tiny
# character-level models train on these texts.
_TEMPLATES = (
    ("Tom", "apples", "gets {} more", "gives away {}"),
    ("Ann", "coins", "finds {} more", "loses {}"),
    ("Sam", "books", "buys {} more", "gives away {}"),
    ("Mia", "pens", "gets {} more", "loses {}"),
)

# difficulty -> (operand count, (min, max) of each operand, allowed operators)
_LEVELS = {
    1: (2, (1, 9), ("+",)),
    2: (2, (10, 99), ("+",)),
    3: (2, (10, 99), ("+", "-")),
    4: (3, (1, 99), ("+", "-")),
    5: (2, (100, 999), ("+", "-")),
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Problem:
    """One task problem."""

    question: str  # the problem text, without any prompt template
    reference: str  # gold final answer as the reward reads it: a canonical number ("1234", "-7"), else math as written
    solution: str  # a full target completion for supervised warm-start, ending with "#### <reference>"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"task.split={split!r} is unknown: choose one of {', '.join(SPLITS)}")


def _check_difficulty(difficulty: int) -> None:
    if isinstance(difficulty, bool) or not isinstance(difficulty, int) or difficulty not in _LEVELS:
        raise ConfigError(f"task.difficulty={difficulty!r} is out of range: choose 1..5")


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ConfigError(f"task.limit={limit!r} is invalid: use None (all) or an integer >= 0")


# ---------------------------------------------------------------------------
# arithmetic


def _evaluate(operands: list[int], operators: list[str]) -> int:
    """Left-to-right value of operands joined by + / - operators."""
    value = operands[0]
    for operator, operand in zip(operators, operands[1:], strict=True):
        value = value + operand if operator == "+" else value - operand
    return value


def _expression(operands: list[int], operators: list[str]) -> str:
    """The expression without spaces, e.g. "23+45-7"."""
    parts = [str(operands[0])]
    for operator, operand in zip(operators, operands[1:], strict=True):
        parts.append(f"{operator}{operand}")
    return "".join(parts)


def _split_of(operands: list[int], operators: list[str]) -> str:
    """The split a problem belongs to, from a stable hash of its arithmetic.

    The hash covers only the numbers and operators (not the wording), so the
    same sum can never appear in both splits under different templates.
    """
    key = _expression(operands, operators).encode()
    return "test" if zlib.crc32(key) % _TEST_BUCKETS == 0 else "train"


def _word_problem(operands: list[int], operators: list[str], template: tuple[str, str, str, str]) -> str:
    """E.g. "Tom has 5 apples, gets 12 more and gives away 7. How many apples does Tom have?"."""
    name, item, add_phrase, sub_phrase = template
    steps = [
        (add_phrase if operator == "+" else sub_phrase).format(operand)
        for operator, operand in zip(operators, operands[1:], strict=True)
    ]
    # Chain the steps: "a, b and c".
    chained = steps[-1] if len(steps) == 1 else ", ".join(steps[:-1]) + " and " + steps[-1]
    separator = " and " if len(steps) == 1 else ", "
    return f"{name} has {operands[0]} {item}{separator}{chained}. How many {item} does {name} have?"


def _arithmetic_problem(operands: list[int], operators: list[str], template: tuple[str, str, str, str]) -> Problem:
    value = _evaluate(operands, operators)
    return Problem(
        question=_word_problem(operands, operators, template),
        reference=str(value),
        solution=f"{_expression(operands, operators)}={value}\n#### {value}",
    )


def make_arithmetic(n: int, *, difficulty: int, seed: int, split: str | None = None) -> list[Problem]:
    """Make ``n`` synthetic arithmetic word problems, deterministic given the arguments.

    Difficulty: 1: two 1-digit operands, '+'; 2: two 2-digit operands, '+';
    3: two 2-digit operands, '+' or '-'; 4: three 1-2 digit operands, '+' or '-';
    5: two 3-digit operands, '+' or '-'. Results may be negative.

    ``split`` ("train"/"test") keeps only problems of that split, so the two
    never share a problem; None keeps all. Small levels have few distinct
    problems (difficulty 1 has 81), so problems may repeat.
    """
    _check_difficulty(difficulty)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"n={n!r} is invalid: use an integer >= 0")
    if split is not None:
        _check_split(split)
    count, (low, high), allowed = _LEVELS[difficulty]
    # A string seed is hashed deterministically by random.Random (unlike hash()).
    rng = random.Random(f"arithmetic:{seed}:{difficulty}:{split}")
    problems: list[Problem] = []
    while len(problems) < n:
        operands = [rng.randint(low, high) for _ in range(count)]
        operators = [rng.choice(allowed) for _ in range(count - 1)]
        template = rng.choice(_TEMPLATES)
        if split is not None and _split_of(operands, operators) != split:
            continue
        problems.append(_arithmetic_problem(operands, operators, template))
    return problems


# ---------------------------------------------------------------------------
# gsm8k


def default_gsm8k_dir() -> pathlib.Path:
    """The GSM8K folder: $LORA_RL_GSM8K_DIR, else ../shared/data/gsm8k beside the repo."""
    override = os.environ.get(GSM8K_DIR_ENV)
    if override:
        return pathlib.Path(override)
    return pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


def _gsm8k_reference(answer: str, path: pathlib.Path, line_number: int, reward, reward_name: str) -> str:
    """The answer after the last "####", read as the reward reads a completion's ("1,234" -> "1234").

    A row whose own solution would not score 1.0 is refused: every completion,
    the right one included, would score 0 on it.
    """
    if "####" not in answer:
        raise ConfigError(f"{path}:{line_number}: answer has no '#### <number>' line; fix or drop this row")
    written = answer.rsplit("####", 1)[1].strip()
    if not written:
        raise ConfigError(f"{path}:{line_number}: nothing after '####'; fix or drop this row")
    if not any(c.isdigit() for c in written):  # "five", "N/A": no completion could ever match it
        raise ConfigError(f"{path}:{line_number}: the answer after '####' is {written!r}, which holds no number; "
                          "the rewards compare numbers (or math such as \\frac{1}{2}): write it as a number, or drop "
                          "this row")
    reference = extract_answer(answer, strict=True)  # the "#### " line: the strict and lenient rewards agree here
    if reference is None or reward(answer, reference) != 1.0:
        raise ConfigError(f"{path}:{line_number}: the answer after '####' is {written!r}, which the "
                          f"{reward_name!r} reward cannot score: the row's own solution scores 0 against it, and so "
                          "would every completion. Write one plain number after '####' (e.g. '#### 42'), or drop "
                          "this row")
    return reference


def load_gsm8k(data_dir: str | os.PathLike[str], split: str, limit: int | None = None,
               reward: str = "gsm8k") -> list[Problem]:
    """Read ``{data_dir}/{split}.jsonl`` (rows with "question" and "answer") into Problems.

    Every row (not only the first ``limit``) must score 1.0 under ``reward``
    (a name in lora_rl.rewards.REWARDS) with its own solution.
    """
    _check_split(split)
    _check_limit(limit)
    reward_fn = get_reward(reward)
    folder = pathlib.Path(data_dir)
    hint = f"set task.data_dir or {GSM8K_DIR_ENV} to the folder holding train.jsonl and test.jsonl"
    if not folder.is_dir():
        raise ConfigError(f"task.data_dir={str(folder)!r} is not a folder: {hint}")
    path = folder / f"{split}.jsonl"
    if not path.is_file():
        raise ConfigError(f"GSM8K file {str(path)!r} does not exist: {hint}")
    problems: list[Problem] = []
    with path.open("rb") as handle:  # bytes: a line that is not UTF-8 is named with its line number
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig")  # -sig: a byte-order mark some editors write is not part of the row
            except UnicodeDecodeError as error:
                raise ConfigError(f"{path}:{line_number}: not UTF-8 text (byte {error.start} of the line): save the "
                                  "file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ConfigError(f"{path}:{line_number}: not valid JSON ({error.msg})") from error
            if not isinstance(row, dict) or "question" not in row or "answer" not in row:
                raise ConfigError(f"{path}:{line_number}: row needs 'question' and 'answer' fields")
            for field in ("question", "answer"):
                if not isinstance(row[field], str) or not row[field].strip():
                    raise ConfigError(f"{path}:{line_number}: '{field}' is {row[field]!r}; it must be non-empty text: "
                                      "fix or drop this row")
            problems.append(
                Problem(
                    question=row["question"],
                    reference=_gsm8k_reference(row["answer"], path, line_number, reward_fn, reward),
                    solution=row["answer"],
                )
            )
    if not problems:  # training would have nothing to sample, evaluation nothing to score
        raise ConfigError(f"GSM8K file {str(path)!r} holds no rows: add problems, one JSON object a line")
    return problems if limit is None else problems[:limit]


# ---------------------------------------------------------------------------
# public entry points


def load_problems(
    name: str,
    *,
    split: str,
    seed: int = 0,
    difficulty: int = 2,
    data_dir: str | os.PathLike[str] | None = None,
    limit: int | None = None,
    reward: str = "",
) -> list[Problem]:
    """Load a task's problems by name: "arithmetic" or "gsm8k".

    ``seed`` and ``difficulty`` apply to arithmetic only (which makes
    ``limit`` problems, or ARITHMETIC_SIZES[split] without a limit);
    ``data_dir`` applies to gsm8k only (default: ``default_gsm8k_dir()``).
    ``limit`` keeps the first ``limit`` problems, so it is deterministic.
    ``reward`` (task.reward; empty: the task's own) is the one gsm8k rows are
    checked against.
    """
    if name not in TASKS:
        raise ConfigError(f"task.name={name!r} is unknown: choose one of {', '.join(TASKS)}")
    _check_split(split)
    _check_limit(limit)
    if name == "arithmetic":
        _check_difficulty(difficulty)
        n = ARITHMETIC_SIZES[split] if limit is None else limit
        return make_arithmetic(n, difficulty=difficulty, seed=seed, split=split)
    folder = default_gsm8k_dir() if data_dir is None else data_dir
    return load_gsm8k(folder, split, limit=limit, reward=reward or name)


def format_prompt(question: str, tokenizer=None) -> str:
    """The prompt for a question: the tokenizer's chat template if it has one, else plain text.

    Plain form: "Question: <question>\\nAnswer: " (ending in one space), so
    prompt + solution reads "Question: ...\\nAnswer: 23+45=68\\n#### 68".
    """
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": INSTRUCTION + question}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return _PLAIN_PROMPT.format(question=question)


# Tokens a chat template may add around the question beyond those it adds around an empty one.
_TEMPLATE_SLACK = 16


def check_prompt_lengths(problems: list[Problem], tokenizer, max_new_tokens: int, *, split: str,
                         context: int | None, window: int | None = None) -> None:
    """Refuse problems whose prompt plus rollout.max_new_tokens does not fit the model's positions (`context`)
    (tokenizer None: only a max_new_tokens that leaves no room for any prompt):
    RoPE does not fail past them, it samples and trains on garbage (GSM8K's longest prompts on a 256-position
    model). `window`: a sliding attention window the rollout engine does not apply (the embedded sampler's).
    Only questions that could be too long are tokenized: a token covers at least one byte of text (byte-level
    BPE, SentencePiece), so the template's own tokens plus the question's bytes bound the prompt's length."""
    limit = min((n for n in (context, window) if n), default=None)
    if not limit:
        return
    if max_new_tokens >= limit:  # every prompt has a token at least: no tokenizer needed to refuse this
        what = (f"the model's {context} positions (max_position_embeddings)" if limit == context else
                f"the model's sliding attention window of {window} tokens, which the embedded sampler does not apply")
        raise ConfigError(f"rollout.max_new_tokens={max_new_tokens} leaves no room for a prompt within {what}: "
                          f"lower it well below {limit}")
    if tokenizer is None or not problems:
        return
    from lora_rl.batching import encode

    overhead = len(encode(tokenizer, format_prompt("", tokenizer))) + _TEMPLATE_SLACK
    too_long = []
    for index, problem in enumerate(problems):
        if overhead + len(problem.question.encode("utf-8")) + max_new_tokens > limit:
            length = len(encode(tokenizer, format_prompt(problem.question, tokenizer)))
            if length + max_new_tokens > limit:
                too_long.append((length, index))
    if not too_long:
        return
    length, index = max(too_long)
    question = problems[index].question
    if context and length + max_new_tokens > context:
        what, fix = f"its {context} positions (max_position_embeddings)", "Use a model with a longer context"
    else:
        what = f"its sliding attention window of {window} tokens, which the embedded sampler does not apply"
        fix = "Use rollout.engine=vllm for this model"
    raise ConfigError(f"{len(too_long)} of the {len(problems)} {split} problems do not fit the model: prompt plus "
                      f"rollout.max_new_tokens={max_new_tokens} is above {what}, e.g. a {length}-token prompt for "
                      f"{question[:60] + '...' if len(question) > 60 else question!r}. {fix}, lower "
                      "rollout.max_new_tokens, or leave those problems out of the data (task.data_dir)")
