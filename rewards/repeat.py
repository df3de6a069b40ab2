"""The `repeat` reward: a penalty for degenerate looping responses ("and so on and so on and so on ...").

A response loops when a large share of its word n-grams are repeats of earlier ones: with n-grams of
`ngram` words, repeat_share = 1 - distinct / total. Responses with at least `min_words` words and
repeat_share >= `threshold` score -1.0 (reason "repeats: share 0.83"), others 0.0. Words, not tokens:
the reward sees text only, and a loop of tokens is a loop of words. Binary on purpose, so that it
cannot be farmed by shaving repeats off a response that is mostly a loop; scale it with the spec weight.

A response the engine stopped at decode time because its tail looped (`rollout.repeat`; finish_reason
"repeat") scores -1 whatever its words (reason "stopped looping at decode"): it was cut right where the loop
became certain, often before the word n-grams could show it.
"""

from __future__ import annotations

from rewards.types import RewardInput, RewardResult


def repeat_share(text: str, ngram: int = 4) -> float:
    """Share of the text's word n-grams that repeat an earlier one (0 for texts shorter than `ngram`).

    Example:
        >>> repeat_share("a b c d e f"), round(repeat_share("x y " * 20, ngram=2), 3)
        (0.0, 0.949)
    """
    if ngram < 1:
        raise ValueError(f"ngram must be >= 1, got {ngram}")
    words = text.split()
    grams = [tuple(words[i : i + ngram]) for i in range(len(words) - ngram + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


class RepeatPenalty:
    """The `repeat` reward. Options: `ngram` (4), `threshold` (0.5), `min_words` (20)."""

    reward_kind = "sample"
    score_range = (-1.0, 0.0)

    def __init__(self, ngram: int = 4, threshold: float = 0.5, min_words: int = 20) -> None:
        if ngram < 1 or not 0 < threshold <= 1 or min_words < 0:
            raise ValueError(f"repeat: need ngram >= 1, 0 < threshold <= 1, min_words >= 0; got "
                             f"ngram={ngram}, threshold={threshold}, min_words={min_words}")
        self.ngram, self.threshold, self.min_words = int(ngram), float(threshold), int(min_words)

    def __call__(self, sample: RewardInput) -> RewardResult:
        if sample.finish_reason == "repeat":
            return RewardResult(-1.0, "stopped looping at decode")
        if len(sample.response.split()) < self.min_words:
            return RewardResult(0.0, "short")
        share = repeat_share(sample.response, self.ngram)
        if share >= self.threshold:
            return RewardResult(-1.0, f"repeats: share {share:.2f}", {"share": share})
        return RewardResult(0.0, "ok", {"share": share})
