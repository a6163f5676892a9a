"""`rlhf data prepare`: a source -> canonical tables, splits, prompts, SFT examples and preference pairs.

Writes under RUN_DIR/data/ (names in rlhf/runs.py):
  catalog.jsonl, interactions.parquet, splits.jsonl, meta.json, summary.json
  sft/{train,val}.parquet          prompt messages -> target listing (completion), user_id
  pairs/{ratings,clicks,simulator}.parquet   prompt, chosen, rejected, source, provenance
  prompts/{train,val,test}.parquet prompt messages + history / held-out / candidate / future ids for RL and eval
What each is built from: rlhf/data/build.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rlhf import baselines
from rlhf.data import build
from rlhf.data.loaders import DataError, SkipLog, load_source
from rlhf.data.splits import CONSUMPTION, sequences, split_users, train_pairs
from rlhf.prompts import PromptBuilder
from rlhf.runs import RunDir

NOUNS = {"builtin": "films", "movielens-100k": "films", "movielens": "films", "goodbooks": "books"}


def write_rows(rows: list[dict], path: Path) -> int:
    """Rows as parquet; an empty set still gets a file (readers see a lone "empty" column and return no rows)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows) if rows else pa.table({"empty": pa.array([], pa.int8())})
    pq.write_table(table, path)
    return len(rows)


def _filter_users(table: pa.Table, cfg, skips: SkipLog, rng) -> pa.Table:
    """Keep users with at least data.min_history consumption events (and at most data.max_users of them),
    working on Arrow columns so no per-row Python objects exist before the table is small."""
    consumed = table.filter(pc.is_in(table.column("event"), pa.array(CONSUMPTION)))
    counts = consumed.group_by("user_id").aggregate([("item_id", "count")])
    users = counts.column("user_id").to_numpy(zero_copy_only=False)
    n = counts.column("item_id_count").to_numpy()
    keep = np.sort(users[n >= cfg.min_history])
    dropped = len(users) - len(keep)
    if dropped:
        skips.counts["users_below_min_history"] += int(dropped)
    if cfg.max_users and len(keep) > cfg.max_users:
        keep = np.sort(rng.choice(keep, size=cfg.max_users, replace=False))
    return table.filter(pc.is_in(table.column("user_id"), pa.array(keep.tolist(), pa.string())))


def _write_splits(path: Path, splits) -> None:
    with open(path, "w") as f:
        for u in splits:
            history = [[e.item_id, e.timestamp, None if math.isnan(e.rating) else e.rating] for e in u.history]
            row = {
                "user_id": u.user_id,
                "split": u.split,
                "cold_start": u.cold_start,
                "history": history,
                "heldout": [e.item_id for e in u.heldout],
            }
            f.write(json.dumps(row) + "\n")


def _build_all(env: build.BuildEnv, files, by_role: dict, table, seqs, sim) -> dict:
    """Every stage dataset written; returns the row count of each."""
    cfg, train = env.cfg, by_role["train"]
    counts = {
        "sft/train": write_rows(build.build_sft(env, train), files.sft("train")),
        "sft/val": write_rows(build.build_sft(env, by_role["val"]), files.sft("val")),
    }
    for role in ("train", "val", "test"):
        counts[f"prompts/{role}"] = write_rows(build.build_prompts(env, by_role[role]), files.prompts(role))
    counts["pairs/ratings"] = write_rows(build.build_rating_pairs(env, train), files.pairs("ratings"))
    clicks = build.build_click_pairs(env, table, seqs, {u.user_id for u in train})
    counts["pairs/clicks"] = write_rows(clicks, files.pairs("clicks"))
    if sim is not None:
        sim_pairs = build.build_sim_pairs(env, sim, train, cfg.sim_label_pairs, cfg.sim_noise)
        counts["pairs/simulator"] = write_rows(sim_pairs, files.pairs("simulator"))
    return counts


def prepare(cfg, model_name: str, run_dir: Path) -> dict:
    """Run the whole data stage; returns the summary that is also written to data/summary.json."""
    from rlhf.models import load_tokenizer

    files = RunDir(run_dir).data
    files.dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    skips = SkipLog()
    catalog, table = load_source(cfg, skips)
    rows_read = table.num_rows
    table = _filter_users(table, cfg, skips, rng)
    seqs = sequences(table)
    if not seqs:
        raise DataError(f"no user has at least data.min_history={cfg.min_history} interactions; lower --min-history")
    splits = split_users(
        seqs, cfg.split, cfg.holdout, cfg.val_fraction, cfg.test_fraction, cfg.cold_start_max, cfg.seed
    )
    item_ids = [it.item_id for it in catalog.items]
    if 2 * cfg.k > len(item_ids):
        raise DataError(
            f"data.k={cfg.k} asks for more items than the catalog can give a user ({len(item_ids)} items); "
            "lower data.k to at most half the catalog"
        )
    default = "ease" if len(catalog) <= baselines.MAX_EASE_ITEMS else "itemknn"
    name = cfg.retriever if cfg.mode == "rerank" else default
    try:
        retriever = baselines.make(
            name, item_ids, train_pairs(splits), seed=cfg.seed, genres=baselines.catalog_genres(catalog)
        )
    except baselines.MissingGenres as e:
        raise DataError(f"data.retriever={name}: {e}") from e
    builder = PromptBuilder(
        catalog,
        load_tokenizer(model_name),
        k=cfg.k,
        noun=NOUNS.get(cfg.source, "items"),
        max_prompt_tokens=cfg.max_prompt_tokens,
        ranked=cfg.candidate_order == "ranked",
    )
    teacher = None
    if cfg.sft_teacher != "none":
        from reward_models.terms.behaviour import BehaviourModel

        try:
            teacher = BehaviourModel.fit(
                cfg.sft_teacher, item_ids, train_pairs(splits), baselines.catalog_genres(catalog)
            )
        except baselines.MissingGenres as e:
            raise DataError(f"data.sft_teacher={cfg.sft_teacher}: {e}") from e
    env = build.BuildEnv(cfg, catalog, builder, retriever, rng, teacher)
    by_role = {r: [u for u in splits if u.split == r] for r in ("train", "val", "test")}
    catalog.save_jsonl(files.catalog)
    pq.write_table(table, files.interactions)
    _write_splits(files.splits, splits)
    sim = None
    if cfg.source == "builtin":
        from rlhf.data.simulator import Simulator

        sim = Simulator(catalog, seed=cfg.seed)
    counts = _build_all(env, files, by_role, table, seqs, sim)
    meta = {
        "source": cfg.source,
        "k": cfg.k,
        "mode": cfg.mode,
        "protocol": cfg.protocol if cfg.mode == "rerank" else None,
        "candidate_order": cfg.candidate_order if cfg.mode == "rerank" else None,
        "noun": builder.noun,
        "template": builder.template,
        "retriever": retriever.name,
        "simulator_seed": cfg.seed if sim is not None else None,
        "tokenizer": model_name,
        "max_prompt_tokens": builder.max_prompt_tokens,
        "windows": cfg.windows,
    }
    files.meta.write_text(json.dumps(meta, indent=2))
    summary = {
        "users": len(seqs),
        "items": len(catalog),
        "interactions": int(table.num_rows),
        "interactions_read": int(rows_read),
        "users_by_split": {r: len(v) for r, v in by_role.items()},
        "cold_start_users": sum(u.cold_start for u in splits),
        "rows": counts,
        "skipped": skips.to_dict(),
    }
    files.summary.write_text(json.dumps(summary, indent=2))
    return summary


def run_data(cfg, run_dir: Path) -> dict:
    """`rlhf data prepare`: the whole data stage, and what it made."""
    from rlhf.config import save_resolved

    save_resolved(cfg, RunDir(run_dir), ["run", "data"])
    summary = prepare(cfg.data, cfg.model.name, run_dir)
    skipped = summary["skipped"]["total"]
    print(
        f"data: {summary['users']} users, {summary['items']} items, {summary['interactions']} interactions; "
        f"{skipped} rows skipped" + (f" ({json.dumps(summary['skipped']['counts'])})" if skipped else "")
    )
    print(f"data: wrote {RunDir(run_dir).data.dir} " + ", ".join(f"{k}={v}" for k, v in summary["rows"].items()))
    return summary
