"""Classic recommenders, fit on training interactions only: popularity, item-kNN (cosine), EASE.

They are the yardstick in evaluation and the retrievers that supply candidates in rerank mode.
"""

from __future__ import annotations

import numpy as np

MAX_EASE_ITEMS = 20_000  # EASE inverts an items x items Gram matrix


class Recommender:
    name = "base"

    def __init__(self, item_ids: list[str]):
        self.item_ids = list(item_ids)
        self.index = {iid: j for j, iid in enumerate(self.item_ids)}

    def _matrix(self, pairs):
        users = sorted({u for u, _, _ in pairs})
        uidx = {u: k for k, u in enumerate(users)}
        X = np.zeros((len(users), len(self.item_ids)), dtype=np.float32)
        for u, i, _ in pairs:
            if i in self.index:
                X[uidx[u], self.index[i]] = 1.0
        return X

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
        self.counts = self._matrix(pairs).sum(axis=0)
        return self

    def scores(self, history):
        return self.counts.copy()


class ItemKNN(Recommender):
    name = "itemknn"

    def __init__(self, item_ids, neighbours: int = 50):
        super().__init__(item_ids)
        self.neighbours = neighbours

    def fit(self, pairs):
        X = self._matrix(pairs)
        norms = np.sqrt((X * X).sum(axis=0)) + 1e-8
        S = (X.T @ X) / np.outer(norms, norms)
        np.fill_diagonal(S, 0.0)
        if self.neighbours and self.neighbours < S.shape[0]:
            cut = np.partition(S, -self.neighbours, axis=1)[:, -self.neighbours][:, None]
            S = np.where(S >= cut, S, 0.0)
        self.S = S.astype(np.float32)
        self.pop = X.sum(axis=0) * 1e-6  # breaks ties toward popular items
        return self

    def scores(self, history):
        return self._history_vector(history) @ self.S + self.pop


class EASE(Recommender):
    """Steck (2019): closed-form linear item-item model with a zero diagonal."""

    name = "ease"

    def __init__(self, item_ids, l2: float = 200.0):
        super().__init__(item_ids)
        if len(item_ids) > MAX_EASE_ITEMS:
            raise ValueError(f"EASE needs an items x items inverse; {len(item_ids)} items is over {MAX_EASE_ITEMS}. "
                             "Use --retriever itemknn or popularity.")
        self.l2 = l2

    def fit(self, pairs):
        X = self._matrix(pairs).astype(np.float64)
        G = X.T @ X
        G[np.diag_indices_from(G)] += self.l2
        P = np.linalg.inv(G)
        B = P / (-np.diag(P))
        np.fill_diagonal(B, 0.0)
        self.B = B.astype(np.float32)
        self.pop = X.sum(axis=0).astype(np.float32) * 1e-6
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


BASELINES = {"popularity": Popularity, "itemknn": ItemKNN, "ease": EASE, "random": RandomRecommender}


def make(name: str, item_ids, pairs, seed: int = 0) -> Recommender:
    cls = BASELINES[name]
    model = cls(item_ids, seed=seed) if cls is RandomRecommender else cls(item_ids)
    return model.fit(pairs)
