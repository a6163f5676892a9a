"""Which behaviour model and which form of the behaviour term track the simulator's true utility best.

    python bench/behaviour_probe.py --run runs/demo [--users 80] [--seed 0]

Needs a run whose data came from the built-in simulator. Fits EASE, item-kNN and popularity on the run's training
interactions (as the reward stage does), then for each held-out user scores several kinds of K-listing: what each
evaluated LLM stage wrote (eval/listings.jsonl, when present), random catalog listings, each baseline's top K,
and "one good + random" mixes. Prints, per behaviour model and form of the term (``score``; ``percentile`` among the
prompt's candidates in rerank mode, to powers 1, 2, 4), the Pearson correlation of the term with true utility over
all listings, over the LLM's listings, and over the LLM's listings whose K items are all valid (which isolates
"which items" from "valid or not"); in rerank mode, per model and form, the correlation within users over random
K-lists of each user's own candidates (the choice the policy makes: both sides demeaned per user); and, per model,
the mean per-user Spearman correlation of its item scores with true item utilities over unseen items.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _listings(users, rng, k: int, recs: dict) -> list[tuple[str, dict, list]]:
    """(kind, prompt row, item ids) for every held-out user and kind of listing."""
    from rlhf.listing import parse_and_ground

    sim, catalog = users.sim, users.catalog
    out = []
    written = {}
    if users.run.eval.listings.exists():
        for line in users.run.eval.listings.read_text().splitlines():
            row = json.loads(line)
            written.setdefault(row["stage"], {})[row["user_id"]] = row["text"]
    for r in users.rows:
        seen = set(r["history_ids"])
        unseen = [i for i in sim.item_ids if i not in seen]
        for stage, texts in written.items():
            if r["user_id"] in texts:
                items = [e.item_id for e in parse_and_ground(texts[r["user_id"]], catalog)][:k]
                out.append((f"llm:{stage}", r, items))
        for _ in range(3):
            out.append(("random", r, list(rng.choice(unseen, size=k, replace=False))))
        for name, rec in recs.items():
            top = rec.recommend(r["history_ids"], 10)
            out.append((f"top:{name}", r, top[:k]))
            out.append((f"mix:{name}", r, [top[int(rng.integers(10))]] + list(rng.choice(unseen, size=k - 1))))
    return out


def _top(model, row, k: int, among=None) -> list:
    pct = model.percentiles(row["history_ids"], row.get("history_ratings"), among)
    return [model.item_ids[j] for j in np.argsort(-np.nan_to_num(pct, nan=-1.0), kind="stable")[:k]]


def main() -> None:
    from reward_models.terms.behaviour import BehaviourModel, listing_value
    from rlhf import baselines
    from rlhf.evaluate import HeldOutUsers
    from rlhf.runs import RunDir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--users", type=int, default=80)
    p.add_argument("--split", default="test")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    users = HeldOutUsers(RunDir(a.run), a.split, a.users)
    if users.sim is None:
        raise SystemExit(f"{a.run}: the data did not come from the simulator, so true utility is unknown")
    sim, k = users.sim, users.meta["k"]
    item_ids = [it.item_id for it in users.catalog.items]
    genres = baselines.catalog_genres(users.catalog)
    names = ("genre", "ease", "itemknn", "popularity") if any(genres.values()) else ("ease", "itemknn", "popularity")
    models = {name: BehaviourModel.fit(name, item_ids, users.fit_pairs(), genres) for name in names}
    recs = {name: baselines.make(name, item_ids, users.fit_pairs(), genres=genres) for name in names}
    rng = np.random.default_rng(a.seed)
    rows = _listings(users, rng, k, recs)
    truth = np.array(
        [sim.list_utility(sim.user(r["user_id"]), items, set(r["history_ids"]), k) for _, r, items in rows]
    )
    kinds = np.array([kind for kind, _, _ in rows])
    llm = np.char.startswith(kinds, "llm:")
    valid = np.array(
        [
            len(items) == k
            and all(i is not None for i in items)
            and len(set(items)) == k
            and not set(items) & set(r["history_ids"])
            for _, r, items in rows
        ]
    )
    print(
        f"{a.run}: {len(users.rows)} {a.split} users, K={k}, {len(rows)} listings "
        f"({int(llm.sum())} by the LLM, {int((llm & valid).sum())} of them all-valid)"
    )
    print(f"{'model':10s} {'form':12s} {'all':>6s} {'llm':>6s} {'llm valid':>9s} {'valid':>6s}")
    forms = [("score", 1.0, "score")] + [("percentile", p, f"pct^{p:g}") for p in (1.0, 2.0, 4.0)]
    for name, model in models.items():
        for form, power, label in forms:
            v = np.array(
                [
                    listing_value(
                        model, items, r["history_ids"], k, power, r.get("history_ratings"), r.get("candidate_ids"), form
                    )
                    for _, r, items in rows
                ]
            )
            cells = []
            for mask in (np.ones_like(llm), llm, llm & valid, valid):
                ok = mask.sum() > 2 and v[mask].std() > 0 and truth[mask].std() > 0
                cells.append(f"{np.corrcoef(v[mask], truth[mask])[0, 1]:+.2f}" if ok else "n/a")
            print(f"{name:10s} {label:12s} {cells[0]:>6s} {cells[1]:>6s} {cells[2]:>9s} {cells[3]:>6s}")
    if users.rows[0].get("candidate_ids"):
        print("within users, 30 random K-lists of each user's candidates (term and truth demeaned per user):")
        for name, model in models.items():
            cells = []
            for form, power, label in forms:
                got, true = [], []
                for r in users.rows:
                    seen = set(r["history_ids"])
                    offered = [c for c in r["candidate_ids"] if c not in seen]
                    lists = [list(rng.choice(offered, size=k, replace=False)) for _ in range(30)]
                    ratings = r.get("history_ratings")
                    v = [listing_value(model, x, r["history_ids"], k, power, ratings, offered, form) for x in lists]
                    t = [sim.list_utility(sim.user(r["user_id"]), x, seen, k) for x in lists]
                    got.append(np.subtract(v, np.mean(v)))
                    true.append(np.subtract(t, np.mean(t)))
                cells.append(f"{label} {np.corrcoef(np.concatenate(got), np.concatenate(true))[0, 1]:+.2f}")
            print(f"  {name:10s} " + "  ".join(cells))
    print("per-user Spearman of item scores with true item utility (unseen items):")
    for name, model in models.items():
        rhos = []
        for r in users.rows:
            util = sim.utilities(sim.user(r["user_id"]))
            pct = model.percentiles(r["history_ids"], r.get("history_ratings"))
            idx = [j for j, i in enumerate(model.item_ids) if not np.isnan(pct[j])]
            truth_rank = np.argsort(np.argsort(util[[sim.index[model.item_ids[j]] for j in idx]]))
            rhos.append(np.corrcoef(pct[idx], truth_rank)[0, 1])
        print(f"  {name:10s} {np.nanmean(rhos):+.2f}")
    for name, model in models.items():  # each model's own top K, history weighted by the user's ratings
        for where in ("catalog", "candidates") if users.rows[0].get("candidate_ids") else ("catalog",):
            tops = [_top(model, r, k, r["candidate_ids"] if where == "candidates" else None) for r in users.rows]
            util = [
                sim.list_utility(sim.user(r["user_id"]), t, set(r["history_ids"]), k) for r, t in zip(users.rows, tops)
            ]
            print(f"  top {k} of {name} among the {where} (rating-weighted history): true utility {np.mean(util):.3f}")
    print(
        "mean true utility by kind: " + ", ".join(f"{kd} {truth[kinds == kd].mean():.3f}" for kd in sorted(set(kinds)))
    )


if __name__ == "__main__":
    main()
