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
import os
import stat
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
    """A row's image field as a list of references: one path, a list of paths, or nothing.

    Raises ValueError for anything else (a number, a boolean), naming the value.
    """
    if value is None:
        return []
    if isinstance(value, (str, dict)):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ValueError(f"expected an image path or a list of them, got {_cut(repr(value))}")


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
                   image_dir: Path | None = None, image_root: Path | None = None) -> list[str]:
    """The row's images as absolute paths, each checked to decode, and their count against the `<image>` marks.

    Paths are relative to `base_dir` (the data file's folder) or absolute. An image stored in the row
    itself (a `datasets` Image cell: {"bytes": ..., "path": ...}) is written once to `image_dir` under
    its content hash, once it decodes. With `image_root`, a path whose real path leaves that folder is
    refused (`read_image_file`). Raises ValueError starting with `where` (file:row) and naming the field.
    """
    from rewards.atomic import atomic_write_bytes
    from thinkrl.fileio import text_problem

    try:
        refs = image_list(row.get(field))
    except ValueError as e:
        raise ValueError(f"{where}: field {field!r}: {e}") from None
    out = []
    for i, ref in enumerate(refs):
        label = f"{where}: field {field!r}[{i}]"
        in_row = isinstance(ref, dict) and ref.get("bytes") is not None
        if in_row:
            if not isinstance(ref["bytes"], (bytes, bytearray)):
                raise ValueError(f"{label}: expected image bytes, got {_cut(repr(ref['bytes']))}")
            data = bytes(ref["bytes"])
            if image_dir is None:
                raise ValueError(f"{label}: image bytes in the row need a folder to be written to")
            path = image_dir / (hashlib.sha256(data).hexdigest()[:24] + ".img")
        else:
            ref = ref.get("path") if isinstance(ref, dict) else ref
            if not isinstance(ref, str) or not ref.strip() or "\0" in ref or text_problem(ref):
                raise ValueError(f"{label}: expected an image path, got {_cut(repr(ref))}")
            path = Path(ref).expanduser()
            path = path if path.is_absolute() else base_dir / path
            try:
                path, data = read_image_file(path, image_root)
            except ValueError as e:
                raise ValueError(f"{label}: {e}") from None
        try:
            check_image(data)
        except ValueError as e:
            raise ValueError(f"{label}: {path}: {e}") from None
        if in_row and not path.exists():  # written only once checked: a bad row leaves no file behind
            atomic_write_bytes(path, data)
        out.append(str(path.resolve()))
    marks = str(row.get(prompt_field, "")).count(IMAGE_MARK)
    if marks > 0 and marks != len(out):
        raise ValueError(f"{where}: field {prompt_field!r} has {marks} {IMAGE_MARK} marks for {len(out)} images")
    return out


def read_image_file(path: Path, root: Path | None = None) -> tuple[Path, bytes]:
    """(real path, bytes) of the regular file at `path`; with `root`, only if that file lies inside `root`.

    Every symlink, at any component, is resolved (`os.path.realpath`) before the comparison with the
    real path of `root`, so `..`, an absolute path or a symlink that leads out is refused before the file
    is opened. The file is then opened by its real path with O_NOFOLLOW (a symlink swapped in for it
    fails to open) and what was opened is checked once more (where it is, by /proc/self/fd, else that it
    is the file now at the real path), so a directory swapped for a symlink between the check and the
    open is refused too. A FIFO or device is refused without being read. Raises ValueError naming the
    path: outside `root`, not found, not a regular file, or unreadable.
    """
    real = Path(os.path.realpath(path))
    top = None if root is None else Path(os.path.realpath(root))
    if top is not None and not real.is_relative_to(top):
        raise ValueError(f"{_cut(str(path))} is outside the image root {top}")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ValueError(f"image file {_cut(str(path))!r} not found") from None
    except OSError as e:
        raise ValueError(f"cannot open image file {_cut(str(path))!r} ({e.strerror})") from None
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode):
            raise ValueError(f"{_cut(str(path))!r} is not a regular file")
        if top is not None and not _opened_inside(fd, opened, real, top):
            raise ValueError(f"{_cut(str(path))} is outside the image root {top} (it changed while it was opened)")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return real, f.read()
    finally:
        os.close(fd)


def _opened_inside(fd: int, opened: os.stat_result, real: Path, top: Path) -> bool:
    """Whether the file open as `fd` is inside `top`: by its /proc/self/fd link on Linux, else by being
    the very file (device and inode) now at `real`, which `read_image_file` checked is inside."""
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}").removesuffix(" (deleted)")).is_relative_to(top)
    except OSError:
        try:
            now = os.stat(real, follow_symlinks=False)
        except OSError:
            return False
        return (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino)


def _cut(text: str, limit: int = 160) -> str:
    """`text` cut to `limit` characters for a message (a hostile row's value may be megabytes)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
