import random

import pytest

from rewards.math import math_reward
from thinkrl.fileio import DataError, atomic_directory, read_jsonl
from thinkrl.tasks import arithmetic


def test_problems_have_correct_answers_and_difficulty():
    rows = arithmetic.make_rows(200, seed=3)
    assert len({r["prompt"] for r in rows}) == 200
    for r in rows:
        expr = r["prompt"].removesuffix("=?")
        assert str(eval(expr)) == r["answer"]  # noqa: S307 - our own generated digits and +/-
        assert r["difficulty"] == expr.count("+") + expr.count("-")
        assert 1 <= r["difficulty"] <= 5


def test_teacher_without_slips_is_always_right_and_shows_the_moves():
    rng = random.Random(0)
    for row in arithmetic.make_rows(100, seed=4):
        text = arithmetic.teacher_solution(arithmetic.parse_question(row["prompt"]), rng, slip_rate=0.0)
        assert math_reward(text, row["answer"]).score == 1.0
        assert text.startswith("<think>Plan:") and "Check:" in text and "</think>\\boxed{" in text


def test_teacher_slips_at_the_stated_rate():
    rng = random.Random(1)
    rows = arithmetic.make_rows(100, seed=5, min_ops=1, max_ops=1) * 14
    texts = [arithmetic.teacher_solution(arithmetic.parse_question(r["prompt"]), rng, 0.3, 0.5) for r in rows]
    correct = sum(math_reward(t, r["answer"]).score for t, r in zip(texts, rows, strict=True)) / len(rows)
    assert abs(correct - (1 - 0.3 * 0.5)) < 0.05
    assert any("Wait," in t for t in texts)


def test_read_jsonl_names_file_row_and_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "1+1=?", "answer": "2"}\n{"prompt": "2+2=?"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing or empty field 'answer'"):
        read_jsonl(path, required=("prompt", "answer"))
    with pytest.raises(DataError, match="not found"):
        read_jsonl(tmp_path / "missing.jsonl")
    path.write_text("{not json\n")
    with pytest.raises(DataError, match=r"d\.jsonl:1: not valid JSON"):
        read_jsonl(path)
    path.write_bytes('{"prompt": "é", "answer": "1"}\n'.encode() + b'{"prompt": "\xff", "answer": "2"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not UTF-8"):
        read_jsonl(path)
    path.write_text('{"prompt": "é", "answer": "1"}\n', encoding="utf-8")
    assert read_jsonl(path) == [{"prompt": "é", "answer": "1"}]


def test_atomic_directory_keeps_the_old_copy_when_a_save_fails(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_directory(target) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("killed mid-save")
    assert (target / "weights").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
