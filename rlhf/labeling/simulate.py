"""Simulated labelers answer a round's batch through the same store and import path people use.

Each labeler judges every prompt: the candidates are parsed and grounded, scored by the simulator's true
list utility for that user, and one is picked with Bradley-Terry (softmax) noise; lists with no catalog
item at all are "both_bad", exactly equal utilities with no noise are a "tie".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rlhf.data.loaders import DataError
from rlhf.labeling import round_files
from rlhf.labeling.batch import Batch
from rlhf.labeling.store import JudgmentError, JudgmentStore
from rlhf.runs import RunDir


def choose(utilities: list[float], grounded: list[int], noise: float, rng: np.random.Generator) -> int | str:
    """Index of the picked list, or "both_bad" / "tie"."""
    if not any(grounded):
        return "both_bad"
    u = np.asarray(utilities, dtype=float)
    if noise == 0:
        best = np.flatnonzero(u == u.max())
        return int(best[0]) if len(best) == 1 else "tie"
    z = u * 10.0 / noise  # the scale the simulator's pairwise labeler uses
    p = np.exp(z - z.max())
    return int(rng.choice(len(u), p=p / p.sum()))


def run_simulate(cfg, run_dir: Path, round_no: int) -> dict:
    """`rlhf label simulate`: the simulated labelers judge the round's batch, then the judgments are imported."""
    from rlhf.labeling.importer import run_import

    judge_simulated(cfg, run_dir, round_no)
    return run_import(cfg, run_dir, round_no)


def judge_simulated(cfg, run_dir: Path, round_no: int) -> dict:
    """label.labelers simulated labelers judge every prompt of the round's batch into its judgment log (idempotent:
    a rerun stores nothing twice). Returns what was stored, found already there, and kept from earlier settings."""
    from rlhf.data.simulator import Simulator
    from rlhf.listing import parse_and_ground

    run, lc = RunDir(run_dir), cfg.label
    meta = run.meta()
    if meta.get("simulator_seed") is None:
        raise DataError(
            f"{run.data.meta}: this run's data has no simulator; `rlhf label simulate` needs "
            "data.source=builtin (people label other data with `rlhf label serve`)"
        )
    catalog = run.catalog()
    sim = Simulator(catalog, seed=meta["simulator_seed"])
    batch = Batch.load(run_dir, round_no)
    store = JudgmentStore(round_files(run_dir, round_no).judgments, batch)
    stored = repeated = kept = 0
    try:
        for n in range(lc.labelers):
            labeler = f"sim-{n + 1}"
            rng = np.random.default_rng([cfg.run.seed, round_no, n])
            for row in batch.rows:
                user = sim.user(row["user_id"])
                seen = {h["item_id"] for h in row["history"]}
                lists = [
                    [e.item_id for e in parse_and_ground(c["text"], catalog) if e.item_id] for c in row["candidates"]
                ]
                utils = [sim.list_utility(user, ids, seen, meta["k"]) for ids in lists]
                pick = choose(utils, [len(ids) for ids in lists], lc.noise, rng)
                preferred = pick if isinstance(pick, str) else row["candidates"][pick]["candidate_id"]
                try:
                    status, _ = store.add(
                        labeler,
                        {
                            "batch_id": batch.batch_id,
                            "prompt_id": row["prompt_id"],
                            "preferred": preferred,
                            "idempotency_key": f"sim:{row['prompt_id']}",
                        },
                    )
                except JudgmentError:  # judged before with other settings: the first decision stands
                    kept += 1
                    continue
                stored += status == 201
                repeated += status == 200
    finally:
        store.close()
    print(
        f"label simulate: {lc.labelers} labelers, noise {lc.noise}: {stored} judgments stored, {repeated} already there"
        + (f", {kept} earlier decisions kept (made with other settings)" if kept else "")
    )
    return {"stored": stored, "repeated": repeated, "kept": kept}
