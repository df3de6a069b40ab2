"""The PMD trainer: one Ray actor per device, each a DeepSpeed rank (see thinkrl.train_engine).

Per iteration the driver hands every rank its samples, each with its advantage (r_j minus its group's
baseline, computed on the driver: `rl.loss.advantages`), and a plan (`rl.batching.plan_update`): the
optimizer steps, and each step's micro-batches, cut by a token budget and balanced across ranks. A
micro-batch may hold part of a group: the loss is a mean of per-sample terms (`rl.loss.pmd_terms`).

The rank needs log pi_theta_i of every sample (the reference of this iteration's KL term). With
`old_logprobs="trainer"` (the default) it is the trainer's own: the first step's forward passes run
under theta_i, so only the other steps' samples are recomputed, in a no-grad pass over their
micro-batches. With `old_logprobs="rollout"` it is vLLM's log-probs of the sampled tokens (raw model
log-probs, before temperature) and nothing is recomputed; right where engine and trainer compute alike
(float32 on CPU: the gap is measured every iteration on the first step), not under bf16. Sequence sums
are float64 on both sides, so equal weights give a log-ratio of exactly ~0 on every machine.

Partial rollouts: a sample's first `earlier_tokens` response tokens are the ones the driver counted for
the loss (`rollout.partial.Trajectory.context_tokens`). With `partial_loss="mask"` (those generated under
older weights) or "last_segment" (all but the sample's own last segment) they are context (no log-prob of
theirs is summed); with "importance" (those generated under older weights) all tokens are summed, and the
sample's term is weighted by `rl.loss.importance_weights` of those tokens (pi_theta_i from the trainer, the
behaviour's from vLLM as it generated them). The vLLM gap counts only the tokens after them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from rl.batching import StepPlan
from rl.loss import importance_weights, pmd_terms
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
    advantage: float  # r_j minus its group's baseline
    rollout_logprobs: list[float]  # vLLM's per-token log-probs (the gap; log pi_theta_i with old_logprobs=rollout)
    # the prompt's images (encoded bytes); prompt_ids then hold each image's placeholder expanded, as the
    # engine ran it
    images: list[bytes] | None = None
    # partial rollouts: how many leading response tokens were generated under weights older than theta_i
    earlier_tokens: int = 0


@dataclass
class PMDSettings:
    """The loss settings of one PMD update."""

    tau: float
    log_ratio_norm: str = "sequence"  # or "token"
    reset_optimizer: bool = True
    old_logprobs: str = "trainer"  # where log pi_theta_i comes from: "trainer" or "rollout" (vLLM's)
    partial_loss: str = "mask"  # "mask" / "last_segment": the earlier_tokens are context; "importance": weighted
    importance_clip: float = 2.0

    @property
    def masks_earlier_tokens(self) -> bool:
        """Whether a sample's earlier_tokens are context, left out of the loss (`mask`, `last_segment`)."""
        return self.partial_loss in ("mask", "last_segment")

    def __post_init__(self) -> None:
        if self.partial_loss not in ("mask", "last_segment", "importance"):
            raise ValueError(f"partial_loss must be 'mask', 'last_segment' or 'importance', not {self.partial_loss!r}")
        if self.partial_loss == "importance" and self.old_logprobs != "trainer":
            raise ValueError("partial_loss='importance' needs old_logprobs='trainer' (pi_theta_i of earlier tokens)")
        if self.old_logprobs not in ("trainer", "rollout"):
            raise ValueError(f"old_logprobs must be 'trainer' or 'rollout', not {self.old_logprobs!r}")
        if self.log_ratio_norm not in ("sequence", "token"):
            raise ValueError(f"log_ratio_norm must be 'sequence' or 'token', not {self.log_ratio_norm!r}")


class PMDWorker:
    """One rank of the PMD trainer group. Created as a Ray actor by the RL driver."""

    def __init__(self, model_path: str, optim: OptimConfig, dist: DistConfig, seed: int) -> None:
        from thinkrl.vl import is_vl

        self.engine = TrainEngine(model_path, optim, dist, seed=seed)
        self.pad_id = self.engine.tokenizer.pad_token_id
        self.world_size = dist.world_size
        self.vision = None
        if is_vl(model_path):
            from thinkrl.vl.inputs import VisionInputs

            self.vision = VisionInputs(model_path)
        # under ZeRO-3 every forward pass gathers the sharded weights again: one bucket, padded to the longest
        self.bucket_overhead_tokens = BUCKET_OVERHEAD_TOKENS if dist.zero_stage < 3 else 10**12

    def _logprobs(self, samples: list[Sample], skip: list[int] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Each sample's summed response log-prob [B] (float64, differentiable) and its per-token log-probs.

        `skip`: per sample, how many leading response tokens are context only (0 where not given); their
        per-token log-probs are 0.

        Samples go through the model in length buckets (`length_buckets`), not padded to the longest of
        all; the results come back in `samples`' order. Under gradients, every bucket's graph stays alive
        until the caller's one backward pass: the same step as one padded batch, on fewer slots.
        """
        lengths = [len(s.prompt_ids) + len(s.response_ids) for s in samples]
        skip = skip or [0] * len(samples)
        sums, tokens, order = [], [None] * len(samples), []
        for bucket in length_buckets(lengths, self.bucket_overhead_tokens):
            chunk = [samples[i] for i in bucket]
            masks = [[0] * (len(samples[i].prompt_ids) + skip[i]) + [1] * (len(samples[i].response_ids) - skip[i])
                     for i in bucket]
            ids, attn, target = pad_batch([s.prompt_ids + s.response_ids for s in chunk], masks, self.pad_id)
            token_logp_B_T = self.engine.token_logprobs(ids, attn, target, images=self._images(chunk))
            # in float64: a float32 sum rounds differently from the engine's (and loses ~5e-4 nats over
            # 5,000 tokens); the log-ratio of equal weights must be 0 on every machine, not by luck
            sums.append(token_logp_B_T.double().sum(-1))
            for row, (i, s) in enumerate(zip(bucket, chunk, strict=True)):
                tokens[i] = token_logp_B_T[row, len(s.prompt_ids) : len(s.prompt_ids) + len(s.response_ids)]
            order.extend(bucket)
        position = torch.empty(len(samples), dtype=torch.long)
        position[torch.tensor(order)] = torch.arange(len(samples))
        return torch.cat(sums)[position.to(sums[0].device)], tokens

    def update(self, samples: list[Sample], plans: list[StepPlan], settings: PMDSettings) -> dict[str, float]:
        """One optimizer step per plan on `samples` (this rank's); returns the update's statistics."""
        started = time.perf_counter()
        logp_old, weights, gaps = self._old_logprobs(samples, plans, settings)
        logprobs_seconds = time.perf_counter() - started
        if settings.reset_optimizer:
            self.engine.reset_optimizer()
        steps, log_ratios = [], []
        for k, plan in enumerate(plans):

            def loss_of(micro: list[int], plan: StepPlan = plan, first: bool = k == 0) -> torch.Tensor:
                if not micro:  # padding: every rank runs the same number of backward passes
                    return self._zero_loss()
                chunk = [samples[i] for i in micro]
                logp, token_logps = self._logprobs(chunk, _context_tokens(chunk, settings))
                if first:  # under theta_i: this forward is also log pi_theta_i's, and the gap's
                    gaps.extend(_rollout_gaps([t.detach() for t in token_logps], chunk))
                    if settings.old_logprobs == "trainer":
                        logp_old[micro] = logp.detach().cpu()
                        weights[micro] = _weights([t.detach() for t in token_logps], chunk, settings)
                old = logp_old[micro].to(logp.device)
                log_ratios.extend((logp.detach() - old).tolist())
                terms = pmd_terms(logp, old, torch.tensor([s.advantage for s in chunk], device=logp.device), settings.tau,
                                  num_tokens=self._num_tokens(chunk, logp.device, settings),
                                  weights=weights[micro].to(logp.device))
                # this rank's share of the step's mean over all ranks (DeepSpeed averages over ranks)
                return terms.sum() * (self.world_size / plan.step_samples)

            steps.append({**self.engine.train_step(plan.micro_batches, loss_of), "micro_batches": len(plan.micro_batches)})
        stats = _update_stats(steps, gaps, log_ratios, logprobs_seconds, time.perf_counter() - started)
        if any(s.earlier_tokens for s in samples):
            stats["importance_weight_mean"] = weights.mean().item()
        return stats

    def _old_logprobs(self, samples: list[Sample], plans: list[StepPlan], settings: PMDSettings,
                      ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[float, bool]]]:
        """log pi_theta_i of each sample (float64; the first step's are filled in by its own forward), the
        samples' importance weights (1 but under partial rollouts' `importance`) and the vLLM-vs-trainer gaps
        measured on the way."""
        logp_old = torch.zeros(len(samples), dtype=torch.float64)
        weights = torch.ones(len(samples), dtype=torch.float64)
        gaps: list[tuple[float, bool]] = []
        if settings.old_logprobs == "rollout":
            for i, s in enumerate(samples):
                if len(s.rollout_logprobs) != len(s.response_ids):
                    raise ValueError(f"old_logprobs='rollout' needs a log-prob per response token: sample {i} has "
                                     f"{len(s.rollout_logprobs)} for {len(s.response_ids)} tokens")
                logp_old[i] = math.fsum(s.rollout_logprobs[_context_tokens([s], settings)[0]:])
            return logp_old, weights, gaps
        with torch.no_grad():
            for plan in plans[1:]:
                for micro in plan.micro_batches:
                    if not micro:  # every rank runs as many forward passes (under ZeRO-3 each is a collective)
                        self._zero_loss()
                    else:
                        chunk = [samples[i] for i in micro]
                        seq_logp, token_logps = self._logprobs(chunk, _context_tokens(chunk, settings))
                        logp_old[micro] = seq_logp.cpu()
                        weights[micro] = _weights(token_logps, chunk, settings)
                        gaps.extend(_rollout_gaps(token_logps, chunk))
        return logp_old, weights, gaps

    def _images(self, chunk: list[Sample]):
        """The pixel inputs of a bucket's images, in row order (None for a text model)."""
        if self.vision is None:
            return None
        return self.vision.batch([s.images or [] for s in chunk])

    def _zero_loss(self) -> torch.Tensor:
        """A loss of exactly 0 that still runs the model (a padding micro-batch's backward)."""
        ids = torch.full((1, 2), self.pad_id)
        return self.engine.token_logprobs(ids, torch.ones_like(ids), torch.tensor([[0, 1]])).sum() * 0.0

    @staticmethod
    def _num_tokens(chunk: list[Sample], device, settings: PMDSettings) -> torch.Tensor | None:
        if settings.log_ratio_norm != "token":
            return None
        context = _context_tokens(chunk, settings)
        return torch.tensor([len(s.response_ids) - c for s, c in zip(chunk, context, strict=True)], device=device)

    def probe_logprobs(self, token_ids: list[int], prompt_len: int, images: list[bytes] | None = None) -> list[float]:
        """Per-token log-probs of `token_ids[prompt_len:]` under the current weights (`images`: the prompt's,
        one placeholder token each in `token_ids[:prompt_len]`)."""
        prompt = self.expanded_prompt(token_ids[:prompt_len], images) if images else token_ids[:prompt_len]
        with torch.no_grad():
            s = Sample(prompt, token_ids[prompt_len:], 0.0, [], images)
            _, token_logps = self._logprobs([s])
        return token_logps[0].tolist()

    def expanded_prompt(self, token_ids: list[int], images: list[bytes]) -> list[int]:
        """The prompt with each image placeholder expanded by this trainer's processor (the parity check)."""
        if self.vision is None:
            raise ValueError("a prompt with images needs a vision-language model")
        return self.vision.expand(token_ids, images)

    def publish_weights(self, targets: list, bucket_bytes: int = 256 << 20):
        """Every rank calls; rank 0 returns where the weights are for the engines' `targets`
        (`TrainEngine.publish_weights`)."""
        return self.engine.publish_weights(targets, bucket_bytes)

    def save_hf(self, out_dir: str) -> None:
        self.engine.save_hf(out_dir)

    def save_state(self, out_dir: str) -> None:
        self.engine.save_state(out_dir)

    def load_state(self, in_dir: str) -> None:
        self.engine.load_state(in_dir)


def _context_tokens(samples: list[Sample], settings: PMDSettings) -> list[int]:
    """Per sample, the leading response tokens the loss leaves out: its earlier_tokens under `mask` and
    `last_segment` (the driver counts them per loss: `rollout.partial.Trajectory.context_tokens`)."""
    return [s.earlier_tokens if settings.masks_earlier_tokens else 0 for s in samples]


def _weights(token_logps: list[torch.Tensor], samples: list[Sample], settings: PMDSettings) -> torch.Tensor:
    """Each sample's importance weight (`rl.loss.importance_weights` of its earlier tokens; 1 under `mask`)."""
    if settings.partial_loss != "importance":
        return torch.ones(len(samples), dtype=torch.float64)
    old = torch.stack([t[: s.earlier_tokens].double().sum().cpu() for t, s in zip(token_logps, samples, strict=True)])
    behaviour = torch.tensor([math.fsum(s.rollout_logprobs[: s.earlier_tokens]) for s in samples], dtype=torch.float64)
    return importance_weights(old, behaviour, settings.importance_clip)


def _rollout_gaps(token_logps: list[torch.Tensor], samples: list[Sample]) -> list[tuple[float, bool]]:
    """Mean |trainer - vLLM| log-prob over each sample's tokens generated under theta_i (all its response
    tokens, but under partial rollouts), and whether its prompt has images."""
    return [((t[s.earlier_tokens :].cpu() - torch.tensor(s.rollout_logprobs[s.earlier_tokens :])).abs().mean().item(),
             bool(s.images))
            for t, s in zip(token_logps, samples, strict=True)
            if s.rollout_logprobs and len(s.response_ids) > s.earlier_tokens]


def _update_stats(steps: list[dict], gaps: list[tuple[float, bool]], log_ratios: list[float], logprobs_seconds: float,
                  seconds: float) -> dict[str, float]:
    """The means over the steps, the vLLM gap (all, text prompts, image prompts), the timings and the
    log-ratio's statistics."""
    out = {key: sum(s[key] for s in steps if key in s) / max(1, sum(key in s for s in steps))
           for key in ("loss", "grad_norm", "lr", "micro_batches") if any(key in s for s in steps)}
    out["steps"] = len(steps)
    out["logprob_gap_vllm_trainer"] = sum(g for g, _ in gaps) / max(1, len(gaps))
    for name, image in (("logprob_gap_text", False), ("logprob_gap_image", True)):
        mine = [g for g, has_image in gaps if has_image == image]
        if mine:
            out[name] = sum(mine) / len(mine)
    out["time_logprobs"] = logprobs_seconds  # the no-grad pass for log pi_theta_i, inside time/update
    out["time_in_trainer"] = seconds  # time/update minus this: shipping through Ray
    if log_ratios:
        t = torch.tensor(log_ratios, dtype=torch.float64)
        out["log_ratio_mean"] = t.mean().item()
        out["log_ratio_abs_max"] = t.abs().max().item()
        # k1.5's KL term estimated from the samples: mean of (log-ratio)^2 / 2
        out["kl_to_prev_est"] = (t.pow(2).mean() / 2).item()
    return out
