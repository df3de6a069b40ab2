"""Packing and the assistant-only loss: pure logic plus one real tiny model forward (no DeepSpeed)."""

import pytest
import torch

from sft.packing import non_padding_share, pack_bins, packed_batch, padded_batch, split_rows
from thinkrl.chat import encode_conversation
from thinkrl.tasks import arithmetic
from thinkrl.train_engine import block_diagonal_mask, token_logprobs


def test_pack_bins_balanced_rows_respect_budget():
    lengths = [5, 3, 7, 2, 8, 1]
    bins = pack_bins(lengths, budget=10)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 3  # 26 tokens need at least 3 rows of 10
    with pytest.raises(ValueError, match="example 1 has 12 tokens"):
        pack_bins([3, 12], budget=10)


def test_block_diagonal_mask_keeps_attention_inside_examples():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])  # examples of 3 and 2 tokens, then one pad
    mask = block_diagonal_mask(pos)[0, 0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)


def test_multi_turn_loss_mask_token_by_token(tokenizer):
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "1+1"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "+3"},
        {"role": "assistant", "content": "5"},
    ]
    enc = encode_conversation(tokenizer, messages)
    pieces = [(tokenizer.convert_ids_to_tokens(t), m) for t, m in zip(enc.input_ids, enc.loss_mask, strict=True)]
    assert [tok for tok, m in pieces if m] == ["2", "<|im_end|>", "5", "<|im_end|>"]
    # everything else (system, user turns, role headers, the newline after <|im_end|>) carries no loss
    text_without_loss = "".join(tok for tok, m in pieces if not m)
    assert text_without_loss.count("<|im_start|>") == 5 and "S" in text_without_loss and "+3" in text_without_loss


def _examples(tokenizer, n, seed=0):
    rows = arithmetic.sft_conversations(arithmetic.make_rows(n, seed=seed, max_ops=3), seed=seed)
    return [encode_conversation(tokenizer, r["messages"]) for r in rows]


def test_packing_beats_padding_on_teacher_data(tokenizer):
    examples = _examples(tokenizer, 64)
    packed = packed_batch(examples, budget=512, pad_id=tokenizer.pad_token_id)
    padded = padded_batch(examples, pad_id=tokenizer.pad_token_id)
    assert packed.real_tokens == padded.real_tokens == sum(len(e.input_ids) for e in examples)
    assert int(packed.target_mask_B_T.sum()) == int(padded.target_mask_B_T.sum())
    assert non_padding_share([packed]) > 0.9 > non_padding_share([padded])
    parts = split_rows(packed, 3)
    assert sum(p.input_ids_B_T.shape[0] for p in parts) == packed.input_ids_B_T.shape[0]


def test_packed_logprobs_equal_unpacked(tiny_dense, tokenizer):
    """The proof of "no attention across examples": per-example log-probs are the same packed or not."""
    from thinkrl.models import load_causal_lm

    torch.manual_seed(0)
    model = load_causal_lm(tiny_dense).eval()
    examples = _examples(tokenizer, 7, seed=3)
    packed = packed_batch(examples, budget=400, pad_id=tokenizer.pad_token_id)
    padded = padded_batch(examples, pad_id=tokenizer.pad_token_id)
    assert packed.input_ids_B_T.shape[0] < len(examples)  # several examples share a row
    with torch.no_grad():
        lp_packed = token_logprobs(model, packed.input_ids_B_T, packed.attention_mask_B_T,
                                   packed.target_mask_B_T, packed.position_ids_B_T)
        lp_padded = token_logprobs(model, padded.input_ids_B_T, padded.attention_mask_B_T, padded.target_mask_B_T)
    # gather each example's log-probs from the packed rows in pack order
    per_example_packed = []
    for r in range(packed.input_ids_B_T.shape[0]):
        starts = (packed.position_ids_B_T[r] == 0).nonzero().flatten().tolist() + [packed.input_ids_B_T.shape[1]]
        for lo, hi in zip(starts, starts[1:], strict=False):
            if packed.attention_mask_B_T[r, lo]:
                per_example_packed.append((packed.input_ids_B_T[r, lo:hi].tolist(), lp_packed[r, lo:hi]))
    assert len(per_example_packed) == len(examples)
    for i, e in enumerate(examples):
        match = [lp for ids, lp in per_example_packed if ids == e.input_ids]
        assert match, f"example {i} missing from the packed rows"
        unpacked = lp_padded[i, : len(e.input_ids)]
        assert torch.allclose(match[0], unpacked, atol=1e-5), (match[0] - unpacked).abs().max()
    mean_packed = lp_packed.sum() / packed.target_mask_B_T[:, 1:].sum()
    mean_padded = lp_padded.sum() / padded.target_mask_B_T[:, 1:].sum()
    assert torch.allclose(mean_packed, mean_padded, atol=1e-5)
    # and the mask matters: without it the packed rows give different numbers
    with torch.no_grad():
        leaky = token_logprobs(model, packed.input_ids_B_T, packed.attention_mask_B_T, packed.target_mask_B_T)
    assert not torch.allclose(leaky, lp_packed, atol=1e-3)
