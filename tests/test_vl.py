"""The vision-language pieces without Ray or vLLM: the tiny Kimi-VL folder, its processor, the training
model's image path, image rows (hostile ones included), and SFT encoding and packing with images."""

import io
import json

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory):
    from thinkrl.models import ensure_tiny_model

    return ensure_tiny_model("tiny-vl", tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def vision(tiny_vl):
    from thinkrl.vl.inputs import VisionInputs

    return VisionInputs(tiny_vl)


def _png(colour=(255, 0, 0), size=56) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(out, format="PNG")
    return out.getvalue()


def test_tiny_vl_folder_is_a_kimi_vl_checkpoint(tiny_vl):
    from safetensors import safe_open
    from transformers import AutoProcessor

    from thinkrl.models import load_tokenizer

    config = json.loads((tiny_vl / "config.json").read_text())
    tok = load_tokenizer(tiny_vl)
    assert config["model_type"] == "kimi_vl" and config["architectures"] == ["KimiVLForConditionalGeneration"]
    assert config["media_placeholder_token_id"] == tok.convert_tokens_to_ids("<|media_pad|>")
    assert config["text_config"]["model_type"] == "deepseek_v3" and config["text_config"]["kv_lora_rank"] == 512
    with safe_open(str(tiny_vl / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    # the names vLLM's kimi_vl and a real Kimi-VL-A3B folder use
    for name in ("vision_tower.patch_embed.proj.weight", "vision_tower.patch_embed.pos_emb.weight",
                 "vision_tower.encoder.blocks.1.wqkv.weight", "vision_tower.encoder.final_layernorm.weight",
                 "multi_modal_projector.pre_norm.weight", "multi_modal_projector.linear_2.weight",
                 "language_model.model.layers.1.mlp.experts.7.down_proj.weight", "language_model.lm_head.weight"):
        assert name in names, name
    processor = AutoProcessor.from_pretrained(str(tiny_vl), trust_remote_code=True)
    out = processor(text=["<|media_pad|>x"], images=[_decoded(_png())])
    assert out["pixel_values"].shape == (16, 3, 14, 14) and out["image_grid_hws"].tolist() == [[4, 4]]
    assert out["input_ids"][0].count(config["media_placeholder_token_id"]) == 4


def _decoded(data):
    from thinkrl.vl.inputs import decode

    return decode(data)


def test_processor_counts_tokens_as_vllm_does(vision):
    processor = vision.processor.image_processor
    # 56 px: 4 x 4 patches, merged 2 x 2; a 70 x 30 image pads to 84 x 56 (6 x 4 patches: 3 x 2 tokens)
    assert vision.num_tokens(_png()) == 4 and processor.num_image_tokens(56, 56) == 4
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (70, 30)).save(buffer, format="PNG")
    assert vision.num_tokens(buffer.getvalue()) == 6 == processor.num_image_tokens(70, 30)
    # over the token limit (256 patches): scaled down to fit
    assert processor.num_image_tokens(560, 560) <= 256 // 4


def test_save_round_trip_keeps_the_checkpoint_layout(tiny_vl, tmp_path):
    from safetensors import safe_open

    from thinkrl.models import load_causal_lm
    from thinkrl.train_engine import checkpoint_format

    model = load_causal_lm(tiny_vl)
    with safe_open(str(tiny_vl / "model.safetensors"), "pt") as f:
        original = {k: f.get_tensor(k) for k in f.keys()}
    exported = checkpoint_format(model, dict(model.state_dict()))  # what the weight sync sends to vLLM
    assert set(exported) == set(original)
    assert all(torch.equal(exported[k], original[k]) for k in original)
    model.save_pretrained(tmp_path / "again")
    with safe_open(str(tmp_path / "again" / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(original)
        assert all(torch.equal(f.get_tensor(k), original[k]) for k in original)


def test_image_tokens_take_the_images_and_gradients_reach_the_tower(tiny_vl, vision):
    from thinkrl.models import load_causal_lm

    model = load_causal_lm(tiny_vl)
    pad = vision.token_id
    ids = torch.tensor([[5, pad, pad, pad, pad, 6, 7, pad]])  # the last placeholder was generated: text
    batch = vision.batch([[_png()]])
    embeds = model.embed_inputs(ids, batch.pixel_values, batch.grid_hws, batch.row_tokens)
    text = model.get_input_embeddings()(ids)
    assert torch.equal(embeds[0, [0, 5, 6, 7]], text[0, [0, 5, 6, 7]])
    assert not torch.allclose(embeds[0, 1:5], text[0, 1:5])
    other = model.embed_inputs(ids, vision.batch([[_png((0, 0, 255))]]).pixel_values, batch.grid_hws, batch.row_tokens)
    assert (other[0, 1:5] - embeds[0, 1:5]).abs().max() > 1e-3  # the image is really used
    # two rows showing the same image: one pass of the tower, the same embeddings as two passes
    two = torch.cat([ids, ids])
    shared = vision.batch([[_png()], [_png()]])
    assert shared.order == [0, 0] and len(shared.grid_hws) == 1
    once = model.embed_inputs(two, shared.pixel_values, shared.grid_hws, shared.row_tokens, shared.order)
    twice = model.embed_inputs(two, torch.cat([batch.pixel_values] * 2), batch.grid_hws * 2, shared.row_tokens)
    assert torch.equal(once, twice) and torch.equal(once[0], embeds[0])
    embeds.sum().backward()
    assert model.vision_tower.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="5 image placeholder tokens for 4 image tokens"):
        model.embed_inputs(ids, batch.pixel_values, batch.grid_hws)
    with pytest.raises(ValueError, match="but no image"):
        model.embed_inputs(ids, None, [])


def test_render_prompt_places_images():
    from thinkrl.vl.inputs import KIMI_VL_PLACEHOLDER, render_prompt

    assert render_prompt("a <image> b", 1) == f"a {KIMI_VL_PLACEHOLDER} b"
    assert render_prompt("q", 2) == f"{KIMI_VL_PLACEHOLDER}\n{KIMI_VL_PLACEHOLDER}\nq"
    with pytest.raises(ValueError, match="2 <image> marks for 1 images"):
        render_prompt("<image><image>", 1)


def test_hostile_image_rows_are_named(tmp_path):
    from thinkrl.vl.inputs import resolve_images

    (tmp_path / "ok.png").write_bytes(_png())
    (tmp_path / "text.png").write_text("<html>not an image</html>")
    (tmp_path / "cut.png").write_bytes(_png()[:40])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "folder.png").mkdir()
    where = "data.jsonl:3"

    def bad(row, match):
        with pytest.raises(ValueError, match=match):
            resolve_images(row, "images", tmp_path, where, image_dir=tmp_path / "cache")

    assert resolve_images({"images": "ok.png"}, "images", tmp_path, where) == [str(tmp_path / "ok.png")]
    bad({"images": ["ok.png", "gone.png"]}, r"data\.jsonl:3: field 'images'\[1\]: image file .*gone\.png.* not found")
    bad({"images": "text.png"}, r"data\.jsonl:3: field 'images'\[0\]: .*text\.png: not a readable image")
    bad({"images": "cut.png"}, r"field 'images'\[0\]: .*cut\.png: not a readable image")
    bad({"images": "empty.png"}, r"field 'images'\[0\]: .*empty\.png: not a readable image")
    bad({"images": "folder.png"}, r"field 'images'\[0\]: '.*folder\.png' is not a regular file")
    bad({"images": [42]}, r"field 'images'\[0\]: expected an image path, got 42")
    bad({"images": [{"bytes": b"\x00garbage"}]}, r"field 'images'\[0\]: .*: not a readable image")
    bad({"images": ["ok.png", "ok.png"], "prompt": "<image> only one"}, r"has 1 <image> marks for 2 images")
    # an image inside the row (a datasets Image cell) is written once, by content
    paths = resolve_images({"images": [{"bytes": _png(), "path": None}]}, "images", tmp_path, where,
                           image_dir=tmp_path / "cache")
    assert len(paths) == 1 and open(paths[0], "rb").read() == _png()


def test_files_task_reads_image_rows_and_fails_on_a_bad_one_before_anything_starts(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from thinkrl.fileio import DataError
    from thinkrl.run import DataConfig, load_prompts

    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(_png())
    rows = [{"prompt": "<image>\nHow many?", "answer": 2, "images": ["img/a.png"]},
            {"prompt": "text only", "answer": "3"},
            {"prompt": "first", "answer": "1", "images": str(tmp_path / "img" / "a.png")}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.table({"prompt": ["<image> x"], "answer": ["1"],
                             "pics": [[{"bytes": _png((0, 255, 0)), "path": None}]]}), tmp_path / "held.parquet")
    data = DataConfig(task="files", train_file=str(tmp_path / "train.jsonl"), heldout_file=str(tmp_path / "held.parquet"))
    with pytest.raises(DataError, match=r"held\.parquet:1: field 'prompt' has 1 <image> marks for 0 images"):
        load_prompts(data, 0, tmp_path / "run")
    pics = data.model_copy(update={"image_field": "pics", "train_file": data.heldout_file})
    train, held = load_prompts(pics, 0, tmp_path / "run")
    assert held[0]["images"][0].startswith(str(tmp_path / "run" / "images")) and held[0]["images"] == train[0]["images"]
    data = data.model_copy(update={"heldout_file": str(tmp_path / "train.jsonl")})
    train, held = load_prompts(data, 0, tmp_path / "run")
    assert [len(r["images"]) for r in train] == [1, 0, 1] and train[0]["answer"] == "2"
    assert train[0]["images"] == [str(tmp_path / "img" / "a.png")] == train[2]["images"]
    rows.append({"prompt": "<image>", "answer": "1", "images": ["img/missing.png"]})
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"train\.jsonl:4: field 'images'\[0\]: image file .*missing\.png.* not found"):
        load_prompts(data, 0, tmp_path / "run")


def test_shapes_task_rows_carry_their_image(tmp_path):
    from thinkrl.run import DataConfig, load_prompts

    train, held = load_prompts(DataConfig(task="shapes", n_train=20, n_heldout=5), 0, tmp_path)
    assert all(len(r["images"]) == 1 and r["prompt"].startswith("<image>") for r in train + held)
    assert not {r["images"][0] for r in train} & {r["images"][0] for r in held}


def test_sft_rows_with_images_expand_mask_and_pack(tiny_vl, vision, tmp_path):
    from sft.data import encode_rows
    from sft.packing import packed_batch, padded_batch, split_rows
    from thinkrl.fileio import DataError
    from thinkrl.models import load_tokenizer

    tok = load_tokenizer(tiny_vl)
    red, blue = _png(), _png((0, 0, 255))
    (tmp_path / "red.png").write_bytes(red)
    (tmp_path / "blue.png").write_bytes(blue)
    convo = [{"role": "user", "content": "<image>\nHow many?"}, {"role": "assistant", "content": "<think>1</think>1"}]
    rows = [{"messages": convo, "images": ["red.png"]}, {"messages": [{"role": "user", "content": "2+2"},
            {"role": "assistant", "content": "4"}]}, {"messages": convo, "images": ["blue.png"]}]
    source = str(tmp_path / "sft.jsonl")
    examples = encode_rows(tok, rows, source, 512, vision=vision).examples
    for e, image in zip(examples, (red, None, blue), strict=True):
        slots = [p for p, t in enumerate(e.input_ids) if t == vision.token_id]
        assert len(slots) == (4 if image else 0) and e.images == ([image] if image else [])
        assert all(e.loss_mask[p] == 0 for p in slots) and sum(e.loss_mask) > 0  # never loss on image tokens
    packed = packed_batch(examples, budget=200, pad_id=tok.pad_token_id)
    for row, images in zip(packed.input_ids_B_T, packed.row_images, strict=True):
        assert int((row == vision.token_id).sum()) == 4 * len(images)  # an example's image stays in its row
    assert sorted(packed.images) == sorted([red, blue])
    assert [b.images for b in split_rows(padded_batch(examples, tok.pad_token_id), 3)] == [[red], [], [blue]]
    shared = vision.batch([[red], [blue], [red]])  # the k samples of a prompt: one pass of the tower per image
    assert len(shared.grid_hws) == 2 and shared.order == [0, 1, 0] and shared.row_tokens == [4, 4, 4]
    with pytest.raises(DataError, match=r"sft\.jsonl:1: 1 <image> marks in the user turns for 2 images"):
        encode_rows(tok, [{"messages": convo, "images": ["red.png", "blue.png"]}], source, 512, vision=vision)
    with pytest.raises(DataError, match=r"sft\.jsonl:1: field 'images'\[0\]: image file .*nope\.png.* not found"):
        encode_rows(tok, [{"messages": convo, "images": ["nope.png"]}], source, 512, vision=vision)
    with pytest.raises(DataError, match=r"sft\.jsonl:1: field 'images': images need a vision-language model"):
        encode_rows(tok, [{"messages": convo, "images": ["red.png"]}], source, 512)
    skipped = encode_rows(tok, [rows[0], {"messages": convo, "images": ["nope.png"]}], source, 512, vision=vision,
                          bad_rows="skip")
    assert len(skipped.examples) == 1 and skipped.skipped[0][0] == 2
