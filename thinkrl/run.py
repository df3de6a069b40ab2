"""What every stage of a run (SFT warmup, RL) needs first: its directory, its model and its prompts.

The recipe sections `run`, `model` and `data` live here, with `prepare_run`, which validates the data and
builds (or finds) the model before any actor starts, so bad input fails in seconds. The SFT warmup
(`sft.train`) and RL (`rl.train`) both start from it; neither imports the other's driver.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from thinkrl.config import Strict


class RunConfig(Strict):
    output_dir: str = Field("runs/tiny", description="run directory; a second submission with it resumes")
    seed: int = Field(0, description="seed of data, sampling, initialisation")
    cache_dir: str = Field("~/.cache/thinkrl", description="where built tiny models are cached")


class ModelConfig(Strict):
    name_or_path: str = Field("tiny-dense", description="'tiny-dense', 'tiny-moe' (built offline) or a local HF folder")


class DataConfig(Strict):
    task: Literal["arithmetic", "files"] = Field("arithmetic", description="embedded task, or your JSONL files")
    train_file: str | None = Field(None, description="JSONL of RL prompts (task=files)")
    heldout_file: str | None = Field(None, description="JSONL of held-out prompts (task=files)")
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    system_prompt: str | None = None
    n_train: int = Field(3000, ge=1, description="arithmetic: RL training problems")
    n_heldout: int = Field(300, ge=1, description="arithmetic: held-out problems")
    min_ops: int = Field(1, ge=1, le=10)
    max_ops: int = Field(5, ge=1, le=10)

    @model_validator(mode="after")
    def _files_given(self):
        if self.task == "files" and not (self.train_file and self.heldout_file):
            raise ValueError("task 'files' needs data.train_file and data.heldout_file")
        if self.min_ops > self.max_ops:
            raise ValueError("data.min_ops must be <= data.max_ops")
        return self


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
    run_dir.mkdir(parents=True, exist_ok=True)
    train, heldout = load_prompts(data, run.seed, run_dir / "data")
    cache = Path(os.environ.get("THINKRL_CACHE", run.cache_dir)).expanduser()
    base_model = resolve_model(model.name_or_path, cache / "models", seed=run.seed)
    return Run(run_dir, base_model, load_tokenizer(base_model), train, heldout)


def load_prompts(data: DataConfig, seed: int, data_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train, held-out) rows with `prompt` and `answer` (a string); the arithmetic task writes its split
    to `data_dir` so a run's data can be read back."""
    from thinkrl.fileio import read_jsonl, write_jsonl
    from thinkrl.tasks import arithmetic

    if data.task == "arithmetic":
        heldout = arithmetic.make_rows(data.n_heldout, seed=seed + 1, min_ops=data.min_ops, max_ops=data.max_ops)
        train = arithmetic.make_rows(data.n_train, seed=seed, min_ops=data.min_ops, max_ops=data.max_ops,
                                     exclude={r["prompt"] for r in heldout})
        write_jsonl(data_dir / "train.jsonl", train)
        write_jsonl(data_dir / "heldout.jsonl", heldout)
        return train, heldout
    fields = (data.prompt_field, data.answer_field)
    # the row's own fields first, so a numeric "answer" field still ends up as the string rewards expect
    return tuple([{**r, "prompt": r[data.prompt_field], "answer": str(r[data.answer_field])}
                  for r in read_jsonl(path, required=fields)] for path in (data.train_file, data.heldout_file))
