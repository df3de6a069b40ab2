"""The trainer's log-prob head: chunked in forward and backward, equal to the plain computation."""

import torch

from thinkrl.models import build_tiny_model, load_causal_lm
from thinkrl.train_engine import head_logprobs, token_logprobs


def _plain(hidden_N_H, weight_V_H, bias_V, targets_N):
    logits = torch.nn.functional.linear(hidden_N_H, weight_V_H, bias_V).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, targets_N[:, None]).squeeze(-1)


def _leaves(n, h, v, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(h, v, bias=bias, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, h, generator=g, dtype=torch.float64))
        if bias:
            head.bias.copy_(torch.randn(v, generator=g, dtype=torch.float64))
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, head, targets


def test_chunked_head_matches_plain_values_and_gradients():
    for bias in (False, True):
        hidden, head, targets = _leaves(n=23, h=8, v=37, bias=bias)
        upstream = torch.randn(23, dtype=torch.float64)
        got = head_logprobs(head, hidden, targets, chunk_tokens=5)  # 5 chunks, the last one short
        (got.double() * upstream).sum().backward()
        grads = [hidden.grad.clone(), head.weight.grad.clone()] + ([head.bias.grad.clone()] if bias else [])
        for t in [hidden, *head.parameters()]:
            t.grad = None
        want = _plain(hidden, head.weight, head.bias, targets)
        (want.double() * upstream).sum().backward()
        ref = [hidden.grad, head.weight.grad] + ([head.bias.grad] if bias else [])
        assert torch.allclose(got.double(), want.double(), atol=1e-5)
        for a, b in zip(grads, ref, strict=True):
            assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_chunked_head_gradcheck():
    hidden, head, targets = _leaves(n=7, h=3, v=5, bias=True, seed=1)
    weight = head.weight.detach().clone().requires_grad_(True)
    bias = head.bias.detach().clone().requires_grad_(True)
    from thinkrl.train_engine import _ChunkedTargetLogprob

    def f(h, w, b):
        return _ChunkedTargetLogprob.apply(h, w, b, targets, 3).double()

    # the function computes in float32 internally: loose tolerances, but a wrong formula is off by O(1)
    assert torch.autograd.gradcheck(f, (hidden, weight, bias), eps=1e-3, atol=1e-2, rtol=1e-2)


def _saved_bytes(fn):
    """(fn(), bytes of the tensors autograd saved for backward while fn ran)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


def test_backward_never_keeps_the_whole_logits():
    """What autograd saves for backward: the plain loop keeps N x V floats, the chunked head a few rows."""
    n, h, v, chunk = 512, 16, 2048, 64
    hidden = torch.randn(n, h, requires_grad=True)
    head = torch.nn.Linear(h, v, bias=False)
    targets = torch.randint(0, v, (n,))

    def saved_bytes(fn):
        return _saved_bytes(fn)[1]

    full_logits = n * v * 4
    chunked = saved_bytes(lambda: head_logprobs(head, hidden, targets, chunk_tokens=chunk))
    plain = saved_bytes(lambda: _plain(hidden, head.weight, None, targets))
    assert plain >= full_logits
    # inputs (hidden, weight, targets) and one float per row: far below one copy of the logits
    assert chunked < (n * h + v * h) * 4 + n * 16
    assert chunked < full_logits / 8


def test_token_logprobs_gradients_with_tied_embeddings(tmp_path):
    """Through a real model whose head shares the embedding matrix: the same as its own full logits."""
    path = build_tiny_model("tiny-dense", tmp_path / "m", seed=3)
    model = load_causal_lm(path)
    ids = torch.randint(3, model.config.vocab_size, (2, 19))
    attn = torch.ones_like(ids)
    attn[1, 15:] = 0
    target = attn.clone()
    target[:, :4] = 0

    def run(logprobs):
        model.zero_grad(set_to_none=True)
        lp = logprobs()
        lp.sum().backward()
        return lp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def reference():  # the model's own full logits
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits.float(), dim=-1)
        lp = torch.zeros(ids.shape)
        lp[:, 1:] = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
        return lp * target

    model.get_output_embeddings().weight = model.get_input_embeddings().weight  # tie them (Qwen2-0.5B does)
    lp_small, g_small = run(lambda: token_logprobs(model, ids, attn, target, chunk_tokens=4))
    lp_big, g_big = run(reference)
    assert torch.allclose(lp_small, lp_big, atol=1e-5)
    assert g_small.keys() == g_big.keys() and g_small
    for name in g_small:
        assert torch.allclose(g_small[name], g_big[name], atol=1e-5), name


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    from thinkrl.train_engine import enable_gradient_checkpointing

    path = build_tiny_model("tiny-dense", tmp_path / "m", seed=4)
    ids = torch.randint(3, 200, (2, 17))
    attn, target = torch.ones_like(ids), torch.ones_like(ids)
    grads, saved = [], []
    for checkpointing in (False, True):
        model = load_causal_lm(path)  # eval mode, as from_pretrained returns it
        if checkpointing:
            enable_gradient_checkpointing(model)
        logp, total = _saved_bytes(lambda m=model: token_logprobs(m, ids, attn, target, chunk_tokens=8))
        logp.sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        saved.append(total)
    assert saved[1] < saved[0] / 4  # the layers' activations are really recomputed, not kept
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-5), name


def test_length_buckets_are_the_cheapest_split():
    """Against every split of the sorted lengths into contiguous runs: the same minimal cost, each index once."""
    import itertools
    import random

    from thinkrl.train_engine import length_buckets

    def cost(buckets, lengths, overhead):
        return sum(len(b) * max(lengths[i] for i in b) + overhead for b in buckets)

    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.choice([rng.randint(1, 20), rng.randint(50, 200)]) for _ in range(rng.randint(1, 8))]
        overhead = rng.choice([0, 16, 64, 10**6])
        buckets = length_buckets(lengths, overhead)
        assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        best = min(
            cost([order[a:b] for a, b in zip((0, *cuts), (*cuts, len(order)), strict=True)], lengths, overhead)
            for k in range(len(order))
            for cuts in itertools.combinations(range(1, len(order)), k)
        )
        assert cost(buckets, lengths, overhead) == best
        assert cost(buckets, lengths, 0) <= len(lengths) * max(lengths)  # never more slots than one batch
    assert length_buckets([5, 100, 6, 101], 16) == [[1, 3], [0, 2]]
    assert length_buckets([5, 100, 6, 101], 10**6) == [[0, 2, 1, 3]]
