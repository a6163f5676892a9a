"""Synthetic users with known tastes over any catalog: histories, ratings, click logs, labelers, and
the true utility of a ranked list (the ground truth evaluation reads).

Each item gets a feature vector (its genres, multi-hot and L2-normalised; items without genres get a
seeded random vector) and a quality in [0, 1]. A user has a taste vector concentrated on 2-3
favourite genres. The utility of item i for user u is ``taste_u . features_i + 0.3 * quality_i``.
Everything is a pure function of the seed.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

from rlhf.catalog import Catalog


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def examine_prob(rank: int) -> float:
    """Position bias of the click model: chance that a user looks at the item at 1-based ``rank``."""
    return 1.0 / rank**0.8


@dataclass
class SimUser:
    user_id: str
    taste: np.ndarray
    favourite: list[str]


class Simulator:
    def __init__(self, catalog: Catalog, seed: int = 0, quality_weight: float = 0.3):
        self.catalog = catalog
        self.seed = seed
        self.item_ids = [it.item_id for it in catalog.items]
        self.index = {iid: j for j, iid in enumerate(self.item_ids)}
        genres = sorted({g for it in catalog.items for g in it.genres})
        self.genres = genres
        rng = np.random.default_rng(seed)
        if genres:
            feats = np.zeros((len(self.item_ids), len(genres)))
            gidx = {g: k for k, g in enumerate(genres)}
            for j, it in enumerate(catalog.items):
                for g in it.genres:
                    feats[j, gidx[g]] = 1.0
        else:
            feats = np.zeros((len(self.item_ids), 8))
        for j, iid in enumerate(self.item_ids):  # items without attributes get a stable random direction
            if not feats[j].any():
                r = np.random.default_rng(zlib.crc32(iid.encode()) ^ seed)
                feats[j] = np.abs(r.normal(size=feats.shape[1]))
        self.features = feats / np.linalg.norm(feats, axis=1, keepdims=True)
        self.quality = rng.beta(2.0, 2.0, size=len(self.item_ids))
        self.quality_weight = quality_weight
        # popularity: quality plus luck; drives exposure, not utility
        self.popularity = np.exp(1.5 * self.quality + rng.normal(0, 0.7, len(self.item_ids)))
        self.popularity /= self.popularity.sum()

    # -- users ---------------------------------------------------------------------------------
    def user(self, user_id: str) -> SimUser:
        r = np.random.default_rng([self.seed, zlib.crc32(user_id.encode())])
        dim = self.features.shape[1]
        n_fav = int(r.integers(2, 4))
        fav = r.choice(dim, size=min(n_fav, dim), replace=False)
        taste = r.uniform(0.0, 0.25, dim)
        taste[fav] += r.uniform(1.0, 1.6, len(fav))
        taste /= np.linalg.norm(taste)
        names = [self.genres[k] for k in fav] if self.genres else [f"f{k}" for k in fav]
        return SimUser(user_id, taste, names)

    def utilities(self, user: SimUser) -> np.ndarray:
        return self.features @ user.taste + self.quality_weight * self.quality

    def utility(self, user: SimUser, item_id: str) -> float:
        j = self.index[item_id]
        return float(self.features[j] @ user.taste + self.quality_weight * self.quality[j])

    # -- logs ----------------------------------------------------------------------------------
    def history(self, user: SimUser, length: int, rng: np.random.Generator, start_ts: int = 1_600_000_000):
        """Items the user consumed, in time order, with ratings 1..5 and timestamps."""
        u = self.utilities(user)
        logits = 6.0 * u + np.log(self.popularity)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        length = min(length, len(self.item_ids))
        chosen = rng.choice(len(self.item_ids), size=length, replace=False, p=p)
        ts = start_ts + np.cumsum(rng.integers(3600, 30 * 86400, size=length))
        lo, hi = np.percentile(u, 10), np.percentile(u, 97)
        rows = []
        for j, t in zip(chosen, ts):
            z = (u[j] - lo) / max(hi - lo, 1e-6)
            rating = int(np.clip(round(1 + 4 * z + rng.normal(0, 0.5)), 1, 5))
            rows.append({"item_id": self.item_ids[j], "timestamp": int(t), "rating": float(rating)})
        return rows

    def click_prob(self, user: SimUser, item_id: str) -> float:
        return float(_sigmoid(8.0 * (self.utility(user, item_id) - 0.75)))

    def impression(self, user: SimUser, rng: np.random.Generator, exclude: set[str], size: int = 10):
        """A shown list (popularity-sampled, as a deployed recommender might) and which were clicked."""
        pool = [j for j in range(len(self.item_ids)) if self.item_ids[j] not in exclude]
        p = self.popularity[pool] / self.popularity[pool].sum()
        shown = rng.choice(pool, size=min(size, len(pool)), replace=False, p=p)
        out = []
        for rank, j in enumerate(shown, 1):
            iid = self.item_ids[j]
            clicked = rng.random() < examine_prob(rank) * self.click_prob(user, iid)
            out.append({"item_id": iid, "position": rank, "clicked": bool(clicked)})
        return out

    # -- ground truth for ranked lists ----------------------------------------------------------
    def list_utility(self, user: SimUser, item_ids: list, seen: set[str], k: int) -> float:
        """DCG of item utilities, normalised by the best possible unseen K-list: in [0, 1].

        Not-in-catalog entries (None), duplicates and items already seen earn nothing.
        """
        u = self.utilities(user)
        got, used = 0.0, set()
        for rank, iid in enumerate(item_ids[:k], 1):
            if iid is None or iid in used or iid in seen or iid not in self.index:
                continue
            used.add(iid)
            got += max(u[self.index[iid]], 0.0) / math.log2(rank + 1)
        mask = np.array([iid not in seen for iid in self.item_ids])
        best = np.sort(u[mask])[::-1][:k]
        ideal = sum(max(v, 0.0) / math.log2(r + 1) for r, v in enumerate(best, 1))
        return float(got / ideal) if ideal > 0 else 0.0

    def expected_clicks(self, user: SimUser, item_ids: list, seen: set[str], k: int) -> float:
        total, used = 0.0, set()
        for rank, iid in enumerate(item_ids[:k], 1):
            if iid is None or iid in used or iid in seen or iid not in self.index:
                continue
            used.add(iid)
            total += examine_prob(rank) * self.click_prob(user, iid)
        return total

    def label(
        self,
        user: SimUser,
        list_a: list,
        list_b: list,
        seen: set[str],
        k: int,
        rng: np.random.Generator,
        noise: float = 1.0,
    ) -> int:
        """A simulated labeler's choice between two lists: 0 for A, 1 for B (Bradley-Terry noise)."""
        ua = self.list_utility(user, list_a, seen, k)
        ub = self.list_utility(user, list_b, seen, k)
        p_a = _sigmoid((ua - ub) * 10.0 / max(noise, 1e-6))
        return 0 if rng.random() < p_a else 1


def listing_truth(catalog: Catalog, meta: dict):
    """``truth(contexts, completions) -> list[float]``: the simulator's utility of each completion's listing, logged
    beside the reward and never rewarded; None when the run's data did not come from the simulator."""
    if meta.get("simulator_seed") is None:
        return None
    from functools import partial

    return partial(_listing_truth, Simulator(catalog, seed=meta["simulator_seed"]), meta["k"])


def _listing_truth(sim: Simulator, k: int, contexts: list, completions: list[str]) -> list[float]:
    from rlhf.listing import parse_and_ground

    out = []
    for ctx, text in zip(contexts, completions):
        items = [e.item_id for e in parse_and_ground(text, sim.catalog)]
        out.append(sim.list_utility(sim.user(ctx.user_id), items, set(ctx.history_ids), k))
    return out
