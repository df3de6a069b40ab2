"""The CPU install is usable: vLLM, transformers and DeepSpeed import, and vLLM serves both tiny models."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

SERVE = r"""
import sys
from vllm import SamplingParams
from vllm.inputs import TokensPrompt
from rollout.engine import EngineSettings, RolloutEngine, RolloutSettings
from thinkrl.models import build_tiny_model, load_tokenizer
from thinkrl.chat import prompt_ids

if __name__ == "__main__":
    path = build_tiny_model(sys.argv[1], sys.argv[2])
    tok = load_tokenizer(path)
    # pinned to this process's cores, as a recipe's engines are: vLLM's engine core in this process
    engine = RolloutEngine(EngineSettings(model_path=str(path), max_model_len=256, enforce_eager=True,
                                          gpu_memory_utilization=0.15, cpu_share=(0, 1)))
    print("CLIENT", type(engine.llm.llm_engine.engine_core).__name__)
    prompt = prompt_ids(tok, "1+2=?")
    [[c]] = engine.generate([prompt], RolloutSettings(n=1, temperature=0.0, max_tokens=24))
    # the rollout layer (no detokenization in the engine, texts decoded in one batch, flat log-probs)
    # returns what vLLM's own output path returns for the same greedy request
    ref = engine.llm.generate([TokensPrompt(prompt_token_ids=prompt)],
                              SamplingParams(max_tokens=24, temperature=0.0, logprobs=0), use_tqdm=False)[0].outputs[0]
    assert c.token_ids == list(ref.token_ids) and len(c.token_ids) >= 1, (c.token_ids, ref.token_ids)
    assert c.text == ref.text, (c.text, ref.text)
    ref_lp = [entry[t].logprob for t, entry in zip(ref.token_ids, ref.logprobs)]
    assert max(abs(a - b) for a, b in zip(c.logprobs, ref_lp)) < 1e-5 and len(c.logprobs) == len(ref_lp)
    print("SERVED", len(c.token_ids))
"""

# The weight sync's contract: an engine that loaded new weights in place serves exactly what an engine
# started on those weights serves. vLLM 0.32's CPU MoE kernel broke it (rollout/worker_extension.py).
SYNC = r"""
import sys
import torch
from rollout.engine import EngineSettings, RolloutEngine
from thinkrl.arena import WeightArena
from thinkrl.models import build_tiny_model, load_causal_lm, load_tokenizer
from thinkrl.train_engine import WeightBucket, checkpoint_format

if __name__ == "__main__":
    path, out, cpu_weights = build_tiny_model(sys.argv[1], sys.argv[2] + "/base"), sys.argv[2], sys.argv[3]
    # "pinned": vLLM's engine core in this process (a recipe's engines); else in a second one (vLLM's default)
    share = (0, 1) if sys.argv[4] == "pinned" else None
    settings = dict(enforce_eager=True, max_model_len=256, gpu_memory_utilization=0.15, cpu_share=share)
    engine = RolloutEngine(EngineSettings(model_path=str(path), cpu_weights=cpu_weights, **settings))
    print("CLIENT", type(engine.llm.llm_engine.engine_core).__name__)
    print("PLAIN", int(all(engine.llm.collective_rpc("thinkrl_plain_weights"))))
    ids = list(range(5, 60))
    before = engine.prompt_logprobs(ids, 10)
    model = load_causal_lm(path)
    base = {k: v.clone() for k, v in checkpoint_format(model, dict(model.state_dict())).items()}
    torch.manual_seed(1)
    with torch.no_grad():  # attention left alone: only the experts and the router needed the fix
        for name, p in model.named_parameters():
            if "self_attn" not in name:
                p.add_(torch.randn_like(p) * (1.0 if name.endswith("mlp.gate.weight") else 0.05))
    new = checkpoint_format(model, dict(model.state_dict()))
    engine.load_buckets([WeightBucket.pack(new)])  # through the engine's own arena (a trainer elsewhere)
    synced = engine.prompt_logprobs(ids, 10)
    placement = engine.llm.collective_rpc("thinkrl_placement")[0]
    print("PLACED", int(placement is not None))
    if placement is not None:  # a trainer on this node: its arena laid out as the engine's parameters want
        trainer = WeightArena()
        layout = trainer.stage(new.items(), placement["end"], placement["at"])
        engine._load_arena(trainer.path, trainer.size, layout)
        aliased = engine.prompt_logprobs(ids, 10)
        # the parameters are views of the trainer's memory: writing the old weights there, with no load,
        # is what the engine serves next
        trainer.stage(base.items(), placement["end"], placement["at"])
        engine.llm.reset_prefix_cache()
        print("VIEWS_GAP", max(abs(a - b) for a, b in zip(engine.prompt_logprobs(ids, 10), before)))
    del engine
    model.save_pretrained(out + "/new")
    load_tokenizer(path).save_pretrained(out + "/new")
    fresh = RolloutEngine(EngineSettings(model_path=out + "/new", **settings)).prompt_logprobs(ids, 10)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    trainer_lp = [logp[t - 1, ids[t]].item() for t in range(10, len(ids))]
    print("CHANGED", max(abs(a - b) for a, b in zip(before, fresh)))
    print("SYNC_GAP", max(abs(a - b) for a, b in zip(synced, fresh)))
    if placement is not None:
        print("ALIAS_GAP", max(abs(a - b) for a, b in zip(aliased, fresh)))
    print("TRAINER_GAP", sum(abs(a - b) for a, b in zip(trainer_lp, fresh)) / len(fresh))
"""


def _run(script_text: str, kind: str, tmp_path, *args: str) -> str:
    import os

    script = tmp_path / "script.py"
    script.write_text(script_text)
    # "auto": the engine pins itself when the script gives it a share of the cores (`EngineSettings.cpu_share`)
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "auto"}
    out = subprocess.run([sys.executable, str(script), kind, str(tmp_path / kind), *args], capture_output=True, text=True,
                         timeout=600, env={**os.environ, **env}, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return out.stdout


def test_imports_without_torchvision():
    code = ("import importlib.util, vllm, transformers, deepspeed, ray, math_verify; "
            "print([m for m in ('torchvision', 'torchaudio', 'torchcodec') if importlib.util.find_spec(m)])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("kind", ["tiny-dense", "tiny-moe"])
def test_vllm_serves_tiny_model(kind, tmp_path):
    out = _run(SERVE, kind, tmp_path)
    assert "SERVED" in out and "CLIENT InprocClient" in out, out[-2000:]


@pytest.mark.parametrize("kind,cpu_weights,where", [("tiny-moe", "packed", "pinned"), ("tiny-dense", "plain", "mp")])
def test_weight_sync_serves_the_new_weights(kind, cpu_weights, where, tmp_path):
    """Packed dense engines are covered by every RL test (the probe after each sync); the MoE needed a fix,
    and plain weights (`rollout.cpu_weights=plain`) load by other paths: a copy (`model.load_weights`), and,
    from a trainer's arena laid out as the engine asks, parameters that are views of it. The plain engine
    runs vLLM's worker in a second process (which reads `PLAIN_CPU_WEIGHTS_ENV`; tests/test_engine_process.py
    covers plain weights in this process), the MoE in this process, as a recipe's pinned engines do."""
    out = _run(SYNC, kind, tmp_path, cpu_weights, where)
    values = dict(line.split() for line in out.splitlines()
                  if line.startswith(("CLIENT", "PLAIN", "PLACED", "CHANGED", "SYNC_GAP", "ALIAS_GAP", "VIEWS_GAP",
                                      "TRAINER_GAP")))
    assert values["CLIENT"] == ("InprocClient" if where == "pinned" else "SyncMPClient")
    plain = "1" if cpu_weights == "plain" else "0"
    assert values["PLAIN"] == plain and values["PLACED"] == plain  # the worker loads by the path asked for
    assert float(values["CHANGED"]) > 0.05  # the new weights change the log-probs...
    assert float(values["SYNC_GAP"]) < 1e-5  # ...and the synced engine serves exactly them
    if cpu_weights == "plain":
        assert float(values["ALIAS_GAP"]) < 1e-5  # served from views of the trainer's arena
        assert float(values["VIEWS_GAP"]) < 1e-5  # and they are views: a write there alone changes what it serves
    # and the engine runs the trainer's model, to float32 rounding: vLLM once routed the tiny MoE with softmax
    # (transformers: sigmoid; thinkrl.models.tiny_config sets scoring_func), and vLLM-CPU's compiled rotary
    # kernel rotates MLA's strided query/key wrongly (thinkrl.inference.cpu_engine_options avoids it)
    assert float(values["TRAINER_GAP"]) < 1e-5  # 1.5e-7 measured here; 2.9e-3 with the rotary kernel, 0.115 softmax
