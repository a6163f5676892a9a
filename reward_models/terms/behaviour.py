"""The behaviour term: how well a listing suits this user, by a classic model fit on the run's training logs.

``BehaviourModel`` wraps a classic recommender (rlhf/baselines.py: item-kNN, EASE, the genre profile, or popularity)
fit on the training users' interactions only, saved in the run (reward/behaviour.npz) by the reward stage. For a
user's history it scores every catalog item as the sum of the history items' rows (item-kNN, EASE), or against the
mean of their genre vectors (genre), each history item weighted by what the user thought of it: ``rating - 3``
where the history is rated (a 1/5 pushes its neighbours or genres down, a 5/5 up), 1 where it is not. The classic
baselines in eval weigh every history item 1; the ratings make the model more personal (bench/behaviour_probe.py).
An unseen item's *percentile* is the share of the user's other unseen items that score
below it (1.0 = the model's first choice for this user, 0.5 = a median item). Where the prompt offers candidates
(rerank mode) the percentile is among the candidates the user has not seen: the choice the listing actually makes.
A retriever's top N all sit near the top of the whole catalog (percentiles 0.9-1.0 on the demo), so a percentile
among the catalog barely tells a good pick among them from a poor one.

The term is the position-weighted (DCG) mean percentile of the listing's first K entries, normalised to [0, 1]:
``sum_r pct(item_r)^power / log2(r + 1)`` over the ideal ``sum_r 1 / log2(r + 1)``. Made-up titles, repeats and
items the user already has earn nothing, so it also pays for validity. ``power`` > 1 sharpens it toward the top of
the user's ranking (chosen by its correlation with true utility: bench/behaviour_probe.py).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import numpy as np

from rlhf.baselines import weighted_history
from rlhf.listing import parse_and_ground


class BehaviourModel:
    """Item scores for a history from a saved linear model: ``weights @ matrix[history] + bias`` (item-item), or,
    factored, ``factors @ mean(weights * factors[history]) + bias`` (the genre profile: items x genres)."""

    def __init__(
        self,
        name: str,
        item_ids: list[str],
        matrix: np.ndarray | None,
        bias: np.ndarray,
        factors: np.ndarray | None = None,
    ):
        self.name, self.item_ids = name, list(item_ids)
        self.index = {i: j for j, i in enumerate(self.item_ids)}
        self.matrix, self.bias, self.factors = matrix, bias.astype(np.float32), factors
        self._cache: OrderedDict[tuple, np.ndarray] = OrderedDict()

    @classmethod
    def fit(cls, name: str, item_ids: list[str], pairs, genres: dict | None = None) -> BehaviourModel:
        """Fit one of rlhf/baselines.py's recommenders on (user, item, rating) training triples; ``genre`` also
        needs the catalog's genres ({item_id: [genre, ...]})."""
        from rlhf import baselines

        if name not in ("ease", "itemknn", "popularity", "genre"):
            raise ValueError(f"behaviour model {name!r}: use genre, ease, itemknn or popularity")
        rec = baselines.make(name, item_ids, pairs, genres=genres)
        if name == "ease":
            return cls(name, item_ids, rec.B, rec.pop)
        if name == "itemknn":
            return cls(name, item_ids, rec.S, rec.pop)
        if name == "genre":
            return cls(name, item_ids, None, rec.prior, factors=rec.factors)
        return cls(name, item_ids, None, rec.counts)

    def save(self, path: Path) -> Path:
        arrays = {"item_ids": np.array(self.item_ids, dtype=object), "bias": self.bias, "name": np.array(self.name)}
        for key, value in (("matrix", self.matrix), ("factors", self.factors)):
            if value is not None:
                arrays[key] = value.astype(np.float32)
        with open(path, "wb") as f:
            np.savez(f, **arrays)
        return path

    @classmethod
    def load(cls, path: Path) -> BehaviourModel:
        with np.load(path, allow_pickle=True) as z:
            matrix = z["matrix"] if "matrix" in z.files else None
            factors = z["factors"] if "factors" in z.files else None
            return cls(str(z["name"]), list(z["item_ids"]), matrix, z["bias"], factors)

    def scores(self, history_ids: list[str], ratings: list | None = None) -> np.ndarray:
        if self.matrix is None and self.factors is None:
            return self.bias.copy()
        found = weighted_history(self.index, history_ids, ratings)
        if found is None:
            return self.bias.copy()
        rows, w = found
        if self.factors is not None:
            return self.factors @ (w @ self.factors[rows] / len(rows)) + self.bias
        return w @ self.matrix[rows] + self.bias

    def percentiles(self, history_ids: list[str], ratings: list | None = None, among=None) -> np.ndarray:
        """Per catalog item, its percentile among the user's unseen items, or among the unseen items of ``among``
        (a prompt's candidates) when given; NaN for items already seen and, with ``among``, items outside it."""
        key = (tuple(history_ids), tuple(ratings or ()), tuple(among or ()))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        s = self.scores(history_ids, ratings).astype(np.float64)
        seen = np.zeros(len(s), dtype=bool)
        seen[[self.index[i] for i in history_ids if i in self.index]] = True
        if among:
            outside = np.ones(len(s), dtype=bool)
            outside[[self.index[i] for i in among if i in self.index]] = False
            seen |= outside
        unseen = np.flatnonzero(~seen)
        pct = np.full(len(s), np.nan)
        if len(unseen) > 1:
            order = np.argsort(s[unseen], kind="stable")
            ranks = np.empty(len(unseen))
            ranks[order] = np.arange(len(unseen))
            pct[unseen] = ranks / (len(unseen) - 1)
        elif len(unseen) == 1:
            pct[unseen] = 1.0
        self._cache[key] = pct
        if len(self._cache) > 4096:
            self._cache.popitem(last=False)
        return pct


def listing_value(
    model: BehaviourModel,
    item_ids: list,
    history_ids: list[str],
    k: int,
    power: float = 1.0,
    ratings=None,
    candidates=None,
) -> float:
    """DCG of the first K items' percentiles (to ``power``; among ``candidates`` where given) over the ideal, in
    [0, 1]; None, repeats, seen items and items outside the candidates earn nothing."""
    pct = model.percentiles(history_ids, ratings, candidates)
    got, used = 0.0, set()
    for rank, item in enumerate(item_ids[:k], 1):
        j = model.index.get(item) if item is not None else None
        if j is None or item in used or math.isnan(pct[j]):
            continue
        used.add(item)
        got += pct[j] ** power / math.log2(rank + 1)
    return got / sum(1.0 / math.log2(r + 1) for r in range(1, k + 1))


def score(env, prompts, completions, contexts) -> list[float]:
    out = []
    for text, ctx in zip(completions, contexts):
        if ctx is None:
            out.append(0.0)
            continue
        items = [e.item_id for e in parse_and_ground(text, env.catalog)]
        out.append(
            listing_value(
                env.behaviour,
                items,
                ctx.history_ids,
                env.k,
                env.behaviour_power,
                ctx.history_ratings,
                ctx.candidate_ids or None,
            )
        )
    return out


def term(env):
    """The run's behaviour model as a term, or None when the run has none."""
    if env.behaviour is None:
        return None
    from functools import partial

    return partial(score, env)
