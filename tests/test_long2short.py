"""Long2short (Kimi k1.5): model merging, shortest rejection sampling, DPO, and the eval command that compares them.

Unit tests: the merge's arithmetic and its refusals (hostile folders), preference pairs from (length,
correct) groups, the DPO loss on hand-computed numbers, the builder's keep="every" rows, the commands'
settings. One integration test runs the four commands (`merge`, `eval`, `long2short --method shortest` and
`--method dpo`) end to end on the tiny model with real Ray, vLLM and DeepSpeed.
"""

import json
import math
import os
import shutil
import sys
from pathlib import Path

import hangs
import pytest
import torch
from safetensors.torch import load_file, save_file

from rl.long2short import by_prompt, check_out, data_summary, load_model_recipe, pair_rows, shortest_rows
from rl.merge import MergeError, config_difference, merge, merge_tensor
from sft.dpo import _share, dpo_loss, preference_pairs, shortest_correct

REPO = Path(__file__).resolve().parent.parent
CONFIG = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 4, "transformers_version": "5.0",
          "dtype": "float32"}


def _model(folder: Path, tensors: dict, config: dict | None = None, tokenizer: str = "A", shards: int = 1) -> Path:
    """A fake Hugging Face folder: config.json, a tokenizer file, weights in `shards` safetensors files."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config or CONFIG))
    (folder / "tokenizer.json").write_text(tokenizer)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def _tensors(seed: int, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"embed.weight": torch.randn(5, 4, generator=g).to(dtype), "layer.0.weight": torch.randn(4, 4, generator=g).to(dtype),
            "layer.0.bias": torch.randn(4, generator=g).to(dtype), "position_ids": torch.arange(6)}


# ---- merge ---------------------------------------------------------------------------------------------


def test_merge_is_alpha_a_plus_the_rest_of_b_in_a_s_dtype_with_a_s_files(tmp_path):
    a = _model(tmp_path / "a", _tensors(0, torch.bfloat16), tokenizer="A's tokenizer")
    b = _model(tmp_path / "b", _tensors(1), tokenizer="B's tokenizer")
    summary = merge(a, b, 0.25, tmp_path / "m")
    merged, ta, tb = load_file(tmp_path / "m" / "model.safetensors"), _tensors(0, torch.bfloat16), _tensors(1)
    for name in ("embed.weight", "layer.0.weight", "layer.0.bias"):
        assert merged[name].dtype == torch.bfloat16
        expected = (0.25 * ta[name].float() + 0.75 * tb[name].float()).to(torch.bfloat16)
        assert torch.equal(merged[name], expected), name
    assert torch.equal(merged["position_ids"], torch.arange(6))  # not floating point: copied
    assert (tmp_path / "m" / "tokenizer.json").read_text() == "A's tokenizer"
    assert json.loads((tmp_path / "m" / "config.json").read_text()) == CONFIG
    assert summary["parameters"] == 4 and json.loads((tmp_path / "m" / "thinkrl_merge.json").read_text())["alpha"] == 0.25
    # the ends: alpha 1 is A, alpha 0 is B (in A's dtype)
    merge(a, b, 1.0, tmp_path / "one")
    merge(a, b, 0.0, tmp_path / "zero")
    assert torch.equal(load_file(tmp_path / "one" / "model.safetensors")["layer.0.weight"], ta["layer.0.weight"])
    assert torch.equal(load_file(tmp_path / "zero" / "model.safetensors")["layer.0.weight"],
                       tb["layer.0.weight"].to(torch.bfloat16))


def test_merge_keeps_a_s_shards_whatever_b_s_layout(tmp_path):
    a = _model(tmp_path / "a", _tensors(0), shards=2)
    b = _model(tmp_path / "b", _tensors(1), shards=1)
    merge(a, b, 0.5, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == sorted([p.name for p in a.iterdir()] + ["thinkrl_merge.json"])
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())["weight_map"]
    merged = {}
    for file in set(index.values()):
        merged.update(load_file(tmp_path / "m" / file))
    assert torch.allclose(merged["layer.0.weight"], (_tensors(0)["layer.0.weight"] + _tensors(1)["layer.0.weight"]) / 2)


def test_merge_tensor_accumulates_in_float32():
    a = torch.tensor([1.0, 3.0], dtype=torch.bfloat16)
    assert torch.equal(merge_tensor(a, torch.tensor([3.0, 5.0]), 0.25), torch.tensor([2.5, 4.5], dtype=torch.bfloat16))
    with pytest.raises(MergeError, match=r"parameter 'w' has shape \[2\] in A and \[3\] in B"):
        merge_tensor(a, torch.zeros(3), 0.5, "w")
    with pytest.raises(MergeError, match="'ids' is not floating point"):
        merge_tensor(torch.arange(3), torch.arange(1, 4), 0.5, "ids")


@pytest.mark.parametrize("case, message", [
    ("alpha_low", r"--alpha must be in \[0, 1\].*-0.1"),
    ("alpha_high", r"--alpha must be in \[0, 1\].*1.5"),
    ("alpha_nan", r"--alpha must be in \[0, 1\].*nan"),
    ("shape", r"parameter 'layer.0.weight' has shape \[4, 4\] in A .* and \[4, 3\] in B"),
    ("missing_in_b", r"parameter 'layer.0.bias' is in A .* but not in B"),
    ("extra_in_b", r"parameter 'extra.weight' is in B .* but not in A"),
    ("architecture", r"differ in config.json \(model_type: 'qwen2' in A, 'llama' in B\)"),
    ("nested_config", r"differ in config.json \(text_config.hidden_size: 4 in A, 8 in B\)"),
    ("int_buffer", r"'position_ids' is not floating point \(torch.int64\) and differs"),
    ("out_is_a", r"--out .* is model A"),
    ("out_is_b", r"--out .* is model B"),
    ("out_inside_a", r"--out .* is inside model A"),
    ("out_contains_a", r"--out .* contains model A"),
    ("out_not_empty", r"--out .* exists and is not empty \(pass --overwrite"),
    ("not_a_model", r"not a Hugging Face model folder \(no config.json\)"),
    ("no_weights", r"no \*.safetensors file \(only safetensors weights are merged"),
    ("bad_json", r"config.json is not valid JSON"),
    ("damaged_weights", r"not a readable safetensors file"),
])
def test_merge_refuses_naming_the_first_difference_and_writes_nothing(tmp_path, case, message):
    a = _model(tmp_path / "a", _tensors(0), config={**CONFIG, "text_config": {"hidden_size": 4}})
    tb = _tensors(1)
    config_b = {**CONFIG, "text_config": {"hidden_size": 4}, "transformers_version": "4.9", "dtype": "bfloat16"}
    alpha, out = 0.5, tmp_path / "out"
    if case == "alpha_low":
        alpha = -0.1
    elif case == "alpha_high":
        alpha = 1.5
    elif case == "alpha_nan":
        alpha = float("nan")
    elif case == "shape":
        tb["layer.0.weight"] = torch.zeros(4, 3)
    elif case == "missing_in_b":
        del tb["layer.0.bias"]
    elif case == "extra_in_b":
        tb["extra.weight"] = torch.zeros(2)
    elif case == "architecture":
        config_b["model_type"] = "llama"
    elif case == "nested_config":
        config_b["text_config"] = {"hidden_size": 8}
    elif case == "int_buffer":
        tb["position_ids"] = torch.arange(6) + 1
    b = _model(tmp_path / "b", tb, config=config_b)
    if case == "out_is_a":
        out = a
    elif case == "out_is_b":
        out = b
    elif case == "out_inside_a":
        out = a / "merged"
    elif case == "out_contains_a":
        out = tmp_path
    elif case == "out_not_empty":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "not_a_model":
        (a / "config.json").unlink()
    elif case == "no_weights":
        (b / "model.safetensors").unlink()
    elif case == "bad_json":
        (b / "config.json").write_text("{not json")
    elif case == "damaged_weights":
        (b / "model.safetensors").write_bytes(b"\x00" * 7)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    with pytest.raises(MergeError, match=message):
        merge(a, b, alpha, out)
    # nothing written, nothing replaced; a failing merge leaves no temporary folder either
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before


def test_merge_command_exit_codes_and_overwrite(tmp_path, capsys):
    from rl.merge import main

    a, b = _model(tmp_path / "a", _tensors(0)), _model(tmp_path / "b", _tensors(1))
    assert main([str(a), str(b), "--alpha", "2", "--out", str(tmp_path / "m")]) == 2
    assert "error: cannot merge: --alpha must be in [0, 1]" in capsys.readouterr().err
    assert main([str(a), str(b), "--alpha", "0.5", "--out", str(tmp_path / "m")]) == 0
    assert json.loads(capsys.readouterr().out)["alpha"] == 0.5
    assert main([str(a), str(b), "--alpha", "0.5", "--out", str(tmp_path / "m")]) == 2  # exists now
    assert main([str(a), str(b), "--alpha", "1", "--out", str(tmp_path / "m"), "--overwrite"]) == 0
    assert torch.equal(load_file(tmp_path / "m" / "model.safetensors")["embed.weight"], _tensors(0)["embed.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "m"]  # no temporary or .old folder left


def test_merge_of_two_tiny_models_loads_in_transformers(tiny_dense, tmp_path):
    from thinkrl.models import build_tiny_model, load_causal_lm

    other = build_tiny_model("tiny-dense", tmp_path / "other", seed=1)
    merge(tiny_dense, other, 0.3, tmp_path / "m")
    models = [load_causal_lm(p) for p in (tiny_dense, other, tmp_path / "m")]
    name = "model.layers.0.mlp.up_proj.weight"
    a, b, m = (dict(model.named_parameters())[name] for model in models)
    assert torch.allclose(m, 0.3 * a + 0.7 * b)
    assert config_difference(json.loads((tiny_dense / "config.json").read_text()),
                             json.loads((tmp_path / "m" / "config.json").read_text())) is None


# ---- pairs and the DPO loss ------------------------------------------------------------------------------


def test_preference_pairs_prefer_the_shortest_correct_to_longer_and_incorrect_ones():
    # correct: 0 (30 tokens), 2 (20), 3 (12, the shortest); incorrect: 1, 4 (even the one shorter than 3)
    assert preference_pairs([30, 12, 20, 12, 5], [True, False, True, True, False]) == [(3, 0), (3, 1), (3, 2), (3, 4)]
    assert shortest_correct([30, 12, 20, 12, 5], [True, False, True, True, False]) == 3
    assert preference_pairs([9, 9, 20], [True, True, False]) == [(0, 2)]  # a tie of correct ones: no pair, first wins
    assert preference_pairs([5, 8], [False, False]) == []  # no correct response: no pair
    assert preference_pairs([5, 8], [True, True]) == [(0, 1)]
    assert preference_pairs([5], [True]) == []
    with pytest.raises(ValueError, match="2 lengths but 1 correctness"):
        preference_pairs([5, 8], [True])


def _row(prompt: str, index: int, tokens: int, verified: bool) -> dict:
    return {"id": prompt, "sample_index": index, "num_tokens": tokens, "verified": verified,
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "x" * tokens}]}


def test_rows_give_the_shortest_correct_per_prompt_and_its_pairs():
    rows = [_row("p0", 0, 40, True), _row("p0", 1, 25, True), _row("p0", 3, 10, False),  # sample 2 was empty
            _row("p1", 0, 30, False), _row("p1", 1, 31, False),
            _row("p2", 0, 18, True)]
    assert by_prompt(rows) == [[0, 1, 2], [3, 4], [5]]
    assert shortest_rows(rows) == [1, 5]
    assert pair_rows(rows) == [(1, 0), (1, 2)]
    # DPO's chosen responses are exactly the shortest method's examples of the prompts that have a pair
    assert {c for c, _ in pair_rows(rows)} <= set(shortest_rows(rows))
    assert data_summary("shortest", rows) == {"train_examples": 2, "chosen_mean_tokens": (25 + 18) / 2}
    assert data_summary("dpo", rows) == {"pairs": 2, "pair_prompts": 1, "rejected_mean_tokens": 25.0,
                                         "chosen_mean_tokens": 25.0}
    assert data_summary("dpo", rows[3:5]) == {"pairs": 0, "pair_prompts": 0, "rejected_mean_tokens": None,
                                              "chosen_mean_tokens": None}


def test_dpo_loss_on_hand_computed_numbers():
    beta = 0.5
    # pair 0: chosen up 1 nat and rejected down 1 nat from the reference: margin 0.5 * (1 - (-1)) = 1
    # pair 1: policy = reference: margin 0, loss log 2; pair 2: the wrong way round: margin -0.5 * 3 = -1.5
    policy_c = torch.tensor([-9.0, -5.0, -7.0], requires_grad=True)
    policy_r = torch.tensor([-21.0, -6.0, -3.0], requires_grad=True)
    loss, chosen, rejected = dpo_loss(policy_c, policy_r, torch.tensor([-10.0, -5.0, -6.0]),
                                      torch.tensor([-20.0, -6.0, -5.0]), beta)
    margin = chosen - rejected
    assert margin.tolist() == pytest.approx([1.0, 0.0, -1.5])
    assert chosen.tolist() == pytest.approx([0.5, 0.0, -0.5]) and rejected.tolist() == pytest.approx([-0.5, 0.0, 1.0])
    expected = [math.log(1 + math.exp(-1.0)), math.log(2), math.log(1 + math.exp(1.5))]  # -log sigmoid(margin)
    assert loss.tolist() == pytest.approx(expected, rel=1e-6)
    loss.sum().backward()
    sigmoid = [1 / (1 + math.exp(m)) for m in (1.0, 0.0, -1.5)]  # sigmoid(-margin)
    assert policy_c.grad.tolist() == pytest.approx([-beta * s for s in sigmoid], rel=1e-6)
    assert policy_r.grad.tolist() == pytest.approx([beta * s for s in sigmoid], rel=1e-6)
    # far from the reference the loss stays finite (no log of a sigmoid that underflowed)
    far, _, _ = dpo_loss(torch.tensor([-1e4]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), 1.0)
    assert far.item() == pytest.approx(1e4)


def test_a_rank_gets_only_the_sequences_its_pairs_use():
    sequences, reference = ["s0", "s1", "s2", "s3"], [-1.0, -2.0, -3.0, -4.0]
    assert _share([(3, 1), (3, 0)], sequences, reference) == (["s0", "s1", "s3"], [(2, 1), (2, 0)], [-1.0, -2.0, -4.0])


# ---- the builder's keep="every", the commands' settings --------------------------------------------------


def test_build_dataset_every_keeps_all_traces_with_their_verdict(tmp_path):
    from rewards.math import math_reward
    from sft.build_cot import ArithmeticTeacher, Question, build_dataset
    from thinkrl.tasks import arithmetic

    questions = [Question(r["id"], r["prompt"], r["answer"], []) for r in arithmetic.make_rows(6, seed=2, max_ops=3)]
    stats = build_dataset(questions, tmp_path / "every", ArithmeticTeacher(slip_rate=0.5, fix_rate=0.0), k=4,
                          keep="every", reward="math", chunk_size=4, progress=False, log=lambda _: None,
                          reward_workers=1, reward_timeout_s=30)
    rows = [json.loads(line) for line in (tmp_path / "every" / "data.jsonl").read_text().splitlines()]
    assert len(rows) == stats["traces_kept"] == stats["traces_sampled"] == 24
    assert sum(r["verified"] for r in rows) == stats["traces_verified"]
    assert 0 < stats["traces_verified"] < 24  # the slipping teacher is wrong sometimes: those rows stay, unverified
    by_id = {q.id: q.answer for q in questions}
    for r in rows:
        assert r["verified"] == bool(math_reward(r["messages"][1]["content"], by_id[r["id"]]).correct)


def test_flags_are_recipe_keys_and_bad_values_fail_by_key(tiny_dense, tmp_path):
    from thinkrl.config import RecipeError

    recipe, model = load_model_recipe("recipes/tiny.yaml", ["long2short.k=4"],
                                      {"long2short.beta": 0.3, "long2short.lr": None}, str(tiny_dense))
    assert (recipe.long2short.k, recipe.long2short.beta, recipe.long2short.lr) == (4, 0.3, 1e-4)
    assert model == tiny_dense
    with pytest.raises(RecipeError, match="long2short.beta"):
        load_model_recipe("recipes/tiny.yaml", [], {"long2short.beta": -1}, str(tiny_dense))
    with pytest.raises(RecipeError, match="long2short.kk: unknown key"):
        load_model_recipe("recipes/tiny.yaml", ["long2short.kk=3"], {}, str(tiny_dense))
    with pytest.raises(ValueError, match="neither a tiny kind"):
        load_model_recipe("recipes/tiny.yaml", [], {}, str(tmp_path))


def test_out_must_be_a_folder_of_its_own(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for out in (model, model / "short", tmp_path):
        with pytest.raises(ValueError, match="overlaps --model"):
            check_out(out, model)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("someone's")
    with pytest.raises(ValueError, match="no earlier output of this command"):
        check_out(tmp_path / "taken", model)
    (tmp_path / "taken-work").mkdir()  # an earlier run of the command: resumed
    check_out(tmp_path / "taken", model)
    check_out(tmp_path / "new", model)


def test_stage_settings_that_cannot_work_fail_before_anything_starts(tiny_dense, tmp_path):
    from rl.long2short import run_stage

    recipe, model = load_model_recipe("recipes/tiny.yaml", ["long2short.k=1"], {}, str(tiny_dense))
    with pytest.raises(ValueError, match="dpo pairs responses to one prompt: it needs k >= 2"):
        run_stage(recipe, "dpo", model, tmp_path / "out")
    with pytest.raises(ValueError, match="--method must be one of shortest, dpo"):
        run_stage(recipe, "merge", model, tmp_path / "out")
    (tmp_path / "out-work").mkdir()
    (tmp_path / "out-work" / "train.json").write_text(json.dumps({"method": "shortest", "stats": {}}))
    with pytest.raises(ValueError, match="holds a finished 'shortest' stage, not 'dpo'"):
        run_stage(recipe.model_copy(update={"long2short": recipe.long2short.model_copy(update={"k": 4})}), "dpo",
                  model, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out-work"]


def test_commands_are_registered():
    from thinkrl.cli import COMMANDS

    assert {name: COMMANDS[name][0] for name in ("eval", "merge", "long2short")} == {
        "eval": "rl.evaluate", "merge": "rl.merge", "long2short": "rl.long2short"}


# ---- the commands end to end ------------------------------------------------------------------------------

SMALL = ["data.n_train=64", "data.n_heldout=6", "rollout.num_engines=1", "rollout.max_tokens=24", "eval.max_tokens=24",
         "eval.samples_per_prompt=2", "rollout.enforce_eager=true", "reward.num_workers=1",
         # an untrained model is never right: a reward whose verdict varies on any text gives groups with both
         "reward.rewards=['user_rewards:coin']"]
EVALUATE_FIELDS = {"accuracy", "mean_response_tokens", "n_prompts", "samples_per_prompt"}  # rl.generation.evaluate's


def _command(*args, env):
    out = hangs.run([sys.executable, "-m", "thinkrl.cli", *args], timeout=900, cwd=REPO, env=env)
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    return out


@pytest.mark.integration
def test_merge_eval_shortest_and_dpo_commands(tiny_dense, tmp_path, monkeypatch):
    """merge -> eval of the merge (vLLM loads it) -> shortest rejection sampling -> DPO on the same samples."""
    from thinkrl.models import build_tiny_model

    plugins = REPO / "tests" / "fixtures" / "reward_plugin"
    monkeypatch.syspath_prepend(str(plugins))
    from user_rewards import coin

    env = {**os.environ, "THINKRL_CACHE": str(tmp_path / "cache"), "VLLM_CPU_KVCACHE_SPACE": "1", "RAY_ADDRESS": "local",
           "PYTHONPATH": str(plugins)}
    other = build_tiny_model("tiny-dense", tmp_path / "other", seed=1)
    _command("merge", str(tiny_dense), str(other), "--alpha", "0.25", "--out", str(tmp_path / "merged"), env=env)
    name = "model.layers.1.self_attn.o_proj.weight"
    a, b, m = (load_file(p / "model.safetensors")[name] for p in (tiny_dense, other, tmp_path / "merged"))
    assert torch.allclose(m, 0.25 * a + 0.75 * b)

    out = _command("eval", "recipes/tiny.yaml", "--model", str(tmp_path / "merged"), "--out", str(tmp_path / "eval.json"),
                   *SMALL, env=env)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == json.loads((tmp_path / "eval.json").read_text())
    assert EVALUATE_FIELDS | {"wall_seconds", "startup_seconds", "model", "recipe", "eval_decoding"} == set(result)
    assert result["n_prompts"] == 6 and result["samples_per_prompt"] == 2
    assert 0 < result["accuracy"] < 1 and 0 < result["mean_response_tokens"] <= 24

    stage = ["recipes/tiny.yaml", "--model", str(tiny_dense), "--k", "4", "--prompts", "8", *SMALL]
    out = _command("long2short", *stage, "--method", "shortest", "--out", str(tmp_path / "short"), "--steps", "2",
                   "--batch-size", "4", env=env)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    rows = [json.loads(line) for line in (tmp_path / "short-work" / "samples" / "data.jsonl").read_text().splitlines()]
    assert len({r["id"] for r in rows}) == 8 and all(r["sample_index"] < 4 for r in rows)
    for r in rows:  # the recipe's reward judged them
        assert r["verified"] == (coin(_Sample(r["messages"][-1]["content"])) > 0)
    shortest = {}  # the shortest correct sample of each prompt, computed here from the samples
    for r in rows:
        if r["verified"] and (r["id"] not in shortest or r["num_tokens"] < shortest[r["id"]]["num_tokens"]):
            shortest[r["id"]] = r
    assert report["train_examples"] == len(shortest) > 0
    assert report["chosen_mean_tokens"] == pytest.approx(sum(r["num_tokens"] for r in shortest.values()) / len(shortest))
    logged = [json.loads(line) for line in (tmp_path / "short-work" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [2] and "eval_loss" in logged[0]  # run_sft logs the last step, evaluated
    trained = load_file(tmp_path / "short" / "model.safetensors")[name]
    assert not torch.equal(trained, a) and not (tmp_path / "short-state").exists()

    # DPO on the same samples: the sampling stage resumes from copied chunks (same settings), no engine starts
    (tmp_path / "dpo-work").mkdir()
    for part in ("samples", "templates"):
        shutil.copytree(tmp_path / "short-work" / part, tmp_path / "dpo-work" / part)
    out = _command("long2short", *stage, "--method", "dpo", "--out", str(tmp_path / "dpo"), "--steps", "6",
                   "--batch-size", "8", "--lr", "1e-3", env=env)
    assert "RolloutEngine" not in out.stdout + out.stderr and "1/1 chunks already done" in out.stdout
    report = json.loads(out.stdout.strip().splitlines()[-1])
    pairs = sum(sum(1 for s in group if not s["verified"] or s["num_tokens"] > shortest[prompt]["num_tokens"])
                for prompt, group in _groups(rows).items() if prompt in shortest)
    assert report["pairs"] == report["train"]["dpo_pairs"] == pairs > 0
    steps = [json.loads(line) for line in (tmp_path / "dpo-work" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3, 4, 5, 6]
    # the first step's policy is the reference: margin 0, loss log 2; DPO then prefers the chosen responses
    assert abs(steps[0]["margin"]) < 1e-4 and steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert steps[-1]["margin"] > 0.5 and steps[-1]["accuracy"] >= 0.75 and steps[-1]["loss"] < 0.5
    assert (tmp_path / "dpo" / "config.json").is_file() and not (tmp_path / "dpo-state").exists()


class _Sample:
    def __init__(self, response: str) -> None:
        self.response = response


def _groups(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["id"], []).append(r)
    return groups
