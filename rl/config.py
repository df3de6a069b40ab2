"""The recipe of an RL run (SFT warmup included): every field typed, documented and range-checked."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from rewards.config import RewardSpec, RewardSpecs, resolve_specs
from samplers.config import SamplerConfig
from sft.config import SFTConfig
from thinkrl.config import Strict
from thinkrl.run import DataConfig, ModelConfig, RunConfig


class PartialRolloutConfig(Strict):
    """Partial rollouts (Kimi k1.5; rollout.partial, docs/partial-rollouts.md)."""

    segment_tokens: int = Field(
        0, ge=0, description="tokens one trajectory may generate per iteration; an unfinished one waits in the "
        "replay buffer and continues in the next iteration under the new weights (0: off, every response is "
        "generated whole in its iteration)")
    max_segments: int = Field(4, ge=1, description="a trajectory still unfinished after this many segments is "
                              "finished as truncated (finish_reason length)")
    loss: Literal["mask", "last_segment", "importance"] = Field(
        "mask", description="tokens of a trajectory generated under earlier weights: context only, not trained "
        "(mask, the k1.5 way; a sample that finished before its group did is then not trained at all); each "
        "sample's own last segment trained, the ones before it context (last_segment: a sample that waited for "
        "its group is trained on the segment it ended with, generated under weights up to a few iterations old); "
        "or all trained with a clipped importance weight pi_theta_i / behaviour (importance; needs "
        "rl.old_logprobs=trainer). docs/partial-rollouts.md")
    importance_clip: float = Field(2.0, gt=0, description="importance: the sample's weight is "
                                   "min(importance_clip, pi_theta_i(earlier tokens) / behaviour(earlier tokens))")


class RepeatConfig(Strict):
    """Stopping looping samples at decode time (rollout.repeat; rollout/repeat.py has the rule)."""

    enabled: bool = Field(False, description="end a sample as soon as its tail repeats: finish_reason repeat, which "
                          "the repeat reward penalises; off: loops run to max_tokens")
    max_period: int = Field(64, ge=1, le=1024, description="longest repeating unit, in tokens")
    min_repeats: int = Field(3, ge=2, le=1000, description="the unit seen this many times in a row")
    min_tokens: int = Field(24, ge=1, le=100000, description="the repeating tail spans at least this many tokens "
                            "(keeps short runs such as 1000000 or a ---- rule legal)")


class RolloutConfig(Strict):
    num_engines: int = Field(1, ge=1, description="data-parallel vLLM engines")
    tensor_parallel_size: int = Field(1, ge=1)
    gpus_per_engine: float = Field(0.0, ge=0, description="0 on CPU; tensor_parallel_size on GPU")
    cpus_per_engine: float = Field(0.0, ge=0, description="logical CPUs reserved per engine in the Ray cluster (0: "
                                   "none; on one CPU machine the engines and the trainer take turns on the cores)")
    engine_resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources reserved per engine: the label of the nodes the "
        "engines go to (`ray start --resources '{\"rollout_node\": 8}'` there), e.g. {rollout_node: 1}")
    placement: Literal["pack", "spread"] = Field(
        "pack", description="engines on as few nodes as they fit (pack) or one per node as far as possible (spread)")
    max_tokens: int = Field(160, ge=1, description="response budget per sample")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_model_len: int = Field(1024, ge=16)
    enforce_eager: bool = Field(False, description="skip torch.compile (faster start, slower decode)")
    gpu_memory_utilization: float = Field(0.15, gt=0, le=1, description="on CPU: share of RAM vLLM may reserve")
    cpu_kv_cache_gb: int = Field(1, ge=1)
    cpu_weights: Literal["packed", "plain"] = Field(
        "packed", description="on CPU, how the engines' linear layers hold their weights: packed (vLLM's oneDNN "
        "handles: fastest decode; a weight sync re-packs every layer) or plain (torch's linear on views of the "
        "trainer's shared memory: a sync is the trainer's one copy, decode is slower; docs/benchmarks.md section 3 "
        "has both). Dense float32 models; ignored on GPU")
    max_engine_restarts: int = Field(3, ge=0, description="engines that die (OOM, a crash) are restarted with the "
                                     "current weights and their step redone, this many times over the run")
    repeat: RepeatConfig = RepeatConfig()
    partial: PartialRolloutConfig = PartialRolloutConfig()

    @model_validator(mode="after")
    def _segment_below_budget(self):
        if self.partial.segment_tokens >= self.max_tokens:
            raise ValueError(f"rollout.partial.segment_tokens ({self.partial.segment_tokens}) must be below "
                             f"rollout.max_tokens ({self.max_tokens}), or 0 (off): no trajectory would ever be cut")
        return self


class RewardConfig(Strict):
    rewards: RewardSpecs = Field(
        default_factory=lambda: [RewardSpec(name="math")],
        description="weighted rewards: built-in names (math, length, format, code, repeat, reasoning_gym), entry points of "
        "group thinkrl.rewards, or module:attr paths; e.g. [math, {name: length, weight: 0.1, warmup_iterations: 10}]")
    num_workers: int = Field(2, ge=1, description="reward worker processes (beside the driver, or per host)")
    hosts: int = Field(0, ge=0, description="reward hosts: Ray actors on the cluster's nodes, each running "
                       "num_workers processes (0: the processes run beside the driver)")
    host_resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources each reward host reserves: the label of the "
        "nodes it may run on, e.g. {trainer_node: 0.01}; hosts spread over the nodes as far as they go")
    cpus_per_host: float = Field(0.0, ge=0, description="logical CPUs each reward host reserves")
    timeout_s: float = Field(10.0, gt=0, description="hard limit per reward call")
    max_consecutive_failures: int = Field(
        64, ge=1, description="a reward failing on this many samples in a row stops the run")

    @field_validator("rewards")
    @classmethod
    def _resolvable(cls, specs):
        # imports user modules and entry points now, so a typo fails before any actor starts
        resolve_specs(specs, where="reward.rewards")
        return specs


class RLConfig(Strict):
    iterations: int = Field(40, ge=0)
    prompts_per_iteration: int = Field(32, ge=1)
    samples_per_prompt: int = Field(8, ge=2, description="k; the group baseline needs >= 2")
    mini_batches: int = Field(4, ge=1, description="optimizer steps per iteration")
    max_tokens_per_micro_batch: int = Field(
        0, ge=0, description="prompt + response tokens of one micro-batch on one rank (0: a rank's share of a "
        "step in one micro-batch); micro-batches may split prompt groups (advantages are per sample)")
    lr: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    tau: float = Field(0.1, gt=0, description="KL-to-previous-iterate coefficient")
    baseline: Literal["mean", "logsumexp"] = "mean"
    log_ratio_norm: Literal["sequence", "token"] = Field("sequence", description="paper: sequence")
    reset_optimizer: bool = Field(True, description="k1.5 resets the optimizer every iteration")
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw", description="adamw: AdamW for every parameter; muon: Muon for the hidden weight matrices and AdamW "
        "for embeddings, output head, norms and biases (Moonlight, Kimi), with one lr for both (Muon's step scaled to "
        "AdamW's RMS); under muon grad_clip is not applied (`thinkrl.train_engine.build_optimizer` says why)")
    old_logprobs: Literal["trainer", "rollout"] = Field(
        "trainer", description="log pi_theta_i of the KL term: the trainer's own (exact; one no-grad pass over all "
        "but the first step) or vLLM's sampled-token log-probs (no pass; only where engine and trainer "
        "compute alike, e.g. float32 on CPU: watch sync/logprob_gap_rollout_vs_trainer)")
    drop_uniform_groups: bool = Field(
        False, description="leave prompt groups whose k rewards are all equal out of the update (under the mean "
        "baseline they carry no policy-gradient signal); counted in metrics either way")
    num_trainers: int = Field(1, ge=1, description="DeepSpeed ranks (one per GPU, or CPU processes)")
    gpus_per_trainer: float = Field(0.0, ge=0)
    cpus_per_trainer: float = Field(0.0, ge=0, description="logical CPUs reserved per trainer rank in the Ray cluster "
                                    "(0: none)")
    trainer_resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources reserved per trainer rank: the label of the nodes "
        "the trainer group goes to, e.g. {trainer_node: 1}; the ranks are packed onto as few nodes as they fit")
    zero_stage: int = Field(1, ge=0, le=3)
    gradient_checkpointing: bool = Field(
        False, description="recompute decoder activations in backward (long sequences: memory for ~1/3 more "
        "compute); also the SFT warmup's default")
    checkpoint_every: int = Field(10, ge=1)
    keep_checkpoints: int = Field(2, ge=1, description="RL checkpoints kept (the newest); older ones are deleted "
                                  "once a newer one is complete")
    probe_tolerance: float = Field(
        1e-3, gt=0, description="max increase of the mean |vLLM - trainer| probe log-prob after a sync over "
        "the gap measured on identical weights at start-up")
    samples_to_log: int = Field(4, ge=0, description="rollouts written to samples.jsonl per iteration")

    @model_validator(mode="after")
    def _groups_fill_steps(self):
        if self.prompts_per_iteration < self.mini_batches:
            raise ValueError("rl.prompts_per_iteration must be >= rl.mini_batches (each step takes whole prompt groups)")
        return self


class Long2ShortConfig(Strict):
    """The long2short stage (`thinkrl long2short`, rl.long2short): sampling from the long model, then a short fine-tune."""

    k: int = Field(8, ge=1, description="responses sampled per prompt (the recipe's rollout decoding); dpo needs >= 2")
    prompts: int = Field(512, ge=1, description="train prompts sampled from: a seeded draw of the recipe's train split")
    steps: int = Field(40, ge=1, description="optimizer steps of the fine-tune")
    batch_size: int = Field(32, ge=1, description="examples (shortest) or preference pairs (dpo) per step, all ranks")
    lr: float = Field(1e-4, gt=0, description="peak learning rate (it starts from a trained model: lower than a warmup's)")
    warmup_steps: int = Field(2, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="the cosine decay's floor, as a fraction of lr")
    beta: float = Field(0.1, gt=0, description="dpo: how far the policy may move from the starting model")
    micro_batches: int = Field(1, ge=1, description="gradient accumulation: micro-batches per step and rank")
    save_every: int = Field(20, ge=1, description="steps between resumable trainer states")
    log_every: int = Field(5, ge=1)
    chunk_size: int = Field(64, ge=1, description="prompts per resumable chunk of the sampling stage")


class EvalConfig(Strict):
    samples_per_prompt: int = Field(4, ge=1, description="accuracy = mean correctness over these samples")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(160, ge=1)
    every: int = Field(0, ge=0, description="held-out evaluation every this many RL iterations too (logged as "
                       "eval/accuracy, drawn on curves.png); 0: before and after RL only")
    test_time_budgets: list[int] = Field(
        default_factory=list, description="test-time scaling: after RL the policy is evaluated again at each of "
        "these max_tokens (report.json test_time_scaling, tts.png); [] skips it")

    @field_validator("test_time_budgets")
    @classmethod
    def _budgets(cls, budgets):
        if any(b < 1 for b in budgets):
            raise ValueError(f"every budget must be >= 1 token, got {budgets}")
        if len(set(budgets)) != len(budgets):
            raise ValueError(f"budgets repeat: {budgets}")
        return sorted(budgets)


class Recipe(Strict):
    """A whole run: `python -m rl.train recipe.yaml key=value ...`."""

    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    sft: SFTConfig = SFTConfig()
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig = RewardConfig()
    sampler: SamplerConfig = SamplerConfig()
    rl: RLConfig = RLConfig()
    eval: EvalConfig = EvalConfig()
    long2short: Long2ShortConfig = Long2ShortConfig()

    @model_validator(mode="after")
    def _budgets_fit_the_context(self):
        longest = max([self.eval.max_tokens, *self.eval.test_time_budgets])
        if longest >= self.rollout.max_model_len:
            raise ValueError(f"eval.max_tokens, eval.test_time_budgets: a budget of {longest} tokens leaves no room for "
                             f"the prompt in rollout.max_model_len ({self.rollout.max_model_len})")
        return self

    @model_validator(mode="after")
    def _importance_needs_trainer_logprobs(self):
        partial = self.rollout.partial
        if partial.segment_tokens and partial.loss == "importance" and self.rl.old_logprobs != "trainer":
            raise ValueError("rollout.partial.loss=importance weighs earlier segments by pi_theta_i / behaviour, and "
                             "pi_theta_i of those tokens comes from the trainer: set rl.old_logprobs=trainer")
        return self
