"""ChatML rendering and the assistant-only loss mask, shared by the SFT warmup and RL.

The mask is derived from the tokenizer's own chat template, not from a hand-written ChatML string: each
assistant turn's span runs from the end of the rendered prefix *with* the generation prompt to the end
of the turn's end-of-turn token, found by rendering growing prefixes of the conversation. This works for
any template that renders a conversation as the concatenation of its turns (ChatML and its relatives).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EncodedConversation:
    """Token ids of a conversation and, per position, whether it carries loss (assistant tokens)."""

    input_ids: list[int]
    loss_mask: list[int]
    # the conversation's images (encoded bytes), in the order of their placeholder tokens in input_ids
    images: list[bytes] = field(default_factory=list)


def prompt_ids(tokenizer, prompt: str | list[dict], system: str | None = None) -> list[int]:
    """Token ids of a user prompt (a string or a message list), ending with the generation prompt."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system:
        messages = [{"role": "system", "content": system}, *messages]
    return _render_ids(tokenizer, messages, add_generation_prompt=True)


def row_prompt_ids(tokenizer, row: dict, system: str | None = None) -> list[int]:
    """`prompt_ids` of a dataset row: its `prompt`, with one image placeholder per image of its `images`
    (where its `<image>` marks are, else first: `thinkrl.vl.inputs.render_prompt`)."""
    images = row.get("images") or []
    if not images:
        return prompt_ids(tokenizer, row["prompt"], system)
    from thinkrl.vl.inputs import render_prompt

    return prompt_ids(tokenizer, render_prompt(row["prompt"], len(images)), system)


def encode_conversation(tokenizer, messages: list[dict]) -> EncodedConversation:
    """Tokenize a ChatML conversation with loss on assistant content and its end-of-turn token only.

    Raises ValueError if the conversation has no assistant turn or the template is not concatenative.
    """
    if not any(m.get("role") == "assistant" for m in messages):
        raise ValueError("conversation has no assistant turn")
    if messages[0].get("role") == "assistant":
        raise ValueError("conversation starts with an assistant turn (it needs a prompt before it)")
    full = _render_ids(tokenizer, messages, add_generation_prompt=False)
    mask = [0] * len(full)
    eos = tokenizer.eos_token_id
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render_ids(tokenizer, messages[:i], add_generation_prompt=True))
        end = len(_render_ids(tokenizer, messages[: i + 1], add_generation_prompt=False))
        if full[:start] != _render_ids(tokenizer, messages[:i], add_generation_prompt=True):
            raise ValueError("chat template does not render conversations as a concatenation of turns")
        span = full[start:end]
        stop = span.index(eos) + 1 if eos in span else len(span)  # keep the end-of-turn token, drop "\n"
        for p in range(start, start + stop):
            mask[p] = 1
    return EncodedConversation(full, mask)


def _render_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    if not messages:
        return []
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
