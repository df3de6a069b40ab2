"""DPO (direct preference optimisation) on the shared TrainEngine, for Kimi k1.5's long2short: the shortest
correct response of a prompt is preferred to its longer and its incorrect ones.

For a pair (chosen c, rejected r) of responses to one prompt x, pi the policy and ref the model training
starts from (frozen: its log-probs are computed once, before the first step),

    loss = -log sigmoid( beta * ( (log pi(c|x) - log ref(c|x)) - (log pi(r|x) - log ref(r|x)) ) )

with log pi(y|x) the sum of the response's token log-probs (the assistant turn and its end-of-turn token),
summed in float64 as the PMD trainer sums them. beta * (log pi - log ref) is a response's implicit reward;
the chosen one's minus the rejected one's is the reward margin, logged with the share of pairs whose margin
is > 0 (accuracy). At the first step pi = ref: every margin is 0 and the loss log 2 = 0.693.

Pairs (`preference_pairs`, k1.5's long2short DPO): per prompt, chosen = the shortest correct response,
rejected = each longer correct one and each incorrect one; a prompt with no correct response gives none.

Layout: a response's log-prob must be a sum per example, so sequences are never packed several to a row:
one per row, in length buckets each padded to its own longest (`length_buckets`, `sft.packing.padded_batch`),
or one padded batch per micro-batch under ZeRO-3, where each extra forward gathers the sharded weights again
and every rank must run as many. Within a micro-batch each distinct sequence goes forward once (a prompt's
pairs share their chosen response). The loss is the mean over the step's pairs on all ranks, however they
are split over ranks and micro-batches (as the SFT loss is over tokens).

Resume (`run_dpo`): the reference log-probs are computed on the starting weights before any state is
loaded and kept in `<out>-state/reference.json`; DeepSpeed state every `save_every` steps goes to
`<out>-state/step_N` (`sft.train`'s checkpoints); a restarted run reads the reference, loads the last state
and continues the same pair stream by step number. The model is written atomically to `out`.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from thinkrl.chat import EncodedConversation
from thinkrl.train_engine import BUCKET_OVERHEAD_TOKENS, DistConfig, OptimConfig, TrainEngine


def shortest_correct(lengths: list[int], correct: list[bool]) -> int | None:
    """Index of the shortest correct response (the first of equals), None if none is correct: what the
    shortest-rejection-sampling SFT keeps, and DPO's chosen response."""
    candidates = [i for i, ok in enumerate(correct) if ok]
    return min(candidates, key=lambda i: (lengths[i], i)) if candidates else None


def preference_pairs(lengths: list[int], correct: list[bool]) -> list[tuple[int, int]]:
    """(chosen, rejected) index pairs among one prompt's responses: the shortest correct one against each
    longer correct one and each incorrect one (a correct one as short as the chosen is no pair).

    Example:
        >>> preference_pairs([30, 12, 20, 12, 5], [True, False, True, True, False])
        [(3, 0), (3, 1), (3, 2), (3, 4)]
        >>> preference_pairs([10, 20], [False, False])
        []
    """
    if len(lengths) != len(correct):
        raise ValueError(f"{len(lengths)} lengths but {len(correct)} correctness verdicts")
    chosen = shortest_correct(lengths, correct)
    if chosen is None:
        return []
    return [(chosen, j) for j in range(len(lengths))
            if j != chosen and (not correct[j] or lengths[j] > lengths[chosen])]


def dpo_loss(policy_chosen_B: torch.Tensor, policy_rejected_B: torch.Tensor, reference_chosen_B: torch.Tensor,
             reference_rejected_B: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss [B], and the chosen and rejected responses' implicit rewards [B] (no gradient).

    Inputs are sequence log-probs (sums over the response tokens) of B pairs under the policy and the
    reference. loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) = softplus(-margin); its
    gradient with respect to pi_c is -beta * sigmoid(-margin) (and the opposite for pi_r).

    Example (margin 0.1 * ((-10 + 12) - (-20 + 18)) = 0.4):
        >>> pc = torch.tensor([-10.0], requires_grad=True)
        >>> loss, chosen, rejected = dpo_loss(pc, torch.tensor([-20.0]), torch.tensor([-12.0]), torch.tensor([-18.0]), 0.1)
        >>> round(loss.item(), 4), round((chosen - rejected).item(), 4)
        (0.513, 0.4)
        >>> loss.sum().backward(); round(pc.grad.item(), 5)  # -0.1 * sigmoid(-0.4)
        -0.04013
    """
    chosen_B = beta * (policy_chosen_B - reference_chosen_B)
    rejected_B = beta * (policy_rejected_B - reference_rejected_B)
    loss_B = torch.nn.functional.softplus(rejected_B - chosen_B)  # = -log sigmoid(chosen - rejected), stably
    return loss_B, chosen_B.detach(), rejected_B.detach()


class DPOWorker:
    """One rank of the DPO trainer group. Created as a Ray actor by `run_dpo`."""

    def __init__(self, model_path: str, optim: OptimConfig, dist: DistConfig, seed: int, micro_batches: int = 1) -> None:
        from thinkrl.vl import is_vl

        self.engine = TrainEngine(model_path, optim, dist, seed=seed)
        self.pad_id = self.engine.tokenizer.pad_token_id
        self.micro_batches = micro_batches
        self.vision = None
        if is_vl(model_path):
            from thinkrl.vl.inputs import VisionInputs

            self.vision = VisionInputs(model_path)
        # under ZeRO-3 every forward gathers the sharded weights (a collective): one padded batch per call
        self.bucket_overhead_tokens = BUCKET_OVERHEAD_TOKENS if dist.zero_stage < 3 else 10**12

    def _sums(self, sequences: list[EncodedConversation]) -> torch.Tensor:
        """Each sequence's summed response log-prob [N] (float64, differentiable), in `sequences`' order."""
        from sft.packing import padded_batch
        from thinkrl.train_engine import length_buckets

        order, sums = [], []
        for bucket in length_buckets([len(s.input_ids) for s in sequences], self.bucket_overhead_tokens):
            batch = padded_batch([sequences[i] for i in bucket], self.pad_id)
            images = self.vision.batch(batch.row_images) if self.vision is not None else None
            logp_B_T = self.engine.token_logprobs(batch.input_ids_B_T, batch.attention_mask_B_T, batch.target_mask_B_T,
                                                  images=images)
            sums.append(logp_B_T.double().sum(-1))
            order += bucket
        return torch.cat(sums)[torch.argsort(torch.tensor(order))]

    def sequence_logprobs(self, sequences: list[EncodedConversation]) -> list[float]:
        """Each sequence's summed response log-prob, without gradients (the reference)."""
        with torch.no_grad():
            return self._sums(sequences).tolist()

    def train_step(self, sequences: list[EncodedConversation], pairs: list[tuple[int, int]], reference: list[float],
                   beta: float, step_pairs: int) -> dict[str, float]:
        """One optimizer step on this rank's `pairs` (indices into `sequences`, whose reference log-probs are
        `reference`); `step_pairs`: the pairs of the whole step on all ranks, so the loss is their mean.

        Returns the engine's stats (loss: this rank's share, lr, grad_norm) and sums over this rank's pairs:
        pairs, margin_sum, chosen_reward_sum, rejected_reward_sum, preferred (pairs with margin > 0).
        """
        if len(pairs) < self.micro_batches:
            raise ValueError(f"a step of {len(pairs)} pairs cannot fill {self.micro_batches} micro-batches")
        # DeepSpeed averages the ranks' gradients: a rank's share of the step's mean is its sum over step_pairs / W
        denominator = step_pairs / self.engine.world_size
        reference_N = torch.tensor(reference, dtype=torch.float64)
        bounds = [len(pairs) * m // self.micro_batches for m in range(self.micro_batches + 1)]
        micro = [pairs[lo:hi] for lo, hi in zip(bounds, bounds[1:], strict=False)]
        sums = dict.fromkeys(("margin_sum", "chosen_reward_sum", "rejected_reward_sum", "preferred"), 0.0)

        def loss_of(part: list[tuple[int, int]]) -> torch.Tensor:
            used = sorted({i for pair in part for i in pair})
            logp_U = self._sums([sequences[i] for i in used])
            reference_U = reference_N[used].to(logp_U.device)
            at = {s: u for u, s in enumerate(used)}
            chosen, rejected = torch.tensor([at[c] for c, _ in part]), torch.tensor([at[r] for _, r in part])
            loss_B, chosen_B, rejected_B = dpo_loss(logp_U[chosen], logp_U[rejected], reference_U[chosen],
                                                    reference_U[rejected], beta)
            margin_B = chosen_B - rejected_B
            sums["margin_sum"] += margin_B.sum().item()
            sums["chosen_reward_sum"] += chosen_B.sum().item()
            sums["rejected_reward_sum"] += rejected_B.sum().item()
            sums["preferred"] += (margin_B > 0).sum().item()
            return loss_B.sum() / denominator

        stats = self.engine.train_step(micro, loss_of)
        return {**stats, **sums, "pairs": len(pairs)}

    def save_hf(self, out_dir: str) -> None:
        self.engine.save_hf(out_dir)

    def save_state(self, out_dir: str) -> None:
        self.engine.save_state(out_dir)

    def load_state(self, in_dir: str) -> None:
        self.engine.load_state(in_dir)


@dataclass
class DPOSettings:
    """A DPO stage's plain settings (its command reads them from the recipe; the optimizer and schedule are an
    `OptimConfig`, built as the SFT warmup builds its own: `sft.train.optim_config`)."""

    steps: int
    batch_size: int  # pairs per optimizer step, all ranks together
    beta: float = 0.1
    micro_batches: int = 1
    save_every: int = 50
    log_every: int = 5


def run_dpo(settings: DPOSettings, optim: OptimConfig, sequences: list[EncodedConversation],
            pairs: list[tuple[int, int]], model_path: str, out_dir: Path, seed: int, num_trainers: int = 1,
            zero_stage: int = 1, resources=None, log=print, *, metrics_file: Path | None = None,
            gradient_checkpointing: bool = False) -> dict[str, float]:
    """Train `model_path` on `pairs` (chosen, rejected indices into `sequences`) and save it to `out_dir`.

    Resumes from `<out_dir>-state` (see the module docstring). `metrics_file`: JSONL of every step's record
    (step, loss, margin, accuracy, chosen_reward, rejected_reward, lr, grad_norm), appended. Returns the
    last `log_every` steps' mean loss, margin and accuracy, and the step it resumed from.
    """
    import ray

    from sft.data import batch_stream
    from sft.train import _resume, _save_state
    from thinkrl.cluster import check_shared_storage, release, trainer_group
    from thinkrl.fileio import atomic_directory
    from thinkrl.metrics import truncate_jsonl

    if not pairs:
        raise ValueError("DPO needs at least one preference pair")
    out_dir, state_root = Path(out_dir), Path(out_dir).with_name(Path(out_dir).name + "-state")
    workers = trainer_group(
        DPOWorker, num_trainers,
        lambda rank, addr, port: (model_path, optim, DistConfig(rank, num_trainers, addr, port, zero_stage,
                                                                gradient_checkpointing), seed, settings.micro_batches),
        resources=resources, role="dpo trainer ranks (rl.num_trainers x rl.cpus_per_trainer, rl.gpus_per_trainer, "
        "rl.trainer_resources)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    check_shared_storage(workers, out_dir.parent, "dpo trainer rank")
    per_rank = max(settings.micro_batches, settings.batch_size // num_trainers)
    reference = _reference(workers, sequences, state_root, max(1, 2 * per_rank // settings.micro_batches), log)
    start_step = _resume(workers, state_root, log, tag="dpo")
    if metrics_file:  # what was logged after the state it resumes from is logged again
        truncate_jsonl(Path(metrics_file), "step", start_step or None)
    stream = batch_stream(pairs, per_rank * num_trainers, seed, start_step=start_step)
    start, records = time.time(), []
    for step in range(start_step + 1, settings.steps + 1):
        batch = next(stream)
        shares = [_share(batch[r * per_rank : (r + 1) * per_rank], sequences, reference) for r in range(num_trainers)]
        results = ray.get([w.train_step.remote(*share, settings.beta, len(batch)) for w, share in zip(workers, shares,
                                                                                                     strict=True)])
        records.append(_record(step, results))
        _log_step(records[-1], settings, start, metrics_file, log)
        if step % settings.save_every == 0 and step < settings.steps:
            _save_state(workers, state_root, step)
    with atomic_directory(out_dir) as tmp:
        ray.get([w.save_hf.remote(str(tmp)) for w in workers])
    release(workers)
    shutil.rmtree(state_root, ignore_errors=True)  # a finished stage is never redone
    recent = records[-settings.log_every:]
    final = {key: sum(r[key] for r in recent) / len(recent) if recent else float("nan")
             for key in ("loss", "margin", "accuracy")}
    return {**{f"dpo_final_{key}": value for key, value in final.items()}, "dpo_resumed_from_step": start_step,
            "dpo_pairs": len(pairs), "dpo_sequences": len(sequences)}


def _share(pairs: list[tuple[int, int]], sequences: list, reference: list[float]) -> tuple[list, list, list]:
    """(sequences, pairs, reference) of one rank's pairs: only the sequences they use, re-indexed."""
    used = sorted({i for pair in pairs for i in pair})
    at = {s: u for u, s in enumerate(used)}
    return [sequences[i] for i in used], [(at[c], at[r]) for c, r in pairs], [reference[i] for i in used]


def _reference(workers: list, sequences: list, state_root: Path, per_call: int, log) -> list[float]:
    """The starting model's log-prob of every sequence: read from `state_root/reference.json`, or computed
    now (every rank runs as many forward passes: a rank past the end repeats the first sequence) and written
    there before the first step, so that a resumed run, whose weights have moved, uses the same numbers."""
    import ray

    from thinkrl.fileio import atomic_write_json

    path = state_root / "reference.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if len(saved) != len(sequences):
            raise ValueError(f"{path}: {len(saved)} reference log-probs for {len(sequences)} sequences: this state is "
                             "another run's; delete the folder to start over")
        return saved
    t0, out, width = time.time(), [], per_call * len(workers)
    for begin in range(0, len(sequences), width):
        chunk = sequences[begin : begin + width]
        parts = [chunk[r * per_call : (r + 1) * per_call] for r in range(len(workers))]
        results = ray.get([w.sequence_logprobs.remote(p or chunk[:1]) for w, p in zip(workers, parts, strict=True)])
        out += [x for part, values in zip(parts, results, strict=True) if part for x in values]
    state_root.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, out)
    log(f"[dpo] reference log-probs of {len(out)} sequences in {time.time() - t0:.0f}s")
    return out


def _record(step: int, results: list[dict]) -> dict:
    """One step's record from every rank's `train_step` result: means over the step's pairs."""
    pairs = sum(r["pairs"] for r in results)
    record = {"step": step, "loss": sum(r["loss"] for r in results) / len(results),
              "margin": sum(r["margin_sum"] for r in results) / pairs,
              "accuracy": sum(r["preferred"] for r in results) / pairs,
              "chosen_reward": sum(r["chosen_reward_sum"] for r in results) / pairs,
              "rejected_reward": sum(r["rejected_reward_sum"] for r in results) / pairs,
              "lr": results[0]["lr"], "pairs": pairs}
    if "grad_norm" in results[0]:
        record["grad_norm"] = results[0]["grad_norm"]
    return record


def _log_step(record: dict, settings: DPOSettings, start: float, metrics_file: Path | None, log) -> None:
    if metrics_file:
        with open(metrics_file, "a") as f:
            f.write(json.dumps(record) + "\n")
    step = record["step"]
    if step == 1 or step % settings.log_every == 0 or step == settings.steps:
        log(f"[dpo] step {step}/{settings.steps}  loss {record['loss']:.4f}  margin {record['margin']:+.4f}  "
            f"accuracy {record['accuracy']:.3f}  chosen {record['chosen_reward']:+.4f}  "
            f"rejected {record['rejected_reward']:+.4f}  lr {record['lr']:.2e}  {time.time() - start:.0f}s")
