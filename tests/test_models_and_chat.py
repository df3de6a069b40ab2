import pytest
import torch

from thinkrl.chat import encode_conversation, prompt_ids
from thinkrl.models import load_causal_lm, load_tokenizer


def test_tokenizer_round_trips_and_keeps_think_tags(tokenizer):
    text = "<think>Plan: 2 steps.\n3+4=7 ✓ é</think>\\boxed{7}"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.convert_tokens_to_ids("<think>") in ids
    assert tokenizer.eos_token == "<|im_end|>"


def test_chat_template_is_chatml(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "1+1=?"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\n1+1=?<|im_end|>\n<|im_start|>assistant\n"


def test_loss_mask_covers_assistant_tokens_and_end_of_turn_only(tokenizer):
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "<think>x</think>B"},
    ]
    enc = encode_conversation(tokenizer, messages)
    tokens = tokenizer.convert_ids_to_tokens(enc.input_ids)
    carrying = [t for t, m in zip(tokens, enc.loss_mask, strict=True) if m]
    # exactly the assistant contents, each followed by its end-of-turn token
    assert carrying == ["A", "1", "<|im_end|>", "<think>", "x", "</think>", "B", "<|im_end|>"]
    # the prompt of the first turn (rendered with the generation prompt) carries none
    first_prompt = prompt_ids(tokenizer, [{"role": "user", "content": "Q1"}], system="S")
    assert enc.input_ids[: len(first_prompt)] == first_prompt
    assert not any(enc.loss_mask[: len(first_prompt)])


def test_conversation_without_assistant_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="no assistant turn"):
        encode_conversation(tokenizer, [{"role": "user", "content": "hi"}])


def test_tiny_dense_model_loads_in_transformers(tiny_dense):
    tok = load_tokenizer(tiny_dense)
    model = load_causal_lm(tiny_dense)
    ids = torch.tensor([prompt_ids(tok, "2+2=?")])
    out = model(input_ids=ids).logits
    assert out.shape == (1, ids.shape[1], model.config.vocab_size)
    assert model.config.vocab_size >= len(tok)
    assert torch.isfinite(out).all()


def test_tiny_moe_builds_and_loads(tmp_path):
    from thinkrl.models import build_tiny_model

    path = build_tiny_model("tiny-moe", tmp_path / "moe")
    model = load_causal_lm(path)
    assert model.config.model_type == "deepseek_v3"
    assert model.config.kv_lora_rank + model.config.qk_rope_head_dim == 576
    assert model.config.topk_method == "noaux_tc"
    out = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(out).all()


def test_unknown_model_is_named(tmp_path):
    from thinkrl.models import resolve_model

    with pytest.raises(ValueError, match="nope"):
        resolve_model(str(tmp_path / "nope"), tmp_path)


def test_weight_sync_exports_checkpoint_names_for_moe(tmp_path):
    """The trainer's in-memory MoE layout (fused experts) goes back to the checkpoint's per-expert names,
    which vLLM's loader expects (it rejects `mlp.experts.down_proj`)."""
    from safetensors import safe_open

    from thinkrl.models import ensure_tiny_model, load_causal_lm
    from thinkrl.train_engine import checkpoint_format

    path = ensure_tiny_model("tiny-moe", tmp_path)
    model = load_causal_lm(path)
    saved = set()
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            saved |= set(h.keys())
    assert set(model.state_dict()) != saved  # transformers fuses the experts in memory
    exported = checkpoint_format(model, dict(model.state_dict()))
    assert set(exported) == saved
    assert any(".mlp.experts.0.down_proj.weight" in name for name in exported)
