"""The behaviour term: how well a listing suits this user, by a classic model fit on the run's training logs.

``BehaviourModel`` wraps a classic recommender (rlhf/baselines.py: item-kNN, EASE, the genre profile, or popularity)
fit on the training users' interactions only, saved in the run (reward/behaviour.npz) by the reward stage. For a
user's history it scores every catalog item as the sum of the history items' rows (item-kNN, EASE), or against the
mean of their genre vectors (genre), each history item weighted by what the user thought of it: ``rating - 3``
where the history is rated (a 1/5 pushes its neighbours or genres down, a 5/5 up), 1 where it is not. The classic
baselines in eval weigh every history item 1; the ratings make the model more personal (bench/behaviour_probe.py).
The term reads the model's scores in one of two forms (``reward.behaviour_form``):

- ``score`` (the default): an unseen item's *value* is its score scaled over the user's unseen catalog, 0 at the
  10th percentile (and below) and 1 at the model's first choice. The term is the position-weighted (DCG) sum of the
  listed items' values over the ideal one, the DCG of the K best values in the catalog. It is the simulator's own
  shape of true utility (DCG of item utilities over the best unseen K-list) with the model's scores in place of the
  utilities, so it says both which candidates suit the user best and how good the offered candidates are for this
  user at all (a retriever that missed the user's taste leaves every listing of its candidates low).
- ``percentile``: an unseen item's share of the user's other unseen items that score below it (among the prompt's
  candidates in rerank mode: the choice the listing makes), to ``power``; the DCG-weighted mean, in [0, 1]. A
  percentile keeps only the order within the user, so every user's best listing scores 1, whatever was offered.

On the demo's data and its 80 test users, against true utility (bench/behaviour_probe.py prints both forms):
``score`` tracks it better for every behaviour model, over the LLM's listings (genre +0.85 against +0.57) and
within each user's own candidates (random 3-lists of them: genre +0.79 against +0.73, item-kNN +0.44 against +0.38,
EASE +0.36 against +0.31), the difference PPO climbs.

Either way made-up titles, repeats, items the user already has and, with candidates, items outside them earn
nothing, so the term also pays for validity.
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

    def values(self, history_ids: list[str], ratings: list | None, k: int) -> tuple[np.ndarray, float]:
        """Per catalog item, its score scaled over the user's unseen items (0 at their ``VALUE_FLOOR``-th percentile
        and below, 1 at the best; NaN for seen items), and the ideal DCG: that of the K best values. Where every
        unseen item scores alike (no preference to read) each is worth 1."""
        key = ("values", tuple(history_ids), tuple(ratings or ()), k)
        if (hit := self._recall(key)) is not None:
            return hit
        s = self.scores(history_ids, ratings).astype(np.float64)
        unseen = np.ones(len(s), dtype=bool)
        unseen[[self.index[i] for i in history_ids if i in self.index]] = False
        value = np.full(len(s), np.nan)
        ideal = 0.0
        if unseen.any():
            lo, hi = float(np.percentile(s[unseen], VALUE_FLOOR)), float(s[unseen].max())
            value[unseen] = np.clip((s[unseen] - lo) / (hi - lo), 0.0, 1.0) if hi - lo > 1e-12 else 1.0
            best = np.sort(value[unseen])[::-1][:k]
            ideal = float(sum(v / math.log2(r + 1) for r, v in enumerate(best, 1)))
        self._remember(key, (value, ideal))
        return value, ideal

    def _recall(self, key):
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        return None

    def _remember(self, key, value) -> None:
        self._cache[key] = value
        if len(self._cache) > 4096:
            self._cache.popitem(last=False)

    def percentiles(self, history_ids: list[str], ratings: list | None = None, among=None) -> np.ndarray:
        """Per catalog item, its percentile among the user's unseen items, or among the unseen items of ``among``
        (a prompt's candidates) when given; NaN for items already seen and, with ``among``, items outside it."""
        key = (tuple(history_ids), tuple(ratings or ()), tuple(among or ()))
        if (hit := self._recall(key)) is not None:
            return hit
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
        self._remember(key, pct)
        return pct


VALUE_FLOOR = 10  # the percentile of the user's unseen catalog scores that maps to value 0


def listing_value(
    model: BehaviourModel,
    item_ids: list,
    history_ids: list[str],
    k: int,
    power: float = 1.0,
    ratings=None,
    candidates=None,
    form: str = "score",
) -> float:
    """The behaviour term of one listing, in [0, 1]: with ``form="score"`` the DCG of the first K items' values over
    the ideal DCG of the catalog's K best; with ``"percentile"`` the DCG of their percentiles (to ``power``; among
    ``candidates`` where given) over the ideal. None, repeats, seen items and items outside ``candidates`` earn
    nothing."""
    if form == "score":
        value, ideal = model.values(history_ids, ratings, k)
    elif form == "percentile":
        value, ideal = model.percentiles(history_ids, ratings, candidates), None
    else:
        raise ValueError(f"behaviour form {form!r}: use score or percentile")
    offered = set(candidates) if candidates else None
    got, used = 0.0, set()
    for rank, item in enumerate(item_ids[:k], 1):
        j = model.index.get(item) if item is not None else None
        if j is None or item in used or math.isnan(value[j]) or (offered is not None and item not in offered):
            continue
        used.add(item)
        got += (value[j] if ideal is not None else value[j] ** power) / math.log2(rank + 1)
    if ideal is None:
        ideal = sum(1.0 / math.log2(r + 1) for r in range(1, k + 1))
    return got / ideal if ideal > 0 else 0.0


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
                ctx.history_ratings if env.behaviour_ratings else None,
                ctx.candidate_ids or None,
                env.behaviour_form,
            )
        )
    return out


def term(env):
    """The run's behaviour model as a term, or None when the run has none."""
    if env.behaviour is None:
        return None
    from functools import partial

    return partial(score, env)
