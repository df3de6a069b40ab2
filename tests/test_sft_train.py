"""SFT warmup through real Ray actors and DeepSpeed: resume after a crash continues exactly by step."""

import json
import os

import pytest

from sft.config import SFTConfig, SFTStage
from sft.train import optim_config
from thinkrl.chat import encode_conversation
from thinkrl.tasks import arithmetic
from thinkrl.train_engine import lr_lambda


def test_schedule_decays_then_rewarms_for_a_second_stage():
    sft = SFTConfig(lr=2e-5, steps=10, warmup_steps=2, min_lr_ratio=0.1,
                    second_stage=SFTStage(steps=10, lr=1e-5, min_lr=1e-6, warmup_steps=2, max_seq_len=1024))
    f = lr_lambda(optim_config(sft))
    lr = [2e-5 * f(s) for s in range(25)]
    assert lr[0] == pytest.approx(1e-5) and lr[1] == pytest.approx(2e-5)  # warmup
    assert 2e-6 < lr[9] < 3e-6  # nearly decayed to the floor (2e-6) at the end of stage 1
    assert lr[10] == pytest.approx(5e-6) and lr[11] == pytest.approx(1e-5)  # re-warm to the stage-2 peak
    assert 1e-6 < lr[19] < 1.5e-6 and lr[24] == pytest.approx(1e-6)  # decays, then holds its floor
    assert all(a >= b for a, b in zip(lr[1:10], lr[2:10], strict=False))
    linear = lr_lambda(optim_config(SFTConfig(lr=1.0, steps=11, warmup_steps=1, min_lr_ratio=0.0, schedule="linear")))
    assert linear(6) == pytest.approx(0.5)


def test_bad_row_policy_counts_and_names_rows(tokenizer):
    from sft.data import encode_rows
    from thinkrl.fileio import DataError

    good = {"messages": [{"role": "user", "content": "1+1=?"}, {"role": "assistant", "content": "2"}]}
    rows = [good, {"messages": [{"role": "user", "content": "x"}]},
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]},
            {"messages": [{"role": "user", "content": "9" * 100}, {"role": "assistant", "content": "1"}]}, good]
    with pytest.raises(DataError, match=r"d\.jsonl:2: messages: no assistant turn"):
        encode_rows(tokenizer, rows, "d.jsonl", max_seq_len=64)
    out = encode_rows(tokenizer, rows, "d.jsonl", max_seq_len=64, bad_rows="skip")
    assert len(out.examples) == 2
    assert [r for r, _ in out.skipped] == [2, 3, 4]
    assert "non-empty 'content'" in out.skipped[1][1] and "over max_seq_len=64" in out.skipped[2][1]


def test_load_rows_reads_jsonl_parquet_and_datasets_folder(tmp_path):
    import datasets

    from sft.data import load_rows
    from thinkrl.fileio import write_jsonl

    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": str(i)}]}
            for i in range(3)]
    write_jsonl(tmp_path / "a.jsonl", rows)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "folder"))
    for name in ("a.jsonl", "a.parquet", "folder"):
        assert load_rows(tmp_path / name) == rows


class _Crash(Exception):
    pass


@pytest.mark.integration
def test_sft_resume_continues_exactly(ray_local, tiny_dense, tokenizer, tmp_path):
    from sft.train import run_sft

    rows = arithmetic.sft_conversations(arithmetic.make_rows(40, seed=5, max_ops=2), seed=5)
    examples = [encode_conversation(tokenizer, r["messages"]) for r in rows]
    sft = SFTConfig(steps=4, batch_size=8, micro_batches=2, lr=1e-3, warmup_steps=1, save_every=2,
                    eval_every=2, log_every=1, max_seq_len=256)

    def crash_at_step_4(line):
        if line.startswith("[sft] step 4/"):
            raise _Crash

    with pytest.raises(_Crash):
        run_sft(sft, examples, str(tiny_dense), tmp_path / "sft", seed=0, log=crash_at_step_4,
                metrics_file=tmp_path / "cut.jsonl")
    assert json.loads((tmp_path / "sft-state" / "latest.json").read_text())["step"] == 2
    assert not (tmp_path / "sft").exists()
    stats = run_sft(sft, examples, str(tiny_dense), tmp_path / "sft", seed=0, log=lambda _: None,
                    metrics_file=tmp_path / "resumed.jsonl")
    assert stats["sft_resumed_from_step"] == 2
    cut = [json.loads(x) for x in (tmp_path / "cut.jsonl").read_text().splitlines()]
    resumed = [json.loads(x) for x in (tmp_path / "resumed.jsonl").read_text().splitlines()]
    assert [r["step"] for r in cut] == [1, 2, 3, 4] and [r["step"] for r in resumed] == [3, 4]
    # step 3 needs the restored weights and example stream, step 4 the restored optimizer and schedule
    for before, after in zip(cut[2:], resumed, strict=True):
        assert after["loss"] == pytest.approx(before["loss"], rel=1e-5)
        assert after["lr"] == pytest.approx(before["lr"], rel=1e-9)
    assert resumed[1]["eval_loss"] == pytest.approx(cut[3]["eval_loss"], rel=1e-5)
    assert cut[3]["eval_loss"] < cut[1]["eval_loss"]  # the held-out loss falls while training
    assert 0.5 < stats["sft_non_padding_share"] <= 1.0
    assert (tmp_path / "sft" / "config.json").exists()
    assert not (tmp_path / "sft-state").exists()  # a finished warmup drops its resumable state


@pytest.mark.integration
def test_every_layout_gives_the_same_step(tiny_dense, tokenizer):
    """Padded, packed rows and length buckets: the same loss, gradient norm and held-out sums on real
    DeepSpeed (the learning rate is too small to move the weights between the calls)."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    from sft.worker import SFTWorker
    from thinkrl.cluster import free_port
    from thinkrl.train_engine import DistConfig, OptimConfig

    rows = arithmetic.sft_conversations(arithmetic.make_rows(16, seed=7, max_ops=3), seed=7)
    examples = [encode_conversation(tokenizer, r["messages"]) for r in rows]
    worker = SFTWorker(str(tiny_dense), OptimConfig(lr=1e-30, warmup_steps=0), DistConfig(master_port=free_port()), seed=0)
    padded = worker.train_step(examples, None)
    rows_step = worker.train_step(examples, 512, "rows")
    buckets = worker.train_step(examples, 512, "buckets")
    assert padded["input_tokens"] == rows_step["input_tokens"] == buckets["input_tokens"]
    assert padded["slots"] > buckets["slots"] and padded["slots"] > rows_step["slots"]
    for step in (rows_step, buckets):
        assert step["loss"] == pytest.approx(padded["loss"], rel=1e-5)
        assert step["grad_norm"] == pytest.approx(padded["grad_norm"], rel=1e-4)
    sums = [worker.eval_sums(examples, budget, layout) for budget, layout in ((None, "auto"), (512, "rows"), (512, "auto"))]
    assert sums[0][1] == sums[1][1] == sums[2][1]
    assert sums[1][0] == pytest.approx(sums[0][0], rel=1e-5) and sums[2][0] == pytest.approx(sums[0][0], rel=1e-5)
    with pytest.raises(ValueError, match="packing layout"):
        worker.train_step(examples, 512, "rowz")


@pytest.mark.integration
def test_gradient_accumulation_takes_the_same_steps(tiny_dense, tokenizer):
    """sft.micro_batches=2 steps the optimizer and the schedule once per train_step, on the same mean
    loss as micro_batches=1: the same losses, learning rates and gradient norms, step after step (the
    weights move between steps, so a step taken late or with a doubled gradient shows at the next)."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    from sft.worker import SFTWorker
    from thinkrl.cluster import free_port
    from thinkrl.train_engine import DistConfig, OptimConfig

    rows = arithmetic.sft_conversations(arithmetic.make_rows(24, seed=11, max_ops=3), seed=11)
    examples = [encode_conversation(tokenizer, r["messages"]) for r in rows]
    runs = {}
    for micro in (1, 2):
        worker = SFTWorker(str(tiny_dense), OptimConfig(lr=3e-3, warmup_steps=2, total_steps=6),
                           DistConfig(master_port=free_port()), seed=0, micro_batches=micro)
        runs[micro] = [worker.train_step(examples[i * 8 : (i + 1) * 8], 512) for i in range(3)]
    for one, two in zip(runs[1], runs[2], strict=True):
        assert two["lr"] == pytest.approx(one["lr"], rel=1e-9)
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-4)
        assert two["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-3)
    assert runs[1][2]["loss"] < runs[1][0]["loss"]  # the steps really move the weights
