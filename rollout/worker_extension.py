"""Methods thinkrl adds to every vLLM worker (passed to vLLM as `worker_extension_cls`).

vLLM mixes this class into its worker; the engine reaches these methods through
`LLM.collective_rpc(name, args=...)`. They run inside the worker process, next to the model.
"""

from __future__ import annotations


class WeightLoaderExtension:
    """Load new weights into the served model from a safetensors file (CPU weight sync).

    The trainer writes its weights once to shared memory (`/dev/shm` where it exists); every worker
    maps the file and copies the tensors into its own, possibly sharded, parameters through the model's
    `load_weights`, the same path vLLM uses at start-up, so name mapping and tensor-parallel sharding
    are vLLM's own.
    """

    def thinkrl_load_weights(self, path: str) -> int:
        import logging

        from safetensors.torch import load_file

        state = load_file(path, device="cpu")
        # vLLM's in-place reload restores each layer to checkpoint format, loads, and re-runs the
        # post-load processing (on CPU the linear layers repack their weights for oneDNN). Layers with
        # buffers but no checkpoint weights (rotary embeddings) keep their tensors and make the reload
        # warn "Failed to load weights" on every sync; the probe after each sync is the real check.
        reload_log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        level = reload_log.level
        reload_log.setLevel(logging.ERROR)
        try:
            self.model_runner.reload_weights(weights_iterator=iter(state.items()), is_checkpoint_format=True)
        finally:
            reload_log.setLevel(level)
        return len(state)
