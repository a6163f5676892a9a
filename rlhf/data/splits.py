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
import pyarrow.compute as pc

CONSUMPTION = ("rating", "view", "purchase", "to_read")


@dataclass
class Event:
    item_id: str
    timestamp: int
    rating: float  # NaN when unknown


class Sequences:
    """Every user's consumption events in time order (ties keep file order), held as numpy columns.

    Users and items are dictionary-encoded, so 25M interactions cost ~25 bytes each in four arrays
    instead of 25M Python objects; ``events(start, stop)`` builds the few Event objects a caller needs.
    Iterates user ids in sorted order; ``seqs[user]`` gives that user's events as a list.
    """

    def __init__(self, table: pa.Table):
        mask = pc.is_in(table.column("event"), value_set=pa.array(CONSUMPTION))
        sub = table.filter(pc.fill_null(mask, False))
        users = pc.dictionary_encode(sub.column("user_id")).combine_chunks()
        items = pc.dictionary_encode(sub.column("item_id")).combine_chunks()
        self.user_ids = users.dictionary.to_pylist()  # one string per user, not per event
        self.item_ids = items.dictionary.to_pylist()
        user_codes = users.indices.to_numpy(zero_copy_only=False).astype(np.int32)
        rank = np.empty(len(self.user_ids), dtype=np.int64)
        rank[np.argsort(np.array(self.user_ids, dtype=object), kind="stable")] = np.arange(len(self.user_ids))
        ts = sub.column("timestamp").to_numpy().astype(np.int64)
        order = np.lexsort([np.arange(len(ts)), ts, rank[user_codes]])
        self.users = user_codes[order]
        self.items = items.indices.to_numpy(zero_copy_only=False).astype(np.int32)[order]
        self.timestamps = ts[order]
        self.ratings = sub.column("rating").to_numpy(zero_copy_only=False).astype(np.float64)[order]
        starts = np.flatnonzero(np.r_[True, self.users[1:] != self.users[:-1]]) if len(order) else np.array([], int)
        stops = np.r_[starts[1:], len(order)].astype(np.int64)
        self._span = {self.user_ids[self.users[a]]: (int(a), int(b)) for a, b in zip(starts, stops)}

    def __len__(self) -> int:
        return len(self._span)

    def __iter__(self):
        return iter(self._span)  # built in sorted-user order

    def __contains__(self, user_id) -> bool:
        return user_id in self._span

    def span(self, user_id: str) -> tuple[int, int]:
        return self._span[user_id]

    def events(self, start: int, stop: int) -> list[Event]:
        return [
            Event(self.item_ids[self.items[j]], int(self.timestamps[j]), float(self.ratings[j]))
            for j in range(start, stop)
        ]

    def __getitem__(self, user_id: str) -> list[Event]:
        return self.events(*self._span[user_id])

    def get(self, user_id: str, default=None):
        return self[user_id] if user_id in self._span else default


def sequences(table: pa.Table) -> Sequences:
    return Sequences(table)


@dataclass
class UserSplit:
    """One user's role and the ranges of their sequence that are history and held-out; the Event lists
    are built when read, so a list of UserSplits stays small however long the histories are."""

    user_id: str
    split: str  # train | val | test
    seqs: Sequences = field(repr=False)
    start: int
    cut: int
    stop: int
    cold_start: bool = False

    @property
    def history(self) -> list[Event]:
        return self.seqs.events(self.start, self.cut)

    @property
    def heldout(self) -> list[Event]:
        return self.seqs.events(self.cut, self.stop)

    @property
    def seen(self) -> set[str]:
        return {self.seqs.item_ids[c] for c in self.seqs.items[self.start : self.cut]}


def assign_users(user_ids: list[str], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    rng = np.random.default_rng(seed)
    ids = sorted(user_ids)
    rng.shuffle(ids)
    n_test = max(1, int(round(len(ids) * test_fraction))) if len(ids) > 2 else 0
    n_val = int(round(len(ids) * val_fraction)) if len(ids) > 3 else 0
    return {u: ("test" if k < n_test else "val" if k < n_test + n_val else "train") for k, u in enumerate(ids)}


def split_users(
    seqs: Sequences,
    method: str,
    holdout: int,
    val_fraction: float,
    test_fraction: float,
    cold_start_max: int,
    seed: int,
) -> list[UserSplit]:
    roles = assign_users(list(seqs), val_fraction, test_fraction, seed)
    cutoff = None
    if method == "temporal":
        all_ts = seqs.timestamps
        cutoff = int(np.quantile(all_ts, 1.0 - test_fraction)) if len(all_ts) else 0
    out = []
    for uid in sorted(seqs):
        start, stop = seqs.span(uid)
        role = roles[uid]
        if role == "train":
            cut, end = stop, stop
        elif method == "temporal":
            cut = start + int(np.searchsorted(seqs.timestamps[start:stop], cutoff, side="right"))
            end = min(cut + holdout, stop)
            if cut == start or cut == stop:  # nothing on one side of the cutoff: evaluate by leave-last-out
                cut, end = max(stop - holdout, start), stop
        else:
            cut, end = max(stop - holdout, start), stop
        if cut == start:
            continue
        out.append(UserSplit(uid, role, seqs, start, cut, end, cold_start=cut - start <= cold_start_max))
    return out


def train_pairs(splits: list[UserSplit]):
    """(user, item, rating) triples the baselines may be fit on: every history, no held-out item.
    A generator: callers stream it (the baselines fill their matrix from it) instead of holding a list."""
    for u in splits:
        for j in range(u.start, u.cut):
            yield u.user_id, u.seqs.item_ids[u.seqs.items[j]], float(u.seqs.ratings[j])


def is_positive(rating: float, threshold: float) -> bool:
    return math.isnan(rating) or rating >= threshold


def stored_training_triples(path):
    """(user, item, rating) of every user's history as the data stage stored it (splits.jsonl: held-out items are
    not in it), streamed one user at a time: what the baselines and the behaviour model are fit on."""
    import json

    with open(path) as f:
        for line in f:
            if line.strip():
                u = json.loads(line)
                for item, _, rating in u["history"]:
                    yield u["user_id"], item, math.nan if rating is None else rating
