"""Unit tests of the rewards layer: pure functions, no worker pool (except the small pool tests at the end)."""

import json
import os
import threading
import time
from pathlib import Path

import pytest

from rewards.code import SANDBOX_DIR, CodeReward, parse_tests, run_python
from rewards.config import RewardSpec, parse_specs, resolve_specs
from rewards.format import FormatReward, check_format
from rewards.length import LengthPenalty, length_penalty
from rewards.math import MathReward, extract_answer, is_equivalent, math_reward
from rewards.pool import RewardPool
from rewards.repeat import RepeatPenalty, repeat_share
from rewards.types import RewardInput, RewardResult, normalize_result, reward

FIXTURES = Path(__file__).parent / "fixtures" / "reward_plugin"


# ---- math: extraction -----------------------------------------------------------------------------------

@pytest.mark.parametrize("response, expected", [
    ("<think>3+4=8\nWait, 3+4=7.</think>\\boxed{7}", "7"),
    ("<think>maybe \\boxed{3}</think> so \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),      # box in thinking ignored
    ("\\boxed{1} then \\boxed{2}", "2"),                                               # several boxes: last
    ("<think>x</think>\\boxed{\\frac{1}{\\sqrt{2}}} and that's it", "\\frac{1}{\\sqrt{2}}"),  # nested braces
    ("<think>x</think>\\boxed{\\left\\{1, \\{2\\}\\right\\}}", "\\left\\{1, \\{2\\}\\right\\}"),
    ("<think>x</think>\\boxed {5}", "5"),
    ("<think>x</think>\\fbox{12}", "12"),
    ("<think>x</think>\\boxed{5", "5"),                                                # unbalanced: fallback
    ("<think>x</think>Answer: 42.", "42"),
    ("<think>x</think>**Final Answer:** $\\frac{3}{4}$", "\\frac{3}{4}"),
    ("<think>x</think>The answer is: 17\nCheck: 17 = 17", "17"),
    ("<think>x</think>the total is 12 apples", "12"),                                 # last number fallback
    ("<think>x</think>about 1,250 people", "1,250"),
    ("<think>x=5</think>no digits here", None),                                        # missing answer
    ("<think>unfinished 3+4=7", None),                                                 # thinking never closed
    ("", None),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("<think>x</think>Answer: −5", "-5"),                                              # unicode minus
    ("<think>x</think>Answer：３２", "32"),                                             # full-width colon, digits
    ("<think>x</think>\\boxed{2π}", "2\\pi"),
    ("<think>x</think>\\boxed{∅}", "\\emptyset"),
    ("<think>x</think>\\boxed{$7$}", "7"),
])
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


def test_extract_answer_without_last_number_fallback():
    assert extract_answer("<think>x</think>the total is 12", last_number=False) is None
    assert extract_answer("<think>x</think>\\boxed{12}", last_number=False) == "12"


# ---- math: equivalence table (gold, prediction, expected verdict) ----------------------------------------

EQUIVALENCE = [
    # integers, decimals, fractions
    ("7", "7", True), ("7", "7.0", True), ("7", "07", True), ("7", "8", False), ("3", "-3", False),
    ("-3", "- 3", True), ("0", "-0", True), ("-1", "1", False), ("24", "42", False), ("10", "100", False),
    ("1/2", "\\frac{1}{2}", True), ("0.5", "\\frac12", True), ("\\frac{2}{4}", "\\frac{1}{2}", True),
    ("\\frac{1}{3}", "\\frac{2}{6}", True), ("1.5", "3/2", True), ("-0.25", "-\\frac{1}{4}", True),
    ("\\frac{1}{2}", "0.50", True), ("\\dfrac{3}{4}", "0.75", True), ("\\tfrac{3}{4}", "3/4", True),
    ("1/3", "0.333", False), ("3/4", "4/3", False), ("\\frac{1}{2}", "\\frac{1}{3}", False),
    ("1.25", "1.52", False), ("100", "99.99", False), ("12", "12.0001", False), ("-0.5", "0.5", False),
    # thousands separators, powers, scientific notation
    ("1000", "1,000", True), ("1000", "1{,}000", True), ("10^3", "1000", True), ("2^{10}", "1024", True),
    ("1e3", "1000", True), ("1000", "100", False),
    # expressions
    ("\\sqrt{2}", "2^{1/2}", True), ("\\sqrt{8}", "2\\sqrt{2}", True), ("2\\sqrt{2}", "\\sqrt{2}", False),
    ("2\\pi", "6.283185", True), ("3.14", "\\pi", False), ("x+1", "1+x", True), ("x+1", "x+2", False),
    ("x^2", "2x", False), ("\\binom{5}{2}", "10", True), ("5!", "120", True), ("2+3i", "3i+2", True),
    ("0.1+0.2", "0.3", True), ("x=2", "2", True), ("y = 3x", "3x", True),
    # sets, intervals, tuples, inequalities
    ("\\{1,2\\}", "\\{2,1\\}", True), ("\\{1,2\\}", "\\{1,3\\}", False), ("[0,1]", "(0,1)", False),
    ("(0,1]", "(0,1]", True), ("(-\\infty, 2)", "(-\\infty,2)", True), ("(1,2)", "(2,1)", False),
    ("(1,2)\\cup(3,4)", "(3,4)\\cup(1,2)", True), ("(0,1)", "(0,2)", False), ("x>2", "2<x", True),
    ("\\emptyset", "\\varnothing", True), ("\\infty", "\\infty", True),
    # units, percent, degrees, text
    ("50\\%", "50", True), ("50\\%", "0.5", True), ("5 \\text{ cm}", "5", True), ("5\\,\\text{m}", "5", True),
    ("\\$10", "10", True), ("30^\\circ", "30", True), ("\\text{Yes}", "Yes", True), ("A", "B", False),
    ("5", "five", False), ("e", "2.718", False),
    # unicode
    ("−3", "-3", True), ("３", "3", True), ("2×3", "6", True), ("4", "\\boxed{4}", True),
]


def test_equivalence_table():
    assert len(EQUIVALENCE) >= 60
    assert {v for *_, v in EQUIVALENCE} == {True, False}
    wrong = [(g, p, v) for g, p, v in EQUIVALENCE if is_equivalent(g, p) is not v]
    assert not wrong, f"verdicts differ from the table: {wrong}"


def test_math_reward_reasons():
    assert math_reward("<think>a</think>\\boxed{5}", "5") == RewardResult(1.0, "correct", correct=True)
    assert math_reward("<think>a</think>\\boxed{6}", "5") == RewardResult(0.0, "wrong", correct=False)
    assert math_reward("<think>unfinished", "5") == RewardResult(0.0, "no answer", correct=False)
    assert MathReward(last_number=False)(RewardInput("", "<think>a</think>it is 5", "5")).reason == "no answer"


# ---- length penalty: hand-computed values ----------------------------------------------------------------

@pytest.mark.parametrize("lengths, correct, expected", [
    ([10, 20, 30, 40], [True, True, True, True], [0.5, 0.5 - 1 / 3, 0.5 - 2 / 3, -0.5]),
    ([10, 20, 30, 40], [True, False, True, False], [0.5, 0.0, 0.5 - 2 / 3, -0.5]),   # incorrect: min(0, λ)
    ([5, 10, 15], [False, False, False], [0.0, 0.0, -0.5]),                           # all incorrect
    ([7, 7, 7], [True, False, True], [0.0, 0.0, 0.0]),                                # max_len == min_len
    ([100, 60, 80, 60], [False, True, True, True], [-0.5, 0.5, 0.0, 0.5]),
    ([42], [True], [0.0]),
    ([], [], []),
])
def test_length_penalty_hand_computed(lengths, correct, expected):
    assert length_penalty(lengths, correct) == pytest.approx(expected)


def test_length_penalty_group_reward_uses_tokens_and_verdicts():
    samples = [RewardInput("p", "r", "1", 10, correct=True), RewardInput("p", "r", "1", 30, correct=False)]
    assert [r.score for r in LengthPenalty()(samples)] == [0.5, -0.5]
    with pytest.raises(ValueError):
        length_penalty([1, 2], [True])


# ---- format, repeat --------------------------------------------------------------------------------------

@pytest.mark.parametrize("response, verdict", [
    ("<think>2+2=4</think>\\boxed{4}", "ok"),
    ("  <think>a</think>\n answer", "ok"),
    ("\\boxed{4}", "no <think> block"),
    ("hi <think>a</think>4", "text before <think>"),
    ("<think>a</think><think>b</think>4", "more than one <think> block"),
    ("<think>a", "unclosed <think>"),
    ("<think>a</think>b</think>4", "more than one </think>"),
    ("<think>a</think>  ", "no answer after </think>"),
])
def test_check_format(response, verdict):
    assert check_format(response) == verdict


def test_format_reward_modes():
    assert check_format("a</think>4", think_in_prompt=True) == "ok"
    assert check_format("<think>a</think>4", think_in_prompt=True).startswith("<think> in the response")
    assert FormatReward()(RewardInput("", "<think>a</think>4", "4")).score == 1.0
    assert FormatReward(mode="gate").gate and not FormatReward().gate
    with pytest.raises(ValueError, match="mode"):
        FormatReward(mode="strict")


def test_repeat_penalty():
    loop = "<think>" + "and so on " * 30 + "</think>"
    assert repeat_share("a b c d e f g h") == 0.0
    assert repeat_share("x y " * 20, ngram=2) == pytest.approx(1 - 2 / 39)
    assert RepeatPenalty()(RewardInput("", loop, "")).score == -1.0
    varied = " ".join(f"step {i} adds {i * 3} to the sum" for i in range(10))
    assert RepeatPenalty()(RewardInput("", varied, "")).score == 0.0
    assert RepeatPenalty(min_words=100)(RewardInput("", loop, "")).reason == "short"


# ---- the result contract ---------------------------------------------------------------------------------

def test_normalize_result_accepts_the_documented_shapes():
    assert normalize_result(1) == RewardResult(1.0)
    assert normalize_result(RewardResult(0.5, "half")) == RewardResult(0.5, "half")
    got = normalize_result({"score": 1, "reason": "ok", "scores": {"a": 2}, "correct": True}, (0, 1))
    assert got == RewardResult(1.0, "ok", {"a": 2.0}, True)


@pytest.mark.parametrize("value, message", [
    (float("nan"), "nan"), (float("inf"), "inf"), (2.0, "outside"), ("1", "str"), (None, "NoneType"),
    (True, "bool"), ({"reason": "x"}, "keys"), ({"score": 1, "extra": 1}, "keys"),
    ({"score": 1, "scores": {"a": float("nan")}}, "sub-score"), ({"score": 1, "correct": 1}, "correct"),
])
def test_normalize_result_rejects(value, message):
    with pytest.raises((TypeError, ValueError), match=message):
        normalize_result(value, (-1.0, 1.0))


def test_reward_decorator_declares_shape():
    @reward(kind="group", score_range=(0.0, 2.0))
    def both(samples):
        return [2.0] * len(samples)

    assert both.reward_kind == "group" and both.score_range == (0.0, 2.0)
    with pytest.raises(ValueError):
        reward(kind="batch")


# ---- specs, registry -------------------------------------------------------------------------------------

def test_specs_validate_with_index_and_key():
    specs = parse_specs(["math", {"name": "length", "weight": 0.1, "warmup_iterations": 3}])
    assert specs[1] == RewardSpec(name="length", weight=0.1, warmup_iterations=3)
    assert [specs[1].active(i) for i in (1, 3, 4)] == [False, False, True]
    assert specs[0].active(1)
    with pytest.raises(ValueError, match=r"rewards\[1\]\.weight"):
        parse_specs(["math", {"name": "length", "weight": "heavy"}])
    with pytest.raises(ValueError, match=r"rewards\[0\]\.colour"):
        parse_specs([{"name": "math", "colour": 1}])
    with pytest.raises(ValueError, match="empty"):
        parse_specs([])


def test_reward_specs_field_in_a_config():
    from pydantic import BaseModel, ValidationError

    from rewards.config import RewardSpecs

    class RewardConfig(BaseModel):
        rewards: RewardSpecs = [RewardSpec(name="math")]

    parsed = RewardConfig.model_validate({"rewards": ["math", {"name": "length", "weight": 0.1}]})
    assert parsed.rewards == [RewardSpec(name="math"), RewardSpec(name="length", weight=0.1)]
    with pytest.raises(ValidationError, match=r"rewards\.1\.warmup_iterations"):
        RewardConfig.model_validate({"rewards": ["math", {"name": "length", "warmup_iterations": -1}]})


def test_resolve_specs_errors_before_any_worker():
    with pytest.raises(ValueError, match=r"rewards\[1\]\.name: unknown reward 'lenght' \(built-ins: math, "):
        resolve_specs(["math", "lenght"])
    with pytest.raises(ValueError, match=r"rewards\[0\]\.name: cannot import module 'no_such_mod'"):
        resolve_specs(["no_such_mod:fn"])
    with pytest.raises(ValueError, match=r"rewards\[0\]\.name: module 'rewards\.math' has no attribute"):
        resolve_specs(["rewards.math:nope"])
    with pytest.raises(ValueError, match=r"rewards\[0\]\.options: 'math'"):
        resolve_specs([{"name": "math", "options": {"colour": "red"}}])
    with pytest.raises(ValueError, match=r"rewards\[1\]\.name: .* own name"):
        resolve_specs(["math", {"name": "math", "weight": 2}])


def test_resolve_module_attr_and_options(monkeypatch):
    monkeypatch.syspath_prepend(str(FIXTURES))
    resolved = resolve_specs(["user_rewards:concise", {"name": "user_rewards:Brevity", "options": {"bonus": 0.5}}])
    assert [r.name for r in resolved] == ["concise", "Brevity"]
    assert [r.reward.kind for r in resolved] == ["sample", "group"]
    assert resolved[1].reward.fn.bonus == 0.5
    with pytest.raises(ValueError, match=r"rewards\[0\]\.options: 'user_rewards:Unpicklable': the reward must be picklable"):
        resolve_specs(["user_rewards:Unpicklable"])


# ---- code sandbox ----------------------------------------------------------------------------------------

def _code(program: str) -> str:
    return f"<think>write it</think>\n```python\n{program}\n```"


def test_code_reward_passes_and_fails():
    tests = '[{"input": "2 3", "output": "5"}, {"input": "10 -4", "output": "6\\n"}]'
    good = CodeReward()(RewardInput("", _code("a, b = map(int, input().split())\nprint(a + b)"), tests))
    assert good == RewardResult(1.0, "2/2 tests passed", {"pass_rate": 1.0}, True)
    bad = CodeReward(partial=True)(RewardInput("", _code("print(5)"), tests))
    assert bad.score == 0.5 and bad.correct is False and "test 2: wrong output" in bad.reason
    asserts = CodeReward()(RewardInput("", _code("def f(x):\n    return x * 2"), "assert f(2) == 4\nassert f(0) == 1"))
    assert asserts.score == 0.0 and "AssertionError" in asserts.reason
    assert CodeReward()(RewardInput("", "no code here", tests)).reason == "no answer"
    assert isinstance(parse_tests("assert True"), str)


def test_code_sandbox_limits(tmp_path):
    start = time.monotonic()
    looped = run_python("while True:\n    pass", timeout_s=1.0)
    assert looped.timed_out and time.monotonic() - start < 10
    bomb = run_python("x = bytearray(4 * 1024**3)\nprint(len(x))", memory_mb=256)
    assert not bomb.ok and "MemoryError" in bomb.stderr
    flood = run_python("while True:\n    print('y' * 10000)", max_output_bytes=100_000, timeout_s=5)
    assert not flood.ok and flood.output_truncated and len(flood.stdout) <= 100_000
    net = run_python("import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)")
    assert not net.ok and "sandbox" in net.stderr
    secret = tmp_path / "secret.txt"
    secret.write_text("run data")
    spy = run_python(f"print(open({str(secret)!r}).read())")
    assert not spy.ok and "run data" not in spy.stdout and "not allowed" in spy.stderr
    escape = run_python("import subprocess\nsubprocess.run(['ls', '/'])")
    assert not escape.ok and "sandbox" in escape.stderr
    local = run_python("import os\nopen('f.txt', 'w').write('x')\nprint(os.listdir('.'), os.getcwd())")
    assert local.ok and "f.txt" in local.stdout and SANDBOX_DIR in local.stdout  # its own tmpfs
    for run in (looped, bomb, flood, net, spy, escape, local):
        assert not os.path.exists(run.workdir)  # the temporary directory is gone afterwards


# ---- the pool --------------------------------------------------------------------------------------------

def _hang(x):
    time.sleep(1000)


def _crash(x):
    raise RuntimeError("boom")


def _wrong_type(x):
    return 1.0


def _echo(x):
    return RewardResult(float(x), "ok")


def _die(x):
    os._exit(3)


def test_pool_cuts_off_hangs_and_contains_crashes():
    with RewardPool(num_workers=2, timeout_s=1.5) as pool:
        start = time.monotonic()
        results = pool.map(_hang, [(1,), (2,)])
        assert time.monotonic() - start < 60  # _hang sleeps 1000 s: only the 1.5 s cutoff ends it this soon
        assert all(r.score == 0 and r.reason.startswith("timeout") for r in results)
        assert pool.timeouts == 2
        # the pool keeps working after replacing killed workers
        assert [r.score for r in pool.map(_echo, [(i,) for i in range(5)])] == [0.0, 1.0, 2.0, 3.0, 4.0]
        crashed = pool.map(_crash, [(0,)])[0]
        assert crashed.score == 0 and "boom" in crashed.reason
        assert "not RewardResult" in pool.map(_wrong_type, [(0,)])[0].reason
        died = pool.run(_die, [(0,)])[0]
        assert died.error == "error: reward worker died"


def test_math_reward_in_pool_from_a_thread():
    # math-verify's own signal timeout breaks outside the main thread; the pool must not care
    out = {}

    def run():
        with RewardPool(num_workers=1, timeout_s=20) as pool:
            out["r"] = pool.map(math_reward, [("\\boxed{4}", "4"), ("\\boxed{5}", "4")])

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    assert [r.score for r in out["r"]] == [1.0, 0.0]


def test_reward_set_in_a_borrowed_pool_names_the_failed_rewards():
    from rewards.combine import RewardSet

    samples = [[RewardInput("p", "<think>a</think>\\boxed{4}", "4"), RewardInput("p", "\\boxed{5}", "4")]]
    with RewardPool(num_workers=1, timeout_s=20) as pool:
        with RewardSet(["math", "tests.test_rewards:_crash"], pool=pool) as rs:
            scored = rs.score_groups(samples, 1)[0]
        assert [(s.correct, s.failed) for s in scored] == [(True, ("_crash",)), (False, ("_crash",))]
        with RewardSet(["math"], pool=pool) as rs:  # the pool outlived the first set
            assert [s.failed for s in rs.score_groups(samples, 1)[0]] == [(), ()]


def test_check_correctness_reward():
    from rewards.combine import check_correctness_reward

    check_correctness_reward("code")
    check_correctness_reward("tests.test_rewards:_echo")
    for name, why in (("length", "is a group reward"), ("lenght", "unknown reward 'lenght'"),
                      ("rewards.math:nothing", "has no attribute 'nothing'")):
        with pytest.raises(ValueError, match=why):
            check_correctness_reward(name)


# ---- the scoring CLI: a row needs a prompt only where a group reward needs it ------------------------------

def _responses_and_answers(tmp_path):
    path = tmp_path / "in.jsonl"
    rows = [{"id": 1, "response": "<think>2+2=4</think>\\boxed{4}", "answer": "4"},
            {"id": 2, "response": "<think>2+2=5</think>\\boxed{5}", "answer": "4"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_score_cli_scores_rows_without_prompt_with_per_sample_rewards(tmp_path, capsys):
    from rewards.score import main

    source, out = _responses_and_answers(tmp_path), tmp_path / "out.jsonl"
    assert main(["--reward", "math", "--workers", "1", str(source), "-o", str(out)]) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["reward"]) for r in written] == [(1, 1.0), (2, 0.0)]
    assert "prompt" not in written[0] and "scored 2 rows (0 bad" in capsys.readouterr().err


def test_score_cli_group_reward_names_the_row_field_and_reward(tmp_path, capsys):
    from rewards.score import main

    source, out = _responses_and_answers(tmp_path), tmp_path / "out.jsonl"
    assert main(["--reward", "math", "--reward", "length", str(source), "-o", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"rewards.score: {source}:1: missing field 'prompt' (2 of 2 rows lack it), which the group reward "
        "'length' needs to group the responses of one prompt; add the field (or name it with --prompt-field), "
        "or score with per-sample rewards only\n")
    assert not out.exists()  # stopped before scoring anything
    # a group reward still in its warmup groups nothing yet: the rows score
    assert main(["--reward", "format", "--reward", "length", "--warmup", "length=2", "--iteration", "1",
                 "--workers", "1", str(source), "-o", str(out)]) == 0
    assert [json.loads(line)["rewards"] for line in out.read_text().splitlines()] == [{"format": 1.0, "length": 0.0}] * 2


def test_group_rows_by_prompt_and_alone_without_one(tmp_path):
    from rewards.score import group_rows

    rows = [(1, {"prompt": "a"}, ""), (2, {}, ""), (3, None, "not JSON"), (4, {"prompt": "a"}, ""), (5, {}, "")]
    assert group_rows(rows, "prompt", [], tmp_path / "in.jsonl") == [[0, 3], [1], [4]]
    with pytest.raises(ValueError, match=r"in.jsonl:2: missing field 'prompt' \(2 of 4 rows lack it\), which "
                                         r"the group rewards 'length', 'judge' need to"):
        group_rows(rows, "prompt", ["length", "judge"], tmp_path / "in.jsonl")

