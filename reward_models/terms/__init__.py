"""Reward terms behind one contract, and the registry the composite reward is built from.

A term is a named function ``score(prompts, completions, contexts) -> list[float]`` (the shape of TRL's
``reward_funcs`` and OpenRLHF's ``reward_func``): chat prompts, the completions' texts and, per prompt, a
``PromptContext`` saying whose prompt it is. A term is built for a run by ``TermSpec.build(env)``, which binds
what it reads (the catalog, K, a trained model) from a ``RewardEnv``. Adding a term is one function in a module
of this package plus one line in ``TERMS`` (its default weight and what it rewards).

Values: rule terms are in [0, 1] (more is better) or, for penalties, in [-1, 0]; the learned score is the
reward model's raw output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from reward_models.terms import behaviour, learned, next_item, rules

Term = Callable[[list, list[str], list["PromptContext"]], list[float]]


@dataclass
class PromptContext:
    """What the reward knows about the user behind one prompt."""

    history_ids: list
    candidate_ids: list = field(default_factory=list)
    user_id: str | None = None
    shown: list | None = None  # (item id, rating) pairs the prompt showed; None where it showed none
    future_ids: list = field(default_factory=list)  # training prompts: what the user consumed next
    history_ratings: list | None = None  # one rating (or None) per history item, where the data has ratings

    @classmethod
    def from_row(cls, row: dict) -> PromptContext:
        """From a prompt row of the data stage (prompts/*.parquet)."""
        return cls(
            list(row["history_ids"]),
            list(row.get("candidate_ids") or []),
            row.get("user_id"),
            rules.shown_pairs(row),
            list(row.get("future_ids") or []),
            list(row["history_ratings"]) if row.get("history_ratings") is not None else None,
        )


@dataclass
class RewardEnv:
    """What terms may read: the run's catalog and K, and the models trained for the run (None when absent)."""

    catalog: object
    k: int
    reward_model: object = None  # a learned.LearnedScore
    behaviour: object = None  # a behaviour.BehaviourModel fit on the run's training interactions
    behaviour_power: float = 1.0
    behaviour_form: str = "score"  # reward.behaviour_form: score | percentile
    behaviour_ratings: bool = True  # reward.behaviour_ratings: weigh the history by the user's ratings


@dataclass(frozen=True)
class TermSpec:
    """A registered term: its default weight, what it rewards, and either a per-listing ``rule`` or a ``builder``
    that makes a batch term for a run (returning None when the run lacks what it needs, e.g. a trained model)."""

    weight: float
    help: str
    rule: Callable | None = None
    builder: Callable[[RewardEnv], Term | None] | None = None

    def build(self, env: RewardEnv) -> Term | None:
        return partial(rules.score, self.rule, env) if self.rule is not None else self.builder(env)


TERMS: dict[str, TermSpec] = {
    "learned": TermSpec(1.0, "the learned reward model's score on (prompt, listing)", builder=learned.term),
    "behaviour": TermSpec(
        0.0, "DCG of the listed items' values (or percentiles) in the user's behaviour model", builder=behaviour.term
    ),
    "next_item": TermSpec(
        0.0, "training prompts: NDCG@K of the listing against the user's next items", builder=next_item.term
    ),
    "parses": TermSpec(1.0, "the response is a list at all", rules.parses),
    "has_k": TermSpec(1.0, "the list has exactly K items", rules.has_k),
    "in_catalog": TermSpec(1.0, "share of distinct items grounded in the catalog", rules.in_catalog),
    "no_duplicates": TermSpec(1.0, "penalty share of repeated items (made-up titles too)", rules.no_duplicates),
    "not_in_history": TermSpec(0.5, "penalty share of items the user already has", rules.not_in_history),
    "in_candidates": TermSpec(1.0, "rerank: penalty share of items not among the candidates", rules.in_candidates),
    "explained": TermSpec(0.5, "share of reasons that name a history title or genre", rules.explained),
    "misquoted": TermSpec(0.0, "penalty share of reasons quoting a rating the prompt did not show", rules.misquoted),
}
DEFAULT_WEIGHTS = {name: spec.weight for name, spec in TERMS.items()}


def rule_values(entries: list, ctx: PromptContext | None, env: RewardEnv) -> dict[str, float]:
    """Every rule term of one parsed listing (tests, probes and eval's per-term tables)."""
    return {name: spec.rule(entries, ctx, env) for name, spec in TERMS.items() if spec.rule is not None}
