"""Images in prompts: where they go in the text, how they are checked and read, and how the trainer sees them.

A dataset row marks each image's place with `<image>` in its prompt (or has none: its images come
first). Before tokenizing, each `<image>` becomes the model's own placeholder (for Kimi-VL
`<|media_start|>image<|media_content|><|media_pad|><|media_end|>`): one `<|media_pad|>` per image. The
engine (vLLM) and the trainer both expand that token into one per image token; the start-up parity
check holds them to the same expansion.

Images travel between processes as their encoded file bytes (a PNG of the visual task is a few hundred
bytes): the driver reads them, Ray ships them to engines and trainer ranks on any node, and each
decodes them itself. `ImageBatch` is what a trainer forward takes: the processor's pixel patches and
patch grids, in the order the placeholders appear in the batch (row-major).
"""

from __future__ import annotations

import hashlib
import io
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

IMAGE_MARK = "<image>"
KIMI_VL_PLACEHOLDER = "<|media_start|>image<|media_content|><|media_pad|><|media_end|>"
PLACEHOLDER_TOKEN = "<|media_pad|>"


def render_prompt(text: str, n_images: int, placeholder: str = KIMI_VL_PLACEHOLDER) -> str:
    """`text` with each `<image>` replaced by the model's placeholder; without any, the images go first.

    Raises ValueError when the marks and the images disagree in number.
    """
    marks = text.count(IMAGE_MARK)
    if marks == 0:
        return "".join(placeholder + "\n" for _ in range(n_images)) + text
    if marks != n_images:
        raise ValueError(f"{marks} {IMAGE_MARK} marks for {n_images} images")
    return text.replace(IMAGE_MARK, placeholder)


def image_list(value) -> list[str]:
    """A row's image field as a list of references: one path, a list of paths, or nothing."""
    if value is None:
        return []
    if isinstance(value, (str, dict)):
        return [value]
    return list(value)


def check_image(data: bytes) -> tuple[int, int]:
    """(width, height) of an encoded image; raises ValueError when PIL cannot decode it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"not a readable image ({type(e).__name__}: {e})") from None


def resolve_images(row: dict, field: str, base_dir: Path, where: str, prompt_field: str = "prompt",
                   image_dir: Path | None = None) -> list[str]:
    """The row's images as absolute paths, each checked to decode, and their count against the `<image>` marks.

    Paths are relative to `base_dir` (the data file's folder) or absolute. An image stored in the row
    itself (a `datasets` Image cell: {"bytes": ..., "path": ...}) is written once to `image_dir` under
    its content hash. Raises ValueError starting with `where` (file:row) and naming the field.
    """
    from rewards.atomic import atomic_write_bytes

    out = []
    for i, ref in enumerate(image_list(row.get(field))):
        label = f"{where}: field {field!r}[{i}]"
        if isinstance(ref, dict) and ref.get("bytes") is not None:
            data = bytes(ref["bytes"])
            if image_dir is None:
                raise ValueError(f"{label}: image bytes in the row need a folder to be written to")
            path = image_dir / (hashlib.sha256(data).hexdigest()[:24] + ".img")
            if not path.exists():
                atomic_write_bytes(path, data)
        else:
            ref = ref.get("path") if isinstance(ref, dict) else ref
            if not isinstance(ref, str) or not ref.strip():
                raise ValueError(f"{label}: expected an image path, got {ref!r}")
            path = Path(ref).expanduser()
            path = path if path.is_absolute() else base_dir / path
            if not path.is_file():
                raise ValueError(f"{label}: image file {str(path)!r} not found")
            data = path.read_bytes()
        try:
            check_image(data)
        except ValueError as e:
            raise ValueError(f"{label}: {path}: {e}") from None
        out.append(str(path.resolve()))
    marks = str(row.get(prompt_field, "")).count(IMAGE_MARK)
    if marks > 0 and marks != len(out):
        raise ValueError(f"{where}: field {prompt_field!r} has {marks} {IMAGE_MARK} marks for {len(out)} images")
    return out


class ImageStore:
    """Encoded image bytes by path, read once and kept for the most recent `capacity` paths."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._data: OrderedDict[str, bytes] = OrderedDict()

    def get(self, paths: list[str]) -> list[bytes]:
        out = []
        for path in paths:
            if path in self._data:
                self._data.move_to_end(path)
            else:
                self._data[path] = Path(path).read_bytes()
                if len(self._data) > self.capacity:
                    self._data.popitem(last=False)
            out.append(self._data[path])
        return out


def decode(data: bytes):
    """An RGB PIL image from encoded bytes."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


@dataclass
class ImageBatch:
    """Pixel inputs of a batch's images: the patches [N, 3, p, p] and grids of its *distinct* images, which
    distinct image each placeholder-ordered image is (`order`: the k samples of a prompt share one pass of
    the vision tower, as vLLM's encoder cache shares it), and each row's image-token count (its first that
    many placeholder tokens are images: a placeholder token the policy *generated* is text, as vLLM embeds it)."""

    pixel_values: object  # torch.Tensor
    grid_hws: list[tuple[int, int]]
    row_tokens: list[int]
    order: list[int]


class VisionInputs:
    """A model folder's processor for the trainer and the driver: token counts, expansion, pixel inputs.

    Processed images are cached by content (a prompt's image is seen by all k samples of its group).
    """

    def __init__(self, model_path: str | Path, cache_size: int = 1024) -> None:
        from transformers import AutoProcessor
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        self.processor = AutoProcessor.from_pretrained(str(model_path), trust_remote_code=True)
        tokenizer = self.processor.tokenizer
        self.token_id = tokenizer.convert_tokens_to_ids(PLACEHOLDER_TOKEN)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[object, tuple[int, int]]] = OrderedDict()

    def _processed(self, data: bytes):
        key = hashlib.sha1(data).hexdigest()
        if key not in self._cache:
            out = self.processor.image_processor.preprocess([decode(data)], return_tensors="pt")
            self._cache[key] = (out["pixel_values"], tuple(int(v) for v in out["image_grid_hws"][0]))
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

    def num_tokens(self, data: bytes) -> int:
        _, (h, w) = self._processed(data)
        kh, kw = self.processor.image_processor.merge_kernel_size
        return (h // kh) * (w // kw)

    def expand(self, ids: list[int], images: list[bytes]) -> list[int]:
        """`ids` with its i-th placeholder token repeated as many times as image i has tokens."""
        slots = [p for p, t in enumerate(ids) if t == self.token_id]
        if len(slots) != len(images):
            raise ValueError(f"{len(slots)} image placeholders in the prompt for {len(images)} images")
        out, last = [], 0
        for p, data in zip(slots, images, strict=True):
            out.extend(ids[last:p])
            out.extend([self.token_id] * self.num_tokens(data))
            last = p + 1
        return out + ids[last:]

    def batch(self, row_images: list[list[bytes]]) -> ImageBatch | None:
        """The pixel inputs of each row's images (rows in batch order), or None when there is none."""
        import torch

        images = [d for row in row_images for d in row]
        if not images:
            return None
        distinct: dict[bytes, int] = {}
        order = [distinct.setdefault(d, len(distinct)) for d in images]
        done = [self._processed(d) for d in distinct]
        return ImageBatch(torch.cat([d[0] for d in done]), [d[1] for d in done],
                          [sum(self.num_tokens(d) for d in row) for row in row_images], order)
