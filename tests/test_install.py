"""The CPU install is usable: vLLM, transformers and DeepSpeed import, and vLLM serves both tiny models."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

SERVE = r"""
import sys
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
from thinkrl.models import build_tiny_model, load_tokenizer
from thinkrl.chat import prompt_ids

if __name__ == "__main__":
    path = build_tiny_model(sys.argv[1], sys.argv[2])
    tok = load_tokenizer(path)
    llm = LLM(model=str(path), dtype="float32", max_model_len=256, enforce_eager=True,
              gpu_memory_utilization=0.15)
    out = llm.generate([TokensPrompt(prompt_token_ids=prompt_ids(tok, "1+2=?"))],
                       SamplingParams(max_tokens=8, temperature=1.0, logprobs=0))[0].outputs[0]
    assert len(out.token_ids) >= 1 and len(out.logprobs) == len(out.token_ids)
    print("SERVED", len(out.token_ids))
"""


def test_imports_without_torchvision():
    code = ("import importlib.util, vllm, transformers, deepspeed, ray, math_verify; "
            "print([m for m in ('torchvision', 'torchaudio', 'torchcodec') if importlib.util.find_spec(m)])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("kind", ["tiny-dense", "tiny-moe"])
def test_vllm_serves_tiny_model(kind, tmp_path):
    script = tmp_path / "serve.py"
    script.write_text(SERVE)
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    import os

    out = subprocess.run([sys.executable, str(script), kind, str(tmp_path / kind)], capture_output=True, text=True,
                         timeout=600, env={**os.environ, **env}, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "SERVED" in out.stdout
