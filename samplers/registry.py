"""`build_sampler`: the one place a recipe's `sampler:` section becomes a sampler, validated up front.

Every check that depends on the data (empty dataset, missing or invalid difficulty labels) runs here,
before the run starts any actor, and fails with a `SamplerSetupError` (a ValueError) whose message
names the row index and the field, ready to print as-is.
"""

from __future__ import annotations

from collections.abc import Callable

from samplers.base import Sampler
from samplers.config import SamplerConfig
from samplers.curriculum import CurriculumSampler, CurriculumSchedule
from samplers.difficulty import SamplerSetupError, row_levels
from samplers.prioritized import PrioritizedSampler
from samplers.uniform import UniformSampler


def _uniform(config: SamplerConfig, n: int, levels: list[int] | None, seed: int) -> Sampler:
    return UniformSampler(n, seed=seed, levels=levels)


def _prioritized(config: SamplerConfig, n: int, levels: list[int] | None, seed: int) -> PrioritizedSampler:
    return PrioritizedSampler(n, seed=seed, floor=config.floor, prior=config.prior,
                              prior_weight=config.prior_weight, decay=config.decay, levels=levels)


def _curriculum(config: SamplerConfig, n: int, levels: list[int], seed: int, prioritized: bool) -> Sampler:
    schedule = CurriculumSchedule(config.schedule, config.iterations_per_level, config.success_threshold,
                                  config.success_window, config.max_iterations_per_level)
    picker = _prioritized(config, n, levels, seed) if prioritized else None
    return CurriculumSampler(levels, seed=seed, schedule=schedule, review_share=config.review_share, prioritized=picker)


SAMPLERS: dict[str, Callable[..., Sampler]] = {
    "uniform": _uniform,
    "prioritized": _prioritized,
    "curriculum": lambda c, n, levels, seed: _curriculum(c, n, levels, seed, prioritized=False),
    "curriculum+prioritized": lambda c, n, levels, seed: _curriculum(c, n, levels, seed, prioritized=True),
}


def build_sampler(config: SamplerConfig, rows: list[dict], seed: int) -> Sampler:
    """The sampler of `config.kind` over `rows` (the training prompts, in dataset order), seeded by `seed`.

    Raises SamplerSetupError (a ValueError) for an empty dataset, for a curriculum whose rows lack
    difficulty labels, and for any present but invalid label (NaN or out-of-range `pass_rate`, a
    non-integer `difficulty`); the message names the 0-based row index and the field.
    """
    needs_levels = config.kind.startswith("curriculum")
    levels = row_levels(rows, config.difficulty_source, required=needs_levels)
    return SAMPLERS[config.kind](config, len(rows), levels, seed)


__all__ = ["SAMPLERS", "SamplerSetupError", "build_sampler"]
