"""Difficulty levels of dataset rows: from a `difficulty` field, or binned from a measured `pass_rate`.

Two sources, one meaning (a higher level is harder):

- `difficulty`: an integer level given with the data (the arithmetic task: the number of operations).
- `pass_rate`: the share of n samples of a model that solved the row (written by `python -m rl.label`),
  binned by `PASS_RATE_BINS` into the levels 1 (easy) .. 4 (very hard).

The bins live here, in the one module both the sampler and the labelling CLI read, so a label written
by the CLI and the level a curriculum derives from its pass rate always agree. Validation is strict and
names the row: a curriculum trained on silently defaulted levels would look like it works.
"""

from __future__ import annotations

import math
from typing import Literal

# (lowest pass rate of the bin, level, label); a pass rate falls in the first bin whose lower edge it reaches
PASS_RATE_BINS: tuple[tuple[float, int, str], ...] = (
    (0.75, 1, "easy"),
    (0.50, 2, "medium"),
    (0.25, 3, "hard"),
    (0.00, 4, "very_hard"),
)

DifficultySource = Literal["auto", "difficulty", "pass_rate"]


class SamplerSetupError(ValueError):
    """A sampler that cannot start on this dataset; the message names the row and the field."""


def pass_rate_bin(pass_rate: float) -> tuple[int, str]:
    """`(level, label)` of a pass rate in [0, 1] under `PASS_RATE_BINS` (1 = easy ... 4 = very hard).

    Raises ValueError for NaN or values outside [0, 1].
    """
    if not isinstance(pass_rate, (int, float)) or isinstance(pass_rate, bool) or math.isnan(pass_rate):
        raise ValueError(f"pass rate {pass_rate!r} is not a number")
    if not 0.0 <= pass_rate <= 1.0:
        raise ValueError(f"pass rate {pass_rate!r} is outside [0, 1]")
    for lower, level, label in PASS_RATE_BINS:
        if pass_rate >= lower:
            return level, label
    raise AssertionError("unreachable: the last bin starts at 0")


def row_levels(rows: list[dict], source: DifficultySource = "auto", required: bool = False) -> list[int] | None:
    """The difficulty level of every row, or None when the rows carry none and `required` is False.

    `source="difficulty"` reads the integer `difficulty` field; `"pass_rate"` bins the `pass_rate` field
    (see `PASS_RATE_BINS`); `"auto"` uses `difficulty` if the first row has it, else `pass_rate` if the
    first row has that. Whatever the source, every row must then carry a valid value: a present but
    invalid value (NaN, out of range, not an integer) is always an error, even when levels are optional.

    Raises SamplerSetupError naming the 0-based row index and the field.
    """
    if not rows:
        raise SamplerSetupError("the training dataset is empty: a sampler needs at least one prompt")
    if source == "auto":
        first = rows[0]
        source = "difficulty" if "difficulty" in first else "pass_rate" if "pass_rate" in first else "auto"
        if source == "auto":
            for i, row in enumerate(rows):
                if "difficulty" in row or "pass_rate" in row:
                    field = "difficulty" if "difficulty" in row else "pass_rate"
                    raise SamplerSetupError(f"training row {i} has a {field!r} field but row 0 has neither "
                                            "'difficulty' nor 'pass_rate': label every row or none")
            if required:
                raise SamplerSetupError("the curriculum needs difficulty labels: training row 0 has neither a "
                                        "'difficulty' field (integer level) nor a 'pass_rate' field (label the "
                                        "dataset with `python -m rl.label`)")
            return None
    levels = []
    for i, row in enumerate(rows):
        if source not in row or row[source] is None:
            raise SamplerSetupError(f"training row {i} has no {source!r} field (row 0 has one; "
                                    "difficulty labels must cover every row)")
        value = row[source]
        if source == "difficulty":
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                else:
                    raise SamplerSetupError(f"training row {i}: field 'difficulty' must be an integer level, "
                                            f"got {value!r}")
            levels.append(value)
        else:
            try:
                levels.append(pass_rate_bin(value)[0])
            except ValueError as e:
                raise SamplerSetupError(f"training row {i}: field 'pass_rate': {e}") from None
    return levels
