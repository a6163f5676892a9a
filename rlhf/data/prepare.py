"""`rlhf data prepare`: a source -> canonical tables, splits, prompts, SFT examples and preference pairs.

Writes under RUN_DIR/data/:
  catalog.jsonl, interactions.parquet, splits.jsonl, meta.json, summary.json
  sft/{train,val}.parquet          prompt messages -> target listing (completion), user_id
  pairs/{ratings,clicks,simulator}.parquet   prompt, chosen, rejected, source, provenance
  prompts/{train,val,test}.parquet prompt messages + history / held-out / candidate ids for PPO and eval
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
from rlhf.catalog import Catalog
from rlhf.data.splits import UserSplit, is_positive, sequences, split_users, train_pairs
from rlhf.explain import explain
from rlhf.interactions import SkipLog, load_source
from rlhf.listing import render
from rlhf.prompts import PromptBuilder
from rlhf.runs import RunDir

NOUNS = {"builtin": "films", "movielens-100k": "films", "movielens": "films", "goodbooks": "books"}


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _write(rows: list[dict], path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    # an empty set still gets a file (readers see a lone "empty" column and return no rows)
    table = pa.Table.from_pylist(rows) if rows else pa.table({"empty": pa.array([], pa.int8())})
    pq.write_table(table, path)
    return len(rows)


class BuildEnv:
    """What every builder below needs: the catalog, prompt builder, retriever, config."""

    def __init__(self, cfg, catalog: Catalog, builder: PromptBuilder, retriever, rng):
        self.cfg, self.catalog, self.builder, self.retriever, self.rng = cfg, catalog, builder, retriever, rng

    def listing(self, item_ids: list[str], history: list[tuple[str, float]]) -> str:
        return render(
            [self.catalog[i].display for i in item_ids], [explain(i, history, self.catalog) for i in item_ids]
        )

    def candidates(self, history_ids: list[str], must_include: list[str]) -> list[str] | None:
        """Rerank mode: the held-out items plus retrieved (or random unseen) items, shuffled."""
        if self.cfg.mode != "rerank":
            return None
        n = self.cfg.num_candidates
        keep = list(dict.fromkeys(must_include))[:n]
        pool = self.retriever.recommend(history_ids, n, exclude=keep)
        cands = keep + [c for c in pool if c not in keep][: n - len(keep)]
        self.rng.shuffle(cands)
        return cands


def _hist(events) -> list[tuple[str, float]]:
    return [(e.item_id, e.rating) for e in events]


def _recent(events, n):
    return events[-n:] if n else events


def build_sft(ctx: BuildEnv, users: list[UserSplit]) -> list[dict]:
    """Prompt = a training user's earlier history; target = the best-rated positives among their next 2K
    interactions, filled with the retriever's picks (or, in rerank mode, the remaining candidates) up to
    K only when there are too few. A wide window keeps targets personal rather than retriever-popular."""
    k, rows = ctx.cfg.k, []
    for u in users:
        events = u.history  # built once per user from the sequence arrays
        if len(events) < k + 2:
            continue
        window = min(2 * k, len(events) - 2)
        prefix, future = events[:-window], events[-window:]
        pos = sorted(
            [e for e in future if is_positive(e.rating, ctx.cfg.positive_rating)],
            key=lambda e: -(0 if math.isnan(e.rating) else e.rating),
        )
        seen = {e.item_id for e in prefix}
        target = [t for t in dict.fromkeys(e.item_id for e in pos) if t not in seen][:k]
        shown = _recent(prefix, ctx.cfg.history_len)
        cands = ctx.candidates([e.item_id for e in prefix], target)
        fill = ctx.retriever.recommend([e.item_id for e in prefix], k, exclude=target, candidates=cands)
        target = (target + [f for f in fill if f not in target])[:k]
        if len(target) < k:
            continue
        msgs, kept = ctx.builder.build(_hist(shown), cands)
        rows.append({"prompt": msgs, "completion": _assistant(ctx.listing(target, kept)), "user_id": u.user_id})
    return rows


def build_prompts(ctx: BuildEnv, users: list[UserSplit]) -> list[dict]:
    rows = []
    for u in users:
        events = u.history  # built once per user from the sequence arrays
        shown = _recent(events, ctx.cfg.history_len)
        held = [e.item_id for e in u.heldout]
        cands = ctx.candidates([e.item_id for e in events], held)
        msgs, kept = ctx.builder.build(_hist(shown), cands)
        rows.append(
            {
                "prompt": msgs,
                "user_id": u.user_id,
                "split": u.split,
                "history_ids": [e.item_id for e in events],
                "heldout_ids": held,
                # what the prompt shows (budget-trimmed), for labelers and reports
                "shown": [{"item_id": i, "rating": None if r is None or math.isnan(r) else float(r)} for i, r in kept],
                "candidate_ids": cands or [],
                "cold_start": u.cold_start,
            }
        )
    return rows


def _pair(ctx, prompt_hist, chosen, rejected, source, user_id, cands=None, **prov) -> dict:
    msgs, kept = ctx.builder.build(prompt_hist, cands)
    return {
        "prompt": msgs,
        "chosen": _assistant(ctx.listing(chosen, kept)),
        "rejected": _assistant(ctx.listing(rejected, kept)),
        "source": source,
        "user_id": user_id,
        "provenance": json.dumps(prov, sort_keys=True),
    }


def build_rating_pairs(ctx: BuildEnv, users: list[UserSplit]) -> list[dict]:
    """Higher- vs lower-rated continuations of the same history (same length, rating gap >= 1)."""
    rows = []
    for u in users:
        events = u.history  # built once per user from the sequence arrays
        rated = [e for e in events if not math.isnan(e.rating)]
        if len(rated) < 6:
            continue
        cut = len(events) - min(2 * ctx.cfg.k, len(events) // 2)
        prefix, future = events[:cut], [e for e in events[cut:] if not math.isnan(e.rating)]
        future = sorted(future, key=lambda e: -e.rating)
        n = min(ctx.cfg.k, len(future) // 2)
        if n < 2:
            continue
        hi, lo = future[:n], future[-n:]
        if (
            min(e.rating for e in hi) <= max(e.rating for e in lo)
            or np.mean([e.rating for e in hi]) - np.mean([e.rating for e in lo]) < 1.0
        ):
            continue
        shown = _hist(_recent(prefix, ctx.cfg.history_len))
        rows.append(
            _pair(
                ctx,
                shown,
                [e.item_id for e in hi],
                [e.item_id for e in lo],
                "ratings",
                u.user_id,
                chosen_ratings=[e.rating for e in hi],
                rejected_ratings=[e.rating for e in lo],
            )
        )
    return rows


def build_click_pairs(ctx: BuildEnv, table: pa.Table, seqs: dict, train_users: set[str]) -> list[dict]:
    """Per impression with clicks and skips: the list led by clicked items beats the list led by skipped ones."""
    mask = pc.fill_null(pc.is_in(table.column("event"), value_set=pa.array(["impression", "click"])), False)
    if not pc.any(mask).as_py():
        return []
    sub = table.filter(mask).to_pydict()  # click-log rows only
    groups: dict[str, list[int]] = {}
    for j, imp in enumerate(sub["impression_id"]):
        if sub["user_id"][j] in train_users and imp:
            groups.setdefault(imp, []).append(j)
    rows, k = [], ctx.cfg.k
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
        shown = _hist(_recent(before, ctx.cfg.history_len))
        chosen, rejected = (clicked + skipped)[:k], (skipped + clicked)[:k]
        if chosen == rejected:
            continue
        rows.append(_pair(ctx, shown, chosen, rejected, "clicks", uid, impression_id=imp, clicked=clicked))
    return rows


SIM_STRATEGIES = ("oracle", "retriever", "popular", "random", "anti", "history_repeat", "duplicates")


def _strategy_list(name, ctx, sim, user, history_ids, k, rng):
    seen = set(history_ids)
    unseen = [i for i in sim.item_ids if i not in seen]
    u = sim.utilities(user)
    if name == "oracle":
        return sorted(unseen, key=lambda i: -u[sim.index[i]])[:k]
    if name == "anti":
        return sorted(unseen, key=lambda i: u[sim.index[i]])[:k]
    if name == "retriever":
        return ctx.retriever.recommend(history_ids, k)
    if name == "popular":
        return sorted(unseen, key=lambda i: -sim.popularity[sim.index[i]])[:k]
    if name == "random":
        return list(rng.choice(unseen, size=k, replace=False))
    if name == "history_repeat":
        good = sorted(unseen, key=lambda i: -u[sim.index[i]])[: k - k // 2]
        return good + list(rng.choice(history_ids, size=min(k // 2, len(history_ids)), replace=False))
    good = sorted(unseen, key=lambda i: -u[sim.index[i]])[: (k + 1) // 2]
    return (good * k)[:k]  # duplicates


def build_sim_pairs(ctx: BuildEnv, sim, users: list[UserSplit], n_pairs: int, noise: float) -> list[dict]:
    """Simulated labelers compare two lists from different strategies (Bradley-Terry on true utility)."""
    rows, k, rng = [], ctx.cfg.k, ctx.rng
    if not users:
        return rows
    for p in range(n_pairs):
        u = users[p % len(users)]
        events = u.history
        user = sim.user(u.user_id)
        hist_ids = [e.item_id for e in events]
        a, b = rng.choice(len(SIM_STRATEGIES), size=2, replace=False)
        la = _strategy_list(SIM_STRATEGIES[a], ctx, sim, user, hist_ids, k, rng)
        lb = _strategy_list(SIM_STRATEGIES[b], ctx, sim, user, hist_ids, k, rng)
        if len(la) < k or len(lb) < k or la == lb:
            continue
        pick = sim.label(user, la, lb, set(hist_ids), k, rng, noise)
        chosen, rejected = (la, lb) if pick == 0 else (lb, la)
        names = (SIM_STRATEGIES[a], SIM_STRATEGIES[b]) if pick == 0 else (SIM_STRATEGIES[b], SIM_STRATEGIES[a])
        shown = _hist(_recent(events, ctx.cfg.history_len))
        rows.append(
            _pair(
                ctx,
                shown,
                chosen,
                rejected,
                "simulator",
                u.user_id,
                labeler=f"sim-{p % 5}",
                chosen_strategy=names[0],
                rejected_strategy=names[1],
            )
        )
    return rows


def _filter_users(table: pa.Table, cfg, skips: SkipLog, rng) -> pa.Table:
    """Keep users with at least data.min_history consumption events (and at most data.max_users of them),
    working on Arrow columns so no per-row Python objects exist before the table is small."""
    from rlhf.data.splits import CONSUMPTION

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
        from rlhf.interactions import DataError

        raise DataError(f"no user has at least data.min_history={cfg.min_history} interactions; lower --min-history")
    splits = split_users(
        seqs, cfg.split, cfg.holdout, cfg.val_fraction, cfg.test_fraction, cfg.cold_start_max, cfg.seed
    )
    fit_on = train_pairs(splits)
    retriever = baselines.make(
        cfg.retriever if cfg.mode == "rerank" else "ease" if len(catalog) <= baselines.MAX_EASE_ITEMS else "itemknn",
        [it.item_id for it in catalog.items],
        fit_on,
        seed=cfg.seed,
    )
    builder = PromptBuilder(
        catalog,
        load_tokenizer(model_name),
        k=cfg.k,
        noun=NOUNS.get(cfg.source, "items"),
        max_prompt_tokens=cfg.max_prompt_tokens,
    )
    ctx = BuildEnv(cfg, catalog, builder, retriever, rng)
    by_role = {r: [u for u in splits if u.split == r] for r in ("train", "val", "test")}

    catalog.save_jsonl(files.catalog)
    pq.write_table(table, files.interactions)
    with open(files.splits, "w") as f:
        for u in splits:
            events = u.history  # built once per user from the sequence arrays
            f.write(
                json.dumps(
                    {
                        "user_id": u.user_id,
                        "split": u.split,
                        "cold_start": u.cold_start,
                        "history": [
                            [e.item_id, e.timestamp, None if math.isnan(e.rating) else e.rating] for e in events
                        ],
                        "heldout": [e.item_id for e in u.heldout],
                    }
                )
                + "\n"
            )

    counts = {
        "sft/train": _write(build_sft(ctx, by_role["train"]), files.sft("train")),
        "sft/val": _write(build_sft(ctx, by_role["val"]), files.sft("val")),
    }
    for role in ("train", "val", "test"):
        counts[f"prompts/{role}"] = _write(build_prompts(ctx, by_role[role]), files.prompts(role))
    pair_users = by_role["train"]
    counts["pairs/ratings"] = _write(build_rating_pairs(ctx, pair_users), files.pairs("ratings"))
    counts["pairs/clicks"] = _write(
        build_click_pairs(ctx, table, seqs, {u.user_id for u in pair_users}), files.pairs("clicks")
    )
    if cfg.source == "builtin":
        from rlhf.data.simulator import Simulator

        sim = Simulator(catalog, seed=cfg.seed)
        counts["pairs/simulator"] = _write(
            build_sim_pairs(ctx, sim, pair_users, cfg.sim_label_pairs, cfg.sim_noise),
            files.pairs("simulator"),
        )

    meta = {
        "source": cfg.source,
        "k": cfg.k,
        "mode": cfg.mode,
        "noun": builder.noun,
        "template": builder.template,
        "retriever": retriever.name,
        "simulator_seed": cfg.seed if cfg.source == "builtin" else None,
        "tokenizer": model_name,
        "max_prompt_tokens": builder.max_prompt_tokens,
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
