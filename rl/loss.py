"""The policy mirror descent loss of Kimi k1.5, as a pure function of tensors.

Iteration i samples k responses y_j per prompt x from pi_theta_i and fits the optimum of

    max_theta  E[r(x, y)] - tau * KL(pi_theta(.|x) || pi_theta_i(.|x))

with the squared surrogate

    L(theta) = mean_j ( r_j - tau*log Z - tau * (log pi_theta(y_j|x) - log pi_theta_i(y_j|x)) )^2

where tau*log Z is estimated per prompt group by the mean reward r_bar (or, exactly, by
tau * log mean_j exp(r_j / tau)). We return L / (2 tau), whose gradient is

    - mean_j [ (r_j - r_bar) * grad log pi_theta(y_j|x) ]  +  (tau/2) * grad mean_j (log-ratio_j)^2

so at theta = theta_i (log-ratio 0) it is exactly minus the mean-baseline policy gradient, whatever tau,
and the tau term pulls the policy back toward the previous iterate. No value network and no frozen
reference model: the previous iterate is the reference.

The baseline is the only thing that couples the samples of a prompt group. The trainer therefore
takes each sample's advantage a_j = r_j - b_j (`advantages`, computed once on the driver, where whole
groups are at hand) and the per-sample terms (a_j - tau*d_j)^2 / (2 tau) (`pmd_terms`): the loss is
their mean, so a micro-batch may hold any subset of samples (less than a group, or parts of several),
and the gradients of its sums over micro-batches add up to that of `pmd_loss` (tested).

Partial rollouts (`rollout.partial`, docs/partial-rollouts.md) make a response y = (y_old, y_new): y_old
generated in earlier iterations under older weights (the behaviour policy mu), y_new under theta_i. Two
ways to keep the surrogate's fixed point at the optimum of iteration i:

- mask (k1.5): y_old is context. d_j = log pi_theta(y_new | x, y_old) - log pi_theta_i(y_new | x, y_old), so
  the update fits pi*(y_new | x, y_old) on tokens sampled from pi_theta_i; at theta = theta_i the gradient
  is -mean_j a_j * grad log pi_theta(y_new_j | x, y_old_j). A sample whose whole response predates
  iteration i has no token left to train: it only enters its group's baseline.
- last_segment: each sample's own last segment y_last is trained, what came before it is context. For a
  sample finished in an earlier iteration j (its group waited for others) y_last is from pi_theta_j: the
  gradient at theta_i is then the policy gradient on samples up to i - j iterations old, uncorrected, where
  mask would leave that sample untrained.
- importance: every token counts (d_j over all of y_j) and each term is weighted by
  w_j = min(c, pi_theta_i(y_old_j | x) / mu(y_old_j | x)) (no gradient through it; 1 for a response
  sampled whole under theta_i), so at theta = theta_i the gradient is -mean_j w_j a_j grad log pi_theta(y_j|x):
  the policy gradient of samples from pi_theta_i, importance-corrected for the prefix, the clip c bounding
  its variance (and its bias).
"""

from __future__ import annotations

from typing import Literal

import torch


def group_mean(values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Per-element mean of `values` over the elements sharing its group id."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inverse.max().item()) + 1 if inverse.numel() else 0
    sums = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(0, inverse, values)
    counts = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add_(
        0, inverse, torch.ones_like(values)
    )
    return (sums / counts)[inverse]


def pmd_baseline(rewards: torch.Tensor, group_ids: torch.Tensor, tau: float,
                 baseline: Literal["mean", "logsumexp"] = "mean") -> torch.Tensor:
    """The per-sample estimate of tau * log Z: the group's mean reward, or tau*log mean exp(r/tau)."""
    if baseline == "mean":
        return group_mean(rewards, group_ids)
    if baseline == "logsumexp":
        scaled = rewards / tau
        _, inverse = torch.unique(group_ids, return_inverse=True)
        group_max = scaled.new_full((int(inverse.max()) + 1,), float("-inf")).scatter_reduce(
            0, inverse, scaled, reduce="amax"
        )[inverse]
        return tau * (group_max + torch.log(group_mean(torch.exp(scaled - group_max), group_ids)))
    raise ValueError(f"baseline must be 'mean' or 'logsumexp', got {baseline!r}")


def advantages(rewards: torch.Tensor, group_ids: torch.Tensor, tau: float,
               baseline: Literal["mean", "logsumexp"] = "mean") -> torch.Tensor:
    """Each sample's reward minus its group's baseline (`pmd_baseline`), [N].

    Example:
        >>> advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0]), torch.tensor([0, 0, 0, 1, 1]), tau=0.1)
        tensor([ 0.6667, -0.3333, -0.3333,  0.0000,  0.0000])
    """
    return rewards - pmd_baseline(rewards, group_ids, tau, baseline)


def pmd_terms(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, tau: float, *,
              num_tokens: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The per-sample terms (a_j - tau * d_j)^2 / (2 tau) of the PMD loss, [N]; their mean is `pmd_loss`.

    Args:
        logp: [N] log pi_theta(y_j | x_j), summed over the response tokens; differentiable.
        logp_old: [N] the same under theta_i (no gradient is taken through it).
        advantages: [N] r_j minus the group baseline (`advantages`).
        tau: the KL coefficient, > 0.
        num_tokens: optional [N] response lengths: the log-ratio per token instead of per sequence.
        weights: optional [N] importance weights w_j of the terms (partial rollouts, `importance`); no
            gradient is taken through them.

    Example (two micro-batches of one group give the gradient of the whole group):
        >>> logp = torch.tensor([-3.0, -5.0, -4.0], requires_grad=True)
        >>> adv = advantages(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0, 0, 0]), tau=0.1)
        >>> (pmd_terms(logp[:1], logp[:1].detach(), adv[:1], 0.1).sum() / 3).backward()
        >>> (pmd_terms(logp[1:], logp[1:].detach(), adv[1:], 0.1).sum() / 3).backward()
        >>> logp.grad  # -(r - r_bar) / N, as pmd_loss over the whole group
        tensor([-0.2222,  0.1111,  0.1111])
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    shapes = {t.shape for t in (logp, logp_old, advantages)}
    if len(shapes) != 1 or logp.dim() != 1:
        raise ValueError(f"logp, logp_old and advantages must be 1-D of equal length, got {shapes}")
    log_ratio = logp - logp_old.to(logp.dtype).detach()
    if num_tokens is not None:
        log_ratio = log_ratio / num_tokens.to(logp.dtype).clamp(min=1)
    terms = (advantages.to(logp.dtype) - tau * log_ratio) ** 2 / (2 * tau)
    return terms if weights is None else terms * weights.to(logp.dtype).detach()


def importance_weights(logp_old_prefix: torch.Tensor, behaviour_prefix: torch.Tensor, clip: float) -> torch.Tensor:
    """w_j = min(clip, exp(log pi_theta_i(y_old_j) - log mu(y_old_j))): each sample's weight under partial
    rollouts' `importance` loss, from the summed log-probs of its earlier segments' tokens, [N].

    Example (a prefix the new weights like more, one they like less, none):
        >>> importance_weights(torch.tensor([-2.0, -4.0, 0.0]), torch.tensor([-3.0, -3.0, 0.0]), clip=2.0)
        tensor([2.0000, 0.3679, 1.0000], dtype=torch.float64)
    """
    if clip <= 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    ratio = torch.exp(logp_old_prefix.double() - behaviour_prefix.double())
    return ratio.clamp(max=clip)


def pmd_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    tau: float,
    *,
    baseline: Literal["mean", "logsumexp"] = "mean",
    num_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """The k1.5 policy mirror descent loss (scaled by 1 / (2 tau)); a scalar to minimise.

    Args:
        logp: [N] log pi_theta(y_j | x_j), summed over the response tokens; differentiable.
        logp_old: [N] the same under the previous iterate theta_i (no gradient is taken through it).
        rewards: [N] rewards r_j.
        group_ids: [N] integer prompt-group index; the baseline is computed within each group.
        tau: the KL coefficient, > 0.
        baseline: "mean" (k1.5's r_bar, default) or "logsumexp" (the exact tau*log mean exp(r/tau)).
        num_tokens: optional [N] response lengths. When given, the log-ratio is normalised per token
            (mean over the response instead of the sequence sum): a documented departure from the
            paper's sequence-level form that makes tau's pull independent of response length.

    Returns:
        mean_j (r_j - b_j - tau * d_j)^2 / (2 tau), with b_j the group baseline and d_j the log-ratio.

    Example:
        >>> import torch
        >>> logp = torch.tensor([-3.0, -5.0], requires_grad=True)
        >>> loss = pmd_loss(logp, logp.detach(), torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), tau=0.1)
        >>> loss.backward(); logp.grad  # minus the mean-baseline policy gradient: -(r - r_bar) / N
        tensor([-0.2500,  0.2500])
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    shapes = {t.shape for t in (logp, logp_old, rewards, group_ids)}
    if len(shapes) != 1 or logp.dim() != 1:
        raise ValueError(f"logp, logp_old, rewards and group_ids must be 1-D of equal length, got {shapes}")
    adv = advantages(rewards.to(logp.dtype), group_ids, tau, baseline)
    return pmd_terms(logp, logp_old, adv, tau, num_tokens=num_tokens).mean()
