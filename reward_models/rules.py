"""Rule-based reward terms on a parsed, grounded listing. Each term is a named number.

Positive terms are in [0, 1] (more is better); penalty terms are in [-1, 0]. The composite reward
multiplies each by its weight from ``ppo.rules``.
"""

from __future__ import annotations

import math
import re

from rlhf.catalog import Catalog, normalise
from rlhf.listing import GroundedEntry

TERMS = ("parses", "has_k", "in_catalog", "no_duplicates", "not_in_history", "in_candidates", "explained", "misquoted")


def explanation_tied(explanation: str, history_ids: list[str], catalog: Catalog) -> bool:
    """True when the explanation names an item of the history or a genre the history has."""
    text = normalise(explanation)
    if not text:
        return False
    words = f" {text} "
    genres = set()
    for hid in history_ids:
        if hid not in catalog:
            continue
        it = catalog[hid]
        title = normalise(it.title)
        if title and f" {title} " in words:
            return True
        genres.update(normalise(g) for g in it.genres)
    return any(g and re.search(rf"\b{re.escape(g)}\b", text) for g in genres)


# the title is what follows the last "like " before the claim ("also by Mann, like Heat, which you rated 5/5")
_RATING_CLAIM = re.compile(r"\blike ((?:(?!\blike ).)+?),? which you rated (\d(?:\.\d+)?) ?/ ?5")


def shown_pairs(row: dict) -> list[tuple[str, float | None]] | None:
    """The (item id, rating) pairs a prompt row of the data stage showed; None for rows without them."""
    return [(h["item_id"], h["rating"]) for h in row["shown"]] if row.get("shown") is not None else None


def rating_claims(explanation: str, shown: list[tuple[str, float | None]], catalog: Catalog) -> list[bool]:
    """One bool per "like <title>, which you rated N/5" claim in the explanation: True when the shown
    history has that title with that rating. A title the history lacks, or has unrated, is a false claim."""
    ratings: dict[str, float | None] = {}
    for hid, rating in shown:
        if hid in catalog:
            ratings[normalise(catalog[hid].title)] = rating
    out = []
    for title, stated in _RATING_CLAIM.findall(explanation):
        actual = ratings.get(normalise(title))
        out.append(actual is not None and not math.isnan(actual) and round(actual) == round(float(stated)))
    return out


def rule_terms(
    entries: list[GroundedEntry],
    k: int,
    history_ids: list[str],
    catalog: Catalog,
    candidate_ids: list[str] | None = None,
    shown: list[tuple[str, float | None]] | None = None,
) -> dict[str, float]:
    """``shown``: the (item id, rating) pairs the prompt showed, for checking quoted ratings."""
    n = len(entries)
    if n == 0:
        return dict.fromkeys(TERMS, 0.0)
    ids = [e.item_id for e in entries]
    grounded = [i for i in ids if i is not None]
    history = set(history_ids)
    # a repeat is a repeat whether or not the title is in the catalog
    keys = [e.item_id or f"title:{normalise(e.title)}" for e in entries]
    dupes = n - len(set(keys))
    terms = {
        "parses": 1.0,
        "has_k": max(0.0, 1.0 - abs(n - k) / k),
        # distinct items only: K copies of one safe catalog title must not earn full catalog credit
        # (PPO found that hack when duplicates cost less than grounding paid)
        "in_catalog": len(set(grounded)) / n,
        "no_duplicates": -dupes / n,
        "not_in_history": -sum(i in history for i in grounded) / n,
        "in_candidates": 0.0,
        "explained": sum(explanation_tied(e.explanation, history_ids, catalog) for e in entries) / n,
        # reasons that quote a rating the prompt did not show ("which you rated 5/5" for a 3/5 film)
        "misquoted": -sum(not all(rating_claims(e.explanation, shown, catalog)) for e in entries) / n
        if shown is not None
        else 0.0,
    }
    if candidate_ids:
        cands = set(candidate_ids)
        terms["in_candidates"] = -sum(i not in cands for i in ids) / n
    return terms


def weighted_sum(terms: dict[str, float], weights) -> float:
    return sum(float(getattr(weights, name)) * value for name, value in terms.items())
