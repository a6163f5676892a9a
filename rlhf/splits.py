"""User histories and held-out targets: leave-last-out and temporal splits, cold-start marking.

Consumption events (rating, view, click-through purchases, to_read) form a user's sequence; impression
rows are click logs and stay out of it. Users are divided into train / val / test by a seeded shuffle.
Held-out items of val/test users never appear in the training interactions (``train_pairs``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

CONSUMPTION = ("rating", "view", "purchase", "to_read")


@dataclass
class Event:
    item_id: str
    timestamp: int
    rating: float  # NaN when unknown


@dataclass
class UserSplit:
    user_id: str
    split: str  # train | val | test
    history: list[Event]
    heldout: list[Event] = field(default_factory=list)
    cold_start: bool = False

    @property
    def seen(self) -> set[str]:
        return {e.item_id for e in self.history}


def sequences(table: pa.Table) -> dict[str, list[Event]]:
    """user_id -> consumption events in time order (ties keep file order)."""
    ev = table.column("event").to_numpy(zero_copy_only=False)
    mask = np.isin(ev, CONSUMPTION)
    users = table.column("user_id").to_numpy(zero_copy_only=False)[mask]
    items = table.column("item_id").to_numpy(zero_copy_only=False)[mask]
    ts = table.column("timestamp").to_numpy()[mask]
    ratings = table.column("rating").to_numpy()[mask]
    order = np.lexsort([np.arange(len(ts)), ts, users])
    out: dict[str, list[Event]] = {}
    for j in order:
        out.setdefault(users[j], []).append(Event(items[j], int(ts[j]), float(ratings[j])))
    return out


def assign_users(user_ids: list[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    rng = np.random.default_rng(seed)
    ids = sorted(user_ids)
    rng.shuffle(ids)
    n_test = max(1, int(round(len(ids) * test_fraction))) if len(ids) > 2 else 0
    n_val = int(round(len(ids) * val_fraction)) if len(ids) > 3 else 0
    return {u: ("test" if k < n_test else "val" if k < n_test + n_val else "train") for k, u in enumerate(ids)}


def split_users(seqs: dict[str, list[Event]], method: str, holdout: int, val_fraction: float, test_fraction: float,
                cold_start_max: int, seed: int) -> list[UserSplit]:
    roles = assign_users(list(seqs), val_fraction, test_fraction, seed)
    cutoff = None
    if method == "temporal":
        all_ts = np.array([e.timestamp for s in seqs.values() for e in s])
        cutoff = int(np.quantile(all_ts, 1.0 - test_fraction)) if len(all_ts) else 0
    out = []
    for uid in sorted(seqs):
        seq = seqs[uid]
        role = roles[uid]
        if role == "train":
            hist, held = seq, []
        elif method == "temporal":
            hist = [e for e in seq if e.timestamp <= cutoff]
            held = [e for e in seq if e.timestamp > cutoff][:holdout]
            if not hist or not held:  # nothing on one side of the cutoff: evaluate by leave-last-out
                hist, held = seq[:-holdout], seq[-holdout:]
        else:
            hist, held = seq[:-holdout], seq[-holdout:]
        if not hist:
            continue
        out.append(UserSplit(uid, role, hist, held, cold_start=len(hist) <= cold_start_max))
    return out


def train_pairs(splits: list[UserSplit]) -> list[tuple[str, str, float]]:
    """(user, item, rating) pairs the baselines may be fit on: every history, no held-out item."""
    return [(u.user_id, e.item_id, e.rating) for u in splits for e in u.history]


def is_positive(rating: float, threshold: float) -> bool:
    return math.isnan(rating) or rating >= threshold
