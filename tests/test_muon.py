"""optimizer: muon: which parameters Muon takes, and the engine stepping with it on real DeepSpeed (CPU, gloo)."""

import os

import pytest
import torch

MATRICES = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
            "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")


def test_muon_takes_the_hidden_matrices_of_the_tiny_model(tiny_dense):
    from thinkrl.models import load_causal_lm
    from thinkrl.train_engine import takes_muon

    split = {name: takes_muon(name, p.shape) for name, p in load_causal_lm(tiny_dense).named_parameters()}
    muon = {name for name, takes in split.items() if takes}
    assert muon == {f"model.layers.{i}.{m}" for i in range(4) for m in MATRICES}
    assert not split["model.embed_tokens.weight"] and not split["lm_head.weight"] and not split["model.norm.weight"]
    assert not split["model.layers.0.self_attn.q_proj.bias"] and not split["model.layers.0.input_layernorm.weight"]


def test_build_optimizer_groups_scale_lr_and_decay(tiny_dense):
    from thinkrl.models import load_causal_lm
    from thinkrl.train_engine import OptimConfig, build_optimizer, muon_lr_scale

    model = load_causal_lm(tiny_dense)
    # a tied head is still the embedding: AdamW takes it whatever the matrix test says
    model.lm_head.weight = model.model.embed_tokens.weight
    groups = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.1, optimizer="muon")).param_groups
    assert [g["use_muon"] for g in groups] == [False, True, True]  # AdamW first: its lr is the recipe's
    assert groups[0]["lr"] == 1e-3 and groups[0]["weight_decay"] == 0.1 and groups[0]["eps"] == 1e-8
    for group in groups[1:]:
        scale = muon_lr_scale(group["params"][0].shape)
        assert all(muon_lr_scale(p.shape) == scale for p in group["params"])
        assert group["lr"] == pytest.approx(1e-3 * scale) and group["weight_decay"] == pytest.approx(0.1 / scale)
        assert group["momentum"] == 0.95
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert all(p.use_muon == g["use_muon"] for g in groups for p in g["params"])
    with pytest.raises(ValueError, match=r"OptimConfig.optimizer must be one of adamw, muon, got 'sgd'"):
        build_optimizer(model, OptimConfig(lr=1e-3, optimizer="sgd"))


def test_a_models_own_embeddings_go_to_adamw_whatever_their_names():
    from thinkrl.train_engine import OptimConfig, build_optimizer

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.hidden, self.out = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 10)

        def get_input_embeddings(self):
            return self.wte

        def get_output_embeddings(self):
            return self.out

    model = Toy()
    build_optimizer(model, OptimConfig(lr=1e-3, optimizer="muon"))
    assert [n for n, p in model.named_parameters() if p.use_muon] == ["hidden.weight"]


def test_recipes_choose_the_optimizer():
    from test_config import TINY

    from rl.config import Recipe
    from sft.config import SFTRecipe
    from thinkrl.config import RecipeError, load_recipe

    assert load_recipe(Recipe, TINY, ["rl.optimizer=muon"]).rl.optimizer == "muon"
    assert load_recipe(Recipe, TINY).sft.optimizer == "adamw"
    assert load_recipe(SFTRecipe, TINY, ["sft.optimizer=muon"]).sft.optimizer == "muon"
    with pytest.raises(RecipeError, match=r"sft\.optimizer: .*'adamw' or 'muon'"):
        load_recipe(Recipe, TINY, ["sft.optimizer=bogus"])
    with pytest.raises(RecipeError, match=r"rl\.optimizer: .*'adamw' or 'muon'"):
        load_recipe(Recipe, TINY, ["rl.optimizer=sgd"])


# ---- on DeepSpeed ----------------------------------------------------------------------------------


def _engine(path, optimizer="muon", zero_stage=1, lr=1e-3):
    os.environ["DS_ACCELERATOR"] = "cpu"
    from thinkrl.cluster import free_port
    from thinkrl.train_engine import DistConfig, OptimConfig, TrainEngine

    return TrainEngine(str(path), OptimConfig(lr=lr, optimizer=optimizer),
                       DistConfig(master_port=free_port(), zero_stage=zero_stage), seed=0)


def _step(engine, seed=0):
    """One train step on a fixed batch of random tokens (mean next-token NLL); its loss."""
    ids = torch.randint(3, engine.module.config.vocab_size, (4, 48), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    return engine.train_step([ids], lambda b: -engine.token_logprobs(b, mask, mask).sum() / mask.sum())["loss"]


def _weights(engine):
    return {name: t.clone() for name, t in engine.full_state_dict(checkpoint_names=False).items()}


def _innermost(engine):
    opt = engine.optimizer
    while hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def _stable_rank(update):
    """||U||_F^2 / ||U||_2^2: min(rows, cols) for an orthogonal matrix, ~1 for a rank-one one."""
    return float(update.norm() ** 2 / torch.linalg.matrix_norm(update, ord=2) ** 2)


@pytest.mark.integration
def test_muon_lowers_the_loss_with_orthogonal_steps_of_adamw_size(tiny_dense):
    """Muon's first step on each matrix is orthogonalized (flat spectrum) and of RMS ~0.2 lr, Moonlight's
    scale; AdamW's first step on the same gradient is neither. The AdamW half of Muon is the same AdamW."""
    start = None
    updates, losses = {}, {}
    for optimizer in ("adamw", "muon"):
        engine = _engine(tiny_dense, optimizer)
        start = start or _weights(engine)
        losses[optimizer] = [_step(engine)]
        after = _weights(engine)
        updates[optimizer] = {name: after[name] - start[name] for name in start}
        losses[optimizer] += [_step(engine) for _ in range(2 if optimizer == "muon" else 0)]
    muon, adamw = updates["muon"], updates["adamw"]
    assert losses["muon"][-1] < losses["muon"][0] - 0.25
    for name in (f"model.layers.{i}.{m}" for i in (0, 3) for m in MATRICES):
        rows, cols = muon[name].shape  # Muon ~35-75 (Newton-Schulz leaves the smallest directions small), AdamW ~3-12
        assert _stable_rank(muon[name]) > max(0.25 * min(rows, cols), 3 * _stable_rank(adamw[name])), name
        assert 0.1 < muon[name].pow(2).mean().sqrt() / 1e-3 < 0.3, name  # AdamW: ~1 (its first step is sign(g))
    torch.testing.assert_close(muon["model.embed_tokens.weight"], adamw["model.embed_tokens.weight"], rtol=0.05, atol=1e-5)


@pytest.mark.integration
def test_resume_restores_muon_momentum_and_reset_clears_it(tiny_dense, tmp_path):
    """A save / load round trip then one step equals the uninterrupted run's step exactly (momentum and
    Adam moments included); after `reset_optimizer` the same step differs, and the state is empty."""
    first = _engine(tiny_dense)
    for seed in (0, 1):
        _step(first, seed)
    first.save_state(tmp_path / "state")
    _step(first, 2)
    uninterrupted = _weights(first)

    second = _engine(tiny_dense)
    second.load_state(tmp_path / "state")
    _step(second, 2)
    for name, tensor in _weights(second).items():
        torch.testing.assert_close(tensor, uninterrupted[name], rtol=0, atol=0, msg=name)

    second.load_state(tmp_path / "state")
    state = _innermost(second).state
    assert any("momentum_buffer" in s for s in state.values()) and any("exp_avg" in s for s in state.values())
    second.reset_optimizer()
    assert not _innermost(second).state
    _step(second, 2)
    reset = _weights(second)
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(reset[name], uninterrupted[name])  # without momentum: another step
    assert any("momentum_buffer" in s for s in _innermost(second).state.values())


@pytest.mark.integration
@pytest.mark.parametrize("zero_stage", [0, 2, 3])
def test_muon_steps_under_each_zero_stage(tiny_dense, zero_stage):
    """The same first step as under ZeRO 1 (orthogonalized at Moonlight's scale), whatever the stage."""
    engine = _engine(tiny_dense, zero_stage=zero_stage)
    before = _weights(engine)
    losses = [_step(engine) for _ in range(2)]
    name = "model.layers.1.self_attn.o_proj.weight"
    update = _weights(engine)[name] - before[name]
    assert losses[1] < losses[0]
    assert _stable_rank(update) > 32  # a quarter of 128 (AdamW: ~5)
    assert 0.1 < update.pow(2).mean().sqrt() / (2 * 1e-3) < 0.3
