"""The tiny Kimi-VL built offline: a small MoonViT and projector over the tiny DeepSeek-V3 MoE.

56 x 56 px images are 4 x 4 patches of 14 px, merged 2 x 2: four image tokens, one per quadrant. The
folder is what a real Kimi-VL folder is (config.json with `vision_config` and `text_config`, weights
under the checkpoint's names, a tokenizer with the media tokens), plus the PIL + numpy processor as
remote code (`thinkrl.vl.kimi_processing`, registered through `auto_map`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

TINY_VISION = dict(patch_size=14, init_pos_emb_height=4, init_pos_emb_width=4, num_attention_heads=4,
                   num_hidden_layers=2, hidden_size=64, intermediate_size=128, merge_kernel_size=[2, 2])
# 56 px images have 16 patches; the limit only matters for large images (scaled down to fit it)
TINY_IN_TOKEN_LIMIT = 256
PROCESSOR_FILE = "processing_kimi_vl.py"


def write_processor(out_dir: Path, in_token_limit: int) -> None:
    """The PIL + numpy processor as the folder's remote code, and the configs that point to it."""
    shutil.copyfile(Path(__file__).with_name("kimi_processing.py"), out_dir / PROCESSOR_FILE)
    auto_map = {"AutoImageProcessor": "processing_kimi_vl.KimiVLImageProcessor",
                "AutoProcessor": "processing_kimi_vl.KimiVLProcessor"}
    (out_dir / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "KimiVLImageProcessor", "processor_class": "KimiVLProcessor", "auto_map": auto_map,
        "patch_size": 14, "merge_kernel_size": [2, 2], "in_token_limit": in_token_limit,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}, indent=2))
    (out_dir / "processor_config.json").write_text(json.dumps({
        "processor_class": "KimiVLProcessor", "auto_map": {"AutoProcessor": auto_map["AutoProcessor"]}}, indent=2))


def build_tiny_vl(out_dir: str | Path, text_config, tokenizer) -> Path:
    """Build the random tiny Kimi-VL with `text_config` (the tiny MoE's) and `tokenizer` into `out_dir`."""
    import torch

    from thinkrl.fileio import atomic_directory
    from thinkrl.vl.kimi_vl import KimiVLConfig, KimiVLForConditionalGeneration

    out_dir = Path(out_dir)
    media_pad = tokenizer.convert_tokens_to_ids("<|media_pad|>")
    config = KimiVLConfig(vision_config=TINY_VISION, text_config=text_config, media_placeholder_token_id=media_pad,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                          tie_word_embeddings=False, dtype="float32")
    model = KimiVLForConditionalGeneration(config).to(torch.float32)
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_processor(tmp, TINY_IN_TOKEN_LIMIT)
        gen = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
        (tmp / "generation_config.json").write_text(json.dumps(gen))
    return out_dir
