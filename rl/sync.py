"""Weight sync from the trainer to the engines, and the probe that checks the engines serve the new weights.

The trainer ranks hand the weights over bucket by bucket (under ZeRO-3 each bucket is gathered from every
rank's partitions, then released: `TrainEngine.publish_weights`): into rank 0's shared-memory arena for
engines on its node, whose vLLM workers copy them straight into their parameters; into Ray's object store
for engines on other nodes, which pull them over the network (`rollout.engine.RolloutEngine.load_weights`,
`rollout.worker_extension`). No file is written; the store frees the buckets when the sync is over, and
the arena dies with the trainer. The probe: a fixed sequence's per-token
log-probs from rank 0 and from each engine; their mean gap may exceed the gap measured on identical
weights at start-up (kernels differ) by at most a tolerance, else the run stops rather than train on
stale weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


def sync_weights(trainers: list, engines: list) -> float:
    """Push the trainer's weights into every engine; returns seconds taken."""
    import ray

    start = time.time()
    targets = ray.get([e.sync_target.remote() for e in engines])
    published = ray.get([t.publish_weights.remote(targets) for t in trainers])[0]
    ray.get([e.load_weights.remote(published) for e in engines])
    del published  # the last references: the store frees the buckets
    return time.time() - start


def trainer_call(trainers: list, method: str, *args):
    """Call `method` on every trainer rank (under ZeRO-3 a forward pass or an export is a collective) and
    return rank 0's result."""
    import ray

    return ray.get([getattr(t, method).remote(*args) for t in trainers])[0]


def probe_gap(trainers: list, engines: list, probe_ids: list[int], prompt_len: int,
              images: list[bytes] | None = None) -> float:
    """Max over engines of the mean |vLLM - trainer| log-prob on a fixed probe sequence (its prompt with
    `images`, one placeholder token each, when given)."""
    import ray

    trainer_lp = trainer_call(trainers, "probe_logprobs", probe_ids, prompt_len, images)
    gaps = []
    for engine_lp in ray.get([e.prompt_logprobs.remote(probe_ids, prompt_len, images) for e in engines]):
        gaps.append(sum(abs(a - b) for a, b in zip(engine_lp, trainer_lp, strict=True)) / len(trainer_lp))
    return max(gaps)


def check_image_expansion(trainers: list, engines: list, prompt_ids: list[int], images: list[bytes]) -> int:
    """The engines' and the trainer's expansion of an image prompt must be the same token sequence (image
    token count and positions); raises ValueError naming the first difference. Returns the expanded length."""
    import ray

    trainer_ids = ray.get(trainers[0].expanded_prompt.remote(prompt_ids, images))
    for e, engine_ids in enumerate(ray.get([e.expanded_prompt.remote(prompt_ids, images) for e in engines])):
        if engine_ids != trainer_ids:
            first = next((t for t, (a, b) in enumerate(zip(engine_ids, trainer_ids, strict=False)) if a != b),
                         min(len(engine_ids), len(trainer_ids)))
            raise ValueError(
                f"engine {e} expands the image probe to {len(engine_ids)} tokens, the trainer to {len(trainer_ids)}; "
                f"they first differ at position {first} (engine {engine_ids[first:first + 3]}, trainer "
                f"{trainer_ids[first:first + 3]}): the engine's and the trainer's image processors disagree, and "
                "training on this would compute log-probs of a different prompt than was sampled")
    return len(trainer_ids)


def check_old_logprobs(old_logprobs: str, probe_baseline: float, tolerance: float) -> None:
    """`rl.old_logprobs=rollout` trusts vLLM's log-probs as the trainer's: refuse it where they differ."""
    if old_logprobs == "rollout" and probe_baseline > tolerance:
        raise ValueError(
            f"rl.old_logprobs=rollout uses vLLM's log-probs as log pi_theta_i, but on identical weights they differ "
            f"from the trainer's by {probe_baseline:.1e} per token (more than rl.probe_tolerance="
            f"{tolerance:.0e}): set rl.old_logprobs=trainer for this model/dtype")


@dataclass
class Probe:
    """The fixed probe sequence, and the gap on identical weights it is judged against."""

    ids: list[int]
    prompt_len: int
    baseline: float  # start-up gap: ~1e-6 for the dense float32 model on CPU, ~1e-7 for the MoE and tiny-vl
    tolerance: float
    images: list[bytes] | None = None  # the probe prompt's images: the vision path is checked after each sync too

    def check(self, trainers: list, engines: list, iteration: int) -> float:
        """The gap after a sync; raises if the engines do not serve the trainer's weights."""
        gap = probe_gap(trainers, engines, self.ids, self.prompt_len, self.images)
        if gap > self.baseline + self.tolerance:
            raise RuntimeError(f"after the weight sync of iteration {iteration}, vLLM's log-probs differ from "
                               f"the trainer's by {gap:.2e} on the probe: more than the {self.baseline:.1e} "
                               f"measured on identical weights at start-up + tolerance {self.tolerance:.0e} "
                               "(the engine is not serving the new weights)")
        return gap
