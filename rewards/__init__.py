"""Rewards for thinkrl: the plugin contract, the built-ins, and the worker pool that runs them.

- `rewards.types`: `RewardInput`, `RewardResult`, `ScoredSample`, the `@reward` decorator, the contract
- `rewards.config`: `RewardSpec` (what a recipe lists), `parse_specs`, `resolve_specs`
- `rewards.registry`: built-in names, `module:attr` paths, the `thinkrl.rewards` entry-point group
- `rewards.combine`: `RewardSet`, weighted rewards scored in worker processes, with metrics
- `rewards.pool`: `RewardPool`, killable worker processes with hard per-call timeouts
- built-ins: `math`, `length`, `format`, `code`, `repeat` (one module each)
- `python -m rewards.score`: score a JSONL file from the command line
- `rewards.atomic`: the project's one atomic file write (here so that this package stays self-contained)

This package imports nothing else of thinkrl. See docs/rewards.md for the user guide.
"""
