"""SFT examples: ChatML conversations tokenized with an assistant-only loss mask, and their batches.

Rows are `{"messages": [{"role": ..., "content": ...}, ...]}` (the dataset builder's output format).
Bad rows (no assistant turn, empty content, over-long) are rejected with the file and line named.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from thinkrl.chat import EncodedConversation, encode_conversation
from thinkrl.fileio import DataError


@dataclass
class SFTExamples:
    examples: list[EncodedConversation]
    source: str


def encode_rows(tokenizer, rows: list[dict], source: str, max_seq_len: int) -> SFTExamples:
    """Tokenize conversation rows; raises DataError naming `source`, the 1-based row and the field."""
    examples = []
    for lineno, row in enumerate(rows, start=1):
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{source}:{lineno}: missing or empty field 'messages'")
        for turn, m in enumerate(messages):
            if not isinstance(m, dict) or not str(m.get("content", "")).strip() or "role" not in m:
                raise DataError(f"{source}:{lineno}: messages[{turn}] needs a 'role' and non-empty 'content'")
        try:
            encoded = encode_conversation(tokenizer, messages)
        except ValueError as e:
            raise DataError(f"{source}:{lineno}: {e}") from None
        if len(encoded.input_ids) > max_seq_len:
            raise DataError(f"{source}:{lineno}: {len(encoded.input_ids)} tokens, over max_seq_len={max_seq_len}")
        examples.append(encoded)
    return SFTExamples(examples, source)


def batch_stream(examples: list[EncodedConversation], batch_size: int, seed: int, start_step: int = 0):
    """Endless seeded stream of batches (lists of examples), reshuffled every epoch; resumable by step."""
    rng = random.Random(seed)
    order: list[int] = []
    step = 0
    while True:
        if len(order) < batch_size:
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order.extend(fresh)
        batch, order = order[:batch_size], order[batch_size:]
        if step >= start_step:
            yield [examples[i] for i in batch]
        step += 1
