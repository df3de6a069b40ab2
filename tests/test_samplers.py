"""Samplers: statistics of prioritized draws, curriculum schedules, exact resume, bad input. Pure logic."""

import json
import math
import random

import pytest
from pydantic import ValidationError

from samplers import SamplerConfig, SamplerSetupError, build_sampler, pass_rate_bin
from samplers.curriculum import CurriculumSampler, CurriculumSchedule
from samplers.metrics import batch_metrics
from samplers.prioritized import PrioritizedSampler
from samplers.uniform import UniformSampler

KINDS = ["uniform", "curriculum", "prioritized", "curriculum+prioritized"]


def _rows(levels):
    return [{"prompt": f"q{i}", "answer": "0", "difficulty": d} for i, d in enumerate(levels)]


def _fake_rewards(indices, iteration, k=4):
    """Deterministic rollouts: harder prompts (higher index) are solved less often."""
    out = []
    for j, i in enumerate(indices):
        rng = random.Random(f"{i}-{iteration}-{j}")
        out.append([float(rng.random() < 1.0 - i / 60) for _ in range(k)])
    return out


def _run(sampler, iterations, start=0, n=8):
    batches = []
    for it in range(start, start + iterations):
        batch = sampler.next(n)
        sampler.observe(batch, _fake_rewards(batch, it))
        batches.append(batch)
    return batches


# ---- prioritized --------------------------------------------------------------------------------------


def test_prioritized_frequencies_match_one_minus_success_rate():
    # prompt i has success rate i/8 exactly (8 rollouts, no prior); prompt 8 is solved and lives on the floor
    floor = 0.05
    sampler = PrioritizedSampler(9, seed=0, floor=floor, prior_weight=0.0)
    sampler.observe(list(range(9)), [[1.0] * i + [0.0] * (8 - i) for i in range(9)])
    weights = [max(1 - i / 8, floor) for i in range(9)]
    expected = [w / sum(weights) for w in weights]
    draws = [i for _ in range(200) for i in sampler.next(100)]  # 20,000 draws
    freq = [draws.count(i) / len(draws) for i in range(9)]
    # tolerance: max |freq - p| <= 0.01 (binomial sd <= 0.0035 at 20k draws, so ~3 sd) and a chi-square
    # below the 0.001 critical value for 8 degrees of freedom (26.12)
    assert max(abs(f - p) for f, p in zip(freq, expected, strict=True)) <= 0.01
    chi2 = sum((draws.count(i) - len(draws) * p) ** 2 / (len(draws) * p) for i, p in enumerate(expected))
    assert chi2 < 26.12
    assert draws.count(8) > 0  # the floor lets the solved prompt return


def test_prioritized_prior_for_unseen_and_decay_brings_solved_prompts_back():
    sampler = PrioritizedSampler(3, seed=0, floor=0.0, prior=0.5, prior_weight=1.0, decay=0.5)
    assert sampler.success_rate(2) == 0.5
    sampler.observe([0], [[1.0] * 8])
    assert sampler.success_rate(0) == pytest.approx(8.5 / 9)
    for _ in range(10):
        sampler.observe([1], [[0.0] * 8])
    assert sampler.success_rate(0) == pytest.approx((8 / 1024 + 0.5) / (8 / 1024 + 1))
    assert sampler.success_rate(2) == 0.5
    never_forget = PrioritizedSampler(3, seed=0, floor=0.0, prior_weight=1.0, decay=1.0)
    never_forget.observe([0], [[1.0] * 8])
    for _ in range(10):
        never_forget.observe([1], [[0.0] * 8])
    assert never_forget.success_rate(0) == pytest.approx(8.5 / 9)


def test_prioritized_without_floor_never_draws_a_solved_prompt_and_falls_back_to_uniform():
    sampler = PrioritizedSampler(2, seed=0, floor=0.0, prior_weight=0.0)
    sampler.observe([0], [[1.0, 1.0]])
    assert set(sampler.next(200)) == {1}
    sampler.observe([1], [[1.0, 1.0]])
    assert set(sampler.next(200)) == {0, 1}  # all weights 0: uniform


# ---- curriculum ---------------------------------------------------------------------------------------


def test_curriculum_iteration_schedule_moves_every_p_iterations():
    levels = [1] * 20 + [2] * 20 + [3] * 20
    sampler = build_sampler(SamplerConfig(kind="curriculum", iterations_per_level=3), _rows(levels), seed=0)
    seen = []
    for it in range(12):
        batch = sampler.next(8)
        assert len({levels[i] for i in batch}) == 1
        seen.append(levels[batch[0]])
        sampler.observe(batch, _fake_rewards(batch, it))
    assert seen == [1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3, 3]
    assert sampler.metrics()["sampler/curriculum/level"] == 3.0


def test_curriculum_success_schedule_waits_for_the_threshold():
    levels = [1] * 10 + [2] * 10 + [3] * 10
    schedule = CurriculumSchedule(mode="success", success_threshold=0.7, success_window=2)
    sampler = CurriculumSampler(levels, seed=0, schedule=schedule)
    seen = []
    # level 1 success rates 0.25, 0.5, 1.0, 1.0 -> window means .375, .75 -> moves after the 3rd iteration
    for rate in [0.25, 0.5, 1.0, 0.25, 0.25, 0.25]:
        batch = sampler.next(4)
        seen.append(levels[batch[0]])
        sampler.observe(batch, [[1.0] * int(rate * 4) + [0.0] * (4 - int(rate * 4)) for _ in batch])
    assert seen == [1, 1, 1, 2, 2, 2]
    assert sampler.level == 2 and sampler.metrics()["sampler/curriculum/level_success_rate"] == 0.25
    # max_iterations_per_level moves on without the threshold
    forced = CurriculumSampler(levels, seed=0, schedule=CurriculumSchedule(mode="success", max_iterations_per_level=2))
    for _ in range(2):
        batch = forced.next(4)
        forced.observe(batch, [[0.0] * 4 for _ in batch])
    assert forced.level == 2


def test_curriculum_review_share_draws_from_passed_levels():
    levels = [1] * 10 + [2] * 10
    sampler = build_sampler(SamplerConfig(kind="curriculum+prioritized", iterations_per_level=1, review_share=0.25),
                            _rows(levels), seed=0)
    first = sampler.next(8)
    assert {levels[i] for i in first} == {1}  # nothing to review on the first level
    sampler.observe(first, _fake_rewards(first, 0))
    second = sampler.next(8)
    assert [levels[i] for i in second].count(1) == 2


def test_curriculum_uniform_picker_covers_a_level_once_per_epoch():
    levels = [5] * 6 + [7] * 4
    sampler = CurriculumSampler(levels, seed=1, schedule=CurriculumSchedule(iterations_per_level=100))
    assert sorted(sampler.next(6)) == list(range(6))


# ---- determinism and resume ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_batches_and_resume_in_the_middle_is_exact(kind):
    levels = [1 + i // 20 for i in range(60)]
    config = SamplerConfig(kind=kind, iterations_per_level=4, decay=0.9, review_share=0.25)
    reference = _run(build_sampler(config, _rows(levels), seed=7), 20)
    assert _run(build_sampler(config, _rows(levels), seed=7), 20) == reference
    assert _run(build_sampler(config, _rows(levels), seed=8), 20) != reference

    first = build_sampler(config, _rows(levels), seed=7)
    head = _run(first, 9)
    state = json.loads(json.dumps(first.state_dict()))  # what state.json holds
    resumed = build_sampler(config, _rows(levels), seed=7)
    resumed.load_state_dict(state)
    assert head + _run(resumed, 11, start=9) == reference


def test_uniform_epochs_are_permutations():
    sampler = UniformSampler(10, seed=0)
    batches = [sampler.next(5) for _ in range(4)]
    assert sorted(batches[0] + batches[1]) == list(range(10))
    assert sorted(batches[2] + batches[3]) == list(range(10))
    assert batches[0] + batches[1] != batches[2] + batches[3]


def test_load_state_of_another_kind_or_dataset_fails_clearly():
    rows = _rows([1, 2, 3])
    prioritized = build_sampler(SamplerConfig(kind="prioritized"), rows, seed=0)
    with pytest.raises(ValueError, match="kind 'prioritized'"):
        build_sampler(SamplerConfig(kind="uniform"), rows, seed=0).load_state_dict(prioritized.state_dict())
    with pytest.raises(ValueError, match="3 prompts"):
        build_sampler(SamplerConfig(kind="prioritized"), rows[:2], seed=0).load_state_dict(prioritized.state_dict())


# ---- metrics ------------------------------------------------------------------------------------------


def test_batch_metrics_count_uniform_groups_histogram_and_level_shares():
    rewards = [[1.0, 1.0], [0.0, 0.0], [1.0, 0.0], [0.5, 0.5]]
    m = batch_metrics([0, 1, 2, 3], rewards, levels=[1, 1, 2, 3])
    assert m["sampler/all_correct_groups"] == 2  # [0.5, 0.5] counts: a reward > 0 is a success
    assert m["sampler/all_wrong_groups"] == 1
    assert m["sampler/uniform_groups"] == 3 and m["sampler/uniform_group_share"] == 0.75
    hist = {k: v for k, v in m.items() if k.startswith("sampler/success_hist/")}
    assert hist["sampler/success_hist/0.0-0.2"] == 0.25 and hist["sampler/success_hist/0.8-1.0"] == 0.5
    assert math.isclose(sum(hist.values()), 1.0)
    assert m["sampler/batch_share/level_1"] == 0.5 and m["sampler/batch_share/level_3"] == 0.25


def test_every_kind_reports_its_metrics_under_sampler():
    for kind in KINDS:
        sampler = build_sampler(SamplerConfig(kind=kind), _rows([1, 2] * 10), seed=0)
        _run(sampler, 2)
        metrics = sampler.metrics()
        assert metrics and all(k.startswith("sampler/") for k in metrics)
        assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())


# ---- bad input ----------------------------------------------------------------------------------------


def test_empty_dataset_is_refused():
    with pytest.raises(SamplerSetupError, match="empty"):
        build_sampler(SamplerConfig(), [], seed=0)


def test_curriculum_without_labels_names_the_row_and_field():
    with pytest.raises(SamplerSetupError, match="needs difficulty labels.*row 0"):
        build_sampler(SamplerConfig(kind="curriculum"), [{"prompt": "a"}, {"prompt": "b"}], seed=0)
    rows = _rows([1, 2, 3])
    del rows[2]["difficulty"]
    with pytest.raises(SamplerSetupError, match="row 2 has no 'difficulty'"):
        build_sampler(SamplerConfig(kind="curriculum+prioritized"), rows, seed=0)
    # uniform needs no labels, but a partial labelling is still an error
    assert build_sampler(SamplerConfig(), [{"prompt": "a"}], seed=0).next(1) == [0]
    with pytest.raises(SamplerSetupError, match="row 2"):
        build_sampler(SamplerConfig(), rows, seed=0)


def test_bad_pass_rates_and_difficulties_are_refused():
    rows = [{"pass_rate": 0.5}, {"pass_rate": float("nan")}]
    with pytest.raises(SamplerSetupError, match="row 1: field 'pass_rate'.*not a number"):
        build_sampler(SamplerConfig(kind="curriculum"), rows, seed=0)
    with pytest.raises(SamplerSetupError, match="row 0: field 'pass_rate'.*outside"):
        build_sampler(SamplerConfig(), [{"pass_rate": 1.5}], seed=0)
    with pytest.raises(SamplerSetupError, match="row 0: field 'difficulty' must be an integer"):
        build_sampler(SamplerConfig(kind="curriculum"), [{"difficulty": "hard"}], seed=0)
    with pytest.raises(SamplerSetupError, match="row 1 has a 'pass_rate' field but row 0"):
        build_sampler(SamplerConfig(), [{}, {"pass_rate": 0.5}], seed=0)


def test_pass_rate_levels_follow_the_documented_bins():
    assert [pass_rate_bin(p) for p in (1.0, 0.75, 0.5, 0.25, 0.0)] == [
        (1, "easy"), (1, "easy"), (2, "medium"), (3, "hard"), (4, "very_hard")]
    rows = [{"pass_rate": 0.1}, {"pass_rate": 0.9}]
    sampler = build_sampler(SamplerConfig(kind="curriculum", iterations_per_level=1), rows, seed=0)
    assert sampler.next(1) == [1]  # level 1 (easy) first


def test_config_is_typed_and_range_checked():
    with pytest.raises(ValidationError):
        SamplerConfig(kind="bogus")
    with pytest.raises(ValidationError):
        SamplerConfig(floor=1.5)
    with pytest.raises(ValidationError):
        SamplerConfig(decay=0.0)
    with pytest.raises(ValidationError):
        SamplerConfig(flor=0.1)  # typo: unknown key
    with pytest.raises(ValidationError, match="never be drawn"):
        SamplerConfig(kind="prioritized", floor=0.0, prior=1.0)
