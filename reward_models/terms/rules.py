"""Rule terms: what must hold of a listing, whoever the user is. Each rule is a function of one parsed, grounded
listing and its prompt's context, ``rule(entries, ctx, env) -> float``; ``score`` applies it to a batch as a term
of the contract (reward_models/terms/__init__.py). Parsing is cached by the catalog, so eight rules cost one parse.

Positive rules are in [0, 1] (more is better); penalties are in [-1, 0]. An empty listing scores 0 on every rule.
"""

from __future__ import annotations

import math
import re

from rlhf.catalog import Catalog, normalise
from rlhf.listing import GroundedEntry, parse_and_ground


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
        out.append(actual is not None and not math.isnan(actual) and abs(actual - float(stated)) < 1e-6)
    return out


def parses(entries: list[GroundedEntry], ctx, env) -> float:
    return 1.0 if entries else 0.0


def has_k(entries, ctx, env) -> float:
    return max(0.0, 1.0 - abs(len(entries) - env.k) / env.k) if entries else 0.0


def in_catalog(entries, ctx, env) -> float:
    # distinct items only: K copies of one safe catalog title must not earn full catalog credit
    # (PPO found that hack when duplicates cost less than grounding paid)
    return len({e.item_id for e in entries if e.item_id is not None}) / len(entries) if entries else 0.0


def no_duplicates(entries, ctx, env) -> float:
    if not entries:
        return 0.0
    keys = [e.item_id or f"title:{normalise(e.title)}" for e in entries]  # a made-up title repeats too
    return -(len(keys) - len(set(keys))) / len(entries)


def not_in_history(entries, ctx, env) -> float:
    history = set(ctx.history_ids) if ctx else set()
    return -sum(e.item_id is not None and e.item_id in history for e in entries) / len(entries) if entries else 0.0


def in_candidates(entries, ctx, env) -> float:
    if not entries or not ctx or not ctx.candidate_ids:
        return 0.0
    offered = set(ctx.candidate_ids)
    return -sum(e.item_id not in offered for e in entries) / len(entries)


def explained(entries, ctx, env) -> float:
    if not entries:
        return 0.0
    history = ctx.history_ids if ctx else []
    return sum(explanation_tied(e.explanation, history, env.catalog) for e in entries) / len(entries)


def misquoted(entries, ctx, env) -> float:
    """Reasons that quote a rating the prompt did not show ("which you rated 5/5" for a 3/5 film); not checked
    where the prompt showed no ratings."""
    if not entries or not ctx or ctx.shown is None:
        return 0.0
    return -sum(not all(rating_claims(e.explanation, ctx.shown, env.catalog)) for e in entries) / len(entries)


def score(rule, env, prompts, completions, contexts) -> list[float]:
    """A rule as a term of the contract (bound with functools.partial): each completion parsed and grounded."""
    return [rule(parse_and_ground(c, env.catalog), ctx, env) for c, ctx in zip(completions, contexts)]
