"""Kimi-VL's image processor and processor in PIL + numpy (no torchvision), as a model folder's remote code.

This file is copied into tiny Kimi-VL folders as `processing_kimi_vl.py` and registered through
`auto_map`, so `AutoProcessor.from_pretrained(folder, trust_remote_code=True)` (vLLM's engine, thinkrl's
trainer) finds it. It imports nothing from thinkrl: a model folder must load without thinkrl installed.

An image becomes Kimi-VL's input: RGB, scaled down (bicubic) when it has more than `in_token_limit`
patches, padded right and bottom to a multiple of patch_size x merge_kernel_size, normalised
((x/255 - mean) / std), cut into patch_size patches in row-major order: `pixel_values` [N, 3, p, p]
and `image_grid_hws` [images, 2] (the patch grid). Each image is (h/2)(w/2) `<|media_pad|>` tokens
in the prompt (one per 2x2 patch block): the processor expands every `<|media_pad|>` of the text.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image
from transformers import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ProcessorMixin


class KimiVLImageProcessor(BaseImageProcessor):
    model_input_names = ["pixel_values", "image_grid_hws"]

    def __init__(self, patch_size: int = 14, merge_kernel_size=(2, 2), in_token_limit: int = 4096,
                 image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), **kwargs) -> None:
        super().__init__(**kwargs)
        self.patch_size = patch_size
        self.merge_kernel_size = list(merge_kernel_size)
        self.in_token_limit = in_token_limit
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)

    def _resized(self, image: Image.Image) -> Image.Image:
        p = self.patch_size
        w, h = image.size
        if (w // p) * (h // p) > self.in_token_limit:
            scale = math.sqrt(self.in_token_limit / ((w // p) * (h // p)))
            image = image.resize((int(w * scale), int(h * scale)), Image.BICUBIC)
        return image

    def num_image_tokens(self, width: int, height: int) -> int:
        """Tokens of an image of this size (what vLLM's `get_num_image_tokens` computes)."""
        h, w = self._grid(*self._resized(Image.new("RGB", (width, height))).size[::-1])
        kh, kw = self.merge_kernel_size
        return (h // kh) * (w // kw)

    def _grid(self, height: int, width: int) -> tuple[int, int]:
        p = self.patch_size
        kh, kw = self.merge_kernel_size
        return -(-height // (kh * p)) * kh, -(-width // (kw * p)) * kw

    def _one(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
        image = self._resized(image.convert("RGB"))
        p = self.patch_size
        gh, gw = self._grid(image.size[1], image.size[0])
        array = (np.asarray(image, dtype=np.float32) / 255.0 - np.array(self.image_mean, dtype=np.float32)) \
            / np.array(self.image_std, dtype=np.float32)
        padded = np.zeros((gh * p, gw * p, 3), dtype=np.float32)
        padded[: array.shape[0], : array.shape[1]] = array
        patches = padded.reshape(gh, p, gw, p, 3).transpose(0, 2, 4, 1, 3).reshape(gh * gw, 3, p, p)
        return patches, (gh, gw)

    def preprocess(self, images, return_tensors=None, **kwargs) -> BatchFeature:
        if isinstance(images, Image.Image):
            images = [images]
        flat = []
        for item in images:  # vLLM may pass one list per prompt
            flat.extend(item if isinstance(item, (list, tuple)) else [item])
        done = [self._one(image) for image in flat]
        pixel_values = np.concatenate([d[0] for d in done]) if done else np.zeros((0, 3, self.patch_size, self.patch_size), np.float32)
        grids = np.array([d[1] for d in done], dtype=np.int64).reshape(-1, 2)
        return BatchFeature({"pixel_values": pixel_values, "image_grid_hws": grids}, tensor_type=return_tensors)


class KimiVLProcessor(ProcessorMixin):
    attributes = ["image_processor", "tokenizer"]

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs) -> None:
        self.image_token = "<|media_pad|>"
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def __call__(self, text=None, images=None, return_tensors=None, **kwargs) -> BatchFeature:
        out = {}
        tokens_per_image: list[int] = []
        if images is not None:
            image_inputs = self.image_processor.preprocess(images, return_tensors="np")
            out.update(image_inputs)
            kh, kw = self.image_processor.merge_kernel_size
            tokens_per_image = [int(h // kh * (w // kw)) for h, w in image_inputs["image_grid_hws"]]
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            counts = iter(tokens_per_image)
            expanded = []
            for t in texts:
                pieces = t.split(self.image_token)
                rebuilt = pieces[0]
                for piece in pieces[1:]:
                    rebuilt += self.image_token * next(counts) + piece
                expanded.append(rebuilt)
            kwargs.pop("images_kwargs", None)
            out.update(self.tokenizer(expanded, add_special_tokens=False, **{k: v for k, v in kwargs.items()
                                                                           if k in ("padding", "truncation")}))
        return BatchFeature(out, tensor_type=return_tensors)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values", "image_grid_hws"]
