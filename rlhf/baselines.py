"""Classic recommenders, fit on training interactions only: popularity, item-kNN (cosine), EASE.

They are the yardstick in evaluation and the retrievers that supply candidates in rerank mode.
"""

from __future__ import annotations

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


BASELINES = {"popularity": Popularity, "itemknn": ItemKNN, "ease": EASE, "random": RandomRecommender}


def make(name: str, item_ids, pairs, seed: int = 0) -> Recommender:
    cls = BASELINES[name]
    model = cls(item_ids, seed=seed) if cls is RandomRecommender else cls(item_ids)
    return model.fit(pairs)
