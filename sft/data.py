"""SFT examples: loading conversation files, tokenizing them with an assistant-only loss mask, batching.

Rows are `{"messages": [{"role": ..., "content": ...}, ...]}`: the dataset builder's output format (which
adds fields such as `answer` and `patterns`, ignored here) or any plain messages file. Files are JSONL,
Parquet, or a folder written by `datasets.Dataset.save_to_disk` (a `DatasetDict` uses its `train`
split). JSONL and Parquet are read directly (row numbers in errors are the file's own); folders go
through `datasets`.

Bad rows (no assistant turn, empty content, over-long) are never dropped silently: with
`bad_rows="reject"` the first one raises DataError naming the source, the 1-based row and the field;
with `bad_rows="skip"` each is recorded (row and reason) in `SFTExamples.skipped` and counted.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from thinkrl.chat import EncodedConversation, encode_conversation
from thinkrl.fileio import DataError, load_rows, text_problem  # noqa: F401  (load_rows: re-exported)


@dataclass
class SFTExamples:
    """Encoded examples of one source, and the rows skipped (1-based row, reason)."""

    examples: list[EncodedConversation]
    source: str
    skipped: list[tuple[int, str]] = field(default_factory=list)


def _row_problem(row: dict, messages_field: str) -> str | None:
    messages = row.get(messages_field) if isinstance(row, dict) else None
    if not isinstance(messages, list) or not messages:
        return f"missing or empty field {messages_field!r}"
    for turn, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or not str(m.get("content") or "").strip():
            return f"{messages_field}[{turn}] needs a 'role' and non-empty 'content'"
        for key in ("role", "content"):
            if problem := text_problem(m[key]):
                return f"{messages_field}[{turn}].{key}: {problem}"
    if not any(m["role"] == "assistant" for m in messages):
        return f"{messages_field}: no assistant turn"
    return None


def encode_rows(tokenizer, rows: list[dict], source: str, max_seq_len: int, *,
                bad_rows: str = "reject", messages_field: str = "messages", image_field: str = "images",
                vision=None) -> SFTExamples:
    """Tokenize conversation rows with assistant-only loss masks.

    Rows with images (`image_field`: paths relative to `source`'s folder, or absolute) need `vision` (a
    `thinkrl.vl.inputs.VisionInputs` of the model): each image's placeholder is expanded exactly as the
    engine expands it, and image tokens never carry loss. A missing or unreadable image, or more images
    than `<image>` marks, is a bad row.
    `bad_rows="reject"` raises DataError naming `source`, the 1-based row and the field on the first bad
    row; `"skip"` leaves bad rows out and lists them in `skipped`.
    """
    if bad_rows not in ("reject", "skip"):
        raise ValueError(f"bad_rows must be 'reject' or 'skip', got {bad_rows!r}")
    examples, skipped = [], []
    for lineno, row in enumerate(rows, start=1):
        problem = _row_problem(row, messages_field)
        encoded = None
        if problem is None:
            messages = [{"role": m["role"], "content": m["content"]} for m in row[messages_field]]
            try:
                images = _row_images(row, image_field, Path(source).parent, f"{source}:{lineno}", vision)
                encoded = encode_conversation(tokenizer, _with_placeholders(messages, len(images)))
                if images:
                    encoded = _expand_images(encoded, images, vision)
            except ValueError as e:
                problem = str(e).removeprefix(f"{source}:{lineno}: ")
        if encoded is not None and len(encoded.input_ids) > max_seq_len:
            problem = f"{len(encoded.input_ids)} tokens, over max_seq_len={max_seq_len}"
        if problem is not None:
            if bad_rows == "reject":
                raise DataError(f"{source}:{lineno}: {problem}")
            skipped.append((lineno, problem))
            continue
        examples.append(encoded)
    if not examples:
        raise DataError(f"{source}: no usable rows ({len(skipped)} skipped, first: {skipped[:1]})")
    return SFTExamples(examples, source, skipped)


def _row_images(row: dict, field: str, base_dir: Path, where: str, vision) -> list[bytes]:
    """The row's images as bytes (checked to decode), or ValueError naming the field."""
    from thinkrl.vl.inputs import image_list, resolve_images

    try:
        if not image_list(row.get(field)):
            return []
    except ValueError as e:
        raise ValueError(f"field {field!r}: {e}") from None
    if vision is None:
        raise ValueError(f"field {field!r}: images need a vision-language model")
    return [Path(p).read_bytes() for p in resolve_images(row, field, base_dir, where, prompt_field="")]


def _with_placeholders(messages: list[dict], n_images: int) -> list[dict]:
    """The user turns' `<image>` marks as the model's placeholders; without marks the images open the
    first user turn. Raises ValueError when marks and images differ in number."""
    from thinkrl.vl.inputs import IMAGE_MARK, render_prompt

    marks = sum(m["content"].count(IMAGE_MARK) for m in messages if m["role"] == "user")
    if n_images == 0 and marks == 0:
        return messages
    if marks and marks != n_images:
        raise ValueError(f"{marks} {IMAGE_MARK} marks in the user turns for {n_images} images")
    out, first = [], True
    for m in messages:
        if m["role"] == "user" and (marks or first):
            count = m["content"].count(IMAGE_MARK) if marks else n_images
            m = {**m, "content": render_prompt(m["content"], count)}
            first = False
        out.append(m)
    return out


def _expand_images(encoded: EncodedConversation, images: list[bytes], vision) -> EncodedConversation:
    """Each placeholder token repeated as the model's processor (and the engine) expands it; no loss on any."""
    token = vision.token_id
    slots = [p for p, t in enumerate(encoded.input_ids) if t == token]
    if len(slots) != len(images):
        raise ValueError(f"{len(slots)} image placeholders for {len(images)} images")
    ids, mask, last = [], [], 0
    for p, data in zip(slots, images, strict=True):
        ids += encoded.input_ids[last:p] + [token] * vision.num_tokens(data)
        mask += encoded.loss_mask[last:p] + [0] * vision.num_tokens(data)
        last = p + 1
    return EncodedConversation(ids + encoded.input_ids[last:], mask + encoded.loss_mask[last:], list(images))


def split_heldout(examples: list[EncodedConversation], fraction: float, seed: int,
                  cap: int | None = None) -> tuple[list[EncodedConversation], list[EncodedConversation]]:
    """(train, heldout): a seeded `fraction` of the examples (at least 1 if fraction > 0), capped."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    if cap is not None:
        n = min(n, cap)
    held = set(order[:n])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in order[:n]]


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
