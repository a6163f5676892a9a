"""What the data stage builds from user histories: SFT examples, prompt sets and preference pairs.

Training users give several examples each, from *windows* over their history, as sequential recommenders train:
window j (j = 0 the most recent) cuts the history into a prefix the prompt shows and the next 2K interactions, the
user's future at that point (``data.windows`` windows per user, non-overlapping, each prefix at least 3 items).
Held-out (val / test) users give one prompt each, from their whole history, with their held-out items.

Rerank mode offers candidates in the prompt, built the way the evaluated protocol does (``data.protocol``), so
training teaches no shortcut evaluation would reward:
- ``retrieved`` (LlamaRec's, the default): the retriever's own top N for the history; a held-out item the
  retriever missed is a miss. SFT targets are the user's future positives among those candidates, in rating order,
  then the retriever's order; or, with ``data.sft_teacher``, a behaviour model's top K among them (distillation of
  what the behaviour term rewards).
- ``random`` (LLaRA's): the positive (held-out or next) item among N - 1 random unseen items.
Preference pairs put both of their lists among the candidates, so neither side is "the injected one".
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rlhf.catalog import Catalog
from rlhf.data.splits import Event, UserSplit, is_positive
from rlhf.explain import explain
from rlhf.listing import render
from rlhf.prompts import PromptBuilder

MIN_PREFIX = 3


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _hist(events) -> list[tuple[str, float]]:
    return [(e.item_id, e.rating) for e in events]


def _recent(events, n):
    return events[-n:] if n else events


def _rating(r: float):
    return None if r is None or math.isnan(r) else float(r)


def windows(events: list[Event], k: int, n: int) -> list[tuple[list[Event], list[Event]]]:
    """Up to ``n`` (prefix, future) cuts of a history, most recent first: futures of 2K events, not overlapping."""
    width, out = 2 * k, []
    for j in range(max(n, 1)):
        cut = len(events) - width * (j + 1)
        if cut < MIN_PREFIX:
            # a short history still gives one cut: its last third (at least one event) as the future
            if j == 0 and len(events) >= MIN_PREFIX + 1:
                cut = max(MIN_PREFIX, len(events) - max(1, len(events) // 3))
                out.append((events[:cut], events[cut:]))
            break
        out.append((events[:cut], events[cut : cut + width]))
    return out


def positives(future: list[Event], prefix: list[Event], threshold: float) -> list[str]:
    """The future items the user liked (rated at or above ``threshold``, or consumed without a rating), best rated
    first, not already in the prefix, each once."""
    seen = {e.item_id for e in prefix}
    liked = sorted(
        (e for e in future if is_positive(e.rating, threshold)),
        key=lambda e: -(0 if math.isnan(e.rating) else e.rating),
    )
    return [i for i in dict.fromkeys(e.item_id for e in liked) if i not in seen]


class BuildEnv:
    """What every builder needs: the data config, catalog, prompt builder, retriever and a seeded generator; and
    the SFT teacher (a behaviour model, data.sft_teacher) where the targets come from one."""

    def __init__(self, cfg, catalog: Catalog, builder: PromptBuilder, retriever, rng, teacher=None):
        self.cfg, self.catalog, self.builder, self.retriever, self.rng = cfg, catalog, builder, retriever, rng
        self.teacher = teacher
        self.item_ids = [it.item_id for it in catalog.items]

    def teacher_top(self, prefix: list[Event], cands: list[str] | None, k: int) -> list[str]:
        """The teacher's top K for a history (weighted by its ratings), among ``cands`` where given, unseen only."""
        ids = [e.item_id for e in prefix]
        pct = self.teacher.percentiles(ids, [_rating(e.rating) for e in prefix], cands)
        order = np.argsort(-np.nan_to_num(pct, nan=-1.0), kind="stable")
        return [self.teacher.item_ids[j] for j in order[:k] if not np.isnan(pct[j])]

    def listing(self, item_ids: list[str], history: list[tuple[str, float]]) -> str:
        return render(
            [self.catalog[i].display for i in item_ids], [explain(i, history, self.catalog) for i in item_ids]
        )

    def candidates(self, history_ids: list[str], include: list[str] = ()) -> list[str] | None:
        """Rerank mode: the candidate set a prompt offers (None in generate mode), in
        data.candidate_order. ``include`` are items
        that must be offered: the positive in the random protocol, both sides of a preference pair in either."""
        if self.cfg.mode != "rerank":
            return None
        n, keep = self.cfg.num_candidates, list(dict.fromkeys(include))[: self.cfg.num_candidates]
        if self.cfg.protocol == "random":
            banned = set(history_ids) | set(keep)
            pool = [i for i in self.item_ids if i not in banned]
            fill = list(self.rng.choice(pool, size=min(n - len(keep), len(pool)), replace=False))
        else:
            fill = [c for c in self.retriever.recommend(history_ids, n, exclude=keep)][: n - len(keep)]
        cands = keep + [str(c) for c in fill]
        self.rng.shuffle(cands)
        if self.cfg.candidate_order == "ranked":  # the retriever's ranking of the set (ties: the shuffled order)
            ranked = [str(c) for c in self.retriever.recommend(history_ids, len(cands), candidates=cands)]
            cands = ranked + [c for c in cands if c not in ranked]
        return cands


def build_sft(env: BuildEnv, users: list[UserSplit]) -> list[dict]:
    """One example per window of each user: prompt = the prefix (and its candidates); target = the user's future
    positives (within the candidates in rerank mode), best rated first, then the retriever's picks up to K; or,
    with a teacher (data.sft_teacher), the teacher's top K for the prefix."""
    k, rows = env.cfg.k, []
    for u in users:
        events = u.history
        for prefix, future in windows(events, k, env.cfg.windows):
            prefix_ids = [e.item_id for e in prefix]
            liked = positives(future, prefix, env.cfg.positive_rating)
            cands = env.candidates(prefix_ids, liked[:1] if env.cfg.protocol == "random" else ())
            if env.teacher is not None:
                target = env.teacher_top(prefix, cands, k)
            else:
                target = [i for i in liked if cands is None or i in cands][:k]
                fill = env.retriever.recommend(prefix_ids, k, exclude=target, candidates=cands)
                target = (target + [f for f in fill if f not in target])[:k]
            if len(target) < k:
                continue
            msgs, kept = env.builder.build(_hist(_recent(prefix, env.cfg.history_len)), cands)
            rows.append({"prompt": msgs, "completion": assistant(env.listing(target, kept)), "user_id": u.user_id})
    return rows


def _prompt_row(env: BuildEnv, u: UserSplit, prefix: list[Event], heldout: list[str], cands, future=()) -> dict:
    msgs, kept = env.builder.build(_hist(_recent(prefix, env.cfg.history_len)), cands)
    return {
        "prompt": msgs,
        "user_id": u.user_id,
        "split": u.split,
        "history_ids": [e.item_id for e in prefix],
        "history_ratings": [_rating(e.rating) for e in prefix],
        "heldout_ids": list(heldout),
        "future_ids": list(future),
        # what the prompt shows (budget-trimmed), for labelers and reports
        "shown": [{"item_id": i, "rating": _rating(r)} for i, r in kept],
        "candidate_ids": cands or [],
        "cold_start": u.cold_start,
    }


def build_prompts(env: BuildEnv, users: list[UserSplit]) -> list[dict]:
    """Held-out users: one prompt from the whole history, with the held-out items. Training users (RL prompts): one
    per window, with the future positives as ``future_ids`` (the next-item reward term's) and as held-out ids."""
    rows = []
    for u in users:
        events = u.history
        if u.split != "train":
            held = [e.item_id for e in u.heldout]
            ids = [e.item_id for e in events]
            rows.append(
                _prompt_row(env, u, events, held, env.candidates(ids, held if env.cfg.protocol == "random" else ()))
            )
            continue
        for prefix, future in windows(events, env.cfg.k, env.cfg.windows):
            liked = positives(future, prefix, env.cfg.positive_rating)
            include = liked[:1] if env.cfg.protocol == "random" else ()
            cands = env.candidates([e.item_id for e in prefix], include)
            rows.append(_prompt_row(env, u, prefix, liked, cands, future=liked))
    return rows


def pair_row(env: BuildEnv, prompt_hist, chosen, rejected, source, user_id, **prov) -> dict:
    """A preference pair: both lists rendered for the same prompt; in rerank mode both are among its candidates."""
    cands = env.candidates([i for i, _ in prompt_hist], list(chosen) + list(rejected))
    msgs, kept = env.builder.build(prompt_hist[-env.cfg.history_len :] if env.cfg.history_len else prompt_hist, cands)
    return {
        "prompt": msgs,
        "chosen": assistant(env.listing(chosen, kept)),
        "rejected": assistant(env.listing(rejected, kept)),
        "source": source,
        "user_id": user_id,
        "provenance": json.dumps(prov, sort_keys=True),
        # whose prompt it is, as the reward terms read it (PromptContext.from_row)
        "history_ids": [i for i, _ in prompt_hist],
        "history_ratings": [_rating(r) for _, r in prompt_hist],
        "candidate_ids": cands or [],
        "shown": [{"item_id": i, "rating": _rating(r)} for i, r in kept],
    }


def build_rating_pairs(env: BuildEnv, users: list[UserSplit]) -> list[dict]:
    """Per window: the future's higher- vs lower-rated items after the same prefix (same length, every chosen rating
    above every rejected one, mean gap >= 1)."""
    rows, k = [], env.cfg.k
    for u in users:
        for prefix, future in windows(u.history, k, env.cfg.windows):
            rated = sorted((e for e in future if not math.isnan(e.rating)), key=lambda e: -e.rating)
            n = min(k, len(rated) // 2)
            if n < 2:
                continue
            hi, lo = rated[:n], rated[-n:]
            if min(e.rating for e in hi) <= max(e.rating for e in lo) or (
                np.mean([e.rating for e in hi]) - np.mean([e.rating for e in lo]) < 1.0
            ):
                continue
            hi_ids, lo_ids = [e.item_id for e in hi], [e.item_id for e in lo]
            ratings = {"chosen_ratings": [e.rating for e in hi], "rejected_ratings": [e.rating for e in lo]}
            rows.append(pair_row(env, _hist(prefix), hi_ids, lo_ids, "ratings", u.user_id, **ratings))
    return rows


def build_click_pairs(env: BuildEnv, table: pa.Table, seqs, train_users: set[str]) -> list[dict]:
    """Per impression with clicks and skips: the list led by clicked items beats the list led by skipped ones."""
    mask = pc.fill_null(pc.is_in(table.column("event"), value_set=pa.array(["impression", "click"])), False)
    if not pc.any(mask).as_py():
        return []
    sub = table.filter(mask).to_pydict()  # click-log rows only
    groups: dict[str, list[int]] = {}
    for j, imp in enumerate(sub["impression_id"]):
        if sub["user_id"][j] in train_users and imp:
            groups.setdefault(imp, []).append(j)
    rows, k = [], env.cfg.k
    for imp, idx in sorted(groups.items()):
        idx.sort(key=lambda j: sub["position"][j])
        clicked = [sub["item_id"][j] for j in idx if sub["event"][j] == "click"]
        skipped = [sub["item_id"][j] for j in idx if sub["event"][j] == "impression"]
        if not clicked or not skipped:
            continue
        uid, ts = sub["user_id"][idx[0]], sub["timestamp"][idx[0]]
        before = [e for e in seqs.get(uid, []) if e.timestamp <= ts]
        if not before:
            continue
        chosen, rejected = (clicked + skipped)[:k], (skipped + clicked)[:k]
        if chosen == rejected:
            continue
        rows.append(pair_row(env, _hist(before), chosen, rejected, "clicks", uid, impression_id=imp, clicked=clicked))
    return rows


SIM_STRATEGIES = ("oracle", "retriever", "popular", "random", "anti", "history_repeat", "duplicates")


def _strategy_list(name, env, sim, user, history_ids, k, rng):
    seen = set(history_ids)
    unseen = [i for i in sim.item_ids if i not in seen]
    u = sim.utilities(user)
    if name == "oracle":
        return sorted(unseen, key=lambda i: -u[sim.index[i]])[:k]
    if name == "anti":
        return sorted(unseen, key=lambda i: u[sim.index[i]])[:k]
    if name == "retriever":
        return env.retriever.recommend(history_ids, k)
    if name == "popular":
        return sorted(unseen, key=lambda i: -sim.popularity[sim.index[i]])[:k]
    if name == "random":
        return list(rng.choice(unseen, size=k, replace=False))
    if name == "history_repeat":
        good = sorted(unseen, key=lambda i: -u[sim.index[i]])[: k - k // 2]
        return good + list(rng.choice(history_ids, size=min(k // 2, len(history_ids)), replace=False))
    good = sorted(unseen, key=lambda i: -u[sim.index[i]])[: (k + 1) // 2]
    return (good * k)[:k]  # duplicates


def build_sim_pairs(env: BuildEnv, sim, users: list[UserSplit], n_pairs: int, noise: float) -> list[dict]:
    """Simulated labelers compare two lists from different strategies (Bradley-Terry on true utility)."""
    rows, k, rng = [], env.cfg.k, env.rng
    if not users:
        return rows
    for p in range(n_pairs):
        u = users[p % len(users)]
        events = u.history
        user = sim.user(u.user_id)
        hist_ids = [e.item_id for e in events]
        a, b = rng.choice(len(SIM_STRATEGIES), size=2, replace=False)
        la = _strategy_list(SIM_STRATEGIES[a], env, sim, user, hist_ids, k, rng)
        lb = _strategy_list(SIM_STRATEGIES[b], env, sim, user, hist_ids, k, rng)
        if len(la) < k or len(lb) < k or la == lb:
            continue
        pick = sim.label(user, la, lb, set(hist_ids), k, rng, noise)
        chosen, rejected = (la, lb) if pick == 0 else (lb, la)
        names = (SIM_STRATEGIES[a], SIM_STRATEGIES[b]) if pick == 0 else (SIM_STRATEGIES[b], SIM_STRATEGIES[a])
        prov = {"labeler": f"sim-{p % 5}", "chosen_strategy": names[0], "rejected_strategy": names[1]}
        rows.append(pair_row(env, _hist(events), chosen, rejected, "simulator", u.user_id, **prov))
    return rows
