import pytest

from rewards.math import extract_answer, is_equivalent, math_reward
from rewards.pool import RewardPool
from rewards.types import RewardResult


@pytest.mark.parametrize("response, expected", [
    ("<think>3+4=8\nWait, 3+4=7.</think>\\boxed{7}", "7"),
    ("<think>maybe \\boxed{3}</think> so \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{1} then \\boxed{2}", "2"),
    ("<think>x</think>Answer: 42.", "42"),
    ("<think>x</think>the total is 12 apples", "12"),
    ("<think>x=5</think>no digits here", None),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
])
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


@pytest.mark.parametrize("gold, pred, same", [
    ("7", "7", True), ("7", "7.0", True), ("7", "8", False), ("1/2", "\\frac{1}{2}", True),
    ("0.5", "\\frac{1}{2}", True), ("-3", "-3", True), ("3", "-3", False),
])
def test_equivalence(gold, pred, same):
    assert is_equivalent(gold, pred) is same


def test_math_reward_reasons():
    assert math_reward("<think>a</think>\\boxed{5}", "5") == RewardResult(1.0, "correct")
    assert math_reward("<think>a</think>\\boxed{6}", "5") == RewardResult(0.0, "wrong")
    assert math_reward("<think>unfinished", "5") == RewardResult(0.0, "no answer")


def _hang(x):
    import time

    time.sleep(60)


def _crash(x):
    raise RuntimeError("boom")


def _wrong_type(x):
    return 1.0


def _echo(x):
    return RewardResult(float(x), "ok")


def test_pool_cuts_off_hangs_and_contains_crashes():
    import time

    with RewardPool(num_workers=2, timeout_s=1.5) as pool:
        start = time.monotonic()
        results = pool.map(_hang, [(1,), (2,)])
        assert time.monotonic() - start < 10
        assert all(r.score == 0 and r.reason.startswith("timeout") for r in results)
        assert pool.timeouts == 2
        # the pool keeps working after replacing killed workers
        assert [r.score for r in pool.map(_echo, [(i,) for i in range(5)])] == [0.0, 1.0, 2.0, 3.0, 4.0]
        crashed = pool.map(_crash, [(0,)])[0]
        assert crashed.score == 0 and "boom" in crashed.reason
        assert "not RewardResult" in pool.map(_wrong_type, [(0,)])[0].reason


def test_math_reward_in_pool_from_a_thread():
    # math-verify's own signal timeout breaks outside the main thread; the pool must not care
    import threading

    out = {}

    def run():
        with RewardPool(num_workers=1, timeout_s=20) as pool:
            out["r"] = pool.map(math_reward, [("\\boxed{4}", "4"), ("\\boxed{5}", "4")])

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    assert [r.score for r in out["r"]] == [1.0, 0.0]
