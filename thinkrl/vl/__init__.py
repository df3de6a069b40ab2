"""Vision-language models: what thinkrl needs of each family besides the language model.

A family is known by its `config.json` `model_type`. For each, thinkrl has the training model (the same
computation as vLLM's), the processor that turns images into the model's input, and where images go
in a prompt. Kimi-VL (`kimi_vl`) is the one this toolkit exists for.
"""

from __future__ import annotations

import json
from pathlib import Path

VL_MODEL_TYPES = ("kimi_vl",)


def model_type(path: str | Path) -> str | None:
    """The `model_type` of a model folder's config.json (None when there is none)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get("model_type")


def is_vl(path: str | Path) -> bool:
    return model_type(path) in VL_MODEL_TYPES


def vl_model_class(path: str | Path):
    """The training class of a vision-language folder, or None for a text model."""
    if model_type(path) == "kimi_vl":
        from thinkrl.vl.kimi_vl import KimiVLForConditionalGeneration

        return KimiVLForConditionalGeneration
    return None
