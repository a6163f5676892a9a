"""How well a run's learned reward model tracks the simulator's true utility, on several kinds of listing.

    python bench/reward_probe.py --run runs/demo [--users 80]

Needs a run whose data came from the built-in simulator (true utility is known) with a trained reward
model; the LLM rows also need `rlhf eval` (they read eval/listings.jsonl). For each held-out user it scores:

- each evaluated stage's listing as the model wrote it;
- the same listing rewritten the way the reward model's training pairs are written (catalog title and
  year, the template explanation), to separate "does not know these items" from "does not read this style";
- a random catalog listing, and one whose first item is the user's best (the kind of contrast the
  simulator pairs teach).

Prints, per kind, the Pearson correlation of the learned score with true utility over users, and both means.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    from reward_models.composite import for_run
    from reward_models.terms import PromptContext
    from rlhf.config import load_config
    from rlhf.evaluate import HeldOutUsers
    from rlhf.explain import explain
    from rlhf.listing import parse_and_ground, render
    from rlhf.precision import resolve
    from rlhf.runs import RunDir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--users", type=int, default=80)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    run_dir = Path(args.run)
    cfg = load_config(run_dir / "config.yaml")
    run = RunDir(run_dir)
    ctx = HeldOutUsers(run, "test", args.users)
    if ctx.sim is None:
        raise SystemExit(f"{run_dir}: the data did not come from the simulator, so true utility is unknown")
    if not run.done("reward"):
        raise SystemExit(f"{run_dir}: no reward model (run `rlhf reward --run {run_dir}` first)")
    composite = for_run(run, cfg.ppo.reward_weights, resolve(cfg.model), cfg.reward)
    sim, catalog, k = ctx.sim, ctx.catalog, ctx.meta["k"]
    rng = np.random.default_rng(args.seed)

    written: dict[str, dict[str, str]] = {}
    listings = run_dir / "eval" / "listings.jsonl"
    if listings.exists():
        for line in listings.read_text().splitlines():
            row = json.loads(line)
            written.setdefault(row["stage"], {})[row["user_id"]] = row["text"]

    def shown(row):
        return [(s["item_id"], float("nan") if s["rating"] is None else s["rating"]) for s in row["shown"]]

    def canonical(row, text):
        entries = parse_and_ground(text, catalog)
        titles = [catalog[e.item_id].display if e.item_id else e.title for e in entries]
        reasons = [explain(e.item_id, shown(row), catalog) if e.item_id else e.explanation for e in entries]
        return render(titles, reasons), [e.item_id for e in entries]

    def catalog_listing(row, best_first: bool):
        seen = set(row["history_ids"])
        unseen = [i for i in sim.item_ids if i not in seen]
        ids = list(rng.choice(unseen, size=k, replace=False))
        if best_first:
            util = sim.utilities(sim.user(row["user_id"]))
            best = max(unseen, key=lambda i: util[sim.index[i]])
            ids = [best] + [i for i in ids if i != best][: k - 1]
        return render([catalog[i].display for i in ids], [explain(i, shown(row), catalog) for i in ids]), ids

    kinds: dict[str, list[tuple[dict, str, list]]] = {}
    for stage, texts in written.items():
        rows = [r for r in ctx.rows if r["user_id"] in texts]
        kinds[f"{stage}, as written"] = [
            (r, texts[r["user_id"]], [e.item_id for e in parse_and_ground(texts[r["user_id"]], catalog)]) for r in rows
        ]
        kinds[f"{stage}, catalog titles + template reasons"] = [(r, *canonical(r, texts[r["user_id"]])) for r in rows]
    kinds["random catalog listing"] = [(r, *catalog_listing(r, False)) for r in ctx.rows]
    kinds["user's best item + 2 random"] = [(r, *catalog_listing(r, True)) for r in ctx.rows]

    print(f"reward model of {run_dir} against simulator true utility ({len(ctx.rows)} held-out users)")
    print(f"{'listing':44s} {'n':>4s} {'corr':>6s} {'learned':>8s} {'truth':>6s}")
    for name, items in kinds.items():
        scored = composite.score(
            [r["prompt"] for r, _, _ in items],
            [t for _, t, _ in items],
            [PromptContext.from_row(r) for r, _, _ in items],
        )
        learned = np.array(scored.terms["learned"])
        truth = np.array(
            [sim.list_utility(sim.user(r["user_id"]), ids[:k], set(r["history_ids"]), k) for r, _, ids in items]
        )
        corr = np.corrcoef(learned, truth)[0, 1] if learned.std() > 0 and truth.std() > 0 else float("nan")
        print(f"{name:44s} {len(items):4d} {corr:+6.2f} {learned.mean():+8.3f} {truth.mean():6.3f}")


if __name__ == "__main__":
    main()
