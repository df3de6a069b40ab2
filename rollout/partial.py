"""Partial rollouts (Kimi k1.5): every trajectory gets a token budget per iteration, and what is unfinished
waits in a replay buffer to continue in the next iteration, under the new weights.

Long chain-of-thought makes response lengths heavy-tailed: a synchronous iteration waits for its longest
response while the engines decode a handful of sequences. With a segment budget of S tokens, no request
of an iteration asks for more than S tokens; an unfinished trajectory is continued in the next iteration
from exactly its tokens (prompt + response so far as the new prompt), and a trajectory still unfinished
after `max_segments` segments is finished as truncated (`finish_reason` "length"). A prompt group is
scored, and its advantages computed, only once all its k samples have finished; the sampler observes it
then. Each iteration draws the recipe's number of new prompts and continues every unfinished one, so in
steady state about as many groups finish per iteration as start.

With partial rollouts off the same buffer runs one segment of `rollout.max_tokens`: every group finishes in
the iteration that started it, which is the synchronous loop.

The buffer is plain data: `state_dict` is JSON and goes into every RL checkpoint, so a resumed run
continues the same unfinished trajectories with the same tokens. Which tokens were generated under which
iteration's weights is kept per trajectory (`Trajectory.segments`): the PMD update needs it
(`rollout.partial.loss`, see `rl.loss` and docs/partial-rollouts.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Trajectory:
    """One sample of a group, as far as it got: its tokens, their behaviour log-probs (the engine's, under
    the weights that generated each), and one `[iteration, tokens]` entry per segment."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    segments: list[list[int]] = field(default_factory=list)
    finish_reason: str | None = None  # None while it still runs
    prompt_ids: list[int] | None = None  # the prompt as the engine ran it (images expanded); None: the row's

    def tokens_before(self, iteration: int) -> int:
        """How many of its tokens were generated under weights older than `iteration`'s."""
        return sum(n for it, n in self.segments if it < iteration)

    def context_tokens(self, iteration: int, loss: str) -> int:
        """How many leading tokens the PMD update of `iteration` leaves out as context, under
        `rollout.partial.loss`: `mask`, those generated under earlier weights (all of them for a sample that
        finished before `iteration`); `last_segment`, all but its own last segment (whatever weights that
        came from); `importance`, none are left out: this is then the prefix its importance weight covers.

        >>> t = Trajectory(tokens=[1] * 7, segments=[[1, 4], [2, 3]])
        >>> t.context_tokens(3, "mask"), t.context_tokens(3, "last_segment"), t.context_tokens(2, "importance")
        (7, 4, 4)
        """
        if loss == "last_segment":
            return len(self.tokens) - (self.segments[-1][1] if self.segments else 0)
        return self.tokens_before(iteration)


@dataclass
class Group:
    """The k samples of one drawn prompt (`row`: its index in the train rows), started in `started`."""

    row: int
    started: int
    samples: list[Trajectory]

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)


@dataclass
class Request:
    """One generation request of an iteration: continue sample `sample` of group `group` (buffer order)."""

    group: int
    sample: int
    prompt_ids: list[int]  # the row's prompt + the response so far
    max_tokens: int
    continued: int  # how many of prompt_ids' last tokens are the response so far


class ReplayBuffer:
    """The groups in flight. Per iteration: `add` the new prompts, `requests` for the engines, `extend` with
    what they returned, `pop_finished` for scoring.

    Example (segments of 4 tokens, responses of at most 10):
        >>> buffer = ReplayBuffer(segment_tokens=4, max_segments=3, max_tokens=10)
        >>> buffer.add([7], k=2, iteration=1)
        >>> [(r.prompt_ids, r.max_tokens) for r in buffer.requests([[0]] * 8)]
        [([0], 4), ([0], 4)]
        >>> buffer.extend(buffer.requests([[0]] * 8), [([1, 2], [-0.5, -0.5], "stop", None),
        ...                                            ([3, 4, 5, 6], [-1.0] * 4, "length", None)], iteration=1)
        >>> [(r.prompt_ids, r.max_tokens, r.continued) for r in buffer.requests([[0]] * 8)]
        [([0, 3, 4, 5, 6], 4, 4)]
        >>> buffer.pop_finished()
        []
    """

    def __init__(self, segment_tokens: int, max_segments: int, max_tokens: int) -> None:
        if segment_tokens < 1 or max_segments < 1 or max_tokens < 1:
            raise ValueError(f"segment_tokens, max_segments and max_tokens must be >= 1, got {segment_tokens}, "
                             f"{max_segments}, {max_tokens}")
        self.segment_tokens, self.max_segments, self.max_tokens = segment_tokens, max_segments, max_tokens
        self.groups: list[Group] = []

    def add(self, rows: list[int], k: int, iteration: int) -> None:
        """New groups of k empty samples, one per drawn row."""
        self.groups.extend(Group(row, iteration, [Trajectory() for _ in range(k)]) for row in rows)

    def requests(self, prompts: list[list[int]]) -> list[Request]:
        """What the engines generate this iteration: each unfinished sample, continued for at most a
        segment (and no further than `max_tokens` in all). `prompts`: the train rows' prompt ids."""
        out = []
        for g, group in enumerate(self.groups):
            for j, s in enumerate(group.samples):
                if s.finish_reason is None:
                    budget = min(self.segment_tokens, self.max_tokens - len(s.tokens))
                    out.append(Request(g, j, prompts[group.row] + s.tokens, budget, len(s.tokens)))
        return out

    def extend(self, requests: list[Request], completions: list[tuple[list[int], list[float], str, list[int] | None]],
               iteration: int) -> None:
        """Append each request's new segment: (token ids, log-probs, finish reason, expanded prompt or None).

        A segment that ran out of its budget leaves the sample unfinished, unless the sample has reached
        `max_tokens` or `max_segments` (then it is finished as truncated, "length")."""
        for r, (tokens, logprobs, reason, expanded) in zip(requests, completions, strict=True):
            s = self.groups[r.group].samples[r.sample]
            s.tokens += tokens
            s.logprobs += logprobs
            s.segments.append([iteration, len(tokens)])
            if s.prompt_ids is None and expanded is not None:
                s.prompt_ids = expanded[: len(expanded) - r.continued] if r.continued else expanded
            cut = reason == "length" and len(s.tokens) < self.max_tokens and len(s.segments) < self.max_segments
            s.finish_reason = None if cut else reason

    def pop_finished(self) -> list[Group]:
        """The groups whose k samples have all finished, in the order they started; they leave the buffer."""
        done = [g for g in self.groups if g.finished]
        self.groups = [g for g in self.groups if not g.finished]
        return done

    def metrics(self, iteration: int, trained: list[Group]) -> dict[str, float]:
        """`rollout/partial/...`: what waits in the buffer (groups, unfinished samples, their age in
        iterations) and, of the groups just finished (`trained`), the share of samples that took more than one
        segment and the groups' age."""
        waiting = [s for g in self.groups for s in g.samples if s.finish_reason is None]
        ages = [iteration - g.started for g in self.groups]
        samples = [s for g in trained for s in g.samples]
        return {
            "rollout/partial/buffer_groups": len(self.groups),
            "rollout/partial/buffer_unfinished_samples": len(waiting),
            "rollout/partial/buffer_tokens": sum(len(s.tokens) for g in self.groups for s in g.samples),
            "rollout/partial/buffer_age_mean": sum(ages) / len(ages) if ages else 0.0,
            "rollout/partial/buffer_age_max": max(ages, default=0),
            "rollout/partial/finished_groups": len(trained),
            "rollout/partial/partial_sample_share": (sum(len(s.segments) > 1 for s in samples) / len(samples)
                                                     if samples else 0.0),
            "rollout/partial/finished_group_age_mean": (sum(iteration - g.started for g in trained) / len(trained)
                                                        if trained else 0.0),
        }

    def state_dict(self) -> dict:
        """JSON-able: the settings and every group in flight, tokens included."""
        return {"segment_tokens": self.segment_tokens, "max_segments": self.max_segments,
                "max_tokens": self.max_tokens, "groups": [asdict(g) for g in self.groups]}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`'s output (settings must match: the trajectories were cut by them)."""
        saved = (state["segment_tokens"], state["max_segments"], state["max_tokens"])
        if saved != (self.segment_tokens, self.max_segments, self.max_tokens):
            raise ValueError(f"the checkpoint's replay buffer was cut with segment_tokens, max_segments, max_tokens "
                             f"= {saved}, the recipe now says {(self.segment_tokens, self.max_segments, self.max_tokens)}"
                             f": resume with the same rollout.partial and rollout.max_tokens")
        self.groups = [Group(g["row"], g["started"], [Trajectory(**s) for s in g["samples"]]) for g in state["groups"]]
