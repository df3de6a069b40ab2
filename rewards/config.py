"""Reward specs as a recipe writes them, and their up-front validation.

A recipe lists its rewards, e.g.

    rewards:
      - math                                   # shorthand for {name: math}
      - {name: length, weight: 0.1, warmup_iterations: 10}
      - {name: my_pkg.rewards:Concise, options: {target: 200}}

`parse_specs` validates the list (errors name the list index and key); `resolve_specs` also finds every
reward, applies its options and checks it can be pickled, raising one clear error before any worker
process starts. Warmup: a term with `warmup_iterations = W > 0` is 0 in iterations 1..W (rl.train counts
from 1) and on from W + 1, i.e. off for W iterations, then constant (k1.5's length penalty schedule).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from rewards.registry import LoadedReward, build_reward


class RewardSpec(BaseModel):
    """One reward of a recipe: which, with what weight, from which iteration, with which options."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="built-in name, entry-point name, or module:attr")
    weight: float = Field(1.0, description="the term's factor in the total reward (a gate ignores it)")
    warmup_iterations: int = Field(0, ge=0, description="the term is 0 for iterations 1..W, then on")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the reward")

    def active(self, iteration: int) -> bool:
        """Whether the term counts at `iteration` (1-based, as rl.train counts)."""
        return self.warmup_iterations == 0 or iteration > self.warmup_iterations


def _names_to_specs(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [{"name": v} if isinstance(v, str) else v for v in value]
    return value


RewardSpecs = Annotated[list[RewardSpec], BeforeValidator(_names_to_specs)]
"""A list of specs for a config field, bare names allowed: `rewards: RewardSpecs = Field(default_factory=...)`.
In a recipe: `rewards: [math, {name: length, weight: 0.1}]`."""


@dataclass(frozen=True)
class ResolvedReward:
    """A spec together with the reward it names, loaded and checked."""

    spec: RewardSpec
    reward: LoadedReward

    @property
    def name(self) -> str:
        return self.reward.name


def parse_specs(raw: Sequence[Any], where: str = "rewards") -> list[RewardSpec]:
    """Validate a list of specs (RewardSpec, dict, or a bare name string); errors name `where[i].key`."""
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
        raise ValueError(f"{where}: expected a list of rewards, got {type(raw).__name__}")
    if not raw:
        raise ValueError(f"{where}: the list of rewards is empty")
    specs = []
    for i, item in enumerate(raw):
        if isinstance(item, RewardSpec):
            specs.append(item)
            continue
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict):
            raise ValueError(f"{where}[{i}]: expected a reward name or a mapping, got {type(item).__name__}")
        try:
            specs.append(RewardSpec.model_validate(item))
        except ValidationError as e:
            problems = "; ".join(f"{where}[{i}].{'.'.join(map(str, err['loc'])) or 'value'}: {err['msg']}"
                                 for err in e.errors())
            raise ValueError(problems) from None
    return specs


def resolve_specs(raw: Sequence[Any], where: str = "rewards") -> list[ResolvedReward]:
    """Validate the specs and load every reward they name: one ValueError naming `where[i].key` if not.

    Example:
        >>> [r.name for r in resolve_specs(["math", {"name": "length", "weight": 0.1}])]
        ['math', 'length']
    """
    resolved = []
    for i, spec in enumerate(parse_specs(raw, where)):
        try:
            reward = build_reward(spec.name, spec.options)
        except LookupError as e:
            raise ValueError(f"{where}[{i}].name: {e}") from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}[{i}].options: '{spec.name}': {e}") from None
        clash = [j for j, r in enumerate(resolved) if r.name == reward.name]
        if clash:
            raise ValueError(f"{where}[{i}].name: '{spec.name}' is logged as '{reward.name}', like "
                             f"{where}[{clash[0]}]; each reward needs its own name")
        resolved.append(ResolvedReward(spec, reward))
    return resolved
