"""Tiny models built offline, and the one place that loads a model for training.

There is no model hub on the machines thinkrl is developed and tested on, so the embedded default
builds its own: a byte-level tokenizer (no merges: one token per byte, so every string round-trips)
with a ChatML chat template and `<think>` / `</think>` tokens, and random-initialised decoders in two
families: a dense Qwen2-style model and a DeepSeek-V3-style MoE (the family of Kimi-VL's language
model, with MLA attention). Both are saved as ordinary Hugging Face folders that transformers and vLLM
load. Builds are cached and written atomically (a half-built folder never looks finished).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from thinkrl.fileio import atomic_directory

TinyKind = Literal["tiny-dense", "tiny-moe", "tiny-vl"]
TINY_KINDS: tuple[str, ...] = ("tiny-dense", "tiny-moe", "tiny-vl")
# part of the cache path: bumped whenever a tiny model's definition changes, so no stale build is reused
TINY_MODEL_VERSION = 2

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
# Kimi-VL's image markers: a prompt holds `<|media_start|>image<|media_content|><|media_pad|><|media_end|>`
# per image, and the processor (or vLLM) expands the `<|media_pad|>` into one token per image token
MEDIA_TOKENS = ("<|media_start|>", "<|media_content|>", "<|media_pad|>", "<|media_end|>")

# ChatML. The generation prompt opens the assistant turn; the model writes `<think>...</think>answer`.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def build_tokenizer(media: bool = False):
    """A byte-level tokenizer with ChatML special tokens and think tags (a `PreTrainedTokenizerFast`).

    `<|im_end|>` is the end-of-turn (EOS) token; the think tags are ordinary added tokens, so decoding
    with `skip_special_tokens=True` (vLLM's default) keeps them in the text the rewards read. `media`:
    Kimi-VL's image markers too (special tokens, after the others: the text ids stay the same).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (PAD_TOKEN, IM_START, IM_END)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in (THINK_OPEN, THINK_CLOSE)])
    if media:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in MEDIA_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        chat_template=CHATML_TEMPLATE,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )


def _padded_vocab(n: int, multiple: int = 64) -> int:
    return (n + multiple - 1) // multiple * multiple


def tiny_config(kind: TinyKind, vocab_size: int, eos_id: int, pad_id: int):
    """The model configuration of a tiny kind (random weights, float32)."""
    common = dict(
        vocab_size=_padded_vocab(vocab_size),
        max_position_embeddings=1024,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        dtype="float32",
    )
    if kind == "tiny-dense":
        from transformers import Qwen2Config

        return Qwen2Config(
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            **common,
        )
    if kind in ("tiny-moe", "tiny-vl"):
        from transformers import DeepseekV3Config

        # vLLM's MLA kernels need kv_lora_rank + qk_rope_head_dim == 576, and DeepSeek-V3 routing
        # needs topk_method set; everything else is as small as the architecture allows.
        return DeepseekV3Config(
            hidden_size=128,
            intermediate_size=256,
            moe_intermediate_size=64,
            num_hidden_layers=2,
            first_k_dense_replace=1,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=1,
            n_group=1,
            topk_group=1,
            topk_method="noaux_tc",
            # transformers' DeepSeek-V3 always routes with sigmoid scores; vLLM reads `scoring_func` from
            # the config and falls back to softmax: without it the trainer and the engine run different
            # models (mean log-prob gap 0.29 after a 60-step warmup; real DeepSeek-V3 configs set it)
            scoring_func="sigmoid",
            routed_scaling_factor=1.0,
            num_attention_heads=4,
            num_key_value_heads=4,
            q_lora_rank=None,
            kv_lora_rank=512,
            qk_rope_head_dim=64,
            qk_nope_head_dim=32,
            v_head_dim=32,
            rope_scaling=None,
            **common,
        )
    raise ValueError(f"unknown tiny model kind {kind!r}; choose one of {TINY_KINDS}")


def build_tiny_model(kind: TinyKind, out_dir: str | Path, seed: int = 0) -> Path:
    """Build a random-initialised tiny model and its tokenizer into `out_dir` (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(media=kind == "tiny-vl")
    config = tiny_config(kind, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    torch.manual_seed(seed)
    if kind == "tiny-vl":
        from thinkrl.vl.tiny import build_tiny_vl

        return build_tiny_vl(out_dir, config, tokenizer)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        gen = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
        (tmp / "generation_config.json").write_text(json.dumps(gen))
    return out_dir


def ensure_tiny_model(kind: TinyKind, cache_dir: str | Path, seed: int = 0) -> Path:
    """Path of the cached tiny model of this kind and seed, building it on first use."""
    path = Path(cache_dir) / f"{kind}-seed{seed}-v{TINY_MODEL_VERSION}"
    if not (path / "config.json").exists():
        build_tiny_model(kind, path, seed)
    return path


def resolve_model(name_or_path: str, cache_dir: str | Path, seed: int = 0) -> Path:
    """A tiny kind name (built on first use) or a local Hugging Face folder, as a path.

    Raises ValueError naming the value when it is neither.
    """
    if name_or_path in TINY_KINDS:
        return ensure_tiny_model(name_or_path, cache_dir, seed)  # type: ignore[arg-type]
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(
            f"model {name_or_path!r} is neither a tiny kind {TINY_KINDS} nor a folder with config.json "
            "(thinkrl reads local Hugging Face folders; download hub models beforehand)"
        )
    return path


def load_causal_lm(path: str | Path, dtype: str = "float32"):
    """Load a causal LM (or a vision-language model thinkrl trains: `thinkrl.vl`) from a local folder for
    training (PyTorch SDPA attention)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from thinkrl.vl import vl_model_class

    hf_logging.disable_progress_bar()

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    model_class = vl_model_class(path) or AutoModelForCausalLM
    return model_class.from_pretrained(str(path), dtype=torch_dtype, attn_implementation="sdpa")


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    from thinkrl.vl import is_vl

    if is_vl(path):
        from thinkrl.vl.kimi_vl import register

        register()

    return AutoTokenizer.from_pretrained(str(path))
