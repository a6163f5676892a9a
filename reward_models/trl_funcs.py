"""The composite reward as a TRL reward function (``reward_funcs``), for TRL 1.12's GRPOTrainer and RLOOTrainer.

TRL calls each reward function as ``f(prompts=, completions=, completion_ids=, <dataset columns>=, log_metric=, ...)``
once per generation batch and sums the functions' outputs with ``reward_weights``. This is one function returning the
composite's weighted total: the weights stay in one place (``ppo.reward_weights``, applied by CompositeReward) and the
total is what PPO optimises and eval reports. Every term's batch mean, and the simulator's true utility (logged, never
rewarded), reach the trainer's metrics through ``log_metric`` as ``reward/<term>``, the names PPO logs them under.

The dataset carries a ``row`` column (the prompt's index) by which each completion finds its user's PromptContext.
A completion that does not end within the length budget loses ``missing_eos_penalty``, as in TRL's PPO.
"""

from __future__ import annotations

from reward_models.composite import CompositeReward
from reward_models.terms import PromptContext


class CompositeRewardFunc:
    """``truth(contexts, completions) -> list[float]``, when given, is logged as ``reward/true_utility``."""

    __name__ = "composite"  # TRL names the function's own metrics after it: rewards/composite/mean

    def __init__(
        self,
        composite: CompositeReward,
        contexts: list[PromptContext],
        eos_token_id: int,
        missing_eos_penalty: float = 0.0,
        truth=None,
    ):
        self.composite, self.contexts, self.truth = composite, contexts, truth
        self.eos_token_id, self.missing_eos_penalty = eos_token_id, missing_eos_penalty
        self.records: list[dict] = []

    def __call__(self, prompts, completions, completion_ids, row, log_metric=None, **_) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        contexts = [self.contexts[i] for i in row]
        scored = self.composite.score(prompts, texts, contexts)
        ended = [bool(ids) and ids[-1] == self.eos_token_id for ids in completion_ids]
        total = [t if e else t - self.missing_eos_penalty for t, e in zip(scored.total, ended)]
        means = scored.means()
        if self.truth is not None:
            truth = self.truth(contexts, texts)
            means["true_utility"] = sum(truth) / max(len(truth), 1)
        if log_metric is not None:
            for name in sorted(means):  # every rank logs the same names in the same order (TRL gathers them)
                log_metric(f"reward/{name}", means[name])
        self.records.append({"means": means, "samples": [{"text": t, **r} for t, r in zip(texts, scored.rows())]})
        return total

    def take_records(self) -> list[dict]:
        """What was scored since the last call: per batch, term means and the scored samples."""
        out, self.records = self.records, []
        return out
