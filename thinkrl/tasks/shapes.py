"""The embedded visual task: count the squares of one colour in a tiny image, with a long-CoT teacher.

A problem is a 56x56 RGB image (drawn offline with PIL) on a plain white or light-gray background,
holding a few filled axis-aligned squares (6-12 px) in clearly distinct colours, and the question
"<image>\\nHow many red squares are there?". Squares of the other colours are distractors. The
difficulty is the number of target squares (the answer), `min_count..max_count`.

The layout is shaped by the model that learns it: a tiny Kimi-VL cuts the image into 14 px patches and
merges them 2x2, so the language model sees one token per 28x28 cell, which at 56 px are the four
quadrants. Each square lies inside its own 14 px patch, 1 px off the patch's edges (so no two touch and
none crosses a token or quadrant line): a patch holds a square or background, which a 1M-parameter
vision tower learns to tell in a few hundred steps, while squares anywhere in a 28 px cell it does not
(DESIGN.md, "Vision-language"). The image `size` may be any multiple of 28 (more cells, still four
quadrants).

The teacher reads the image itself, with perfect vision: it decodes the PNG (a path, bytes or a data
URL, as the dataset builder passes it), finds each colour's connected components and counts them per
quadrant. It then writes the moves the Kimi reports name, short enough for a byte-level tiny model
(~140 characters): a glance at the whole image ("Glance: 5."), a plan, a scan of the quadrants in a
fixed order (TL, TR, BL, BR) with a running sum, a "Wait, ..." reflection when it catches a slip, a
re-check of the sum, and `\\boxed{}` after `</think>`. The glance comes first because it is what a
2-layer language model learns to read from the image tokens: one number right after the prompt, all
four tokens alike (measured: the glance is read from the image after 300 warmup steps, the quadrant
counts in the middle of the scan are not). Like `thinkrl.tasks.arithmetic`, the teacher is imperfect on
purpose: each quadrant's count slips by one (never below 0) with probability `slip_rate`, and a share
`fix_rate` of slips is caught; uncaught slips carry into the answer (the scan's sum), which RL with a
correctness reward then has to unlearn, e.g. by keeping the scan consistent with the glance.

Train and held-out sets are drawn with different seeds; pass the held-out keys as `exclude` so that no
image layout is in both: `make_rows(..., exclude={row_key(r) for r in held_out})`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rewards.atomic import atomic_write_bytes

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}
BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((255, 255, 255), (232, 232, 232))
QUADRANTS = ("TL", "TR", "BL", "BR")  # the scan order: top-left, top-right, bottom-left, bottom-right
PATCH_PX = 14  # one vision patch of a tiny Kimi-VL; a square lies inside one
TOKEN_PX = 28  # one image token: patches merged 2x2
MIN_SIDE, MAX_SIDE = 6, 12
MARGIN = 1  # px between a square and its patch's edges
GAP = 2 * MARGIN  # px between two squares, at least
COLOUR_TOLERANCE = 48  # max per-channel distance of a pixel to a palette colour that still counts as it
_QUESTION = re.compile(r"How many (\w+) squares")


@dataclass(frozen=True)
class Square:
    """A filled square: top-left corner (`x`, `y`) and `side`, in pixels."""

    colour: str
    x: int
    y: int
    side: int


@dataclass(frozen=True)
class Problem:
    """One image layout and the colour asked about. `squares` are sorted by (y, x)."""

    size: int
    background: tuple[int, int, int]
    squares: tuple[Square, ...]
    colour: str

    @property
    def question(self) -> str:
        return f"<image>\nHow many {self.colour} squares are there?"

    @property
    def answer(self) -> int:
        return sum(s.colour == self.colour for s in self.squares)

    @property
    def difficulty(self) -> int:
        return self.answer

    @property
    def counts(self) -> tuple[int, int, int, int]:
        """Target squares per quadrant, in `QUADRANTS` order."""
        return quadrant_counts(self.squares, self.colour, self.size)

    @property
    def key(self) -> str:
        """The layout's canonical name (size, background, squares; not the colour asked): the PNG's stem."""
        text = f"{self.size}|{self.background}|" + ";".join(f"{s.colour},{s.x},{s.y},{s.side}" for s in self.squares)
        return "shapes-" + hashlib.sha1(text.encode()).hexdigest()[:16]

    def png(self) -> bytes:
        from PIL import Image, ImageDraw

        image = Image.new("RGB", (self.size, self.size), self.background)
        draw = ImageDraw.Draw(image)
        for s in self.squares:
            draw.rectangle((s.x, s.y, s.x + s.side - 1, s.y + s.side - 1), fill=COLOURS[s.colour])
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()


def quadrant_counts(squares, colour: str, size: int) -> tuple[int, int, int, int]:
    """How many `colour` squares lie in each quadrant of a `size` px image, in `QUADRANTS` order."""
    counts = [0, 0, 0, 0]
    half = size / 2
    for s in squares:
        if s.colour == colour:
            counts[2 * (s.y >= half) + (s.x >= half)] += 1
    return counts[0], counts[1], counts[2], counts[3]


# ---- generation -----------------------------------------------------------------------------------------


def _cells(size: int) -> list[tuple[int, int]]:
    """The top-left corners of the 14 px patches of a `size` px image: the spots a square may take."""
    return [(x, y) for y in range(0, size, PATCH_PX) for x in range(0, size, PATCH_PX)]


def _apart(a: Square, b: Square) -> bool:
    return (a.x >= b.x + b.side + GAP or b.x >= a.x + a.side + GAP
            or a.y >= b.y + b.side + GAP or b.y >= a.y + a.side + GAP)


def _place(rng: random.Random, colours: list[str], size: int) -> tuple[Square, ...]:
    """Squares of the given colours, each in its own random patch, at a random size and offset."""
    placed = []
    for colour, (x0, y0) in zip(colours, rng.sample(_cells(size), len(colours)), strict=True):
        side = rng.randint(MIN_SIDE, MAX_SIDE)
        placed.append(Square(colour, rng.randint(x0 + MARGIN, x0 + PATCH_PX - MARGIN - side),
                             rng.randint(y0 + MARGIN, y0 + PATCH_PX - MARGIN - side), side))
    return tuple(sorted(placed, key=lambda s: (s.y, s.x)))


def sample_problem(rng: random.Random, count: int, distractors: int, size: int = 56) -> Problem:
    """A random layout with `count` squares of the asked colour and `distractors` of other colours.

    Raises ValueError if that many squares do not fit in the image.
    """
    if count + distractors > len(_cells(size)):
        raise ValueError(f"cannot place {count + distractors} squares in a {size}x{size} image: one per "
                         f"{PATCH_PX} px patch, {len(_cells(size))} patches")
    colour = rng.choice(sorted(COLOURS))
    others = sorted(set(COLOURS) - {colour})
    colours = [colour] * count + [rng.choice(others) for _ in range(distractors)]
    background = rng.choice(BACKGROUNDS)
    return Problem(size, background, _place(rng, colours, size), colour)


def make_rows(n: int, seed: int, image_dir: str | Path, min_count: int = 1, max_count: int = 6,
              exclude: set[str] | None = None, min_distractors: int = 0, max_distractors: int = 4,
              size: int = 56) -> list[dict]:
    """`n` distinct problems as dataset rows: `id`, `prompt`, `answer`, `difficulty`, `images`.

    `images` holds one absolute path to the problem's PNG in `image_dir` (created if missing), named by
    the layout's key (`row_key`): the same layout always gets the same file, an existing one is reused,
    a new one is written atomically. No two rows share a layout, nor any row a layout whose key is in
    `exclude` (a set of `row_key` values). The count of target squares is uniform in
    `min_count..max_count`, of distractors in `min_distractors..max_distractors`. Deterministic given
    `seed`. Raises ValueError for a bad range or `size` (a multiple of 28), or if the layouts run out.
    """
    if size < TOKEN_PX or size % TOKEN_PX:
        raise ValueError(f"size must be a positive multiple of {TOKEN_PX} (one image token), got {size}")
    if not 0 <= min_count <= max_count or not 0 <= min_distractors <= max_distractors:
        raise ValueError(f"bad ranges: count {min_count}..{max_count}, distractors {min_distractors}..{max_distractors}")
    directory = Path(image_dir).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    seen = set(exclude or ())
    rows = []
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct layouts with {min_count}..{max_count} target squares")
        problem = sample_problem(rng, rng.randint(min_count, max_count),
                                 rng.randint(min_distractors, max_distractors), size)
        if problem.key in seen:
            continue
        seen.add(problem.key)
        path = directory / f"{problem.key}.png"
        if not path.exists():
            atomic_write_bytes(path, problem.png())  # an existing file is trusted and reused
        rows.append(
            {
                "id": f"shapes-{seed}-{len(rows)}",
                "prompt": problem.question,
                "answer": str(problem.answer),
                "difficulty": problem.difficulty,
                "images": [str(path)],
            }
        )
    return rows


def row_key(row: dict) -> str:
    """The layout key of a `make_rows` row (its image's file stem): what `exclude` takes."""
    return Path(row["images"][0]).stem


# ---- the teacher's vision -------------------------------------------------------------------------------


def parse_colour(question: str) -> str:
    """The colour a shapes question asks about ("How many red squares ..." -> "red")."""
    match = _QUESTION.search(question)
    if match is None or match.group(1) not in COLOURS:
        raise ValueError(f"not a shapes question (expected 'How many <{'|'.join(COLOURS)}> squares'): {question!r}")
    return match.group(1)


def _pixels(image: bytes | str | Path) -> np.ndarray:
    """An image as an (H, W, 3) int array: PNG bytes, a `data:` URL or a local path."""
    from PIL import Image

    if isinstance(image, str) and image.startswith("data:"):
        image = base64.b64decode(image.split(",", 1)[1])
    elif isinstance(image, str) and image.startswith(("http://", "https://")):
        raise ValueError(f"remote images are not fetched; pass a local path or a data URL: {image[:80]}")
    source = io.BytesIO(image) if isinstance(image, bytes) else image
    with Image.open(source) as decoded:
        return np.asarray(decoded.convert("RGB"), dtype=np.int16)


def _components(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Bounding boxes (x0, y0, x1, y1), inclusive, of the 4-connected components of a boolean mask."""
    todo = set(zip(*(a.tolist() for a in np.nonzero(mask)), strict=True))
    boxes = []
    while todo:
        stack = [todo.pop()]
        ys, xs = [], []
        while stack:
            y, x = stack.pop()
            ys.append(y)
            xs.append(x)
            for neighbour in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if neighbour in todo:
                    todo.remove(neighbour)
                    stack.append(neighbour)
        boxes.append((min(xs), min(ys), max(xs), max(ys)))
    return boxes


def _squares_in(pixels: np.ndarray) -> list[Square]:
    squares = []
    for colour, rgb in COLOURS.items():
        mask = np.abs(pixels - np.array(rgb)).max(axis=2) <= COLOUR_TOLERANCE
        for x0, y0, x1, y1 in _components(mask):
            squares.append(Square(colour, x0, y0, max(x1 - x0, y1 - y0) + 1))
    return sorted(squares, key=lambda s: (s.y, s.x))


def find_squares(image: bytes | str | Path) -> list[Square]:
    """The coloured shapes of an image (PNG bytes, data URL or path), sorted by (y, x).

    Every connected component of a palette colour counts as one square (its bounding box's top-left
    and longer side), which is exact for the images `make_rows` draws.
    """
    return _squares_in(_pixels(image))


def solve_image(image: bytes | str | Path, colour: str) -> tuple[int, int, int, int]:
    """How many `colour` squares the image (PNG bytes, data URL or path) holds per quadrant, `QUADRANTS` order."""
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; one of {sorted(COLOURS)}")
    pixels = _pixels(image)
    height, width = pixels.shape[:2]
    if height != width:
        raise ValueError(f"the image is {width}x{height}; shapes images are square")
    return quadrant_counts(_squares_in(pixels), colour, width)


# ---- the teacher's writing ------------------------------------------------------------------------------


def teacher_solution(counts: tuple[int, ...], colour: str, rng: random.Random, slip_rate: float = 0.15,
                     fix_rate: float = 0.5) -> str:
    """A worked long-CoT solution (the assistant message content) from the per-quadrant `counts`.

    The glance (the true total) comes first, then the scan. Each quadrant's count slips by +-1 (+1
    from 0) with probability `slip_rate`; a slip is caught by a "Wait," line and corrected with
    probability `fix_rate`, otherwise the wrong count carries on into the sum and the answer.

    >>> print(teacher_solution((2, 0, 1, 3), "red", random.Random(0), slip_rate=0.0))
    <think>Glance: 6.
    Plan: count red in TL,TR,BL,BR.
    TL 2, sum 2
    TR 0, sum 2
    BL 1, sum 3
    BR 3, sum 6
    Check: 2+0+1+3=6.</think>\\boxed{6}
    """
    lines = [f"Glance: {sum(counts)}.", f"Plan: count {colour} in {','.join(QUADRANTS)}."]
    read: list[int] = []
    total = 0
    for name, count in zip(QUADRANTS, counts, strict=True):
        if rng.random() < slip_rate:
            wrong = count + 1 if count == 0 else count + rng.choice((-1, 1))
            lines.append(f"{name} {wrong}, sum {total + wrong}")
            if rng.random() < fix_rate:
                lines.append(f"Wait, {name} {count}, sum {total + count}.")
            else:
                count = wrong
        else:
            lines.append(f"{name} {count}, sum {total + count}")
        read.append(count)
        total += count
    lines.append(f"Check: {'+'.join(map(str, read))}={total}.")
    return "<think>" + "\n".join(lines) + "</think>\\boxed{" + str(total) + "}"


class ShapesTeacher:
    """The programmatic teacher of this task, behind `sft.build_cot.Teacher`.

    Reads the colour from `messages[-1]["raw_question"]` and the image from the first image part of the
    last message (a data URL, as `sft.build_cot` builds it, or a local path); raises ValueError naming
    the prompt if it has none.
    """

    def __init__(self, slip_rate: float = 0.15, fix_rate: float = 0.5) -> None:
        self.slip_rate, self.fix_rate = slip_rate, fix_rate

    def sample(self, prompts: list[list[dict]], k: int, seed: int) -> list[list[str]]:
        out = []
        for p, messages in enumerate(prompts):
            colour = parse_colour(messages[-1]["raw_question"])
            counts = solve_image(_image_ref(messages[-1]["content"], p), colour)
            rng = random.Random(f"{seed}-{p}")
            out.append([teacher_solution(counts, colour, rng, self.slip_rate, self.fix_rate) for _ in range(k)])
        return out


def _image_ref(content: str | list[dict], prompt_index: int) -> str:
    parts = [] if isinstance(content, str) else [c for c in content if c.get("type") == "image_url"]
    if not parts:
        raise ValueError(f"prompt {prompt_index}: no image part in the user message; the shapes teacher reads "
                         "the image (build the questions with --image-field)")
    return parts[0]["image_url"]["url"]
