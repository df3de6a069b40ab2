"""The PMD trainer: one Ray actor per device, each a DeepSpeed rank (see thinkrl.train_engine).

Per iteration the driver hands every rank its share of the iteration's samples (whole prompt groups,
so the per-group baseline is exact). The rank needs log pi_theta_i of every sample (the reference of
this iteration's KL term), then takes `mini_batches` optimizer steps on the PMD loss, one per
mini-batch of groups. With `old_logprobs="trainer"` (the default) log pi_theta_i is the trainer's own:
the first mini-batch's forward pass runs under theta_i, so only the other mini-batches are recomputed in
a no-grad pass. With `old_logprobs="rollout"` it is vLLM's log-probs of the sampled tokens (raw model
log-probs, before temperature) and no pass is recomputed; right where engine and trainer compute alike
(float32 on CPU: the gap is measured every iteration on the first mini-batch), not under bf16.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch

from rl.loss import pmd_loss
from thinkrl.train_engine import (
    BUCKET_OVERHEAD_TOKENS,
    DistConfig,
    OptimConfig,
    TrainEngine,
    length_buckets,
    pad_batch,
)


@dataclass
class Sample:
    """One response to one prompt, as the trainer needs it."""

    prompt_ids: list[int]
    response_ids: list[int]
    reward: float
    group: int
    rollout_logprobs: list[float]  # vLLM's per-token log-probs, for the vLLM-vs-trainer gap only


@dataclass
class PMDSettings:
    """The loss and update settings of one PMD iteration."""

    tau: float
    mini_batches: int
    baseline: str = "mean"
    log_ratio_norm: str = "sequence"  # or "token"
    reset_optimizer: bool = True
    logprob_batch_size: int = 64  # sequences per no-grad forward when recomputing log pi_theta_i
    old_logprobs: str = "trainer"  # where log pi_theta_i comes from: "trainer" or "rollout" (vLLM's)

    @classmethod
    def from_recipe(cls, rl) -> PMDSettings:
        """The settings of an `rl:` recipe section (rl.config.RLConfig)."""
        return cls(tau=rl.tau, mini_batches=rl.mini_batches, baseline=rl.baseline, log_ratio_norm=rl.log_ratio_norm,
                   reset_optimizer=rl.reset_optimizer, old_logprobs=rl.old_logprobs)


class PMDWorker:
    """One rank of the PMD trainer group. Created as a Ray actor by the RL driver."""

    def __init__(self, model_path: str, optim: OptimConfig, dist: DistConfig, seed: int) -> None:
        self.engine = TrainEngine(model_path, optim, dist, seed=seed)
        self.pad_id = self.engine.tokenizer.pad_token_id
        self.accumulation = dist.micro_batches_per_step
        # under ZeRO-3 every forward pass gathers the sharded weights again: one bucket, padded to the longest
        self.bucket_overhead_tokens = BUCKET_OVERHEAD_TOKENS if dist.zero_stage < 3 else 10**12
        self.rng = random.Random(seed + 1000 * dist.rank)

    def _logprobs(self, samples: list[Sample]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Each sample's summed response log-prob [B] (float64, differentiable) and its per-token log-probs.

        Samples go through the model in length buckets (`length_buckets`), not padded to the longest of
        all; the results come back in `samples`' order. Under gradients, every bucket's graph stays alive
        until the caller's one backward pass: the same step as one padded batch, on fewer slots.
        """
        lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
        sums, tokens, order = [], [None] * len(samples), []
        for bucket in length_buckets(lengths, self.bucket_overhead_tokens):
            chunk = [samples[i] for i in bucket]
            ids, attn, target = pad_batch([s.prompt_ids + s.response_ids for s in chunk],
                                          [[0] * len(s.prompt_ids) + [1] * len(s.response_ids) for s in chunk],
                                          self.pad_id)
            token_logp_B_T = self.engine.token_logprobs(ids, attn, target)
            # in float64: a float32 sum rounds differently from the engine's (and loses ~5e-4 nats over
            # 5,000 tokens); the log-ratio of equal weights must be 0 on every machine, not by luck
            sums.append(token_logp_B_T.double().sum(-1))
            for row, (i, s) in enumerate(zip(bucket, chunk, strict=True)):
                tokens[i] = token_logp_B_T[row, len(s.prompt_ids) : len(s.prompt_ids) + len(s.response_ids)]
            order.extend(bucket)
        position = torch.empty(len(samples), dtype=torch.long)
        position[torch.tensor(order)] = torch.arange(len(samples))
        return torch.cat(sums)[position.to(sums[0].device)], tokens

    def update(self, samples: list[Sample], settings: PMDSettings) -> dict[str, float]:
        """Take `settings.mini_batches` PMD steps on `samples` (log pi_theta_i as above). Returns statistics."""
        stats: dict[str, list[float]] = {"loss": [], "grad_norm": [], "lr": []}
        if settings.old_logprobs not in ("trainer", "rollout"):
            raise ValueError(f"old_logprobs must be 'trainer' or 'rollout', not {settings.old_logprobs!r}")
        groups = sorted({s.group for s in samples})
        self.rng.shuffle(groups)
        first = set(groups[0 :: settings.mini_batches])  # stepped first, while the weights are still theta_i
        index_of = {id(s): i for i, s in enumerate(samples)}
        logp_old = torch.zeros(len(samples), dtype=torch.float64)
        gaps: list[float] = []
        started = time.perf_counter()
        if settings.old_logprobs == "rollout":
            for i, s in enumerate(samples):
                if len(s.rollout_logprobs) != len(s.response_ids):
                    raise ValueError(f"old_logprobs='rollout' needs a log-prob per response token: sample {i} has "
                                     f"{len(s.rollout_logprobs)} for {len(s.response_ids)} tokens")
                logp_old[i] = math.fsum(s.rollout_logprobs)  # float64, as the trainer's sums
        else:
            rest = [s for s in samples if s.group not in first]
            with torch.no_grad():
                for start in range(0, len(rest), settings.logprob_batch_size):
                    chunk = rest[start : start + settings.logprob_batch_size]
                    seq_logp, token_logps = self._logprobs(chunk)
                    logp_old[[index_of[id(s)] for s in chunk]] = seq_logp.cpu()
                    gaps.extend(_rollout_gaps(token_logps, chunk))
        logprobs_seconds = time.perf_counter() - started
        if settings.reset_optimizer:
            self.engine.reset_optimizer()
        log_ratios: list[float] = []
        for step in range(settings.mini_batches):
            chosen = groups[step :: settings.mini_batches]
            if len(chosen) < self.accumulation:
                raise ValueError(
                    f"a mini-batch of {len(chosen)} prompt groups cannot feed {self.accumulation} micro-batches"
                )
            batch = [s for s in samples if s.group in set(chosen)]
            # exactly `accumulation` micro-batches of whole groups per optimizer step (the baseline is
            # per group), as DeepSpeed was configured
            micro = [[s for s in batch if s.group in set(chosen[i :: self.accumulation])] for i in range(self.accumulation)]
            for chunk in micro:
                logp, token_logps = self._logprobs(chunk)
                idx = torch.tensor([index_of[id(s)] for s in chunk])
                if step == 0:  # under theta_i: this forward is also log pi_theta_i's, and the gap's
                    gaps.extend(_rollout_gaps([t.detach() for t in token_logps], chunk))
                    if settings.old_logprobs == "trainer":
                        logp_old[idx] = logp.detach().cpu()
                old = logp_old[idx].to(logp.device)
                n_tokens = torch.tensor([len(s.response_ids) for s in chunk], device=logp.device)
                loss = pmd_loss(
                    logp,
                    old,
                    torch.tensor([s.reward for s in chunk], device=logp.device),
                    torch.tensor([s.group for s in chunk], device=logp.device),
                    settings.tau,
                    baseline=settings.baseline,
                    num_tokens=n_tokens if settings.log_ratio_norm == "token" else None,
                ) * (len(chunk) / len(batch))
                # the micro-batches' shares add up to the mean loss over the mini-batch
                for key, value in self.engine.micro_step(loss).items():
                    if key == "lr" or chunk is micro[-1]:
                        stats[key].append(value)
                stats["loss"].append(loss.item() * self.accumulation)
                log_ratios.extend((logp.detach() - old).tolist())
        out = {k: sum(v) / len(v) for k, v in stats.items() if v}
        out["logprob_gap_vllm_trainer"] = sum(gaps) / max(1, len(gaps))
        out["time_logprobs"] = logprobs_seconds  # the no-grad pass for log pi_theta_i, inside time/update
        out["time_in_trainer"] = time.perf_counter() - started  # time/update minus this: shipping through Ray
        if log_ratios:
            t = torch.tensor(log_ratios)
            out["log_ratio_mean"] = t.mean().item()
            out["log_ratio_abs_max"] = t.abs().max().item()
            # k1.5's KL term estimated from the samples: mean of (log-ratio)^2 / 2
            out["kl_to_prev_est"] = (t.pow(2).mean() / 2).item()
        return out

    def probe_logprobs(self, token_ids: list[int], prompt_len: int) -> list[float]:
        """Per-token log-probs of `token_ids[prompt_len:]` under the current weights."""
        with torch.no_grad():
            s = Sample(token_ids[:prompt_len], token_ids[prompt_len:], 0.0, 0, [])
            _, token_logps = self._logprobs([s])
        return token_logps[0].tolist()

    def export_weights(self, path: str) -> str:
        return self.engine.export_weights(path)

    def save_hf(self, out_dir: str) -> None:
        self.engine.save_hf(out_dir)

    def save_state(self, out_dir: str) -> dict:
        self.engine.save_state(out_dir)
        return {"worker_rng": self.rng.getstate()}

    def load_state(self, in_dir: str, worker_state: dict) -> None:
        self.engine.load_state(in_dir)
        version, internal, gauss = worker_state["worker_rng"]
        self.rng.setstate((version, tuple(internal), gauss))


def _rollout_gaps(token_logps: list[torch.Tensor], samples: list[Sample]) -> list[float]:
    """Mean |trainer - vLLM| log-prob over each sample's response tokens."""
    return [(t.cpu() - torch.tensor(s.rollout_logprobs)).abs().mean().item()
            for t, s in zip(token_logps, samples, strict=True) if s.rollout_logprobs]
