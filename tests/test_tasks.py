"""Tests for lora_rl.tasks: synthetic arithmetic, GSM8K loading and prompts."""

import json
import re
from pathlib import Path

import pytest

from lora_rl import rewards, tasks
from lora_rl.config import ConfigError
from lora_rl.rewards import extract_answer, get_reward
from lora_rl.tasks import Problem, format_prompt, load_gsm8k, load_problems, make_arithmetic

# Solutions look like "23+45-7=61\n#### 61"; parse operands and operators back out.
_SOLUTION = re.compile(r"^(?P<expr>[0-9+-]+)=(?P<value>-?\d+)\n#### (?P=value)$")
_TERMS = re.compile(r"([+-]?)(\d+)")

# difficulty -> (operand count, digit counts allowed, operators allowed)
_EXPECTED = {
    1: (2, {1}, {"+"}),
    2: (2, {2}, {"+"}),
    3: (2, {2}, {"+", "-"}),
    4: (3, {1, 2}, {"+", "-"}),
    5: (2, {3}, {"+", "-"}),
}


def _parse_solution(solution):
    match = _SOLUTION.match(solution)
    assert match is not None, solution
    terms = _TERMS.findall(match.group("expr"))
    operands = [int(digits) for _, digits in terms]
    operators = [sign for sign, _ in terms[1:]]
    return operands, operators, int(match.group("value"))


def _gsm8k_dir():
    folder = tasks.default_gsm8k_dir()
    if not (folder / "train.jsonl").is_file():
        pytest.skip(f"GSM8K data not found at {folder}")
    return folder


# --------------------------------------------------------------------------- arithmetic


def test_arithmetic_is_deterministic_per_seed():
    first = make_arithmetic(50, difficulty=3, seed=7)
    assert first == make_arithmetic(50, difficulty=3, seed=7)
    assert first != make_arithmetic(50, difficulty=3, seed=8)
    assert load_problems("arithmetic", split="train", seed=1, limit=20) == load_problems(
        "arithmetic", split="train", seed=1, limit=20
    )


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 5])
def test_arithmetic_difficulty_levels(difficulty):
    count, digit_counts, allowed = _EXPECTED[difficulty]
    seen_operators = set()
    for problem in make_arithmetic(300, difficulty=difficulty, seed=0):
        operands, operators, value = _parse_solution(problem.solution)
        assert len(operands) == count
        assert {len(str(operand)) for operand in operands} <= digit_counts
        assert set(operators) <= allowed
        seen_operators.update(operators)
        # The value in the solution is right, and matches the reference.
        expected = operands[0]
        for operator, operand in zip(operators, operands[1:]):
            expected = expected + operand if operator == "+" else expected - operand
        assert value == expected
        assert problem.reference == str(value)
        # Every operand appears in the (short) question.
        for operand in operands:
            assert str(operand) in problem.question
        assert len(problem.question) < 100
    assert seen_operators == allowed


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 5])
def test_arithmetic_solutions_earn_full_reward(difficulty):
    reward = get_reward("arithmetic")
    for split in tasks.SPLITS:
        for problem in load_problems("arithmetic", split=split, difficulty=difficulty, limit=200):
            assert reward(problem.solution, problem.reference) == 1.0
            assert extract_answer(problem.solution) == problem.reference


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 5])
def test_arithmetic_train_and_test_are_disjoint(difficulty):
    def keys(split):
        problems = load_problems("arithmetic", split=split, difficulty=difficulty, seed=0)
        return {problem.solution.split("=")[0] for problem in problems}

    train, test = keys("train"), keys("test")
    assert train and test
    assert train.isdisjoint(test)


def test_arithmetic_default_sizes_and_limit():
    assert len(load_problems("arithmetic", split="train")) == tasks.ARITHMETIC_SIZES["train"]
    assert len(load_problems("arithmetic", split="test")) == tasks.ARITHMETIC_SIZES["test"]
    some = load_problems("arithmetic", split="test", limit=7)
    assert len(some) == 7
    assert load_problems("arithmetic", split="test", limit=0) == []


def test_arithmetic_examples_are_readable():
    problem = make_arithmetic(1, difficulty=4, seed=0)[0]
    assert problem.question.endswith("have?")
    assert problem.solution.endswith(f"\n#### {problem.reference}")
    assert " " not in problem.solution.split("\n")[0]


@pytest.mark.parametrize("difficulty", [0, 6, -1, 2.5, "3", True])
def test_bad_difficulty_is_rejected(difficulty):
    with pytest.raises(ValueError, match=r"task\.difficulty=.* choose 1\.\.5"):
        load_problems("arithmetic", split="train", difficulty=difficulty)
    with pytest.raises(ValueError, match=r"task\.difficulty"):
        make_arithmetic(3, difficulty=difficulty, seed=0)


def test_problem_is_frozen_and_keyword_only():
    problem = Problem(question="q", reference="1", solution="1=1\n#### 1")
    with pytest.raises(AttributeError):
        problem.reference = "2"  # type: ignore[misc]
    with pytest.raises(TypeError):
        Problem("q", "1", "s")  # type: ignore[misc]


# --------------------------------------------------------------------------- validation


def test_unknown_task_is_rejected():
    with pytest.raises(ValueError, match=r"task\.name='nope'.*arithmetic, gsm8k"):
        load_problems("nope", split="train")


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match=r"task\.split='validation'"):
        load_problems("arithmetic", split="validation")
    with pytest.raises(ValueError, match=r"task\.split"):
        load_gsm8k("/nonexistent", "dev")


def test_bad_limit_is_rejected():
    with pytest.raises(ValueError, match=r"task\.limit=-1"):
        load_problems("arithmetic", split="train", limit=-1)


# --------------------------------------------------------------------------- gsm8k


def test_gsm8k_loads_full_splits():
    folder = _gsm8k_dir()
    reward = get_reward("gsm8k")
    for split, expected in (("train", 7473), ("test", 1319)):
        problems = load_problems("gsm8k", split=split, data_dir=str(folder))
        assert len(problems) == expected
        for problem in problems:
            assert "," not in problem.reference
            assert re.fullmatch(r"-?\d+", problem.reference), problem.reference
            assert extract_answer(problem.solution) == problem.reference
            assert problem.solution.rstrip().endswith(problem.solution.rsplit("####", 1)[1].strip())
        assert reward(problems[0].solution, problems[0].reference) == 1.0


def test_gsm8k_default_dir_and_limit():
    _gsm8k_dir()
    problems = load_problems("gsm8k", split="test", limit=5)
    assert len(problems) == 5
    assert problems[0].reference == "18"  # Janet's ducks
    assert problems == load_problems("gsm8k", split="test")[:5]


def test_gsm8k_dir_env_override(tmp_path, monkeypatch):
    row = {"question": "How many?", "answer": "2 + 2 = <<2+2=4>>4\n#### 1,004"}
    (tmp_path / "train.jsonl").write_text(json.dumps(row) + "\n\n", encoding="utf-8")
    monkeypatch.setenv("LORA_RL_GSM8K_DIR", str(tmp_path))
    assert tasks.default_gsm8k_dir() == tmp_path
    problems = load_problems("gsm8k", split="train")
    assert problems == [Problem(question="How many?", reference="1004", solution=row["answer"])]


def test_gsm8k_default_dir_without_env(monkeypatch):
    monkeypatch.delenv("LORA_RL_GSM8K_DIR", raising=False)
    expected = tasks.pathlib.Path(tasks.__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
    assert tasks.default_gsm8k_dir() == expected


def test_gsm8k_missing_folder_names_the_fix(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=r"task\.data_dir=.*nowhere.*LORA_RL_GSM8K_DIR"):
        load_problems("gsm8k", split="train", data_dir=str(missing))


def test_gsm8k_missing_file_names_the_path(tmp_path):
    with pytest.raises(ValueError, match=r"test\.jsonl.*task\.data_dir or LORA_RL_GSM8K_DIR"):
        load_gsm8k(tmp_path, "test")


def test_gsm8k_row_without_marker_names_file_and_line(tmp_path):
    good = {"question": "q", "answer": "1\n#### 1"}
    bad = {"question": "q", "answer": "no final answer"}
    lines = [json.dumps(good), json.dumps(bad)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"train\.jsonl:2: .*####"):
        load_gsm8k(tmp_path, "train")


def test_gsm8k_bad_json_names_file_and_line(tmp_path):
    (tmp_path / "test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"test\.jsonl:2: not valid JSON"):
        load_gsm8k(tmp_path, "test")


_GOOD = b'{"question": "q", "answer": "1\\n#### 1"}\n'


@pytest.mark.parametrize("second, needle", [
    ('{"question": "Caf\xe9?", "answer": "#### 3"}\n'.encode("latin-1"), r"train\.jsonl:2: not UTF-8 text"),
    (b'{"question": "How many?", "answer": "#### five"}\n', r"train\.jsonl:2: the answer after '####' is 'five'"),
    (b'{"question": null, "answer": "#### 7"}\n', r"train\.jsonl:2: 'question' is None"),
    (b'{"question": "q", "answer": 7}\n', r"train\.jsonl:2: 'answer' is 7"),
])
def test_gsm8k_bad_rows_name_file_line_and_fix(tmp_path, second, needle):
    (tmp_path / "train.jsonl").write_bytes(_GOOD + second)
    with pytest.raises(ConfigError, match=needle):
        load_gsm8k(tmp_path, "train")


def test_gsm8k_empty_file_is_refused_and_a_byte_order_mark_is_not(tmp_path):
    (tmp_path / "train.jsonl").write_bytes(b"\n\n")
    with pytest.raises(ConfigError, match=r"train\.jsonl' holds no rows"):
        load_gsm8k(tmp_path, "train")
    (tmp_path / "test.jsonl").write_bytes(b"\xef\xbb\xbf" + _GOOD)
    assert [p.reference for p in load_gsm8k(tmp_path, "test")] == ["1"]


def _write_rows(folder, *answers):
    rows = [json.dumps({"question": "q", "answer": answer}) for answer in answers]
    (folder / "train.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")


@pytest.mark.parametrize("answer, reference", [
    ("38-43=-5\n#### 38-43=-5", "-5"),  # an equation: its result, as the reward reads it
    ("7\n#### 7 (seven)", "7"),
    ("#### 1,234.50", "1234.5"),
    ("#### 1 234", "1234"),
    ("#### \\frac{1}{2}", "\\frac{1}{2}"),  # math the reward compares with math-verify
])
def test_gsm8k_reference_is_read_as_the_reward_reads_answers(tmp_path, answer, reference):
    _write_rows(tmp_path, "1\n#### 1", answer)
    problems = load_gsm8k(tmp_path, "train")
    assert problems[1].reference == reference
    for name in ("gsm8k", "gsm8k-strict"):
        assert get_reward(name)(problems[1].solution, problems[1].reference) == 1.0


@pytest.mark.parametrize("written", ["\\Gamma(5)", "9^{(99999999)}", "\\binom{99999999}{3}"])
def test_gsm8k_row_its_own_solution_cannot_score_is_refused(tmp_path, written):
    _write_rows(tmp_path, "1\n#### 1", f"so\n#### {written}")
    with pytest.raises(ConfigError, match=rf"train\.jsonl:2: the answer after '####' is {re.escape(repr(written))}, "
                                          r"which the 'gsm8k' reward cannot score.*'#### 42'.*drop this row"):
        load_gsm8k(tmp_path, "train")


def test_gsm8k_rows_are_checked_against_the_configured_reward(tmp_path, monkeypatch):
    monkeypatch.setitem(rewards.REWARDS, "never", lambda completion, reference: 0.0)
    _write_rows(tmp_path, "1\n#### 1")
    assert len(load_problems("gsm8k", split="train", data_dir=tmp_path)) == 1  # the task's own reward
    with pytest.raises(ConfigError, match=r"train\.jsonl:1: .*the 'never' reward cannot score"):
        load_problems("gsm8k", split="train", data_dir=tmp_path, reward="never", limit=0)  # every row, not the first 0
    with pytest.raises(ConfigError, match=r"task\.reward='nope' is unknown"):
        load_problems("gsm8k", split="train", data_dir=tmp_path, reward="nope")


# --------------------------------------------------------------------------- prompts


def test_format_prompt_without_tokenizer():
    prompt = format_prompt("What is 2+3?")
    assert prompt == "Question: What is 2+3?\nAnswer: "
    problem = make_arithmetic(1, difficulty=2, seed=0)[0]
    text = format_prompt(problem.question) + problem.solution
    assert text.startswith("Question: ")
    assert f"\nAnswer: {problem.solution.split(chr(10))[0]}\n#### {problem.reference}" in text


class _FakeTokenizer:
    def __init__(self, chat_template):
        self.chat_template = chat_template
        self.calls = []

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        self.calls.append((messages, tokenize, add_generation_prompt))
        return "<user>" + messages[0]["content"] + "<assistant>"


def test_format_prompt_uses_chat_template():
    tokenizer = _FakeTokenizer("{{ messages }}")
    prompt = format_prompt("What is 2+3?", tokenizer)
    assert prompt == "<user>" + tasks.INSTRUCTION + "What is 2+3?<assistant>"
    messages, tokenize, add_generation_prompt = tokenizer.calls[0]
    assert messages == [{"role": "user", "content": tasks.INSTRUCTION + "What is 2+3?"}]
    assert tokenize is False and add_generation_prompt is True
    assert "####" in tasks.INSTRUCTION


@pytest.mark.parametrize("template", [None, ""])
def test_format_prompt_without_chat_template_falls_back(template):
    assert format_prompt("Q", _FakeTokenizer(template)) == "Question: Q\nAnswer: "


def test_prompts_past_the_model_s_positions_are_refused(random_model_dir, tmp_path):
    """RoPE does not fail past max_position_embeddings: it samples and trains on garbage. A GSM8K-length
    question on a 256-position model is refused before the run starts, naming the fix; a short one passes,
    and a train() of such data stops with that error before any engine starts."""
    from transformers import AutoTokenizer

    from lora_rl.config import load_config
    from lora_rl.lora import check_config
    from lora_rl.tasks import check_prompt_lengths
    from lora_rl.trainer import train

    tokenizer = AutoTokenizer.from_pretrained(random_model_dir)
    short = Problem(question="What is 2+3?", reference="5", solution="2+3=5\n#### 5")
    long = Problem(question="Ann has 38 coins. " * 40 + "How many?", reference="5", solution="#### 5")
    check_prompt_lengths([short] * 50, tokenizer, 64, split="train", context=256)
    with pytest.raises(ConfigError, match=r"1 of the 2 train problems do not fit the model: prompt plus "
                                          r"rollout.max_new_tokens=64 is above its 256 positions .*Ann has 38 coins"):
        check_prompt_lengths([short, long], tokenizer, 64, split="train", context=256)
    # A sliding window the embedded sampler does not apply (Mistral): the same check, another fix.
    with pytest.raises(ConfigError, match=r"above its sliding attention window of 40 tokens.*rollout.engine=vllm"):
        check_prompt_lengths([short], tokenizer, 32, split="eval", context=256, window=40)
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text(json.dumps({"question": long.question, "answer": "38-33=5\n#### 5"}) + "\n")
    config = load_config(None, [f"model.path={random_model_dir}", f"run.output_dir={tmp_path / 'run'}", "task.name=gsm8k",
                                f"task.data_dir={data}", "run.progress=false", "eval.size=1"])
    with pytest.raises(ConfigError, match="do not fit the model"):
        check_config(config)  # lora-rl validate: the same refusal, before any run folder exists
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="do not fit the model"):
        train(config)


def test_new_tokens_past_the_context_are_refused_without_a_tokenizer(tmp_path, monkeypatch):
    """A max_new_tokens no prompt fits beside is refused by validate and the panel (no data, no tokenizer):
    the built-in model need not be built to know its positions."""
    from lora_rl.config import load_config
    from lora_rl.lora import check_config

    monkeypatch.setenv("LORA_RL_CACHE", str(tmp_path / "cache"))  # tiny-arith not built here
    config = load_config(None, ["model.path=tiny-arith", "rollout.max_new_tokens=100000"])
    with pytest.raises(ConfigError, match=r"rollout.max_new_tokens=100000 leaves no room for a prompt within the "
                                          r"model's \d+ positions \(max_position_embeddings\): lower it"):
        check_config(config, data=False)
    check_config(load_config(None, ["model.path=tiny-arith", "rollout.max_new_tokens=64"]))  # data, no tokenizer
    assert not (tmp_path / "cache").exists()
    # A shape-only folder has no tokenizer to measure with (transformers would make an empty one that
    # encodes every prompt to no tokens).
    from lora_rl.models import built_folder

    assert built_folder(str(Path(__file__).parents[1] / "examples" / "shapes" / "qwen2.5-72b")) is None
