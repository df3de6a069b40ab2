"""Sequence packing: several tokenized conversations per row, up to a token budget.

A step's examples are spread over as few rows as the budget allows, balanced so that the rows are
nearly equally long (`pack_bins`), then right-padded to the longest row. Position ids restart at 0 for every
example, and the padding tail of a row is one more run starting at 0, so `TrainEngine.token_logprobs`
can keep attention inside examples (block-diagonal mask, or varlen kernels on flash-attention).

Trade-off: packing per step (not over the whole dataset) keeps the step's examples exactly those of
the unpacked stream, so packed and unpacked training see the same data in the same steps and resume by
step number; the price is a partly filled last row per step, small once a step holds several rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from thinkrl.chat import EncodedConversation


@dataclass
class Batch:
    """Tensors of one micro-batch, each [B, T]. `position_ids_B_T` is None for unpacked rows."""

    input_ids_B_T: torch.Tensor
    attention_mask_B_T: torch.Tensor
    target_mask_B_T: torch.Tensor
    position_ids_B_T: torch.Tensor | None
    n_examples: int
    # each row's images (encoded bytes) in the order of their placeholder tokens: an example's images stay
    # in the row that holds its tokens
    row_images: list[list[bytes]] = field(default_factory=list)

    @property
    def images(self) -> list[bytes]:
        return [image for row in self.row_images for image in row]

    @property
    def real_tokens(self) -> int:
        return int(self.attention_mask_B_T.sum())

    @property
    def slots(self) -> int:
        return self.input_ids_B_T.numel()


def pack_bins(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of `lengths` grouped into rows of at most `budget` tokens, with little padding.

    The cost of a layout is rows x longest row (every row is padded to the longest). For R rows, from
    ceil(total / budget) up: place examples longest first into the row with the fewest tokens (LPT),
    then move or swap examples out of the longest row while that shortens it; keep the feasible
    layout of least cost over the first few R. Raises ValueError naming an example longer than the budget.
    """
    for i, n in enumerate(lengths):
        if n > budget:
            raise ValueError(f"example {i} has {n} tokens, over the packing budget of {budget}")
    if not lengths:
        return []
    lower = -(-sum(lengths) // budget)
    best: tuple[int, list[list[int]]] | None = None
    for rows in range(lower, len(lengths) + 1):
        bins = _balanced(lengths, rows)
        width = max(sum(lengths[i] for i in b) for b in bins)
        if width <= budget and (best is None or rows * width < best[0]):
            best = (rows * width, bins)
        if best is not None and rows >= lower + 2:
            break
    assert best is not None
    return [b for b in best[1] if b]


def _balanced(lengths: list[int], rows: int) -> list[list[int]]:
    bins: list[list[int]] = [[] for _ in range(rows)]
    load = [0] * rows
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(rows), key=lambda r: (load[r], r))
        bins[r].append(i)
        load[r] += lengths[i]
    improved = True
    while improved:  # shorten the longest row by a move or a swap while one helps
        improved = False
        h = max(range(rows), key=lambda r: load[r])
        best = (load[h], None)
        for r in range(rows):
            if r == h:
                continue
            for a in bins[h]:
                for b in [None, *bins[r]]:
                    d = lengths[a] - (lengths[b] if b is not None else 0)
                    if d > 0 and max(load[h] - d, load[r] + d) < best[0]:
                        best = (max(load[h] - d, load[r] + d), (r, a, b, d))
        if best[1] is not None:
            r, a, b, d = best[1]
            bins[h].remove(a)
            bins[r].append(a)
            if b is not None:
                bins[r].remove(b)
                bins[h].append(b)
            load[h] -= d
            load[r] += d
            improved = True
    return bins


def packed_batch(examples: list[EncodedConversation], budget: int, pad_id: int) -> Batch:
    """Pack `examples` into rows of at most `budget` tokens, padded to the longest row."""
    bins = pack_bins([len(e.input_ids) for e in examples], budget)
    width = max(sum(len(examples[i].input_ids) for i in b) for b in bins)
    shape = (len(bins), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    attn = torch.zeros(shape, dtype=torch.long)
    target = torch.zeros(shape, dtype=torch.long)
    pos = torch.zeros(shape, dtype=torch.long)
    for r, members in enumerate(bins):
        at = 0
        for i in members:
            e = examples[i]
            n = len(e.input_ids)
            ids[r, at : at + n] = torch.tensor(e.input_ids)
            target[r, at : at + n] = torch.tensor(e.loss_mask)
            pos[r, at : at + n] = torch.arange(n)
            attn[r, at : at + n] = 1
            at += n
        pos[r, at:] = torch.arange(width - at)  # the padding tail is a run of its own
    return Batch(ids, attn, target, pos, len(examples), [[im for i in b for im in examples[i].images] for b in bins])


def padded_batch(examples: list[EncodedConversation], pad_id: int) -> Batch:
    """One example per row, right-padded to the longest (the unpacked layout)."""
    from thinkrl.train_engine import pad_batch

    ids, attn, target = pad_batch([e.input_ids for e in examples], [e.loss_mask for e in examples], pad_id)
    return Batch(ids, attn, target, None, len(examples), [list(e.images) for e in examples])


def bucketed_batches(examples: list[EncodedConversation], pad_id: int) -> list[Batch]:
    """One example per row, in length buckets (`thinkrl.train_engine.length_buckets`), each padded to its own
    longest: one forward pass per bucket."""
    from thinkrl.train_engine import length_buckets

    return [padded_batch([examples[i] for i in b], pad_id) for b in length_buckets([len(e.input_ids) for e in examples])]


def split_rows(batch: Batch, parts: int) -> list[Batch]:
    """Split a batch's rows into `parts` micro-batches (fewer if it has fewer rows), in order."""
    rows = batch.input_ids_B_T.shape[0]
    parts = max(1, min(parts, rows))
    bounds = [rows * k // parts for k in range(parts + 1)]
    out = []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        def cut(t, lo=lo, hi=hi):
            return None if t is None else t[lo:hi]

        out.append(Batch(cut(batch.input_ids_B_T), cut(batch.attention_mask_B_T), cut(batch.target_mask_B_T),
                         cut(batch.position_ids_B_T), 0, batch.row_images[lo:hi]))
    return out


def non_padding_share(batches: list[Batch]) -> float:
    """Share of the token slots of `batches` that hold real tokens (1.0: no padding)."""
    slots = sum(b.slots for b in batches)
    return sum(b.real_tokens for b in batches) / slots if slots else 0.0
