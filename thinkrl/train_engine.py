"""The one DeepSpeed training engine, shared by the SFT warmup and RL.

A `TrainEngine` is one data-parallel rank: it joins the process group (gloo on CPU, NCCL on GPU), loads
the model from a Hugging Face folder, wraps it with DeepSpeed (ZeRO stage from the recipe) and offers
what both stages need: token log-probabilities, one train step (accumulation, clipping, schedule), optimizer reset, weight export
and atomic Hugging Face / resumable checkpoints. It holds no algorithm: SFT and PMD workers compose it.

Log-probs are computed from the decoder's hidden states with the output projection applied to chunks
of the selected positions, so logits are never materialised as [T, V] for a whole batch at once.

Packed input (several examples per row, as the SFT warmup builds it) is given by `position_ids` that
restart at 0 for each example. Attention must not cross examples: with a varlen backend
(flash-attention) the position ids alone tell it where examples start; with every other backend (SDPA,
eager: what CPUs have) a block-diagonal causal boolean mask [B, 1, T, T] is built from them. The mask
costs B*T*T bytes, fine up to a few thousand tokens per row; long-context GPU runs want flash-attention.

The optimizer is AdamW, or (`optimizer: muon`, as Moonlight and Kimi train) Muon for the hidden weight
matrices and AdamW for the rest, through DeepSpeed's own Muon so that ZeRO 1-3 orthogonalize whole
matrices before partitioning them (`build_optimizer`). Under Muon, DeepSpeed's gradient norm and clip
would be taken over the orthogonalized updates, not the gradients: clipping is off and no norm is
reported.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")


@dataclass
class OptimConfig:
    """Optimizer and schedule of one training stage (read from the recipe by the stage's driver)."""

    lr: float
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    warmup_steps: int = 0
    total_steps: int = 0  # 0: constant after warmup
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of lr (the paper decays 2e-5 -> 2e-6)
    decay: str = "cosine"  # "cosine" | "linear" | "constant" after warmup
    # Further stages after `total_steps`, each re-warming: (steps, peak_lr, min_lr, warmup_steps).
    # k1.5's long-CoT SFT: 2e-5 -> 2e-6 at 32K, then re-warm to 1e-5 -> 1e-6 at 128K.
    stages: tuple[tuple[int, float, float, int], ...] = ()
    # parameters left as they are: names starting with one of these (e.g. "vision_tower." to freeze a VLM's tower)
    frozen: tuple[str, ...] = ()
    # "adamw", or "muon": the hidden matrices by Muon, everything else by AdamW, one `lr` for both (`build_optimizer`)
    optimizer: str = "adamw"
    muon_momentum: float = 0.95  # Muon's Nesterov momentum (Moonlight, Keller Jordan: 0.95)


@dataclass
class DistConfig:
    """Where this rank sits in its trainer group."""

    rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    zero_stage: int = 1
    # recompute each decoder layer's activations in backward: memory for long sequences, ~1/3 more compute
    gradient_checkpointing: bool = False


def lr_lambda(optim: OptimConfig):
    """Multiplier of `optim.lr` at each step (what `LambdaLR` wants).

    Stage 1: linear warmup, then `decay` down to `min_lr_ratio * lr` over `total_steps` (constant if 0).
    Each entry of `stages` then starts at its step offset, re-warms linearly to its peak and decays
    (same shape) to its floor.
    """
    if optim.decay not in ("cosine", "linear", "constant"):
        raise ValueError(f"OptimConfig.decay must be cosine, linear or constant, got {optim.decay!r}")

    def shape(step: int, warmup: int, total: int, peak: float, floor: float) -> float:
        if warmup and step < warmup:
            return peak * (step + 1) / warmup
        if not total or optim.decay == "constant":
            return peak
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if optim.decay == "linear":
            return floor + (peak - floor) * (1 - progress)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def factor(step: int) -> float:
        if not optim.stages or not optim.total_steps or step < optim.total_steps:
            return shape(step, optim.warmup_steps, optim.total_steps, 1.0, optim.min_lr_ratio)
        offset = optim.total_steps
        for i, (steps, peak_lr, min_lr, warmup) in enumerate(optim.stages):
            if step < offset + steps or i == len(optim.stages) - 1:  # the last stage holds its floor
                return shape(step - offset, warmup, steps, peak_lr / optim.lr, min_lr / optim.lr)
            offset += steps
        raise AssertionError("unreachable")

    return factor


OPTIMIZERS = ("adamw", "muon")
SHM_COMM_OP = "deepspeed_shm_comm"  # DeepSpeed's name of its CPU shared-memory all-reduce op (turned off)


def takes_muon(name: str, shape: Sequence[int]) -> bool:
    """Whether Muon updates this parameter under `optimizer: muon` (else AdamW), as Moonlight splits them.

    Muon orthogonalizes a matrix's update, so it takes the hidden weight matrices: attention and MLP
    projections (2-D), and stacked experts [E, out, in] (3-D, one matrix per expert). Embeddings and the
    output head are matrices too but are rows looked up one token at a time, not a linear map on the
    hidden state: AdamW takes them, and every 1-D parameter (norms, biases). `TrainEngine` also sends the
    model's own input / output embeddings to AdamW whatever their names.

    >>> takes_muon("model.layers.0.self_attn.q_proj.weight", (128, 128))
    True
    >>> takes_muon("model.embed_tokens.weight", (320, 128)), takes_muon("lm_head.weight", (320, 128))
    (False, False)
    >>> takes_muon("model.layers.0.self_attn.q_proj.bias", (128,)), takes_muon("model.norm.weight", (128,))
    (False, False)
    """
    lowered = name.lower()
    return len(shape) in (2, 3) and "embed" not in lowered and "lm_head" not in lowered


def muon_lr_scale(shape: Sequence[int]) -> float:
    """Factor on the recipe's `lr` for a Muon matrix, so that one `lr` suits AdamW and Muon alike.

    Moonlight scales Muon's orthogonalized update O by 0.2 * sqrt(max(rows, cols)): its RMS is then
    ~0.2, like a typical AdamW update, and AdamW's lr and weight decay carry over unchanged. DeepSpeed's
    Muon scales O by sqrt(max(1, rows / cols)) (Keller Jordan's, tuned for lr ~0.02). The ratio of the
    two is 0.2 * sqrt(cols) for every shape; the engine gives each Muon group lr * this factor (a test
    measures the step's RMS, so a change in DeepSpeed's scale fails loudly).

    >>> round(muon_lr_scale((384, 128)), 3), round(muon_lr_scale((128, 384)), 3)
    (2.263, 3.919)
    """
    return 0.2 * math.sqrt(shape[-1])


def build_optimizer(model, optim: OptimConfig, fused: bool = False) -> torch.optim.Optimizer:
    """The optimizer of `model`'s trainable parameters, by `optim.optimizer`.

    adamw: torch's AdamW over all of them. muon: DeepSpeed's `MuonWithAuxAdam` (the class its ZeRO
    stages recognise: under ZeRO 1-3 the orthogonalization runs on each full matrix before the
    gradient is partitioned) with `takes_muon`'s matrices in Muon groups, one per `muon_lr_scale`,
    each marked `param.use_muon`, and the rest in one AdamW group, first, at `optim.lr` (`lr_scale`
    1.0). A Muon group's decay is weight_decay / scale, so each step decays by lr * weight_decay on
    both halves, as Moonlight does.

    Under muon `TrainEngine` turns DeepSpeed's gradient clipping off: under ZeRO its norm is taken after
    the orthogonalization, over Muon's updates (~64 on the tiny model, whatever the gradient), so
    clipping at 1 shrank every Muon step ~60x, and ZeRO 0 (which clips the raw gradients) would behave
    differently. Muon's step size is fixed by the orthogonalization anyway; the AdamW half goes
    unclipped, its steps bounded by Adam's normalisation.
    """
    if optim.optimizer not in OPTIMIZERS:
        raise ValueError(f"OptimConfig.optimizer must be one of {', '.join(OPTIMIZERS)}, got {optim.optimizer!r}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if optim.optimizer == "adamw":
        return torch.optim.AdamW([p for _, p in named], lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay,
                                 fused=fused)  # fused: one kernel for all parameters instead of several per tensor
    from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam

    embeddings = {id(p) for get in ("get_input_embeddings", "get_output_embeddings")
                  for module in [getattr(model, get, lambda: None)()] if module is not None for p in module.parameters()}
    adam, muon = [], {}
    for name, param in named:
        param.use_muon = takes_muon(name, param.shape) and id(param) not in embeddings
        if param.use_muon:
            muon.setdefault(muon_lr_scale(param.shape), []).append(param)
        else:
            adam.append(param)
    groups = [dict(params=adam, use_muon=False, lr=optim.lr, lr_scale=1.0, betas=optim.betas, eps=1e-8,
                   weight_decay=optim.weight_decay)] if adam else []
    groups += [dict(params=params, use_muon=True, lr=optim.lr * scale, lr_scale=scale, momentum=optim.muon_momentum,
                    weight_decay=optim.weight_decay / scale) for scale, params in sorted(muon.items())]
    return MuonWithAuxAdam(groups, adam_optimizer=torch.optim.AdamW, adam_optimizer_kwargs={"fused": fused})


class TrainEngine:
    """One rank of a DeepSpeed trainer group holding a causal LM and its optimizer."""

    def __init__(self, model_path: str | Path, optim: OptimConfig, dist: DistConfig, seed: int = 0,
                 logprob_chunk_tokens: int = 4096) -> None:
        import deepspeed

        from thinkrl.models import load_causal_lm, load_tokenizer

        torch.manual_seed(seed + dist.rank)
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        os.environ.update(
            RANK=str(dist.rank), LOCAL_RANK="0" if self.device.type == "cpu" else str(torch.cuda.current_device()),
            WORLD_SIZE=str(dist.world_size), MASTER_ADDR=dist.master_addr, MASTER_PORT=str(dist.master_port),
        )
        if self.device.type == "cpu":
            # DeepSpeed would compile its shared-memory all-reduce here on each machine's first start (~30 s
            # on 2 cores, again whenever the compiler's command line differs) under torch's lock file, which a
            # process killed mid-build leaves behind: every later start on the machine then waits for it
            # forever. The op serves inference all-reduce only, which training never calls; gloo does the rest.
            deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo", verbose=False)
        self.rank, self.world_size = dist.rank, dist.world_size
        self.arena = None  # rank 0's shared memory for engines on its node (`publish_weights`)
        self.placement = None  # where the engines' parameters want each tensor in it, once one says
        self.model_path = Path(model_path)
        # read now: the folder may be gone when a checkpoint is written (an RL run resumed from a
        # checkpoint that rl.keep_checkpoints has since pruned)
        self.processor_files = processor_files(self.model_path)
        self.dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        model = load_causal_lm(model_path, self.dtype)
        if dist.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.tokenizer = load_tokenizer(model_path)
        self.logprob_chunk_tokens = logprob_chunk_tokens
        for name, param in model.named_parameters():
            if optim.frozen and name.startswith(optim.frozen):
                param.requires_grad_(False)
        optimizer = build_optimizer(model, optim, fused=self.device.type == "cuda")
        self.lr_scale = optimizer.param_groups[0].get("lr_scale", 1.0)  # the recipe's lr is group 0's / this
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim))
        self.muon = optim.optimizer == "muon"
        zero = {"stage": dist.zero_stage}
        if self.muon and dist.zero_stage == 3:
            zero["reduce_scatter"] = False  # ZeRO-3 orthogonalizes whole matrices: it refuses reduce-scatter
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            # accumulation is train_step's: any number of micro-batches per step, the boundary set by hand
            "gradient_accumulation_steps": 1,
            "train_batch_size": dist.world_size,
            # under ZeRO, DeepSpeed's norm and clip see Muon's orthogonalized update, not its gradient
            # (build_optimizer says why it is off)
            "gradient_clipping": 0.0 if self.muon else optim.grad_clip,
            "zero_optimization": zero,
            "bf16": {"enabled": self.dtype == "bfloat16"},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )

    @property
    def module(self):
        return self.engine.module

    # ---- forward ---------------------------------------------------------------------------------

    def token_logprobs(self, input_ids_B_T: torch.Tensor, attention_mask_B_T: torch.Tensor,
                       target_mask_B_T: torch.Tensor, position_ids_B_T: torch.Tensor | None = None,
                       images=None) -> torch.Tensor:
        """`token_logprobs` (the module function) on this rank's model; see there for the contract."""
        return token_logprobs(self.engine.module, input_ids_B_T, attention_mask_B_T, target_mask_B_T,
                              position_ids_B_T, chunk_tokens=self.logprob_chunk_tokens, device=self.device,
                              images=images)

    # ---- update ----------------------------------------------------------------------------------

    def train_step(self, micro_batches: Sequence[T], loss_of: Callable[[T], torch.Tensor]) -> dict[str, float]:
        """One optimizer step over `micro_batches`: the one way SFT and RL update the model.

        For each micro-batch, `loss_of(micro_batch)` runs the forward pass and returns that micro-batch's
        share of this rank's loss (the shares add up to the rank's loss for the step), and its backward
        runs at once; then DeepSpeed reduces the gradients over the ranks (their mean), clips them,
        applies the optimizer and advances the schedule, once. The count may change from step to step;
        every rank must pass the same count (ZeRO-2/3 reduce during each backward): pad with a
        micro-batch whose loss is zero but computed from the model.

        Returns the summed loss, the learning rate the step used, and the gradient norm before clipping.
        """
        if not micro_batches:
            raise ValueError("a train step needs at least one micro-batch")
        lr = float(self.scheduler.get_last_lr()[0]) / self.lr_scale
        total = 0.0
        zero_optimizer = self.engine.optimizer
        for i, micro_batch in enumerate(micro_batches):
            # DeepSpeed's own counter would need a fixed count; the boundary is set by hand instead
            self.engine.set_gradient_accumulation_boundary(i == len(micro_batches) - 1)
            # the forward passes here call the module, not DeepSpeedEngine.forward, which first tells a ZeRO
            # optimizer that a new micro-batch starts: without it ZeRO-3 overwrites the gradients of the
            # step's earlier micro-batches instead of adding to them (only the last one counted)
            if hasattr(zero_optimizer, "clear_backward_seen_flag"):
                zero_optimizer.clear_backward_seen_flag()
            loss = loss_of(micro_batch)
            self.engine.backward(loss)  # gradient_accumulation_steps is 1: DeepSpeed does not rescale
            total += loss.item()
        self.engine.step()
        stats = {"loss": total, "lr": lr}
        norm = self.engine.get_global_grad_norm()
        if norm is not None and not self.muon:  # under Muon, a norm of orthogonalized updates: not reported
            stats["grad_norm"] = float(norm)
        return stats

    def reset_optimizer(self) -> None:
        """Forget Adam's moments and Muon's momentum (k1.5 resets the optimizer at every iteration).

        Both live in the innermost optimizer's `state`, under ZeRO too (a Muon group's flat momentum
        buffer included); the next step starts them from zero.
        """
        opt = self.optimizer
        while hasattr(opt, "optimizer"):
            opt = opt.optimizer
        opt.state.clear()

    # ---- export / checkpoints --------------------------------------------------------------------

    def weight_buckets(self, bucket_bytes: int = 256 << 20, checkpoint_names: bool = True,
                       ) -> Iterator[dict[str, torch.Tensor]]:
        """The weights, full (unsharded), in buckets of about `bucket_bytes`: a collective, every rank runs it.

        Rank 0 gets each bucket as {name: tensor} (checkpoint names and layout when `checkpoint_names`, see
        `checkpoint_format`; else the module's own); other ranks get empty dicts. Under ZeRO-3 each bucket
        is gathered from every rank's partitions and released before the next, so no rank ever holds the
        whole model twice; the tensors are valid until the next bucket is asked for (copy what you keep).
        A parameter is never split, and a module's parameters stay in one bucket (a fused MoE weight is
        converted back to its per-expert names as a whole). Tied weights appear once.
        """
        module = self.engine.module
        persistent = module.state_dict(keep_vars=True).keys()
        named = [(n, p) for n, p in module.named_parameters()]
        named += [(n, b) for n, b in module.named_buffers() if n in persistent]
        zero3 = any(hasattr(p, "ds_id") for _, p in named)
        groups: list[list[tuple[str, torch.Tensor]]] = [[]]
        size, owner = 0, None
        for name, tensor in named:
            nbytes = (tensor.ds_numel if hasattr(tensor, "ds_numel") else tensor.numel()) * tensor.element_size()
            prefix = name.rpartition(".")[0]
            if groups[-1] and size + nbytes > bucket_bytes and prefix != owner:
                groups.append([])
                size = 0
            groups[-1].append((name, tensor))
            size, owner = size + nbytes, prefix
        for group in groups:
            if zero3:
                import deepspeed

                params = [t for _, t in group if hasattr(t, "ds_id")]
                with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                    yield self._bucket(module, group, checkpoint_names)
            else:
                yield self._bucket(module, group, checkpoint_names)

    def _bucket(self, module, group, checkpoint_names: bool) -> dict[str, torch.Tensor]:
        if self.rank != 0:
            return {}
        state = {name: t.detach() for name, t in group}
        return checkpoint_format(module, state) if checkpoint_names else state

    def full_state_dict(self, checkpoint_names: bool = True) -> dict[str, torch.Tensor]:
        """The full weights as CPU tensors (see `weight_buckets`; every rank calls, rank 0 gets them)."""
        state = {}
        for bucket in self.weight_buckets(checkpoint_names=checkpoint_names):
            state.update({k: v.to("cpu", copy=True).contiguous() for k, v in bucket.items()})
        return state

    def publish_weights(self, targets: Sequence[tuple[str, dict | None]], bucket_bytes: int = 256 << 20):
        """Hand the weights to engines, bucket by bucket; `targets` holds each engine's (Ray node, placement)
        (`rollout.engine.RolloutEngine.sync_target`). Rank 0 returns where they are, the other ranks None.

        Every rank calls it (ZeRO-3 gathers are collectives). Engines on rank 0's node read them from rank
        0's shared-memory arena (`thinkrl.arena`: one copy out of the parameters; the engines' vLLM workers
        map it, and copy out of it, or, given a placement, compute with views of it); for a node elsewhere
        each bucket also goes into Ray's object store as a `WeightBucket` (raw bytes, stored without
        pickling; the other node pulls it over the network). Nothing touches a file; the store frees a
        bucket once every holder of its reference is gone, and the arena dies with this process.
        """
        import ray

        from thinkrl.arena import PublishedWeights, WeightArena

        node = ray.get_runtime_context().get_node_id()
        to_arena, to_store = any(n == node for n, _ in targets), any(n != node for n, _ in targets)
        if to_arena and self.rank == 0 and self.arena is None:
            self.arena = WeightArena()
        # where the first engine here that asks wants each tensor (the same model: they all want the same),
        # kept from then on: an engine may be computing with views of the arena, so a later sync that only
        # reaches engines without a placement (a restarted one) must not lay the tensors out otherwise
        if self.placement is None:
            self.placement = next((p for n, p in targets if n == node and p), None)
        placement = self.placement
        layout, offset, refs = [], placement["end"] if placement else 0, []
        for bucket in self.weight_buckets(bucket_bytes):
            if not bucket:
                continue
            if to_arena:
                layout += self.arena.stage(bucket.items(), offset, placement["at"] if placement else None)
                offset = self.arena.end
            if to_store:
                refs.append(ray.put(WeightBucket.pack(bucket)))
        if self.rank != 0:
            return None
        return PublishedWeights(node, (self.arena.path, self.arena.size, layout) if to_arena else None,
                                refs if to_store else None)

    def save_hf(self, out_dir: str | Path) -> None:
        """Write a Hugging Face checkpoint (model + tokenizer) into `out_dir`: every rank calls (under
        ZeRO-3 the weights are gathered from all), rank 0 writes.

        Not atomic by itself: drivers call it inside `atomic_directory`, which all ranks share.
        """
        state = self.full_state_dict(checkpoint_names=False)
        if self.rank == 0:
            self.engine.module.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(out_dir)
            for name, data in self.processor_files.items():
                if not (Path(out_dir) / name).exists():
                    (Path(out_dir) / name).write_bytes(data)

    def save_state(self, out_dir: str | Path) -> None:
        """Resumable training state (weights, optimizer, scheduler) into `out_dir` (every rank)."""
        self.engine.save_checkpoint(str(out_dir), tag="ds", save_latest=False)

    def load_state(self, in_dir: str | Path) -> None:
        self.engine.load_checkpoint(str(in_dir), tag="ds", load_optimizer_states=True, load_lr_scheduler_states=True)


@dataclass
class WeightBucket:
    """A bucket of weights as Ray stores it: raw bytes (uint8 arrays, stored out of band: no pickling,
    no copy on a same-node read), and what turns them back into tensors. bfloat16 has no numpy type, so
    every dtype travels as bytes."""

    names: list[str]
    dtypes: list[str]
    shapes: list[tuple[int, ...]]
    data: list  # numpy uint8 arrays

    @classmethod
    def pack(cls, state: dict[str, torch.Tensor]) -> WeightBucket:
        tensors = [t.detach().to("cpu").contiguous() for t in state.values()]
        return cls(list(state), [str(t.dtype).removeprefix("torch.") for t in tensors], [tuple(t.shape) for t in tensors],
                   [t.reshape(-1).view(torch.uint8).numpy() for t in tensors])

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) pairs viewing the stored bytes (read-only memory: copy before writing)."""
        import warnings

        for name, dtype, shape, data in zip(self.names, self.dtypes, self.shapes, self.data, strict=True):
            with warnings.catch_warnings():  # the object store's memory is read-only; nobody writes to it
                warnings.simplefilter("ignore", UserWarning)
                raw = torch.from_numpy(data)
            yield name, raw.view(getattr(torch, dtype)).view(shape)

    @property
    def nbytes(self) -> int:
        return sum(d.nbytes for d in self.data)


PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def processor_files(source: Path) -> dict[str, bytes]:
    """A vision-language folder's processor (its configs and remote code), by file name: what a checkpoint
    of it needs besides the weights and tokenizer to load in vLLM and transformers like that folder."""
    return {path.name: path.read_bytes() for path in sorted(source.iterdir())
            if path.name in PROCESSOR_FILES or (path.suffix == ".py" and path.name.startswith(("processing_", "image_processing_")))}


def enable_gradient_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant: works with frozen inputs).

    transformers checkpoints only in training mode, and `from_pretrained` returns a model in eval mode.
    """
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()


def checkpoint_format(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` under the names and layout of a saved checkpoint, which is what vLLM's loaders expect.

    transformers 5 keeps some weights in a fused in-memory layout (MoE experts as one [E, ...] tensor)
    and converts them back only in `save_pretrained`; the weight sync must do the same, or vLLM rejects
    names like `mlp.experts.down_proj`.
    """
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers < 5: in-memory names are the checkpoint's
        return state
    return revert_weight_conversion(model, state)


def token_logprobs(module, input_ids_B_T: torch.Tensor, attention_mask_B_T: torch.Tensor,
                   target_mask_B_T: torch.Tensor, position_ids_B_T: torch.Tensor | None = None, *,
                   chunk_tokens: int = 4096, device: torch.device | str = "cpu", images=None) -> torch.Tensor:
    """log p(token_t | tokens_<t) for every position where `target_mask` is 1 (else 0), [B, T].

    Position 0 never has a log-prob, nor has the first token of a packed example. Gradients flow
    when called outside `torch.no_grad()`. `position_ids` (packed rows): restart at 0 at each
    example's first token (padding included, as its own example); attention stays inside examples.
    Without it, rows are single right-padded sequences (RL's input) and nothing changes.
    `images` (a vision-language model, `thinkrl.vl`): a `thinkrl.vl.inputs.ImageBatch` of the batch's
    images in the order their (expanded) placeholder tokens appear, row by row; gradients reach the
    vision tower and the projector through the image tokens' embeddings.
    """
    decoder = module.get_decoder() if hasattr(module, "get_decoder") else module.model
    input_ids_B_T = input_ids_B_T.to(device)
    attention_mask_B_T = attention_mask_B_T.to(device)
    target_mask_B_T = target_mask_B_T.to(device).bool()
    inputs = {"input_ids": input_ids_B_T}
    if hasattr(module, "embed_inputs"):  # a vision-language model: image tokens take the images' features
        if images is None:  # a text batch: a placeholder the policy generated is text
            embeds = module.embed_inputs(input_ids_B_T, None, [], [0] * input_ids_B_T.shape[0])
        else:
            embeds = module.embed_inputs(input_ids_B_T, images.pixel_values.to(device), images.grid_hws, images.row_tokens,
                                         images.order)
        inputs = {"inputs_embeds": embeds}
    if position_ids_B_T is None:
        hidden_B_T_H = decoder(**inputs, attention_mask=attention_mask_B_T).last_hidden_state
    else:
        position_ids_B_T = position_ids_B_T.to(device)
        if "flash" in str(getattr(module.config, "_attn_implementation", "")):
            mask = None  # varlen kernels find the example boundaries in the position ids
        else:
            mask = block_diagonal_mask(position_ids_B_T)
        hidden_B_T_H = decoder(**inputs, attention_mask=mask, position_ids=position_ids_B_T).last_hidden_state
        # a packed example's first token is predicted from the previous example's last: no log-prob
        target_mask_B_T = target_mask_B_T & (position_ids_B_T != 0)
    # hidden at t-1 predicts token t
    select_B_T = target_mask_B_T.clone()
    select_B_T[:, 0] = False
    rows, cols = select_B_T.nonzero(as_tuple=True)
    hidden_N_H = hidden_B_T_H[rows, cols - 1]
    targets_N = input_ids_B_T[rows, cols]
    logp_N = head_logprobs(module.get_output_embeddings(), hidden_N_H, targets_N, chunk_tokens)
    out_B_T = torch.zeros(input_ids_B_T.shape, dtype=torch.float32, device=device)
    return out_B_T.index_put((rows, cols), logp_N)


def head_logprobs(head, hidden_N_H: torch.Tensor, targets_N: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """log softmax(head(hidden))[target] per row, float32 [N], never holding more than chunk x V logits.

    A plain linear head goes through `_ChunkedTargetLogprob`, which recomputes each chunk's logits in
    the backward pass. Any other head (or one whose weight ZeRO-3 has partitioned, so that only the
    module's own hooks can gather it) is called chunk by chunk: bounded without gradients, but autograd
    then keeps every chunk's logits for the backward pass.
    """
    if hidden_N_H.shape[0] == 0:
        return hidden_N_H.new_zeros(0, dtype=torch.float32)
    weight = getattr(head, "weight", None)
    if isinstance(head, torch.nn.Linear) and weight is not None and not hasattr(weight, "ds_id"):
        return _ChunkedTargetLogprob.apply(hidden_N_H, weight, head.bias, targets_N, chunk_tokens)
    pieces = []
    for start in range(0, hidden_N_H.shape[0], chunk_tokens):
        logits = head(hidden_N_H[start : start + chunk_tokens]).float()
        chosen = logits.gather(-1, targets_N[start : start + chunk_tokens, None]).squeeze(-1)
        pieces.append(chosen - torch.logsumexp(logits, dim=-1))
    return torch.cat(pieces)


class _ChunkedTargetLogprob(torch.autograd.Function):
    """log softmax(hidden @ W.T + b)[target], chunk by chunk in the forward and the backward pass.

    Differentiating a chunked loop with autograd keeps every chunk's float32 logits until backward, so
    the [N, V] matrix is alive at once after all. This saves only its inputs and each row's logsumexp
    and recomputes a chunk's logits in backward: d logp / d logits = onehot(target) - softmax(logits).
    Peak extra memory is a few chunk x V buffers, whatever N is.
    """

    @staticmethod
    def forward(ctx, hidden_N_H, weight_V_H, bias_V, targets_N, chunk_tokens):
        n = hidden_N_H.shape[0]
        logp_N = torch.empty(n, dtype=torch.float32, device=hidden_N_H.device)
        lse_N = torch.empty(n, dtype=torch.float32, device=hidden_N_H.device)
        for start in range(0, n, chunk_tokens):
            end = min(n, start + chunk_tokens)
            logits_C_V = torch.nn.functional.linear(hidden_N_H[start:end], weight_V_H, bias_V).float()
            lse_N[start:end] = torch.logsumexp(logits_C_V, dim=-1)
            logp_N[start:end] = logits_C_V.gather(-1, targets_N[start:end, None]).squeeze(-1) - lse_N[start:end]
        ctx.save_for_backward(hidden_N_H, weight_V_H, bias_V, targets_N, lse_N)
        ctx.chunk_tokens = chunk_tokens
        return logp_N

    @staticmethod
    def backward(ctx, grad_N):
        hidden_N_H, weight_V_H, bias_V, targets_N, lse_N = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden_N_H) if need_hidden else None
        # accumulated over chunks in float32 even for bf16 weights, cast once at the end
        grad_weight = torch.zeros(weight_V_H.shape, dtype=torch.float32, device=weight_V_H.device) if need_weight else None
        grad_bias = torch.zeros(bias_V.shape, dtype=torch.float32, device=bias_V.device) if need_bias else None
        n = hidden_N_H.shape[0]
        for start in range(0, n, ctx.chunk_tokens):
            end = min(n, start + ctx.chunk_tokens)
            h_C_H, g_C = hidden_N_H[start:end], grad_N[start:end].float()
            logits_C_V = torch.nn.functional.linear(h_C_H, weight_V_H, bias_V).float()
            # d/d logits of g * logp = g * (onehot - softmax), built in the logits' buffer
            dlogits_C_V = logits_C_V.sub_(lse_N[start:end, None]).exp_().mul_(-g_C[:, None])
            dlogits_C_V.scatter_add_(-1, targets_N[start:end, None], g_C[:, None])
            if need_bias:
                grad_bias += dlogits_C_V.sum(0)
            dlogits_C_V = dlogits_C_V.to(hidden_N_H.dtype)
            if need_hidden:
                grad_hidden[start:end] = dlogits_C_V @ weight_V_H
            if need_weight:
                grad_weight += dlogits_C_V.T @ h_C_H
        if need_weight:
            grad_weight = grad_weight.to(weight_V_H.dtype)
        if need_bias:
            grad_bias = grad_bias.to(bias_V.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


def block_diagonal_mask(position_ids_B_T: torch.Tensor) -> torch.Tensor:
    """Causal attention inside each packed example, [B, 1, T, T] booleans (True: may attend).

    Examples are the runs of positions that start at 0; each token sees earlier tokens of its own run.
    """
    segment_B_T = (position_ids_B_T == 0).long().cumsum(-1)
    T = position_ids_B_T.shape[-1]
    causal_T_T = torch.ones(T, T, dtype=torch.bool, device=position_ids_B_T.device).tril()
    same_B_T_T = segment_B_T[:, :, None] == segment_B_T[:, None, :]
    return (same_B_T_T & causal_T_T)[:, None]


# The fixed cost of one more forward + backward pass in padded-token equivalents, for `length_buckets`: the
# tiny dense model on 2 CPU cores (bench/trainer_efficiency.py measures the layouts)
BUCKET_OVERHEAD_TOKENS = 64


def length_buckets(lengths: list[int], overhead_tokens: int = BUCKET_OVERHEAD_TOKENS) -> list[list[int]]:
    """Indices of `lengths` split into buckets of similar length, each to be padded to its own longest.

    A batch padded to its longest sequence spends compute on padding (a fifth of the slots on the tiny
    recipe's heavy-tailed responses). Buckets are contiguous runs of the sorted lengths chosen to minimise
    total padded slots + `overhead_tokens` per bucket (the fixed cost of one more forward pass, in
    token-equivalents), exactly, by dynamic programming. Never more slots than one bucket of all, so never
    more activation memory. Buckets come longest first; indices inside a bucket ascend by length.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j sorted lengths
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]]
        for i in range(j):  # bucket = sorted[i:j], padded to its last (longest) length
            cost = best[i] + (j - i) * longest + overhead_tokens
            if cost < best[j]:
                best[j], cut[j] = cost, i
    buckets, j = [], n
    while j > 0:
        buckets.append(order[cut[j] : j])
        j = cut[j]
    return buckets


def pad_batch(sequences: list[list[int]], masks: list[list[int]], pad_id: int):
    """Right-pad token lists into (input_ids, attention_mask, target_mask) tensors, each [B, T]."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(sequences), width), dtype=torch.long)
    target = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, (seq, mask) in enumerate(zip(sequences, masks, strict=True)):
        ids[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
        target[i, : len(mask)] = torch.tensor(mask)
    return ids, attn, target
