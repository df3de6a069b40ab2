"""The trainer's CUDA paths: bf16, NCCL, fused AdamW, gradient checkpointing, the chunked head in bf16.

Deselected by `make test` (`-m "not gpu"`); run them on a CUDA machine with `make test-gpu`. Their CPU
counterparts run everywhere: tests/test_logprobs.py (head, checkpointing) and tests/test_trainer.py
(the PMD update on DeepSpeed's CPU accelerator).
"""

import os

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.integration]


@pytest.fixture(scope="module", autouse=True)
def cuda_accelerator():
    if not torch.cuda.is_available():
        pytest.fail("tests marked gpu need a CUDA device (make test deselects them)")
    os.environ["DS_ACCELERATOR"] = "cuda"


def test_chunked_head_in_bf16_matches_float32():
    from thinkrl.train_engine import head_logprobs

    torch.manual_seed(0)
    n, h, v = 3000, 256, 50000
    head = torch.nn.Linear(h, v, bias=False, device="cuda", dtype=torch.bfloat16)
    hidden = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, v, (n,), device="cuda")
    got = head_logprobs(head, hidden, targets, chunk_tokens=512)
    got.sum().backward()
    g_hidden, g_weight = hidden.grad.float(), head.weight.grad.float()
    assert head.weight.grad.dtype == torch.bfloat16 and got.dtype == torch.float32

    hidden32 = hidden.detach().float().requires_grad_(True)
    weight32 = head.weight.detach().float().requires_grad_(True)
    ref = torch.log_softmax(hidden32 @ weight32.T, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    ref.sum().backward()
    # bf16 logits against float32 ones: agreement to bf16 precision, not to float32's
    assert (got - ref).abs().max() < 0.1
    assert torch.nn.functional.cosine_similarity(g_hidden.flatten(), hidden32.grad.flatten(), dim=0) > 0.99
    assert torch.nn.functional.cosine_similarity(g_weight.flatten(), weight32.grad.flatten(), dim=0) > 0.99


def test_train_engine_bf16_with_checkpointing_learns(tiny_dense):
    from thinkrl.cluster import free_port
    from thinkrl.train_engine import DistConfig, OptimConfig, TrainEngine

    engine = TrainEngine(tiny_dense, OptimConfig(lr=3e-3), DistConfig(master_port=free_port(),
                         gradient_checkpointing=True), logprob_chunk_tokens=16)
    params = list(engine.module.parameters())
    assert params[0].device.type == "cuda" and params[0].dtype == torch.bfloat16
    assert engine.module.is_gradient_checkpointing and engine.module.training
    ids = torch.randint(3, 200, (4, 48))
    mask = torch.ones_like(ids)
    losses = []
    for _ in range(8):
        stats = engine.train_step([ids], lambda batch: -engine.token_logprobs(batch, mask, mask).sum() / mask[:, 1:].sum())
        losses.append(stats["loss"])
    assert stats["grad_norm"] > 0
    assert losses[-1] < losses[0] - 0.5, losses


def test_pmd_update_on_cuda(tiny_dense):
    from rl.batching import StepPlan
    from rl.trainer import PMDSettings, PMDWorker, Sample
    from thinkrl.chat import prompt_ids
    from thinkrl.cluster import free_port
    from thinkrl.train_engine import DistConfig, OptimConfig

    worker = PMDWorker(str(tiny_dense), OptimConfig(lr=3e-3), DistConfig(master_port=free_port()), seed=0)
    tok = worker.engine.tokenizer
    prompt = prompt_ids(tok, "3+4=?")
    samples = []
    for reward, text in ((1.0, "<think>3+4=7</think>\\boxed{7}"), (0.0, "<think>3+4=8</think>\\boxed{8}")):
        ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        samples.append(Sample(prompt, ids, reward - 0.5, worker.probe_logprobs(prompt + ids, len(prompt))))
    before = [sum(s.rollout_logprobs) for s in samples]
    stats = worker.update(samples, [StepPlan([list(range(len(samples)))], len(samples))], PMDSettings(tau=0.1))
    after = [sum(worker.probe_logprobs(s.prompt_ids + s.response_ids, len(s.prompt_ids))) for s in samples]
    assert after[0] > before[0] and after[1] < before[1]
    # bf16: the batched recompute and the one-sequence probe round differently, but not by much
    assert stats["logprob_gap_vllm_trainer"] < 0.05


def test_weight_buckets_of_a_bf16_cuda_trainer_travel_exactly(tiny_dense):
    """The weight sync's trainer side on CUDA: bf16 buckets, packed as raw bytes for Ray's object store (the
    CPU counterpart: tests/test_trainer.py::test_synced_and_exported_weights_are_the_trainers)."""
    from thinkrl.cluster import free_port
    from thinkrl.train_engine import DistConfig, OptimConfig, TrainEngine, WeightBucket

    engine = TrainEngine(tiny_dense, OptimConfig(lr=3e-3), DistConfig(master_port=free_port(), zero_stage=3))
    travelled = {}
    for bucket in engine.weight_buckets(bucket_bytes=64 << 10):
        travelled.update({n: t.clone() for n, t in WeightBucket.pack(bucket).tensors()})
    full = engine.full_state_dict()
    assert travelled.keys() == full.keys()
    for name, tensor in full.items():
        assert travelled[name].dtype == torch.bfloat16 and torch.equal(travelled[name], tensor), name
