"""The composite reward: a weighted sum of registered terms, handing back every term's values with the total.

One object scores PPO rollouts (through reward_models/trl_ppo.py), critic-free RL, eval, labeling and the probes.
Weights are the recipe's ``ppo.reward_weights`` over the defaults in ``reward_models.terms.TERMS``.
"""

from __future__ import annotations

from dataclasses import dataclass

from reward_models.terms import DEFAULT_WEIGHTS, TERMS, PromptContext, RewardEnv
from reward_models.terms.learned import LearnedScore


class RewardError(ValueError):
    """A composite that cannot be built as asked; the message says what is missing."""


@dataclass
class Scored:
    """One batch's reward: the weighted total per completion and each term's values (same order)."""

    total: list[float]
    terms: dict[str, list[float]]

    def rows(self) -> list[dict]:
        """Per completion: {"reward": total, <term>: value, ...}."""
        return [{"reward": t, **{n: v[i] for n, v in self.terms.items()}} for i, t in enumerate(self.total)]

    def means(self) -> dict[str, float]:
        n = max(len(self.total), 1)
        return {"reward": sum(self.total) / n, **{name: sum(v) / n for name, v in self.terms.items()}}


class CompositeReward:
    """``score(prompts, completions, contexts)`` -> Scored. Every term the run can build is computed (a weight of 0
    still reports it); a term with a weight but nothing to build it from is an error, not a silent zero."""

    def __init__(self, env: RewardEnv, weights: dict[str, float] | None = None):
        weights = {**DEFAULT_WEIGHTS, **(weights or {})}
        unknown = sorted(set(weights) - set(TERMS))
        if unknown:
            raise RewardError(f"unknown reward term(s) {unknown}; known: {', '.join(TERMS)}")
        self.env, self.weights, self.terms = env, weights, {}
        for name, spec in TERMS.items():
            term = spec.build(env)
            if term is not None:
                self.terms[name] = term
            elif weights[name]:
                raise RewardError(
                    f"reward term {name!r} has weight {weights[name]} but this run has nothing to "
                    f"build it from ({spec.help}); train it first or set its weight to 0"
                )

    def score(self, prompts: list, completions: list[str], contexts: list[PromptContext | None]) -> Scored:
        values = {name: [float(v) for v in term(prompts, completions, contexts)] for name, term in self.terms.items()}
        total = [sum(self.weights[name] * values[name][i] for name in values) for i in range(len(completions))]
        return Scored(total, values)

    def rule_part(self, scored: Scored) -> list[float]:
        """The total without the learned term (eval's reward_vs_truth reads the two parts apart)."""
        learned = scored.terms.get("learned")
        if learned is None:
            return list(scored.total)
        return [t - self.weights["learned"] * s for t, s in zip(scored.total, learned)]


def for_run(run, weights: dict, dtype: str, reward=None) -> CompositeReward:
    """The composite of a run (a RunDir): its catalog and K, and what the reward stage made for it: the reward model
    as the learned term (loaded in ``dtype`` on this process's device) and the behaviour model, read as ``reward``
    (the config's reward section: behaviour_form, behaviour_power, behaviour_ratings) says; its defaults without one."""
    from reward_models.terms.behaviour import BehaviourModel
    from rlhf.models import load_reward_model, load_tokenizer, on_device

    learned = behaviour = None
    if run.reward.model.exists():
        path = run.reward.model
        learned = LearnedScore(on_device(load_reward_model(path, dtype)), load_tokenizer(str(path)))
    if run.reward.behaviour.exists():
        behaviour = BehaviourModel.load(run.reward.behaviour)
    reading = (
        {}
        if reward is None
        else {
            "behaviour_power": reward.behaviour_power,
            "behaviour_form": reward.behaviour_form,
            "behaviour_ratings": reward.behaviour_ratings,
        }
    )
    env = RewardEnv(run.catalog(), run.meta()["k"], learned, behaviour, **reading)
    return CompositeReward(env, weights)
