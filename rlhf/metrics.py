"""Recommendation metrics on ranked lists of item ids (None = a title not in the catalog).

Conventions (also in the README):
- ``hr@K``: 1 if any held-out item is in the first K entries.
- ``ndcg@K``: binary relevance, DCG over the first K entries / ideal DCG for min(|held-out|, K) hits.
- ``recall@K``: held-out items found in the first K / |held-out|.
- ``hr@1``: first entry is a held-out item, divided by ALL prompts (S-DPO's denominator; LLaRA divides
  by valid outputs, which is ``hr@1 / valid_rate``).
Duplicates count once; an empty list scores 0 everywhere.
"""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np


def _dedup(items: list) -> list:
    seen, out = set(), []
    for i in items:
        if i is not None and i in seen:
            out.append(None)  # a repeat earns nothing at its rank
            continue
        seen.add(i)
        out.append(i)
    return out


def hit_rate(items: list, relevant: set, k: int) -> float:
    return float(any(i in relevant for i in _dedup(items)[:k] if i is not None))


def recall(items: list, relevant: set, k: int) -> float:
    if not relevant:
        return 0.0
    return len({i for i in _dedup(items)[:k] if i in relevant}) / len(relevant)


def ndcg(items: list, relevant: set, k: int) -> float:
    if not relevant:
        return 0.0
    dcg = sum(1.0 / math.log2(r + 2) for r, i in enumerate(_dedup(items)[:k]) if i is not None and i in relevant)
    ideal = sum(1.0 / math.log2(r + 2) for r in range(min(len(relevant), k)))
    return dcg / ideal


def duplicate_rate(items: list) -> float:
    real = [i for i in items if i is not None]
    return (len(real) - len(set(real))) / len(items) if items else 0.0


def share(items: list, allowed: set) -> float:
    return sum(i in allowed for i in items) / len(items) if items else 0.0


def novelty(items: list, popularity: dict, n_users: int) -> float:
    """Mean self-information -log2 p(i), p(i) = share of training users with the item (add-one smoothed)."""
    vals = [-math.log2((popularity.get(i, 0) + 1) / (n_users + 1)) for i in items if i is not None]
    return sum(vals) / len(vals) if vals else 0.0


def intra_list_diversity(items: list, features: dict) -> float:
    """Mean pairwise (1 - Jaccard) of item attribute sets (genres)."""
    feats = [features.get(i, set()) for i in dict.fromkeys(i for i in items if i is not None)]
    pairs = list(combinations(feats, 2))
    if not pairs:
        return 0.0
    out = []
    for a, b in pairs:
        union = a | b
        out.append(1.0 - (len(a & b) / len(union) if union else 0.0))
    return sum(out) / len(out)


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def paired_difference(after: list, before: list) -> dict | None:
    """Mean of ``after - before`` over the same users with its standard error (None for fewer than 2 pairs).

    Two stages scored on one user sample differ by less than their separate spreads suggest; the paired
    standard error says whether a difference is larger than the user sample's noise.
    """
    diffs = [a - b for a, b in zip(after, before) if a is not None and b is not None]
    if len(diffs) < 2:
        return None
    mu = sum(diffs) / len(diffs)
    var = sum((d - mu) ** 2 for d in diffs) / (len(diffs) - 1)
    return {"delta": mu, "se": (var / len(diffs)) ** 0.5, "n": len(diffs)}


def pearson(x: list, y: list) -> float | None:
    """Pearson correlation of paired values (pairs with a None left out); None when either side is constant
    or fewer than 3 pairs remain."""
    pairs = [(a, b) for a, b in zip(x, y) if a is not None and b is not None]
    if len(pairs) < 3:
        return None
    xs, ys = np.array(pairs, dtype=float).T
    if xs.std() == 0 or ys.std() == 0:
        return None
    return float(np.corrcoef(xs, ys)[0, 1])


def describe_eval(results: dict) -> list[str]:
    """The lines eval, the pipeline summary and the report print under the metrics table: one
    'stage − sft: metric +delta ± se, ...' line per stage of ``vs_sft`` (stages without any skipped), and
    how well the reward tracks the simulator's true utility (``reward_vs_truth``) when it was measured."""
    lines = []
    for stage, diffs in results.get("vs_sft", {}).items():
        shown = ", ".join(f"{metric} {d['delta']:+.3f} ± {d['se']:.3f}" for metric, d in diffs.items() if d)
        if shown:
            lines.append(f"{stage} − sft: {shown} (same users, mean ± standard error)")
    rt = results.get("reward_vs_truth")
    if rt:  # None: a constant side (e.g. no listing parsed), where a correlation says nothing
        shown = ", ".join(
            f"{part} " + ("n/a" if rt[part] is None else f"{rt[part]:+.2f}") for part in ("reward", "learned", "rules")
        )
        lines.append(f"correlation with true utility over {rt['n']} LLM listings: {shown}")
    return lines
