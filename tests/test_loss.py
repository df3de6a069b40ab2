import torch

from rl.loss import group_mean, pmd_baseline, pmd_loss


def _policy(n_samples=6, n_tokens=5, vocab=7, seed=0):
    torch.manual_seed(seed)
    logits = torch.randn(n_samples, n_tokens, vocab, requires_grad=True)
    tokens = torch.randint(0, vocab, (n_samples, n_tokens))
    def logp():
        return torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1).sum(-1)
    return logits, logp


def test_gradient_at_previous_iterate_is_mean_baseline_policy_gradient():
    logits, logp = _policy()
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    for tau in (0.05, 0.3, 2.0):
        logits.grad = None
        pmd_loss(logp(), logp().detach(), rewards, groups, tau).backward()
        got = logits.grad.clone()
        logits.grad = None
        baseline = torch.tensor([2 / 3] * 3 + [1 / 3] * 3)
        (-((rewards - baseline) * logp()).mean()).backward()
        torch.testing.assert_close(got, logits.grad)


def test_tau_term_pulls_back_toward_previous_iterate():
    # equal rewards: no policy-gradient signal, only the KL term acts
    logp_old = torch.tensor([-2.0, -3.0, -4.0])
    logp = torch.tensor([-1.5, -3.5, -4.0], requires_grad=True)
    pmd_loss(logp, logp_old, torch.ones(3), torch.zeros(3, dtype=torch.long), tau=0.5).backward()
    # gradient descent moves logp toward logp_old: positive grad where logp > old, negative where below
    assert logp.grad[0] > 0 and logp.grad[1] < 0 and logp.grad[2] == 0
    # and it equals (tau/2) * d/dlogp mean (logp - old)^2 = tau * (logp - old) / N
    torch.testing.assert_close(logp.grad, 0.5 * (logp.detach() - logp_old) / 3)


def test_loss_value_matches_formula():
    logp = torch.tensor([-1.0, -2.0, -3.0, -1.0])
    old = torch.tensor([-1.5, -2.0, -2.0, -1.0])
    r = torch.tensor([1.0, 0.0, 1.0, 1.0])
    g = torch.tensor([0, 0, 1, 1])
    tau = 0.2
    rbar = torch.tensor([0.5, 0.5, 1.0, 1.0])
    expected = ((r - rbar - tau * (logp - old)) ** 2).mean() / (2 * tau)
    torch.testing.assert_close(pmd_loss(logp, old, r, g, tau), expected)


def test_token_normalisation_divides_log_ratio_by_length():
    logp = torch.tensor([-1.0, -2.0])
    old = torch.tensor([-2.0, -2.0])
    r = torch.tensor([1.0, 1.0])
    g = torch.tensor([0, 0])
    seq = pmd_loss(logp, old, r, g, 1.0)
    tok = pmd_loss(logp, old, r, g, 1.0, num_tokens=torch.tensor([4, 4]))
    torch.testing.assert_close(seq, torch.tensor(0.25))  # ((1)^2 + 0) / 2 / 2
    torch.testing.assert_close(tok, torch.tensor(0.25 / 16))


def test_group_mean_and_logsumexp_baseline():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    g = torch.tensor([3, 3, 7, 7, 7])
    torch.testing.assert_close(group_mean(r, g), torch.tensor([0.5, 0.5, 2 / 3, 2 / 3, 2 / 3]))
    tau = 0.5
    lse = pmd_baseline(r, g, tau, "logsumexp")
    expected0 = tau * torch.log((torch.exp(torch.tensor(2.0)) + 1) / 2)
    torch.testing.assert_close(lse[0], expected0)
    # the exact baseline is >= the mean (Jensen) and tends to it as tau grows
    assert (lse >= group_mean(r, g) - 1e-6).all()
    torch.testing.assert_close(pmd_baseline(r, g, 1e4, "logsumexp"), group_mean(r, g), atol=1e-3, rtol=0)


def test_bad_inputs_are_rejected():
    import pytest

    x = torch.zeros(3)
    with pytest.raises(ValueError, match="tau"):
        pmd_loss(x, x, x, x.long(), 0.0)
    with pytest.raises(ValueError, match="equal length"):
        pmd_loss(x, torch.zeros(2), x, x.long(), 0.1)


def test_per_sample_terms_in_any_micro_batches_give_the_paper_loss_gradient():
    """The trainer's form (advantages on the driver, per-sample terms summed over micro-batches that cut
    through groups) has exactly the gradient of pmd_loss over the whole batch, tau term included."""
    from rl.loss import advantages, pmd_terms

    logits, logp = _policy(n_samples=6)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    logp_old = (logp() + torch.randn(6) * 0.3).detach()  # away from theta_i: the tau term acts
    for tau, baseline, norm in ((0.1, "mean", None), (0.5, "logsumexp", torch.tensor([5, 5, 4, 3, 5, 2]))):
        logits.grad = None
        pmd_loss(logp(), logp_old, rewards, groups, tau, baseline=baseline, num_tokens=norm).backward()
        want = logits.grad.clone()
        logits.grad = None
        adv = advantages(rewards, groups, tau, baseline)
        for micro in ([0, 4], [1], [2, 3, 5]):  # micro-batches smaller than a group, across groups
            idx = torch.tensor(micro)
            terms = pmd_terms(logp()[idx], logp_old[idx], adv[idx], tau, num_tokens=None if norm is None else norm[idx])
            (terms.sum() / 6).backward()
        torch.testing.assert_close(logits.grad, want)
