"""What every stage of a run (SFT warmup, RL) needs first: its directory, its model and its prompts.

The recipe sections `run`, `model` and `data` live here, with `prepare_run`, which validates the data and
builds (or finds) the model before any actor starts, so bad input fails in seconds. The SFT warmup
(`sft.train`) and RL (`rl.train`) both start from it; neither imports the other's driver.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from thinkrl.config import Strict


class RunConfig(Strict):
    output_dir: str = Field("runs/tiny", description="run directory; a second submission with it resumes")
    seed: int = Field(0, description="seed of data, sampling, initialisation")
    cache_dir: str = Field("~/.cache/thinkrl", description="where built tiny models are cached")


class ModelConfig(Strict):
    name_or_path: str = Field("tiny-dense", description="'tiny-dense', 'tiny-moe', 'tiny-vl' (a Kimi-VL; built "
                              "offline) or a local HF folder")
    freeze_vision_tower: bool = Field(False, description="a vision-language model: train the projector and the "
                                      "language model only (SFT and RL)")

    @property
    def frozen(self) -> tuple[str, ...]:
        """Parameter-name prefixes the trainers leave as they are."""
        return ("vision_tower.",) if self.freeze_vision_tower else ()


class ReasoningGymDataset(Strict):
    """One reasoning-gym task of the mix (`thinkrl.tasks.reasoning_gym`): checked against the installed
    reasoning-gym when the recipe loads (name, levels, config), so a typo fails before anything starts."""

    name: str = Field(description="the task, e.g. chain_sum, letter_counting (reasoning_gym.factory.DATASETS)")
    weight: float = Field(1.0, gt=0, description="its share of the rows, relative to the other tasks' weights")
    config: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the task's dataset "
                                   "(e.g. {min_digits: 1, max_digits: 1}); applied over each level's config")
    levels: list[int] = Field(default_factory=list, description="curriculum levels of the task, rows spread evenly "
                              "over them; a row's difficulty is its level (the curriculum sampler's order); "
                              "empty: config alone, difficulty 0")

    @model_validator(mode="after")
    def _exists(self):
        from thinkrl.tasks.reasoning_gym import check_spec

        if any(level < 0 for level in self.levels):
            raise ValueError(f"{self.name}: levels must be >= 0, got {self.levels}")
        try:
            check_spec(self.spec())
        except ImportError as e:
            raise ValueError(str(e)) from None
        return self

    def spec(self):
        from thinkrl.tasks.reasoning_gym import DatasetSpec

        return DatasetSpec(self.name, self.weight, dict(self.config), tuple(self.levels))


class ReasoningGymData(Strict):
    datasets: list[ReasoningGymDataset] = Field(default_factory=list, description="the tasks of the mix")


class DataConfig(Strict):
    task: Literal["arithmetic", "shapes", "reasoning_gym", "files"] = Field(
        "arithmetic", description="embedded text task (arithmetic), embedded visual task (shapes: count the "
        "squares of a colour in 56 px images), tasks of reasoning-gym (the extra thinkrl[tasks]), or your files")
    reasoning_gym: ReasoningGymData = Field(
        default_factory=ReasoningGymData, description="task=reasoning_gym: datasets [{name, weight, config, levels}]")
    train_file: str | None = Field(None, description="JSONL / Parquet / `datasets` folder of RL prompts (task=files)")
    heldout_file: str | None = Field(None, description="held-out prompts, same formats (task=files)")
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    image_field: str = Field(
        "images", description="task=files: a row's images (one path or a list; relative to the data file or "
        "absolute; `datasets` Image cells too). `<image>` in the prompt marks where each goes, else they come first")
    system_prompt: str | None = None
    n_train: int = Field(3000, ge=1, description="embedded tasks and reasoning_gym: RL training problems")
    n_heldout: int = Field(300, ge=1, description="embedded tasks and reasoning_gym: held-out problems")
    min_ops: int = Field(1, ge=1, le=10)
    max_ops: int = Field(5, ge=1, le=10)
    long_share: float = Field(0.0, ge=0, le=1, description="arithmetic: share of problems drawn with long_min_ops.."
                              "long_max_ops operations instead (a long tail of problem lengths: recipes/tiny-longtail.yaml)")
    long_min_ops: int = Field(12, ge=1, le=40)
    long_max_ops: int = Field(24, ge=1, le=40)
    min_count: int = Field(1, ge=1, le=8, description="shapes: fewest squares to count")
    max_count: int = Field(6, ge=1, le=8, description="shapes: most squares to count")
    max_distractors: int = Field(0, ge=0, le=6, description="shapes: up to this many squares of other colours")

    @model_validator(mode="after")
    def _files_given(self):
        if self.task == "files" and not (self.train_file and self.heldout_file):
            raise ValueError("task 'files' needs data.train_file and data.heldout_file")
        if self.task == "reasoning_gym" and not self.reasoning_gym.datasets:
            raise ValueError("task 'reasoning_gym' needs data.reasoning_gym.datasets, e.g. [{name: chain_sum}]")
        if self.min_ops > self.max_ops:
            raise ValueError("data.min_ops must be <= data.max_ops")
        if self.long_min_ops > self.long_max_ops:
            raise ValueError("data.long_min_ops must be <= data.long_max_ops")
        if self.min_count > self.max_count:
            raise ValueError("data.min_count must be <= data.max_count")
        return self

    def long_problems(self):
        """The arithmetic task's share of long problems (`thinkrl.tasks.arithmetic.LongProblems`)."""
        from thinkrl.tasks.arithmetic import LongProblems

        return LongProblems(self.long_share, self.long_min_ops, self.long_max_ops)


@dataclass
class Run:
    """What `prepare_run` resolved: the directory, the starting model, validated prompts."""

    dir: Path
    base_model: Path
    tokenizer: object
    train_rows: list[dict]
    heldout_rows: list[dict]


def prepare_run(run: RunConfig, model: ModelConfig, data: DataConfig) -> Run:
    """Create the run directory, load (or generate) the prompts, build or resolve the model."""
    from thinkrl.models import load_tokenizer, resolve_model

    run_dir = Path(run.output_dir).expanduser().resolve()
    # the prompts first: a bad data file leaves no run directory behind (a row's image bytes, written
    # whole under data/images before a later row fails, are the only files it can leave)
    train, heldout = load_prompts(data, run.seed, run_dir / "data")
    run_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(os.environ.get("THINKRL_CACHE", run.cache_dir)).expanduser()
    base_model = resolve_model(model.name_or_path, cache / "models", seed=run.seed)
    return Run(run_dir, base_model, load_tokenizer(base_model), train, heldout)


def load_prompts(data: DataConfig, seed: int, data_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train, held-out) rows with `prompt`, `answer` (a string) and `images` (absolute paths, checked to
    decode; [] for text rows). The embedded tasks write their split to `data_dir` so a run's data can be
    read back. Raises DataError naming the file, row and field of the first bad row."""
    from thinkrl.fileio import write_jsonl
    from thinkrl.tasks import arithmetic, shapes

    if data.task in ("arithmetic", "shapes", "reasoning_gym"):
        if data.task == "reasoning_gym":
            from thinkrl.tasks import reasoning_gym

            specs = [d.spec() for d in data.reasoning_gym.datasets]
            heldout = reasoning_gym.make_rows(specs, data.n_heldout, seed, "heldout")
            train = reasoning_gym.make_rows(specs, data.n_train, seed, "train", exclude={r["prompt"] for r in heldout})
        elif data.task == "arithmetic":
            ranges = dict(min_ops=data.min_ops, max_ops=data.max_ops, long=data.long_problems())
            heldout = arithmetic.make_rows(data.n_heldout, seed=seed + 1, **ranges)
            train = arithmetic.make_rows(data.n_train, seed=seed, exclude={r["prompt"] for r in heldout}, **ranges)
        else:
            ranges = dict(image_dir=data_dir / "images", min_count=data.min_count, max_count=data.max_count,
                          max_distractors=data.max_distractors)
            heldout = shapes.make_rows(data.n_heldout, seed=seed + 1, **ranges)
            train = shapes.make_rows(data.n_train, seed=seed, exclude={shapes.row_key(r) for r in heldout}, **ranges)
        write_jsonl(data_dir / "train.jsonl", train)
        write_jsonl(data_dir / "heldout.jsonl", heldout)
        return [{"images": [], **r} for r in train], [{"images": [], **r} for r in heldout]
    return tuple(_file_rows(data, Path(path), data_dir / "images") for path in (data.train_file, data.heldout_file))


def _file_rows(data: DataConfig, path: Path, image_dir: Path) -> list[dict]:
    from thinkrl.fileio import DataError, load_rows_numbered, text_problem
    from thinkrl.vl.inputs import resolve_images

    fields = (data.prompt_field, data.answer_field)
    out = []
    for index, row in load_rows_numbered(path):
        if missing := [k for k in fields if row.get(k) is None or str(row[k]).strip() == ""]:
            raise DataError(f"{path}:{index}: missing or empty field {', '.join(map(repr, missing))}")
        prompt, answer = row[data.prompt_field], row[data.answer_field]
        if problem := text_problem(prompt):
            raise DataError(f"{path}:{index}: field {data.prompt_field!r}: {problem}")
        if not _is_answer(answer):
            raise DataError(f"{path}:{index}: field {data.answer_field!r}: expected a string or a finite number, got "
                            f"{type(answer).__name__} {str(answer)[:40]}")
        try:
            images = resolve_images(row, data.image_field, path.parent, f"{path}:{index}", data.prompt_field, image_dir)
        except ValueError as e:
            raise DataError(str(e)) from None
        # the row's own fields first, so a numeric "answer" field still ends up as the string rewards expect
        out.append({**row, "prompt": row[data.prompt_field], "answer": str(row[data.answer_field]), "images": images})
    return out


def _is_answer(value) -> bool:
    """A gold answer: a string, or a finite number (an int or a float, not a boolean, NaN or infinity)."""
    from thinkrl.fileio import text_problem

    if isinstance(value, bool):
        return False
    if isinstance(value, str):
        return text_problem(value) is None
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
