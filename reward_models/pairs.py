"""Preference pairs for the reward model: read every source, dedupe, balance, hold out a validation split.

Sources: ``ratings``, ``clicks`` and ``simulator`` from RUN_DIR/data/pairs/, and ``labels`` from every
imported labeling round (RUN_DIR/labels/round-NNN/pairs.parquet, source ``labels:round-NNN``).
The validation split is by user, so no user's pairs sit on both sides.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


def _read(path: Path) -> list[dict]:
    table = pq.read_table(path)
    return [] if table.column_names == ["empty"] else table.to_pylist()


def _key(row) -> str:
    blob = json.dumps([row["prompt"], row["chosen"], row["rejected"]], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()


def load_pairs(run, sources: list[str]) -> tuple[list[dict], dict]:
    """All pairs of the chosen sources in a RunDir, deduplicated; plus counts of what was read and dropped."""
    rows, report = [], {"read": Counter(), "dropped": Counter()}
    for src in sources:
        if src == "labels":
            paths = run.labels.imported_pairs()
        else:
            paths = [run.data.pairs(src)]
        for p in paths:
            if not p.exists():
                continue
            for r in _read(p):
                report["read"][r["source"]] += 1
                rows.append(r)
    seen, unique = set(), []
    for r in rows:
        if r["chosen"] == r["rejected"]:
            report["dropped"]["identical_sides"] += 1
            continue
        k = _key(r)
        if k in seen:
            report["dropped"]["duplicate"] += 1
            continue
        seen.add(k)
        unique.append(r)
    return unique, {k: dict(v) for k, v in report.items()}


def source_family(source: str) -> str:
    return "labels" if source.startswith("labels:") else source


def balance(rows: list[dict], ratio: float, seed: int) -> list[dict]:
    """Cap each source at ``ratio`` x the smallest non-empty source, sampling with a seed."""
    by = {}
    for r in rows:
        by.setdefault(r["source"], []).append(r)
    if len(by) < 2:
        return rows
    cap = int(min(len(v) for v in by.values()) * ratio)
    rng = np.random.default_rng(seed)
    out = []
    for src in sorted(by):
        v = by[src]
        if len(v) > cap:
            v = [v[i] for i in sorted(rng.choice(len(v), size=cap, replace=False))]
        out.extend(v)
    return out


def split_by_user(rows: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    users = sorted({r["user_id"] for r in rows})
    rng = np.random.default_rng(seed)
    rng.shuffle(users)
    n_val = max(1, int(round(len(users) * val_fraction))) if len(users) > 1 and val_fraction > 0 else 0
    val_users = set(users[:n_val])
    return [r for r in rows if r["user_id"] not in val_users], [r for r in rows if r["user_id"] in val_users]
