import random
from pathlib import Path

import pytest
from PIL import Image

from rewards.math import math_reward
from sft.build_cot import TEMPLATES, Question, _prompt
from thinkrl.tasks import shapes


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    return shapes.make_rows(300, seed=0, image_dir=tmp_path_factory.mktemp("images"))


def _correct(text: str, answer: str) -> bool:
    return math_reward(text, answer).score == 1.0


def test_rows_are_deterministic_and_files_reused(tmp_path):
    a = shapes.make_rows(40, seed=7, image_dir=tmp_path / "a")
    b = shapes.make_rows(40, seed=7, image_dir=tmp_path / "b")
    again = shapes.make_rows(40, seed=7, image_dir=tmp_path / "a")
    assert again == a
    for ra, rb in zip(a, b, strict=True):
        assert {**ra, "images": None} == {**rb, "images": None}
        assert Path(ra["images"][0]).name == Path(rb["images"][0]).name
        assert Path(ra["images"][0]).read_bytes() == Path(rb["images"][0]).read_bytes()
    assert len(list((tmp_path / "a").iterdir())) == 40  # no temp files left, nothing duplicated


def test_rows_are_distinct_and_exclusion_holds(tmp_path):
    held_out = shapes.make_rows(100, seed=1, image_dir=tmp_path)
    held_keys = {shapes.row_key(r) for r in held_out}
    assert len(held_keys) == 100
    train = shapes.make_rows(100, seed=1, image_dir=tmp_path, exclude=held_keys)  # same seed: would collide
    assert held_keys.isdisjoint(shapes.row_key(r) for r in train)
    assert len({shapes.row_key(r) for r in train}) == 100


def test_rows_have_the_contracted_fields(rows):
    for r in rows:
        assert r["prompt"].startswith("<image>\n") and r["prompt"].count("<image>") == 1
        assert r["prompt"] == f"<image>\nHow many {shapes.parse_colour(r['prompt'])} squares are there?"
        assert r["difficulty"] == int(r["answer"]) and 1 <= r["difficulty"] <= 6
        assert len(r["images"]) == 1 and Path(r["images"][0]).is_absolute()
    assert {r["difficulty"] for r in rows} == set(range(1, 7))


def test_pngs_are_56px_rgb_and_decode(rows):
    for r in rows[:50]:
        with Image.open(r["images"][0]) as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (56, 56)
            image.load()


def test_solve_image_recovers_the_answer(rows):
    for r in rows:
        counts = shapes.solve_image(r["images"][0], shapes.parse_colour(r["prompt"]))
        assert sum(counts) == int(r["answer"]), r["id"]


@pytest.mark.parametrize("size", [56, 84])
def test_layouts_keep_one_square_per_patch_and_are_read_back_exactly(size):
    rng = random.Random(size)
    for _ in range(100):
        problem = shapes.sample_problem(rng, rng.randint(1, 6), rng.randint(0, 4), size)
        patches = set()
        for s in problem.squares:
            assert shapes.MIN_SIDE <= s.side <= shapes.MAX_SIDE
            for start in (s.x, s.y):  # inside one 14 px patch, 1 px off its edges: never on a token line
                end = start + s.side - 1
                assert start // 14 == end // 14 and start % 14 >= 1 and end % 14 <= 12
            patches.add((s.x // 14, s.y // 14))
        assert len(patches) == len(problem.squares)
        for i, a in enumerate(problem.squares):
            for b in problem.squares[i + 1:]:
                assert shapes._apart(a, b)
        png = problem.png()
        assert shapes.find_squares(png) == list(problem.squares)
        assert shapes.solve_image(png, problem.colour) == problem.counts


def test_make_rows_rejects_a_size_off_the_token_grid(tmp_path):
    with pytest.raises(ValueError, match="multiple of 28"):
        shapes.make_rows(1, seed=0, image_dir=tmp_path, size=60)


def test_teacher_without_slips_is_always_right_and_shows_the_moves(rows):
    rng = random.Random(0)
    for r in rows:
        colour = shapes.parse_colour(r["prompt"])
        text = shapes.teacher_solution(shapes.solve_image(r["images"][0], colour), colour, rng, slip_rate=0.0)
        assert _correct(text, r["answer"]) and text.endswith("</think>\\boxed{" + r["answer"] + "}")
        assert text.startswith(f"<think>Glance: {r['answer']}.\nPlan: count {colour}")
        assert "Check:" in text and "Wait" not in text
        assert [line.split()[0] for line in text.splitlines()[2:6]] == list(shapes.QUADRANTS)


def _p_correct(counts, slip_rate, fix_rate):
    """Exact chance that the uncaught +-1 slips of the four quadrants sum to zero."""
    uncaught = slip_rate * (1 - fix_rate)
    dist = {0: 1.0}
    for c in counts:
        step = {0: 1 - uncaught, 1: uncaught} if c == 0 else {0: 1 - uncaught, 1: uncaught / 2, -1: uncaught / 2}
        new = {}
        for total, p in dist.items():
            for delta, q in step.items():
                new[total + delta] = new.get(total + delta, 0.0) + p * q
        dist = new
    return dist[0]


def test_teacher_slips_at_the_stated_rate(rows):
    rng = random.Random(1)
    solved = [(shapes.solve_image(r["images"][0], c := shapes.parse_colour(r["prompt"])), c, r["answer"])
              for r in rows[:100]]
    texts, expected = [], 0.0
    for counts, colour, answer in solved * 20:
        texts.append((shapes.teacher_solution(counts, colour, rng, 0.3, 0.5), answer))
        expected += _p_correct(counts, 0.3, 0.5)
    accuracy = sum(_correct(t, a) for t, a in texts) / len(texts)
    assert abs(accuracy - expected / len(texts)) < 0.03
    assert 0.45 < accuracy < 0.75  # slips do reach the answer (0.85**4 = 0.52 with no uncaught slip)
    assert any("\nWait, " in t for t, _ in texts)


def test_solution_length_stays_short(rows):
    # one character per token for the tiny byte-level model: ~135 for the hardest clean solution
    rng = random.Random(2)
    for r in rows:
        colour = shapes.parse_colour(r["prompt"])
        counts = shapes.solve_image(r["images"][0], colour)
        clean = shapes.teacher_solution(counts, colour, rng, slip_rate=0.0)
        assert len(clean) <= 138
        for _ in range(5):
            text = shapes.teacher_solution(counts, colour, rng, slip_rate=0.5, fix_rate=0.5)
            assert len(text) <= len(clean) + 20 * text.count("Wait,")


def test_shapes_teacher_reads_the_builders_data_url_prompts(rows):
    system, user = (TEMPLATES / "system.txt").read_text(), (TEMPLATES / "user.txt").read_text()
    questions = [Question(r["id"], r["prompt"], r["answer"], r["images"]) for r in rows[:20]]
    prompts = [_prompt(q, system, user) for q in questions]
    assert prompts[0][-1]["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    teacher = shapes.ShapesTeacher(slip_rate=0.0)
    out = teacher.sample(prompts, k=3, seed=5)
    assert [len(texts) for texts in out] == [3] * 20
    assert all(_correct(t, q.answer) for q, texts in zip(questions, out, strict=True) for t in texts)
    slipping = shapes.ShapesTeacher(slip_rate=0.5)
    assert slipping.sample(prompts, k=3, seed=5) == slipping.sample(prompts, k=3, seed=5)


def test_shapes_teacher_names_a_prompt_without_an_image():
    prompt = [{"role": "user", "content": "How many red squares are there?", "raw_question": "How many red squares?"}]
    with pytest.raises(ValueError, match="prompt 0: no image part"):
        shapes.ShapesTeacher().sample([prompt], k=1, seed=0)


def test_more_squares_than_patches_is_refused():
    with pytest.raises(ValueError, match="one per 14 px patch, 16 patches"):
        shapes.sample_problem(random.Random(0), 12, 5, 56)
