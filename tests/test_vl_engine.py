"""Image prompts on the real parts: a vLLM engine and a DeepSpeed PMD trainer rank (Ray actors) on the tiny
Kimi-VL. Rollouts with images, the start-up expansion check, trainer-vs-engine log-probs on image prompts,
and a weight sync that changes what the engine serves for an image it has seen before."""

import io

import pytest

pytestmark = pytest.mark.integration


def _png(colour) -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (56, 56), (255, 255, 255))
    ImageDraw.Draw(image).rectangle([4, 4, 11, 11], fill=colour)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def actors(ray_local, tmp_path_factory):
    import ray

    from rl.trainer import PMDWorker
    from rollout.engine import EngineSettings, RolloutEngine
    from thinkrl.cluster import remote_actor, trainer_group
    from thinkrl.models import ensure_tiny_model, load_tokenizer
    from thinkrl.train_engine import DistConfig, OptimConfig

    path = ensure_tiny_model("tiny-vl", tmp_path_factory.mktemp("models"))
    # a large learning rate: one update must move what the engine serves
    trainers = trainer_group(PMDWorker, 1, lambda r, a, p: (str(path), OptimConfig(lr=3e-3), DistConfig(r, 1, a, p), 0))
    engine = remote_actor(RolloutEngine).remote(EngineSettings(model_path=str(path), max_model_len=512, enforce_eager=True,
                                                               gpu_memory_utilization=0.15))
    ray.get(engine.__ray_ready__.remote())
    yield trainers, [engine], load_tokenizer(path), tmp_path_factory.mktemp("sync")
    for actor in [*trainers, engine]:
        ray.kill(actor)


def _prompt(tok) -> list[int]:
    from thinkrl.chat import row_prompt_ids

    return row_prompt_ids(tok, {"prompt": "<image>\nHow many red squares are there?", "images": ["x"]})


def test_image_rollouts_and_the_start_up_expansion_check(actors):
    import ray

    from rl.generation import generate
    from rl.sync import check_image_expansion
    from rollout.engine import RolloutSettings

    trainers, engines, tok, _ = actors
    prompt, red, blue = _prompt(tok), _png((220, 40, 40)), _png((40, 80, 220))
    pad = tok.convert_tokens_to_ids("<|media_pad|>")
    assert prompt.count(pad) == 1
    expanded = check_image_expansion(trainers, engines, prompt, [red])
    assert expanded == len(prompt) + 3  # one placeholder -> 4 image tokens
    groups = generate(engines, [prompt, prompt, prompt], RolloutSettings(n=2, max_tokens=24), [[red], [blue], []])
    for group, has_image in zip(groups, (True, True, False), strict=True):
        for c in group:
            assert len(c.token_ids) == len(c.logprobs) > 0
            assert (c.prompt_ids is not None and c.prompt_ids.count(pad) == 4) == has_image
    # the engine's expansion is the trainer's (image-token count and positions)
    assert groups[0][0].prompt_ids == ray.get(trainers[0].expanded_prompt.remote(prompt, [red]))


def test_trainer_matches_engine_on_image_prompts(actors):
    import ray

    from rl.generation import generate
    from rl.sync import probe_gap
    from rollout.engine import RolloutSettings

    trainers, engines, tok, _ = actors
    prompt, red, blue = _prompt(tok), _png((220, 40, 40)), _png((40, 80, 220))
    response = tok("<think>TL 1, sum 1</think>\\boxed{1}", add_special_tokens=False)["input_ids"]
    assert probe_gap(trainers, engines, prompt + response, len(prompt), [red]) < 1e-5
    # and on what the engine sampled: its log-probs are the trainer's (float32)
    for group in generate(engines, [prompt], RolloutSettings(n=4, max_tokens=32), [[blue]]):
        for c in group:
            trainer = ray.get(trainers[0].probe_logprobs.remote(prompt + c.token_ids, len(prompt), [blue]))
            assert max(abs(a - b) for a, b in zip(trainer, c.logprobs, strict=True)) < 1e-5
    # the image is really used: another image moves the response's log-probs
    lp_red = ray.get(engines[0].prompt_logprobs.remote(prompt + response, len(prompt), [red]))
    lp_blue = ray.get(engines[0].prompt_logprobs.remote(prompt + response, len(prompt), [blue]))
    assert max(abs(a - b) for a, b in zip(lp_red, lp_blue, strict=True)) > 1e-4


def test_sync_changes_what_the_engine_serves_for_an_image_seen_before(actors):
    import ray

    from rl.batching import plan_update
    from rl.generation import generate
    from rl.sync import probe_gap, sync_weights
    from rl.trainer import PMDSettings, Sample
    from rollout.engine import RolloutSettings

    trainers, engines, tok, tmp = actors
    prompt, red = _prompt(tok), _png((220, 40, 40))
    response = tok("<think>TL 1, sum 1</think>\\boxed{1}", add_special_tokens=False)["input_ids"]
    before = ray.get(engines[0].prompt_logprobs.remote(prompt + response, len(prompt), [red]))  # the encoder caches it
    group = generate(engines, [prompt], RolloutSettings(n=4, max_tokens=24), [[red]])[0]
    samples = [Sample(c.prompt_ids, c.token_ids, 1.0 if i % 2 else -1.0, c.logprobs, [red]) for i, c in enumerate(group)]
    _, plans = plan_update([len(s.prompt_ids) + len(s.response_ids) for s in samples], [0] * 4, mini_batches=1,
                           num_ranks=1, max_tokens_per_micro_batch=0, seed=0)
    stats = ray.get(trainers[0].update.remote(samples, plans[0], PMDSettings(tau=0.1)))
    assert stats["logprob_gap_image"] < 1e-5 and "logprob_gap_text" not in stats
    sync_weights(trainers, engines)
    after = ray.get(engines[0].prompt_logprobs.remote(prompt + response, len(prompt), [red]))
    assert max(abs(a - b) for a, b in zip(before, after, strict=True)) > 1e-3  # the new weights are served...
    assert probe_gap(trainers, engines, prompt + response, len(prompt), [red]) < 1e-5  # ...exactly, tower included
