"""Weights of the composite reward from labelled preference pairs: a Bradley-Terry model over the terms.

For each pair, x = terms(chosen) - terms(rejected); P(chosen preferred) = sigmoid(w . x). The weights maximise the
pairs' likelihood with an L2 penalty and w >= 0 (a term may earn no weight, never a negative one: a penalty term is
already signed), by projected Newton steps. Fit on pairs the learned reward model did not train on (held-out users),
so the learned term earns weight only as far as the labels, not its own training fit, say it should.
"""

from __future__ import annotations

import numpy as np


def term_differences(composite, pairs: list[dict], terms: list[str]) -> np.ndarray:
    """[pairs, terms]: each term's value on the chosen listing minus on the rejected one."""
    from reward_models.terms import PromptContext

    prompts = [p["prompt"] for p in pairs]
    contexts = [PromptContext.from_row(p) if p.get("history_ids") is not None else None for p in pairs]
    chosen = composite.score(prompts, [p["chosen"][0]["content"] for p in pairs], contexts)
    rejected = composite.score(prompts, [p["rejected"][0]["content"] for p in pairs], contexts)
    return np.array([[c - r for c, r in zip(chosen.terms[t], rejected.terms[t])] for t in terms]).T


def fit_bradley_terry(x: np.ndarray, l2: float = 1.0, steps: int = 50) -> np.ndarray:
    """Non-negative weights w maximising sum log sigmoid(x @ w) - l2/2 |w|^2 (projected Newton)."""
    w = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        grad = x.T @ (1.0 - p) - l2 * w
        hess = (x * (p * (1.0 - p))[:, None]).T @ x + l2 * np.eye(x.shape[1])
        new = np.maximum(w + np.linalg.solve(hess, grad), 0.0)
        if np.max(np.abs(new - w)) < 1e-8:
            return new
        w = new
    return w


def pairwise_accuracy(x: np.ndarray, w: np.ndarray) -> float:
    """Share of pairs the weighted terms order as the labels do (ties count half)."""
    margin = x @ w
    return float(np.mean((margin > 0) + 0.5 * (margin == 0))) if len(margin) else float("nan")


def fit_weights(composite, pairs: list[dict], l2: float = 1.0) -> dict:
    """Fitted weights for every term the composite computes, with each term's own pairwise accuracy beside the
    fitted mix's, for reward/weights.json."""
    terms = list(composite.terms)
    x = term_differences(composite, pairs, terms)
    w = fit_bradley_terry(x, l2)
    alone = {t: pairwise_accuracy(x[:, [j]], np.ones(1)) for j, t in enumerate(terms)}
    return {
        "weights": dict(zip(terms, map(float, w))),
        "pairs": len(pairs),
        "l2": l2,
        "accuracy": pairwise_accuracy(x, w),
        "accuracy_by_term": alone,
    }
