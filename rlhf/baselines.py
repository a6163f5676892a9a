"""Classic recommenders, fit on training interactions only: popularity, item-kNN (cosine), EASE, and a
content-based genre profile.

They are the yardstick in evaluation and the retrievers that supply candidates in rerank mode.
"""

from __future__ import annotations

import math
from array import array

import numpy as np

MAX_EASE_ITEMS = 20_000  # EASE inverts an items x items Gram matrix


class Recommender:
    name = "base"

    def __init__(self, item_ids: list[str]):
        self.item_ids = list(item_ids)
        self.index = {iid: j for j, iid in enumerate(self.item_ids)}

    def _interactions(self, pairs) -> tuple[np.ndarray, np.ndarray, int]:
        """Stream (user, item, rating) triples into distinct (user code, item code) arrays, sorted by user.
        Items outside the catalog are dropped. Compact arrays, never a list of tuples."""
        users, u_arr, i_arr = {}, array("i"), array("i")
        for u, i, _ in pairs:
            j = self.index.get(i)
            if j is not None:
                u_arr.append(users.setdefault(u, len(users)))
                i_arr.append(j)
        n = max(len(self.item_ids), 1)
        key = np.unique(
            np.frombuffer(u_arr, dtype=np.int32).astype(np.int64) * n + np.frombuffer(i_arr, dtype=np.int32)
        )
        return key // n, key % n, len(users)

    def _gram(self, u: np.ndarray, i: np.ndarray, n_users: int, chunk: int = 2048) -> np.ndarray:
        """Item co-occurrence X^T X of the binary user x item matrix, built a block of users at a time so
        the users x items matrix never exists whole; memory is items x items."""
        n = len(self.item_ids)
        G = np.zeros((n, n), dtype=np.float64)
        bounds = np.searchsorted(u, np.arange(0, n_users + chunk, chunk))
        for b, (a, z) in enumerate(zip(bounds[:-1], bounds[1:])):
            if a == z:
                continue
            Xc = np.zeros((chunk, n), dtype=np.float32)
            Xc[u[a:z] - b * chunk, i[a:z]] = 1.0
            G += Xc.T @ Xc
        return G

    def fit(self, pairs):
        raise NotImplementedError

    def scores(self, history: list[str]) -> np.ndarray:
        raise NotImplementedError

    def recommend(self, history: list[str], k: int, exclude=(), candidates=None) -> list[str]:
        s = self.scores(history).astype(np.float64)
        banned = set(history) | set(exclude)
        if candidates is not None:
            allowed = np.full(len(self.item_ids), False)
            for c in candidates:
                if c in self.index:
                    allowed[self.index[c]] = True
            s = np.where(allowed, s, -np.inf)
        for i in banned:
            if i in self.index:
                s[self.index[i]] = -np.inf
        order = np.argsort(-s, kind="stable")
        return [self.item_ids[j] for j in order[:k] if np.isfinite(s[j])]

    def _history_vector(self, history):
        x = np.zeros(len(self.item_ids), dtype=np.float32)
        for i in history:
            if i in self.index:
                x[self.index[i]] = 1.0
        return x


class Popularity(Recommender):
    name = "popularity"

    def fit(self, pairs):
        _, i, _ = self._interactions(pairs)
        self.counts = np.bincount(i, minlength=len(self.item_ids)).astype(np.float32)
        return self

    def scores(self, history):
        return self.counts.copy()


class ItemKNN(Recommender):
    name = "itemknn"

    def __init__(self, item_ids, neighbours: int = 50):
        super().__init__(item_ids)
        self.neighbours = neighbours

    def fit(self, pairs):
        u, i, n_users = self._interactions(pairs)
        G = self._gram(u, i, n_users)
        counts = np.diag(G).copy()  # binary matrix: column sums = diagonal of X^T X
        norms = np.sqrt(counts) + 1e-8
        S = G / np.outer(norms, norms)
        np.fill_diagonal(S, 0.0)
        if self.neighbours and self.neighbours < S.shape[0]:
            cut = np.partition(S, -self.neighbours, axis=1)[:, -self.neighbours][:, None]
            S = np.where(S >= cut, S, 0.0)
        self.S = S.astype(np.float32)
        self.pop = (counts * 1e-6).astype(np.float32)  # breaks ties toward popular items
        return self

    def scores(self, history):
        return self._history_vector(history) @ self.S + self.pop


class EASE(Recommender):
    """Steck (2019): closed-form linear item-item model with a zero diagonal."""

    name = "ease"

    def __init__(self, item_ids, l2: float = 200.0):
        super().__init__(item_ids)
        if len(item_ids) > MAX_EASE_ITEMS:
            raise ValueError(
                f"EASE needs an items x items inverse; {len(item_ids)} items is over {MAX_EASE_ITEMS}. "
                "Use --retriever itemknn or popularity."
            )
        self.l2 = l2

    def fit(self, pairs):
        u, i, n_users = self._interactions(pairs)
        G = self._gram(u, i, n_users)
        counts = np.diag(G).copy()
        G[np.diag_indices_from(G)] += self.l2
        P = np.linalg.inv(G)
        B = P / (-np.diag(P))
        np.fill_diagonal(B, 0.0)
        self.B = B.astype(np.float32)
        self.pop = counts.astype(np.float32) * 1e-6
        return self

    def scores(self, history):
        return self._history_vector(history) @ self.B + self.pop


class RandomRecommender(Recommender):
    name = "random"

    def __init__(self, item_ids, seed: int = 0):
        super().__init__(item_ids)
        self.seed = seed

    def fit(self, pairs):
        return self

    def scores(self, history):
        rng = np.random.default_rng([self.seed, len(history), *[self.index.get(i, 0) for i in history[-3:]]])
        return rng.random(len(self.item_ids))


RATING_CENTER = 3.0  # the middle of a 1-5 scale: a history item rated above it pulls its genres up, below it down
PRIOR_SHRINK = 5.0  # an item's mean rating is shrunk toward the global mean as if it had this many more ratings


def history_weights(ratings, n: int) -> list[float]:
    """One weight per history item: rating - RATING_CENTER where rated, 1 where not (implicit feedback)."""
    if not ratings:
        return [1.0] * n
    return [1.0 if r is None or math.isnan(r) else float(r) - RATING_CENTER for r in ratings]


def weighted_history(index: dict, history, ratings=None) -> tuple[list[int], np.ndarray] | None:
    """(rows, weights) of the history items found in ``index``, weighted by ``history_weights``; None if none are."""
    kept = [(index[i], w) for i, w in zip(history, history_weights(ratings, len(history))) if i in index]
    if not kept:
        return None
    rows, w = zip(*kept)
    return list(rows), np.asarray(w, dtype=np.float32)


class MissingGenres(ValueError):
    """The genre recommender was asked for on a catalog without genres."""


class GenreProfile(Recommender):
    """Content-based: the user's genre profile against each item's genres, plus a quality prior.

    Each item is its genres, multi-hot and L2-normalised (``factors``, items x genres). A user's profile is the mean
    of their history items' vectors, each weighted as ``history_weights`` says (the classic baselines' ``scores`` see
    no ratings, so every item weighs 1 there; the behaviour term passes the ratings). An item scores
    ``factors[i] . profile + prior[i]``; the prior is ``beta`` times the item's shrunk mean training rating minus the
    global mean, and ``beta`` is fit by least squares on the training ratings, each predicted from the rest of its
    user's history and the item's other ratings (leave one out, one rating per user and item: the last), so the fit
    is not flattered by the rating itself. ``beta`` is never negative; where the genres predict nothing the prior
    decides and the profile only breaks ties. Where the ratings cannot fit it (clicks, fewer than 3 ratings, all
    alike) the prior is log popularity, standardised, at weight 0.1. The profile's scale differs between the
    rating-weighted reading (what ``beta`` is fit on) and the unrated one (weights 1), so the prior weighs less there.
    """

    name = "genre"

    def __init__(self, item_ids, genres: dict | None = None):
        super().__init__(item_ids)
        if not genres:
            raise MissingGenres("the genre recommender needs the catalog's genres (pass genres={item_id: [...]})")
        vocab = sorted({g for i in self.item_ids for g in genres.get(i) or ()})
        if not vocab:
            raise MissingGenres("the genre recommender needs item genres, and no catalog item has any")
        col = {g: c for c, g in enumerate(vocab)}
        F = np.zeros((len(self.item_ids), len(vocab)), dtype=np.float32)
        for j, i in enumerate(self.item_ids):
            for g in genres.get(i) or ():
                F[j, col[g]] = 1.0
        self.genres = vocab
        self.factors = F / np.maximum(np.linalg.norm(F, axis=1, keepdims=True), 1e-12)

    def fit(self, pairs):
        users, u_arr, i_arr, r_arr = {}, array("i"), array("i"), array("d")
        for u, i, r in pairs:
            j = self.index.get(i)
            if j is not None:
                u_arr.append(users.setdefault(u, len(users)))
                i_arr.append(j)
                r_arr.append(math.nan if r is None else float(r))
        uc, ic = np.frombuffer(u_arr, dtype=np.int32), np.frombuffer(i_arr, dtype=np.int32)
        rc = np.frombuffer(r_arr, dtype=np.float64)
        n = len(self.item_ids)
        # one event per (user, item), the last: a repeat would stay in its own leave-one-out profile and prior
        key = uc.astype(np.int64) * max(n, 1) + ic
        _, last = np.unique(key[::-1], return_index=True)
        keep = np.sort(len(key) - 1 - last)
        uc, ic, rc = uc[keep], ic[keep], rc[keep]
        counts = np.bincount(ic, minlength=n).astype(np.float64)
        rated = ~np.isnan(rc)
        self.beta = 0.0
        if rated.sum() > 2 and np.nanstd(rc) > 0:
            prior = self._fit_rated(uc[rated], ic[rated], rc[rated])
        else:
            logc = np.log1p(counts)
            prior = 0.1 * (logc - logc.mean()) / max(float(logc.std()), 1e-12)
        self.prior = (prior + counts * 1e-6).astype(np.float32)  # ties toward popular items
        return self

    def _fit_rated(self, uc, ic, rc) -> np.ndarray:
        n = len(self.item_ids)
        sums, cnt = np.bincount(ic, rc, minlength=n), np.bincount(ic, minlength=n).astype(np.float64)
        mean = float(rc.sum() / len(rc))
        # leave one out: the item's prior without this rating, the user's profile without this item
        q_loo = (sums[ic] - rc + PRIOR_SHRINK * mean) / (cnt[ic] - 1 + PRIOR_SHRINK) - mean
        W = (rc - RATING_CENTER)[:, None] * self.factors[ic]
        per_user = np.zeros((int(uc.max()) + 1, W.shape[1]))
        np.add.at(per_user, uc, W)
        n_u = np.bincount(uc).astype(np.float64)
        keep = n_u[uc] > 1
        profile = (per_user[uc] - W)[keep] / (n_u[uc][keep] - 1)[:, None]
        x = np.c_[np.einsum("ij,ij->i", profile, self.factors[ic][keep]), q_loo[keep], np.ones(int(keep.sum()))]
        coef = np.linalg.lstsq(x, rc[keep] - RATING_CENTER, rcond=None)[0] if len(x) > 3 else np.zeros(3)
        # scores are ranked, so the profile's coefficient sets the scale: beta = quality's / profile's. A quality
        # coefficient below 0 is noise (a better rated item is not worse): 0. Genres that predict nothing (a
        # coefficient near or below 0): the prior decides, the profile breaks ties.
        a, b = float(coef[0]), max(float(coef[1]), 0.0)
        self.beta = b / a if a > 1e-3 else (1e3 if b > 0 else 0.0)
        return self.beta * ((sums + PRIOR_SHRINK * mean) / (cnt + PRIOR_SHRINK) - mean)

    def profile(self, history, ratings=None) -> np.ndarray | None:
        found = weighted_history(self.index, history, ratings)
        if found is None:
            return None
        rows, w = found
        return w @ self.factors[rows] / len(rows)

    def scores(self, history, ratings=None):
        p = self.profile(history, ratings)
        return self.prior.copy() if p is None else self.factors @ p + self.prior


BASELINES = {
    "popularity": Popularity,
    "itemknn": ItemKNN,
    "ease": EASE,
    "genre": GenreProfile,
    "random": RandomRecommender,
}


def make(name: str, item_ids, pairs, seed: int = 0, genres: dict | None = None) -> Recommender:
    """Fit a recommender by name; ``genres`` ({item_id: [genre, ...]}, the catalog's) is what ``genre`` needs."""
    cls = BASELINES[name]
    if cls is RandomRecommender:
        model = cls(item_ids, seed=seed)
    elif cls is GenreProfile:
        model = cls(item_ids, genres)
    else:
        model = cls(item_ids)
    return model.fit(pairs)


def catalog_genres(catalog) -> dict:
    """{item_id: genres} of a catalog: what ``make(..., genres=...)`` takes."""
    return {it.item_id: it.genres for it in catalog.items}
