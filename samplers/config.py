"""The `sampler:` section of a recipe: which sampler runs and every option of it, typed and range-checked.

Recipe keys are `sampler.<field>`, e.g. `sampler.kind=curriculum+prioritized sampler.floor=0.05`.
Options of a kind that is not selected are ignored (so one recipe can switch kinds with one override).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SamplerKind = Literal["uniform", "curriculum", "prioritized", "curriculum+prioritized"]


class SamplerConfig(BaseModel):
    """Prompt sampling of an RL run (DESIGN.md, "Sampling"); `samplers.build_sampler` turns it into a sampler."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    kind: SamplerKind = Field(
        "uniform",
        description="uniform: seeded epochs; curriculum: easy to hard by difficulty level; prioritized: "
        "probability ~ max(1 - success rate, floor); curriculum+prioritized: prioritized inside the curriculum's level",
    )
    difficulty_source: Literal["auto", "difficulty", "pass_rate"] = Field(
        "auto",
        description="where a row's level comes from: its integer 'difficulty' field, or its 'pass_rate' binned "
        "(1 easy >= 0.75 > 2 medium >= 0.5 > 3 hard >= 0.25 > 4 very hard); auto: 'difficulty' if rows have it",
    )
    # -- curriculum
    schedule: Literal["iterations", "success"] = Field(
        "iterations",
        description="curriculum: move to the next level after a fixed number of iterations, or once the "
        "current level's success rate reaches success_threshold",
    )
    iterations_per_level: int = Field(10, ge=1, description="curriculum, schedule=iterations: iterations per level")
    success_threshold: float = Field(
        0.7, gt=0, le=1, description="curriculum, schedule=success: mean success rate that moves to the next level"
    )
    success_window: int = Field(
        3, ge=1, description="curriculum, schedule=success: iterations averaged (also the least spent on a level)"
    )
    max_iterations_per_level: int | None = Field(
        None, ge=1, description="curriculum, schedule=success: move on after this many iterations regardless"
    )
    review_share: float = Field(
        0.0, ge=0, le=0.9, description="curriculum: share of each batch drawn from easier levels already passed"
    )
    # -- prioritized
    floor: float = Field(
        0.05, ge=0, le=1, description="prioritized: least weight of a prompt (so solved prompts can return)"
    )
    prior: float = Field(0.5, ge=0, le=1, description="prioritized: success rate assumed for an unseen prompt")
    prior_weight: float = Field(
        1.0, ge=0, description="prioritized: pseudo-rollouts of the prior mixed into every estimate (0: none)"
    )
    decay: float = Field(
        1.0, gt=0, le=1,
        description="prioritized: weight per iteration of age of an old observation (1: never forget; "
        "< 1: estimates of prompts not seen lately drift back to the prior)",
    )
    @model_validator(mode="after")
    def _floor_or_prior(self):
        if self.kind in ("prioritized", "curriculum+prioritized") and self.floor == 0 and self.prior == 1:
            raise ValueError("sampler.floor=0 with sampler.prior=1 gives unseen prompts weight 0: "
                             "they could never be drawn")
        return self
