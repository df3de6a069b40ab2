"""Methods thinkrl adds to every vLLM worker (passed to vLLM as `worker_extension_cls`).

vLLM mixes this class into its worker; the engine reaches these methods through
`LLM.collective_rpc(name, args=...)`. They run inside the worker process, next to the model.
"""

from __future__ import annotations

import math
import os

# Set by `rollout.engine.RolloutEngine` (inherited by its vLLM workers): on CPU, linear layers keep their
# own weights and compute with torch's linear instead of vLLM's packed oneDNN handles (`keep_plain_cpu_weights`).
PLAIN_CPU_WEIGHTS_ENV = "THINKRL_PLAIN_CPU_WEIGHTS"


class WeightLoaderExtension:
    """Load new weights into the served model (the weight sync).

    The tensors arrive in checkpoint names and layout, in a shared-memory arena (`thinkrl.arena`: the
    trainer's, or the engine's for a trainer on another node); the worker copies them into its own,
    possibly sharded, parameters through the model's `load_weights`, the same path vLLM uses at start-up,
    so name mapping and tensor-parallel sharding are vLLM's own.
    """

    def thinkrl_load_shared(self, path: str, size: int, layout: list) -> int:
        """Load the tensors `layout` places in the shared arena at `path` (`thinkrl.arena.WeightArena`)."""
        import logging

        if _plain_weights(self):
            if _alias_arena(self, path, size, layout):
                return len(layout)  # the parameters are the arena's memory: the trainer's copy was the sync
            _unalias(self)  # the parameters are about to be written: their own memory again
            if getattr(self, "_thinkrl_placement", False) is False:  # first sync: can the arena hold them?
                self._thinkrl_placement = _placement(self.model_runner.model, layout)
            # every weight is a plain tensor the model computes with: one copy, arena -> parameters
            self.model_runner.model.load_weights(weights=_arena_tensors(self, path, size, layout))
            return len(layout)
        state = _arena_tensors(self, path, size, layout)
        # vLLM's in-place reload restores each layer to checkpoint format, loads, and re-runs the
        # post-load processing (on CPU the linear layers repack their weights for oneDNN). Layers with
        # buffers but no checkpoint weights (rotary embeddings) keep their tensors and make the reload
        # warn "Failed to load weights" on every sync; the probe after each sync is the real check.
        reload_log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        level = reload_log.level
        reload_log.setLevel(logging.ERROR)
        try:
            self.model_runner.reload_weights(weights_iterator=state, is_checkpoint_format=True)
        finally:
            reload_log.setLevel(level)
        _repack_cpu_moe_experts(self.model_runner.model)
        return len(layout)

    def thinkrl_placement(self) -> dict | None:
        """Where this worker's parameters want each checkpoint tensor in a trainer's arena (`_placement`),
        once a first sync has told it the tensors; None: not known yet, or the model cannot take it."""
        return getattr(self, "_thinkrl_placement", None) or None

    def thinkrl_plain_weights(self) -> bool:
        """Whether this worker loads a sync by one copy into its parameters (`keep_plain_cpu_weights`)."""
        return _plain_weights(self)

    def thinkrl_repeat_seconds(self) -> float:
        """Seconds this worker has spent in the repeat-stopping logits processor (`rollout.repeat`)."""
        from rollout.repeat import processor_seconds

        return processor_seconds(self.model_runner)


def _plain_weights(worker) -> bool:
    """True on CPU when every linear layer computes with torch's linear on its own weight (the engine was
    built with `keep_plain_cpu_weights`) and no layer has fused-MoE experts (vLLM-CPU packs those for its
    kernel, and only the reload repacks them). Decided once per worker."""
    known = getattr(worker, "_thinkrl_plain", None)
    if known is None:
        import torch
        from vllm.platforms import current_platform

        modules = list(worker.model_runner.model.modules())
        linear = [m for m in modules if hasattr(m, "cpu_linear")]
        known = (current_platform.is_cpu() and bool(linear)
                 and all(m.cpu_linear is torch.nn.functional.linear for m in linear)
                 and not any(hasattr(m, "w13_weight") for m in modules))
        worker._thinkrl_plain = known
    return known


def _arena_tensors(worker, path: str, size: int, layout: list):
    """(name, tensor) views of a weight arena (`_arena_bytes`)."""
    import torch

    arena = _arena_bytes(worker, path, size)
    for name, dtype, shape, offset in layout:
        dt = getattr(torch, dtype)
        yield name, arena[offset : offset + dt.itemsize * math.prod(shape)].view(dt).view(shape)


def _arena_bytes(worker, path: str, size: int):
    """The arena at `path` as a uint8 tensor, mapped read-only once and kept (re-mapped when it grew or is
    another one). Nobody writes through it: vLLM copies out of it, or computes with views of it."""
    import mmap
    import warnings

    import torch

    mapped = getattr(worker, "_thinkrl_arena", None)
    if mapped is None or mapped[0] != (path, size):
        # the old mapping is not closed: parameters may still view it (`_alias_arena`); it goes with them
        with open(path, "rb") as f:
            mapped = ((path, size), mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ))
        worker._thinkrl_arena = mapped
    with warnings.catch_warnings():  # read-only memory (torch warns that tensors over it are not writable)
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(mapped[1], dtype=torch.uint8)


def _placement(model, layout: list) -> dict | None:
    """Byte offsets at which a trainer should put each checkpoint tensor so that every parameter of `model`
    is one contiguous stretch of the arena: {"at": {name: offset}, "end": bytes}; None if some parameter is
    not whole checkpoint tensors laid end to end (padding, sharding, a transform in its loader).

    Found with vLLM's own loader rather than its name mappings: each checkpoint tensor is loaded filled with
    its own number, and each parameter is read back as the runs of numbers it holds (a fused qkv is the q,
    k and v numbers, each run exactly its tensor's size). The parameters hold these markers afterwards:
    the caller loads the real weights next. Float32 only (markers up to 2**24 are exact there).
    """
    import torch

    from thinkrl.arena import aligned

    params = dict(model.named_parameters())
    if (len(layout) >= 2**24 or any(dtype != "float32" for _, dtype, _, _ in layout)
            or any(p.dtype != torch.float32 or not p.is_contiguous() for p in params.values())):
        return None
    model.load_weights(weights=((name, torch.full(shape, float(i + 1))) for i, (name, _, shape, _) in enumerate(layout)))
    at, starts, end = {}, {}, 0
    for pname, p in params.items():
        starts[pname] = end
        flat = p.detach().reshape(-1)
        cuts = (torch.nonzero(flat[1:] != flat[:-1]).flatten() + 1).tolist()
        if len(cuts) > 16:  # more pieces than any fused layer has: not whole tensors
            return None
        for start, stop in zip([0, *cuts], [*cuts, flat.numel()], strict=True):
            marker = flat[start].item()
            index = int(marker) - 1
            if marker != index + 1 or not 0 <= index < len(layout):
                return None
            name, _, shape, _ = layout[index]
            if name in at or stop - start != math.prod(shape):
                return None
            at[name] = end + 4 * start
        end = aligned(end + 4 * flat.numel())
    if len(at) != len(layout):  # a checkpoint tensor that no parameter holds whole
        return None
    return {"at": at, "end": end, "params": starts}


def _alias_arena(worker, path: str, size: int, layout: list) -> bool:
    """If the arena holds the tensors where this worker's placement wants them, make every parameter a
    read-only view of it (once per arena) and return True: the weights are then already in place."""
    placement = getattr(worker, "_thinkrl_placement", None)
    if not placement or len(layout) != len(placement["at"]) or any(
            placement["at"].get(name) != offset for name, _, _, offset in layout):
        return False
    if getattr(worker, "_thinkrl_aliased", None) != (path, size):
        import torch

        arena = _arena_bytes(worker, path, size)
        for name, p in worker.model_runner.model.named_parameters():
            start = placement["params"][name]
            p.data = arena[start : start + 4 * p.numel()].view(torch.float32).view(p.shape)
        worker._thinkrl_aliased = (path, size)
    return True


def _unalias(worker) -> None:
    """Give parameters that view an arena (`_alias_arena`) their own memory back, with the same values."""
    if getattr(worker, "_thinkrl_aliased", None) is not None:
        for p in worker.model_runner.model.parameters():
            p.data = p.data.clone()
        worker._thinkrl_aliased = None


def _repack_cpu_moe_experts(model) -> None:
    """Redo the CPU MoE kernels' weight prepacking after an in-place reload.

    vLLM (0.32) prepacks fused-MoE expert weights for its CPU grouped GEMM only when the kernel is first
    built: on a weight update `UnquantizedFusedMoEMethod._setup_kernel` skips
    `fused_experts.process_weights_after_loading`, so the reloaded experts stay in checkpoint layout
    while the kernel reads them as packed, and the engine silently serves wrong expert weights (measured
    on the tiny MoE: after one sync the probe's log-probs were 0.26 off the trainer's). Running that
    step once more on each MoE layer packs the new weights. GPU kernels need no prepacking.
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if experts is not None and hasattr(module, "w13_weight"):
            experts.process_weights_after_loading(module)


def keep_plain_cpu_weights() -> None:
    """Make vLLM-CPU's linear layers compute with `torch.nn.functional.linear` on their own weight.

    vLLM-CPU (0.32) turns each linear weight, after loading, into a packed oneDNN handle and drops the
    weight (`vllm.model_executor.layers.utils.dispatch_cpu_unquantized_gemm`): a weight update must then
    re-materialise the layer and repack it (2.2 s of a 4.0 s reload of a 0.5B model, AMD EPYC). With plain
    weights, a sync is one copy into the existing parameters, or none once they view the trainer's arena
    (`_alias_arena`). Runs in the vLLM worker's process before the model loads: the engine calls it when
    the worker is in its own process (`EngineSettings.in_process`, the CPU default), and asks a worker
    process for it through `PLAIN_CPU_WEIGHTS_ENV` (vLLM imports this module there to build the worker,
    `worker_extension_cls`). Weights that are not 2-D (MoE experts, conv) keep vLLM's own dispatch.
    """
    import torch
    from vllm.model_executor.layers import utils

    original = utils.dispatch_cpu_unquantized_gemm
    if getattr(original, "thinkrl_plain", False):
        return

    def dispatch(layer: torch.nn.Module, remove_weight: bool) -> None:
        if layer.weight.is_meta or layer.weight.ndim != 2:
            original(layer, remove_weight)
            return
        layer.cpu_linear = torch.nn.functional.linear

    dispatch.thinkrl_plain = True
    utils.dispatch_cpu_unquantized_gemm = dispatch


if os.environ.get(PLAIN_CPU_WEIGHTS_ENV) == "1":
    keep_plain_cpu_weights()
