"""How much reordering a rerank run's candidates can give, by each behaviour model, without training anything.

    python bench/rerank_probe.py --run runs/ml-retrieved [--split test]

Needs a prepared rerank run (`rlhf data prepare` with data.mode=rerank). For each held-out user, NDCG@K of the
candidates in the retriever's own order, in a random order, and reordered by each behaviour model (the history weighted
by its ratings, as the reward term reads it: reward_models/terms/behaviour.py); and item-kNN, popularity and the
genre model over the whole catalog. Paired against the retriever's order (mean ± standard error over the same
users). On simulator data it also prints true utility.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    from reward_models.terms.behaviour import BehaviourModel
    from rlhf import baselines
    from rlhf.evaluate import HeldOutUsers
    from rlhf.metrics import ndcg, paired_difference
    from rlhf.runs import RunDir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    users = HeldOutUsers(RunDir(a.run), a.split, 0)
    if users.meta.get("mode") != "rerank":
        raise SystemExit(f"{a.run}: not a rerank run (data.mode={users.meta.get('mode')}); nothing to reorder")
    k, sim = users.meta["k"], users.sim
    ids = [it.item_id for it in users.catalog.items]
    genres = baselines.catalog_genres(users.catalog)
    names = ["itemknn", "popularity"] + (["genre"] if any(genres.values()) else [])
    models = {n: BehaviourModel.fit(n, ids, users.fit_pairs(), genres) for n in names}
    recs = {n: baselines.make(n, ids, users.fit_pairs(), genres=genres) for n in names}
    rng = np.random.default_rng(a.seed)
    lists: dict[str, list] = {}
    for r in users.rows:
        c = r["candidate_ids"]
        lists.setdefault("retriever's order", []).append(c[:k])
        lists.setdefault("random order", []).append(list(rng.permutation(c))[:k])
        for n, m in models.items():
            pct = m.percentiles(r["history_ids"], r.get("history_ratings"), c)
            lists.setdefault(f"{n} among the candidates" + (" (rated)" if n != "popularity" else ""), []).append(
                sorted(c, key=lambda i: -pct[m.index[i]])[:k]
            )
        for n, m in recs.items():
            lists.setdefault(f"{n} over the catalog", []).append(m.recommend(r["history_ids"], k))
    metrics = {f"ndcg@{k}": lambda r, top: ndcg(top, set(r["heldout_ids"]), k)}
    if sim is not None:
        metrics["true utility"] = lambda r, top: sim.list_utility(sim.user(r["user_id"]), top, set(r["history_ids"]), k)
    print(f"{a.run}: {len(users.rows)} {a.split} users, K={k}, {len(users.rows[0]['candidate_ids'])} candidates")
    for metric, fn in metrics.items():
        values = {name: [fn(r, top) for r, top in zip(users.rows, tops)] for name, tops in lists.items()}
        base = values["retriever's order"]
        print(f"{metric}:")
        for name, v in values.items():
            d = paired_difference(v, base)  # None with fewer than 2 users
            vs = f"{d['delta']:+.4f} ± {d['se']:.4f}" if d else "n/a"
            print(f"  {name:38s} {np.mean(v):.4f}   − retriever's order {vs}")


if __name__ == "__main__":
    main()
