"""Prompt samplers: which prompts each RL iteration trains on (uniform, curriculum, prioritized).

    from samplers import SamplerConfig, build_sampler
    sampler = build_sampler(SamplerConfig(kind="curriculum+prioritized"), train_rows, seed=0)
    batch = sampler.next(32)                 # prompt indices
    sampler.observe(batch, rewards)          # rewards[j]: the k rollout rewards of batch[j]
    sampler.metrics()                        # {"sampler/...": float}, for the run's metrics
    state = sampler.state_dict()             # JSON-serialisable; load_state_dict(state) resumes exactly

See docs/samplers.md.
"""

from samplers.base import Sampler
from samplers.config import SamplerConfig
from samplers.difficulty import PASS_RATE_BINS, SamplerSetupError, pass_rate_bin
from samplers.registry import build_sampler

__all__ = ["PASS_RATE_BINS", "Sampler", "SamplerConfig", "SamplerSetupError", "build_sampler", "pass_rate_bin"]
