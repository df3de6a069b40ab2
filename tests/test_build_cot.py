"""Dataset builder: answer parsing, selection, patterns, the HTTP client's retries, and resume (no engine)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from sft.build_cot import (
    ArithmeticTeacher,
    OpenAITeacher,
    Question,
    build_dataset,
    gold_answer,
    read_questions,
    select,
)
from sft.patterns import detect_patterns
from thinkrl.tasks import arithmetic


def test_gold_answers_of_gsm8k_and_math():
    assert gold_answer("She has 3 + 4 = 7 apples.\n#### 1,007") == "1007"
    assert gold_answer("So $x = \\boxed{\\frac{1}{2}}$ and not \\boxed{3}... wait: \\boxed{\\frac{a}{b}}") == "\\frac{a}{b}"
    assert gold_answer(42) == "42"
    with pytest.raises(ValueError, match="no '####'"):
        gold_answer("7", "gsm8k")


def test_read_questions_names_bad_rows(tmp_path):
    from thinkrl.fileio import DataError, write_jsonl

    write_jsonl(tmp_path / "q.jsonl", [{"problem": "1+1", "solution": "\\boxed{2}"}, {"problem": "2+2"}])
    with pytest.raises(DataError, match=r"q\.jsonl:2: missing or empty field 'solution'"):
        read_questions(tmp_path / "q.jsonl", "problem", "solution")
    write_jsonl(tmp_path / "q.jsonl", [{"problem": "1+1", "solution": "so \\boxed{2}"}])
    assert read_questions(tmp_path / "q.jsonl", "problem", "solution") == [Question("q0", "1+1", "2", [])]


def test_select_modes():
    import random

    lengths = [30, 10, 20, 5]
    assert select([0, 1, 2], lengths, "all", random.Random(0)) == [0, 1, 2]
    assert select([0, 1, 2], lengths, "shortest", random.Random(0)) == [1]  # 3 is shortest but wrong
    assert select([0, 2], lengths, "random", random.Random(0))[0] in (0, 2)
    assert select([], lengths, "shortest", random.Random(0)) == []


def test_pattern_heuristics():
    trace = "<think>Plan: add first. 3+4=8. Wait, 3+4=7. Let me check: 7-4=3.</think>\\boxed{7} Alternatively"
    assert detect_patterns(trace) == ["planning", "evaluation", "reflection"]  # answer part is not read
    assert detect_patterns("Alternatively, let me try another way") == ["exploration"]
    assert detect_patterns("7") == []


class _Flaky(BaseHTTPRequestHandler):
    calls: list = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls.append((self.headers.get("Authorization"), body))
        if len(type(self).calls) <= 2:
            self.send_response(503)
            self.end_headers()
            return
        reply = {"choices": [{"message": {"content": f"\\boxed{{{i}}}"}} for i in range(body["n"])]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_openai_teacher_retries_with_backoff_and_sends_key_from_env(monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("MY_TEST_KEY", "sk-secret-123")
    try:
        teacher = OpenAITeacher(f"http://127.0.0.1:{server.server_port}/v1", "m", api_key_env="MY_TEST_KEY",
                                retries=3, backoff_s=0.01, concurrency=1, send_seed=True)
        out = teacher.sample([[{"role": "user", "content": "q", "raw_question": "q"}]], k=3, seed=7)
        assert out == [["\\boxed{0}", "\\boxed{1}", "\\boxed{2}"]]
        assert teacher.retried == 2 and len(_Flaky.calls) == 3
        assert _Flaky.calls[-1][0] == "Bearer sk-secret-123"
        assert "raw_question" not in _Flaky.calls[-1][1]["messages"][0] and _Flaky.calls[-1][1]["seed"] == 7
        _Flaky.calls.clear()
        impatient = OpenAITeacher(f"http://127.0.0.1:{server.server_port}/v1", "m", api_key_env="MY_TEST_KEY",
                                  retries=1, backoff_s=0.01)
        with pytest.raises(RuntimeError, match="gave up after 2 attempts") as err:
            impatient.sample([[{"role": "user", "content": "q"}]], k=1, seed=0)
        assert "sk-secret" not in str(err.value)
    finally:
        server.shutdown()


class _StopAfter(ArithmeticTeacher):
    """Fails on its n-th call, like a builder killed mid-run."""

    def __init__(self, calls: int) -> None:
        super().__init__(slip_rate=0.3, fix_rate=0.3)
        self.calls = calls

    def sample(self, prompts, k, seed):
        self.calls -= 1
        if self.calls < 0:
            raise KeyboardInterrupt
        return super().sample(prompts, k, seed)


def test_resume_after_interruption_gives_the_uninterrupted_dataset(tmp_path):
    import datasets

    from sft.data import encode_rows, load_rows
    from thinkrl.models import build_tokenizer

    questions = [Question(r["id"], r["prompt"], r["answer"], [])
                 for r in arithmetic.make_rows(60, seed=4, max_ops=3)]
    from rewards.pool import RewardPool

    pool = RewardPool(num_workers=1, timeout_s=30)  # one math-verify worker for the three builds
    kwargs = dict(k=3, keep="all", chunk_size=16, progress=False, log=lambda _: None, reward_pool=pool)
    with pytest.raises(KeyboardInterrupt):
        build_dataset(questions, tmp_path / "cut", _StopAfter(2), **kwargs)
    assert json.loads((tmp_path / "cut" / "progress.json").read_text())["done_chunks"] == [0, 1]
    stats = build_dataset(questions, tmp_path / "cut", _StopAfter(99), **kwargs)
    assert stats["questions_this_run"] == 60 - 32
    reference = build_dataset(questions, tmp_path / "ref", _StopAfter(99), **kwargs)
    rows = load_rows(tmp_path / "cut" / "data.jsonl")
    assert rows == load_rows(tmp_path / "ref" / "data.jsonl")
    assert len({(r["id"], r["sample_index"]) for r in rows}) == len(rows) == stats["traces_kept"]
    assert stats["questions_in"] == 60 and stats["traces_sampled"] == 180
    assert stats["traces_verified"] == stats["traces_kept"] == reference["traces_kept"]  # keep=all
    assert 0 < stats["traces_kept"] < 180  # the slipping teacher is sometimes wrong: those are dropped
    assert stats["pattern_frequencies"]["planning"]["share"] == 1.0
    assert datasets.load_from_disk(str(tmp_path / "cut" / "dataset")).num_rows == len(rows)
    assert len(encode_rows(build_tokenizer(), rows, "data.jsonl", 512).examples) == len(rows)
    with pytest.raises(ValueError, match=r"differs in \['k'\]"):
        build_dataset(questions, tmp_path / "cut", _StopAfter(99), **{**kwargs, "k": 2})
    pool.close()


def test_tiny_recipe_warmup_data_through_the_builder(tmp_path):
    """The tiny recipe's path: arithmetic teacher -> builder (unverified: slips kept) -> SFT loader."""
    from sft.config import SFTConfig
    from sft.train import build_task_sft_data, load_sft_examples
    from thinkrl.models import build_tokenizer

    prompts = arithmetic.make_rows(30, seed=2, max_ops=3)
    path = build_task_sft_data(prompts, tmp_path / "sft-cot", seed=0, slip_rate=0.5, fix_rate=0.0,
                                     log=lambda _: None)
    stats = json.loads((tmp_path / "sft-cot" / "stats.json").read_text())
    assert stats["traces_kept"] == 30 and stats["reward"] == "none"
    train, heldout = load_sft_examples(SFTConfig(data_file=str(path)), build_tokenizer())
    assert len(train) == 30 and heldout is None
    wrong = [r for r in map(json.loads, path.read_text().splitlines())
             if not r["messages"][1]["content"].endswith("\\boxed{" + r["answer"] + "}")]
    assert wrong  # with slip_rate 0.5 and no fixes the imperfect teacher's wrong traces stay in


def verdict_not_score(sample):
    """A `module:attr` reward whose score and verdict disagree: the verdict decides what is verified."""
    from rewards.types import RewardResult

    return RewardResult(1.0, "scored high", correct=sample.response.rstrip().endswith("\\boxed{" + sample.answer + "}"))


def test_the_reward_is_named_as_everywhere_and_its_verdict_verifies(tmp_path):
    questions = [Question(r["id"], r["prompt"], r["answer"], []) for r in arithmetic.make_rows(8, seed=3, max_ops=3)]
    kwargs = dict(k=4, keep="all", progress=False, log=lambda _: None, reward_workers=1, reward_timeout_s=30)
    teacher = ArithmeticTeacher(slip_rate=0.5, fix_rate=0.0)
    stats = build_dataset(questions, tmp_path / "plugin", teacher, reward="tests.test_build_cot:verdict_not_score",
                          **kwargs)
    rows = [json.loads(line) for line in (tmp_path / "plugin" / "data.jsonl").read_text().splitlines()]
    assert 0 < stats["traces_verified"] == len(rows) < 32 and stats["verify_errors"] == 0
    assert all(r["messages"][1]["content"].rstrip().endswith("\\boxed{" + r["answer"] + "}") for r in rows)
    assert build_dataset(questions, tmp_path / "math", teacher, reward="math", **kwargs)["traces_kept"] == len(rows)
    for name, why in (("length", "is a group reward"), ("nope", "unknown reward 'nope'"),
                      ("tests.test_build_cot:missing", "has no attribute")):
        with pytest.raises(ValueError, match=why):
            build_dataset(questions, tmp_path / name, teacher, reward=name, **kwargs)
        assert not (tmp_path / name).exists()  # refused before anything is written
