"""Explanations for SFT targets and pair listings, written from data rather than boilerplate.

Each reason cites the history item that shares the most with the recommendation (genres, director,
authors), preferring items the user rated highly, so explanations are checkably tied to the history.
"""

from __future__ import annotations

import math

from rlhf.catalog import Catalog, Item


def _people(it: Item) -> set[str]:
    out = set()
    if it.attributes.get("director"):
        out.add(str(it.attributes["director"]))
    out.update(str(a) for a in it.attributes.get("authors") or [])
    return out


def explain(item_id: str, history: list[tuple[str, float]], catalog: Catalog) -> str:
    it = catalog[item_id]
    best, best_score = None, 0.0
    for hid, rating in history:
        if hid not in catalog or hid == item_id:
            continue
        h = catalog[hid]
        shared = len(set(it.genres) & set(h.genres)) + 2 * len(_people(it) & _people(h))
        bonus = 0.0 if rating is None or math.isnan(rating) else (rating - 3) * 0.2
        if shared and shared + bonus > best_score:
            best, best_score = (h, rating), shared + bonus
    if best is None:
        g = " ".join(it.genres[:2]).lower() or "well-liked"
        return f"a {g} pick that widens your list"
    h, rating = best
    rated = f", which you rated {stars(rating)}/5" if rating is not None and not math.isnan(rating) else None
    people = sorted(_people(it) & _people(h))
    if people:
        return f"also by {people[0]}, like {h.title}" + (rated or "")
    shared = " ".join([g for g in it.genres if g in h.genres][:2]).lower()
    return f"{shared} like {h.title}" + (rated or ", which you watched")


def stars(rating: float) -> str:
    """A rating as the prompt shows it: 4 for 4.0, 3.5 for 3.5 (half stars were once cut to "3/5": a misquote
    that SFT then learned)."""
    r = float(rating)
    return str(int(r)) if r.is_integer() else f"{r:g}"
