"""The two RL loops the throughput and learning benchmarks compare, each stepped one iteration at a time.

`ThinkrlLoop` drives thinkrl's real pieces exactly as `rl.train.rl_loop` does (the vLLM `RolloutEngine`
actor, the DeepSpeed `PMDWorker`, the `RewardSet`, weight sync and probe), by calling
`rl.loop.run_iteration`, so every stage time is the driver's own.

`TrlLoop` is TRL's `GRPOTrainer` on the same model, prompts (same chat template), k, max tokens, learning
rate and optimizer steps per iteration (`steps_per_generation` = thinkrl's `rl.mini_batches`, all of one
iteration's P*k completions generated in one batch), rewarded by thinkrl's `math_reward`. `trainer.train()`
runs in a background thread that a callback parks at every iteration boundary, so the benchmark can
interleave one TRL iteration with one thinkrl iteration in the same process and minute (the machine's
drift then hits both alike). While parked, TRL uses no CPU.

Trade-off: TRL's reward runs in-process and sequentially (its design); thinkrl's in a 2-process pool.
Both count response tokens the same way (sampled tokens up to and including the end-of-turn token).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any


def _number(value: float, default: float = 0.0) -> float:
    return default if value != value else value  # NaN: no trainer call this iteration


class ThinkrlLoop:
    """thinkrl's PMD loop on `model_path`, one `run_iteration` per call of `iteration()`."""

    def __init__(self, recipe, run, model_path: Path, heldout_n: int, log=print) -> None:

        from rewards.combine import RewardSet
        from rl.setup import build_loop, heldout_prompts, start_actors

        self.recipe, self.run, self.log = recipe, run, log
        self.trainers, self.engines = start_actors(recipe, model_path, None, run.dir)
        rc = recipe.reward
        self.pool = RewardSet(rc.rewards, rc.num_workers, rc.timeout_s, rc.max_consecutive_failures)
        self.heldout_rows = run.heldout_rows[:heldout_n]
        self.heldout_prompts = heldout_prompts(recipe, run)[:heldout_n]
        self.loop = build_loop(recipe, run, self.trainers, self.engines, self.pool, {})
        self.done = 0

    def iteration(self) -> dict[str, Any]:
        """One PMD iteration; returns response tokens, wall seconds, tokens/s and the stage times."""
        from rl.loop import run_iteration

        self.done += 1
        start = time.perf_counter()
        record = run_iteration(self.loop, self.done)
        wall = time.perf_counter() - start
        tokens = record["rollout/tokens_generated"]
        stages = {k.split("/", 1)[1]: v for k, v in record.items() if k.startswith("time/") and k != "time/iteration"}
        # time/update (the driver's wall time) = shipping samples and stats through Ray + the trainer's own
        # update call, which includes the recompute of log pi_theta_i (time/update_logprobs)
        update = stages.pop("update")
        logprobs = _number(stages.pop("update_logprobs", 0.0))
        in_trainer = _number(stages.pop("update_in_trainer", update), update)
        stages.update(logprobs=logprobs, update=in_trainer - logprobs, update_shipping=update - in_trainer)
        stages["overhead"] = wall - sum(stages.values())
        return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "stages_s": stages,
                "reward_mean": record["train/reward_mean"], "response_tokens_max": record["train/response_tokens_max"],
                "update_stats": {k: v for k, v in record.items() if k.startswith("losses/")}}

    def evaluate(self, seed: int = 10**6) -> dict:
        """Held-out accuracy of the engine's current weights (rl.generation.evaluate on the first heldout_n)."""
        from rl.generation import evaluate
        from rollout.engine import RolloutSettings

        ev = self.recipe.eval
        settings = RolloutSettings(n=ev.samples_per_prompt, temperature=ev.temperature, top_p=ev.top_p,
                                   max_tokens=ev.max_tokens, seed=seed)
        return evaluate(self.engines, self.pool, self.heldout_prompts, self.heldout_rows, settings,
                        iteration=self.recipe.rl.iterations)

    def evaluate_weights(self, state_dict: dict, seed: int = 10**6) -> dict:
        """Held-out accuracy of foreign weights (TRL's), through the same engine; thinkrl's are restored."""
        import ray

        from rl.sync import sync_weights
        from thinkrl.arena import PublishedWeights
        from thinkrl.train_engine import WeightBucket

        bucket = ray.put(WeightBucket.pack({k: v.detach() for k, v in state_dict.items()}))
        ray.get([e.load_weights.remote(PublishedWeights(node="", arena=None, refs=[bucket])) for e in self.engines])
        del bucket
        result = self.evaluate(seed)
        sync_weights(self.trainers, self.engines)
        return result

    def close(self) -> None:
        import ray

        self.pool.close()
        for actor in [*self.trainers, *self.engines]:
            ray.kill(actor)


class TrlLoop:
    """TRL GRPOTrainer (HF generate, or its vLLM mode) parked between iterations in a background thread."""

    def __init__(self, recipe, run, model_path: Path, out_dir: Path, iterations: int, use_vllm: bool = False) -> None:
        import os

        from datasets import Dataset
        from transformers import AutoModelForCausalLM, TrainerCallback
        from trl import GRPOConfig, GRPOTrainer

        from rewards.math import math_reward
        from thinkrl.models import load_tokenizer

        rl, ro = recipe.rl, recipe.rollout
        self.samples = rl.prompts_per_iteration * rl.samples_per_prompt
        self.steps_per_iteration = rl.mini_batches
        self._lengths: list[int] = []
        self._logs: list[dict] = []
        self._go, self._parked = threading.Event(), threading.Event()
        self._stop = False
        self.error: BaseException | None = None
        loop = self

        def reward(completions, answer, completion_ids, **_):
            loop._lengths.extend(len(ids) for ids in completion_ids)
            return [math_reward(c[0]["content"] if isinstance(c, list) else c, a).score
                    for c, a in zip(completions, answer, strict=True)]

        class Park(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                loop._wait()

            def on_step_end(self, args, state, control, **kw):
                if state.global_step % loop.steps_per_iteration == 0:
                    loop._parked.set()
                    loop._wait()
                    if loop._stop:
                        control.should_training_stop = True

            def on_log(self, args, state, control, logs=None, **kw):
                loop._logs.append(dict(logs or {}))

        system = recipe.data.system_prompt
        rows = [{"prompt": ([{"role": "system", "content": system}] if system else [])
                 + [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in run.train_rows]
        config = GRPOConfig(
            output_dir=str(out_dir), use_cpu=True, bf16=False, report_to="none", save_strategy="no",
            logging_steps=1, disable_tqdm=True, seed=recipe.run.seed, dataloader_num_workers=0,
            per_device_train_batch_size=self.samples // rl.mini_batches, gradient_accumulation_steps=1,
            steps_per_generation=rl.mini_batches, num_generations=rl.samples_per_prompt,
            max_completion_length=ro.max_tokens, temperature=ro.temperature, top_p=ro.top_p,
            learning_rate=rl.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=rl.weight_decay,
            adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=rl.grad_clip, beta=0.0, num_iterations=1,
            max_steps=iterations * rl.mini_batches,
            use_vllm=use_vllm, vllm_mode="colocate", vllm_gpu_memory_utilization=ro.gpu_memory_utilization,
            vllm_max_model_length=ro.max_model_len,
        )
        if use_vllm:
            # TRL runs vLLM inside this process (external_launcher): pinning its threads would pin the HF
            # trainer's and the benchmark driver's too, so its engine runs unpinned
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
            # and without torch.compile, as thinkrl's tiny recipe runs its engine (`rollout.enforce_eager`):
            # measured here, the same decode speed for half the start-up (start-up is not timed)
            import functools

            import trl.generation.vllm_generation as trl_vllm

            trl_vllm.LLM = functools.partial(trl_vllm.LLM, enforce_eager=True)
        model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype="float32")
        self.trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config,
                                   train_dataset=Dataset.from_list(rows), processing_class=load_tokenizer(model_path),
                                   callbacks=[Park()])
        self._thread = threading.Thread(target=self._train, daemon=True)
        self._thread.start()

    def _wait(self) -> None:
        self._go.wait()
        self._go.clear()

    def _train(self) -> None:
        try:
            self.trainer.train()
        except BaseException as e:  # reported to the caller of iteration()
            import traceback

            traceback.print_exc()
            self.error = e
        finally:
            self._parked.set()

    def iteration(self) -> dict[str, Any]:
        """Let TRL run one iteration (generation of P*k completions + `steps_per_iteration` steps)."""
        self._lengths.clear()
        first_log = len(self._logs)
        self._parked.clear()
        start = time.perf_counter()
        self._go.set()
        while not self._parked.wait(timeout=1.0):
            if not self._thread.is_alive():  # it died before parking (the error was set first)
                break
        wall = time.perf_counter() - start
        if self.error is not None:
            raise RuntimeError(f"TRL GRPOTrainer failed: {type(self.error).__name__}: {self.error}") from self.error
        if not self._thread.is_alive():
            raise RuntimeError("TRL GRPOTrainer's training thread ended before the iteration finished")
        tokens = sum(self._lengths)
        logs = self._logs[first_log:]
        # TRL times whole steps only; the step that generates (its log has the completion statistics) also
        # scores, computes the old log-probs and takes the first optimizer step
        generating = [float(log["step_time"]) for log in logs if "completions/mean_length" in log and "step_time" in log]
        stages = {}
        if generating:
            stages = {"generation step (generate, score, log-probs, 1st update)": generating[-1],
                      "other optimizer steps and overhead": wall - generating[-1]}
        rewards = [log["reward"] for log in logs if "reward" in log]
        return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "samples": len(self._lengths),
                "stages_s": stages, "reward_mean": sum(rewards) / len(rewards) if rewards else float("nan"),
                "response_tokens_max": max(self._lengths) if self._lengths else 0}

    def state_dict(self) -> dict:
        return self.trainer.model.state_dict()

    def close(self) -> None:
        self._stop = True
        self._go.set()
        self._thread.join(timeout=120)
