"""Methods thinkrl adds to every vLLM worker (passed to vLLM as `worker_extension_cls`).

vLLM mixes this class into its worker; the engine reaches these methods through
`LLM.collective_rpc(name, args=...)`. They run inside the worker process, next to the model.
"""

from __future__ import annotations

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

        state = _arena_tensors(self, path, size, layout)
        if _plain_weights(self):
            # every weight is a plain tensor the model computes with: one copy, arena -> parameters
            self.model_runner.model.load_weights(weights=state)
            return len(layout)
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
    """(name, tensor) views of the engine's weight arena, mapped read-only once and kept (re-mapped when
    the engine grew it)."""
    import mmap
    import warnings

    import torch

    mapped = getattr(worker, "_thinkrl_arena", None)
    if mapped is None or mapped[0] != (path, size):
        if mapped is not None:
            mapped[1].close()
        with open(path, "rb") as f:
            mapped = ((path, size), mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ))
        worker._thinkrl_arena = mapped
    with warnings.catch_warnings():  # read-only memory: vLLM copies out of it, nobody writes into it
        warnings.simplefilter("ignore", UserWarning)
        arena = torch.frombuffer(mapped[1], dtype=torch.uint8)
    for name, dtype, shape, offset in layout:
        dt = getattr(torch, dtype)
        n = dt.itemsize
        for d in shape:
            n *= d
        yield name, arena[offset : offset + n].view(dt).view(shape)


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
    weights, a sync is one copy into the existing parameters. Runs in the vLLM worker, before the model
    loads: vLLM imports this module there to build the worker (`worker_extension_cls`), and the engine
    asks for it through `PLAIN_CPU_WEIGHTS_ENV`. Weights that are not 2-D (MoE experts, conv) keep vLLM's own
    dispatch.
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
