"""The SFT trainer rank: next-token cross-entropy on assistant tokens, through the shared TrainEngine."""

from __future__ import annotations

import torch

from thinkrl.chat import EncodedConversation
from thinkrl.train_engine import DistConfig, OptimConfig, TrainEngine, pad_batch


class SFTWorker:
    """One rank of the SFT trainer group. Created as a Ray actor by the SFT driver."""

    def __init__(self, model_path: str, optim: OptimConfig, dist: DistConfig, seed: int) -> None:
        self.engine = TrainEngine(model_path, optim, dist, seed=seed)
        self.pad_id = self.engine.tokenizer.pad_token_id

    def _loss(self, batch: list[EncodedConversation]) -> tuple[torch.Tensor, int]:
        ids, attn, target = pad_batch([e.input_ids for e in batch], [e.loss_mask for e in batch], self.pad_id)
        token_logp_B_T = self.engine.token_logprobs(ids, attn, target)
        n_tokens = int(target[:, 1:].sum())
        return -token_logp_B_T.sum() / max(1, n_tokens), n_tokens

    def train_step(self, batch: list[EncodedConversation]) -> dict[str, float]:
        """One optimizer step on a batch (mean loss over its assistant tokens)."""
        loss, n_tokens = self._loss(batch)
        self.engine.backward(loss)
        stats = self.engine.step()
        return {"loss": loss.item(), "tokens": n_tokens, **stats}

    def eval_loss(self, batch: list[EncodedConversation]) -> float:
        with torch.no_grad():
            return self._loss(batch)[0].item()

    def save_hf(self, out_dir: str) -> None:
        self.engine.save_hf(out_dir)
