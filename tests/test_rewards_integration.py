"""Integration tests of the rewards layer: RewardSet with its worker processes, misbehaving plugins, a real
Ray actor scoring from a thread, a plugin installed as its own package, and the scoring CLI."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rewards.combine import RewardSet
from rewards.types import RewardInput, RewardPluginError

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).parent / "fixtures" / "reward_plugin"
REPO = Path(__file__).resolve().parents[1]
TOWER = "<think>huge</think>\\boxed{9^{9^{9^{9^{9}}}}}"


@pytest.fixture(scope="module", autouse=True)
def _user_module_importable():
    # spawned workers inherit sys.path, so user_rewards resolves in them too
    sys.path.insert(0, str(FIXTURES))
    yield
    sys.path.remove(str(FIXTURES))


@pytest.fixture(scope="module")
def mixed_set():
    specs = ["math", {"name": "length", "weight": 0.5, "warmup_iterations": 2},
             {"name": "format", "options": {"mode": "gate"}}, {"name": "user_rewards:concise", "weight": 0.1},
             "user_rewards:crash_on_odd", {"name": "user_rewards:hang_on", "weight": 0.0}]
    with RewardSet(specs, num_workers=2, timeout_s=3, max_consecutive_failures=50) as rs:
        yield rs


def _group():
    return [RewardInput("2+2?", "<think>2+2=4</think>\\boxed{4}", "4", num_tokens=10),        # correct, short
            RewardInput("2+2?", "<think>2+2 is 5, hang on</think>\\boxed{5}", "4", num_tokens=30),  # wrong, long
            RewardInput("2+2?", "\\boxed{4}", "4", num_tokens=20)]                          # correct, no think


def test_weights_warmup_gate_failures_and_sub_scores(mixed_set):
    start = time.monotonic()
    before = mixed_set.score_groups([_group()], iteration=2)[0]
    m = mixed_set.metrics()
    assert time.monotonic() - start < 60
    # iteration 2 <= warmup 2: no length term. concise: answer <= 40 chars -> 1.0 * 0.1; crash_on_odd: 1.0
    assert [s.correct for s in before] == [True, False, False]               # the gate makes #3 incorrect
    assert before[0].total == pytest.approx(1.0 + 0.1 + 1.0)
    assert before[0].reasons["length"] == "warmup" and before[0].scores["length"] == 0.0
    assert before[1].total == pytest.approx(0.0 + 0.1 + 1.0)
    assert before[1].reasons["hang_on"] == "timeout after 3s"               # that term only
    assert before[2].total == 0.0 and before[2].reasons["format"] == "no <think> block"
    assert before[0].scores["concise/answer_chars"] == len("\\boxed{4}")
    assert m["reward/concise/thinking_tokens"] == pytest.approx(20.0)
    assert m["reward/timeouts"] == 1 and m["reward/failures"] == 1 and m["reward/gated_share"] == pytest.approx(1 / 3)
    assert m["reward/math"] == pytest.approx(2 / 3) and m["reward/correct_share"] == pytest.approx(1 / 3)

    odd = [RewardInput("1+1?", "<think>x</think>\\boxed{2}", "2", num_tokens=n) for n in (11, 31)]
    after = mixed_set.score_groups([_group(), odd], iteration=3)
    # length on: group 1 lengths 10, 30, 20 with verdicts T, F, F -> +0.5, -0.5, min(0, 0) = 0
    assert [s.scores["length"] for s in after[0]] == [0.5, -0.5, 0.0]
    assert after[0][0].total == pytest.approx(1.0 + 0.5 * 0.5 + 0.1 + 1.0)
    assert after[1][0].reasons["crash_on_odd"] == "error: ValueError: odd length 11"
    assert after[1][0].total == pytest.approx(1.0 + 0.5 * 0.5 + 0.1)   # crash costs its term only
    m = mixed_set.metrics()
    assert m["reward/crash_on_odd/failures"] == 2 and m["reward/errors"] == 2 and m["reward/timeouts"] == 1


def test_verdicts_run_only_correctness_and_gates(mixed_set):
    """Held-out evaluation's path: the same verdicts as score_groups, no other reward, metrics untouched."""
    mixed_set.score_groups([_group()], iteration=3)
    before = mixed_set.metrics()
    hang = [RewardInput("2+2?", "<think>hang on</think>\\boxed{4}", "4", num_tokens=7)]  # would time out
    assert mixed_set.verdicts([_group(), hang], iteration=3) == [[True, False, False], [True]]
    assert mixed_set.metrics() == before


def test_invalid_results_are_failures():
    specs = ["user_rewards:nan", "user_rewards:too_big", "user_rewards:wrong_type", "user_rewards:short_group",
             {"name": "user_rewards:Brevity", "options": {"bonus": 0.5}}]   # a well-behaved class with options
    with RewardSet(specs, num_workers=1, timeout_s=5) as rs:
        (sample, other), = rs.submit([[RewardInput("p", "r", "a", 1), RewardInput("p", "s", "a", 2)]], 1).result()
        m = rs.metrics()
    assert [sample.total, other.total] == [0.5, 0.0] and m["reward/Brevity"] == 0.25
    assert {k: v for k, v in sample.scores.items() if k != "Brevity"} == dict.fromkeys(["nan", "too_big",
                                                                                          "wrong_type", "short_group"], 0.0)
    assert sample.reasons["nan"] == "invalid: score is nan"
    assert "outside the reward's range" in sample.reasons["too_big"]
    assert "returned str" in sample.reasons["wrong_type"]
    assert "group reward returned 1, expected a list of 2" in other.reasons["short_group"]
    assert m["reward/invalid"] == 8 and m["reward/failures"] == 8


def test_always_failing_plugin_stops_the_run_after_the_bound():
    samples = [[RewardInput("p", f"r{i}", "a", i)] for i in range(40)]
    with RewardSet(["user_rewards:crash"], num_workers=1, timeout_s=5, max_consecutive_failures=5) as rs:
        with pytest.raises(RewardPluginError, match=r"reward 'crash' .* failed on 5 samples in a row; last: "
                                                    r"error: RuntimeError: plugin crashed on purpose"):
            rs.score_groups(samples, 1)
    start = time.monotonic()
    with RewardSet(["user_rewards:hang"], num_workers=2, timeout_s=1, max_consecutive_failures=3) as rs:
        with pytest.raises(RewardPluginError, match=r"'hang' .* 3 samples in a row; last: timeout after 1s"):
            rs.score_groups(samples, 1)
    assert time.monotonic() - start < 30  # stopped early: 40 samples would take 20 s of timeouts alone


def test_timeout_inside_a_thread_of_a_ray_actor(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "local")
    import ray

    @ray.remote
    class Scorer:
        def score(self):
            import threading

            from rewards.combine import RewardSet
            from rewards.types import RewardInput

            out = {}

            def work():
                with RewardSet(["math"], num_workers=2, timeout_s=2) as rs:
                    rs.score_groups([[RewardInput("p", "\\boxed{1}", "1", 1)]], 1)  # workers warm
                    start = time.monotonic()
                    out["scored"] = rs.score_groups([[RewardInput("p", TOWER, "1", 5),
                                                      RewardInput("p", "\\boxed{2}", "2", 3)]], 1)[0]
                    out["seconds"] = time.monotonic() - start

            thread = threading.Thread(target=work)
            thread.start()
            thread.join(120)
            return out

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        out = ray.get(Scorer.remote().score.remote(), timeout=180)
    finally:
        ray.shutdown()
    tower, plain = out["scored"]
    assert tower.total == 0.0 and tower.reasons["math"] == "timeout after 2s"
    assert plain.total == 1.0 and plain.correct
    assert out["seconds"] < 15


def test_entry_point_plugin_installed_as_a_package(tmp_path):
    source, target = tmp_path / "src", tmp_path / "site"
    import shutil

    shutil.copytree(FIXTURES, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True, timeout=300)
    script = (
        "from rewards.combine import RewardSet\n"
        "from rewards.types import RewardInput\n"
        "from rewards.registry import installed_entry_points\n"
        "if __name__ == '__main__':\n"
        "    assert 'keyword' in installed_entry_points()\n"
        "    with RewardSet([{'name': 'keyword', 'options': {'keyword': 'boxed'}}], num_workers=1) as rs:\n"
        "        s = rs.score_groups([[RewardInput('p', '<think>t</think>\\\\boxed{1} boxed', '1', 3)]], 1)[0][0]\n"
        "        print(s.total, s.scores['keyword/mentions'], rs.metrics()['reward/keyword/mentions'])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1.0", "2.0", "2.0"]
    # without the install, the name is unknown and the error lists the built-ins
    missing = subprocess.run([sys.executable, "-c", "from rewards.config import resolve_specs\n"
                              "resolve_specs(['keyword'])"], capture_output=True, text=True, timeout=60)
    assert "rewards[0].name: unknown reward 'keyword' (built-ins: math" in missing.stderr


def test_scoring_cli_keeps_bad_rows(tmp_path):
    rows = [json.dumps({"id": 1, "prompt": "2+2?", "response": "<think>4</think>\\boxed{4}", "answer": "4"}),
            json.dumps({"id": 2, "prompt": "2+2?", "response": "<think>5</think>\\boxed{5}", "answer": 4}),
            "{not json",
            json.dumps({"id": 4, "prompt": "3+3?", "response": "6"}),
            json.dumps({"id": 5, "prompt": "3+3?", "response": "<think>long</think>\\boxed{6}", "answer": "6",
                        "num_tokens": 40})]
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join(rows) + "\n")
    env = {**os.environ, "PYTHONPATH": f"{FIXTURES}{os.pathsep}{REPO}"}
    done = subprocess.run([sys.executable, "-m", "rewards.score", "--reward", "math", "--reward",
                           "user_rewards:concise", "--weight", "user_rewards:concise=0.5", str(source), "-o", str(out),
                           "--workers", "1", "--summary", str(tmp_path / "summary.json")],
                          capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(written) == 5
    assert [r.get("id") for r in written] == [1, 2, None, 4, 5]
    assert written[0]["reward"] == 1.5 and written[0]["rewards"]["math"] == 1.0
    assert written[0]["rewards"]["concise/answer_chars"] == len("\\boxed{4}")
    assert written[1]["reward"] == 0.5 and "math: wrong" in written[1]["reason"]
    assert written[2] == {"line": 3, "reward": 0.0, "rewards": {},
                          "reason": f"bad row: {source}:3: not JSON (Expecting property name enclosed in double quotes)"}
    assert written[3]["reward"] == 0.0 and written[3]["reason"] == f"bad row: {source}:4: missing field 'answer'"
    assert written[4]["rewards"]["concise/thinking_tokens"] == 40.0
    assert "scored 3 rows (2 bad, scored 0)" in done.stderr and "rows/s" in done.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rows"] == 5 and summary["bad_rows"] == 2 and summary["failures"] == 0
