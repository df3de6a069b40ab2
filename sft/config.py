"""The `sft` section of a recipe: the long-CoT warmup's data, packing, schedule, evaluation and resume.

Field names are stable: the first block is the same as the original `rl.config.SFTConfig` (so recipes
keep working); the rest are additions with defaults that keep the old behaviour where one existed.
`SFTStage` is the paper's second stage: re-warm the learning rate and train at a longer context.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from thinkrl.config import Strict
from thinkrl.run import DataConfig, ModelConfig, RunConfig


class SFTStage(Strict):
    """A further stage after the first: the learning rate re-warms to `lr` and decays to `min_lr`."""

    steps: int = Field(..., ge=1, description="optimizer steps of this stage")
    lr: float = Field(..., gt=0, description="peak learning rate after the re-warm (k1.5: 1e-5)")
    min_lr: float = Field(..., ge=0, description="floor the stage decays to (k1.5: 1e-6)")
    warmup_steps: int = Field(0, ge=0, description="linear re-warm steps")
    max_seq_len: int = Field(..., ge=8, description="longest example and packing budget of this stage")


class SFTConfig(Strict):
    """Long-CoT SFT warmup. Read once by the driver; workers get plain values."""

    # -- the original fields (rl.config.SFTConfig) --
    enabled: bool = Field(True, description="run the long-CoT SFT warmup before RL")
    data_file: str | None = Field(
        None, description="JSONL / Parquet file or `datasets` folder of {'messages': [...]}; "
        "default: the embedded task's teacher (arithmetic, shapes) through the dataset builder")
    n_examples: int = Field(6000, ge=1, description="embedded task's teacher: conversations to write")
    slip_rate: float = Field(0.15, ge=0, le=1, description="embedded task's teacher: chance a step (arithmetic) or "
                             "a quadrant's count (shapes) slips by one")
    fix_rate: float = Field(0.5, ge=0, le=1, description="embedded task's teacher: chance a slip is caught")
    recheck_rate: float = Field(0.0, ge=0, le=1, description="arithmetic teacher: chance a trace re-checks its whole "
                                "chain after the final check ('Wait, let me re-check: ...'); 0: never (off)")
    recheck_repeat: float = Field(0.0, ge=0, le=1, description="arithmetic teacher: chance each re-check is followed "
                                  "by another, so the count is geometric: a heavy tail of trace lengths")
    max_rechecks: int = Field(8, ge=1, le=100, description="arithmetic teacher: most re-checks in one trace")
    teacher_mode: Literal["plain", "overthinking"] = Field(
        "plain", description="arithmetic teacher: overthinking verifies steps, works the chain again and re-checks "
        "it more than needed (thinkrl.tasks.arithmetic.OVERTHINKING: ~2.4x the plain traces' length), the verbose "
        "start long2short methods shorten; the recheck_* keys then stay at 0")
    steps: int = Field(400, ge=1, description="optimizer steps of the first stage")
    batch_size: int = Field(32, ge=1, description="examples per optimizer step (all ranks together)")
    lr: float = Field(3e-3, gt=0, description="peak learning rate of the first stage")
    warmup_steps: int = Field(20, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="decay floor as a fraction of lr")
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    max_seq_len: int = Field(512, ge=8, description="longest example (tokens) and packing budget")
    log_every: int = Field(25, ge=1)

    # -- additions (issue 5) --
    messages_field: str = Field("messages", description="row field holding the ChatML message list")
    image_field: str = Field("images", description="row field holding a conversation's images (paths relative to the "
                             "data file, or absolute); `<image>` in a user turn marks where each goes")
    bad_rows: Literal["reject", "skip"] = Field(
        "reject", description="rows with no assistant turn, empty content or too many tokens: "
        "reject fails naming the first; skip drops them (each reported by index, counted)")
    packing: bool = Field(True, description="avoid padding (sft.packing_layout says how); false: each step padded "
                          "to its longest example")
    packing_layout: Literal["auto", "rows", "buckets"] = Field(
        "auto", description="rows: several examples per row, attention kept inside each (block-diagonal mask; "
        "varlen kernels on flash-attention); buckets: one example per row, length-sorted runs padded to their "
        "own longest, one forward each; auto: rows under ZeRO-3, buckets otherwise (SDPA, CPU: 1.17x faster)")
    micro_batches: int = Field(1, ge=1, description="gradient accumulation: micro-batches per step and rank")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after warmup")
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw", description="adamw: AdamW for every parameter; muon: Muon for the hidden weight matrices and AdamW "
        "for embeddings, output head, norms and biases (Moonlight, Kimi), with one lr for both (Muon's step scaled to "
        "AdamW's RMS); under muon grad_clip is not applied (`thinkrl.train_engine.build_optimizer` says why)")
    second_stage: SFTStage | None = Field(None, description="re-warm and train at a longer context")
    eval_fraction: float = Field(0.02, ge=0, lt=1, description="held-out share of the data for eval loss")
    eval_file: str | None = Field(None, description="held-out conversations (instead of eval_fraction)")
    eval_every: int = Field(100, ge=1, description="steps between held-out loss evaluations")
    eval_max_examples: int = Field(256, ge=1, description="cap on held-out examples per evaluation")
    save_every: int = Field(100, ge=1, description="steps between resumable DeepSpeed checkpoints")
    zero_stage: int | None = Field(None, ge=0, le=3, description="ZeRO stage; default: rl.zero_stage")
    gradient_checkpointing: bool | None = Field(
        None, description="recompute activations in backward; default: rl.gradient_checkpointing")

    @model_validator(mode="after")
    def _one_source_of_rechecks(self):
        if self.teacher_mode == "overthinking" and self.recheck_rate:
            raise ValueError("sft.teacher_mode overthinking sets its own re-checks: leave sft.recheck_rate at 0")
        return self

    @property
    def rechecks(self):
        """The arithmetic teacher's habits this config asks for (`thinkrl.tasks.arithmetic.Rechecks`)."""
        from thinkrl.tasks.arithmetic import OVERTHINKING, Rechecks

        if self.teacher_mode == "overthinking":
            return OVERTHINKING
        return Rechecks(self.recheck_rate, self.recheck_repeat, self.max_rechecks)

    @model_validator(mode="after")
    def _stages(self):
        if self.second_stage and self.second_stage.max_seq_len < self.max_seq_len:
            raise ValueError("sft.second_stage.max_seq_len must be >= sft.max_seq_len (the longer context)")
        return self

    @property
    def total_steps(self) -> int:
        return self.steps + (self.second_stage.steps if self.second_stage else 0)


class TrainerResources(BaseModel):
    """The trainer group's shape, from the recipe's `rl` section: the warmup runs on the same group as RL.

    Only these keys of `rl` are read here (the rest is the RL run's, validated by `rl.config.Recipe`).
    """

    model_config = ConfigDict(extra="ignore")

    num_trainers: int = Field(1, ge=1)
    gpus_per_trainer: float = Field(0.0, ge=0)
    cpus_per_trainer: float = Field(0.0, ge=0)
    trainer_resources: dict[str, float] = Field(default_factory=dict)
    zero_stage: int = Field(1, ge=0, le=3)
    gradient_checkpointing: bool = False


class SFTRecipe(Strict):
    """What `python -m sft.train recipe.yaml` reads of a recipe: run, model, data, sft and the trainer group.

    The RL sections (rollout, reward, sampler, eval, the rest of rl) belong to the RL run: accepted here
    unread, so one recipe serves both commands.
    """

    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    sft: SFTConfig = SFTConfig()
    rl: TrainerResources = TrainerResources()
    rollout: dict = {}
    reward: dict = {}
    sampler: dict = {}
    eval: dict = {}
    long2short: dict = {}
