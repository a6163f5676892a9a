"""Evaluation stage: base / SFT / PPO listings and classic baselines on held-out users, one metrics table.

    rlhf eval --run runs/demo [--stages base,sft,ppo] [--split test] [--max-users 100] [--k 5]

Writes RUN_DIR/eval/metrics.json, listings.jsonl (every generated listing), report.md, report.html and
plots/*.png. Generation is batched and greedy unless eval.do_sample (seeded).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np

from rlhf import metrics as M
from rlhf.config import Config, save_resolved
from rlhf.runs import RunDir

SIM_NOTE = "simulator metrics (true_utility, sim_ctr) need the built-in simulator; this run's data has none"


class Context:
    """Everything about the held-out users that metric functions need."""

    def __init__(self, run: RunDir, split: str, max_users: int):
        self.run = run
        self.meta = run.meta()
        self.catalog = run.catalog()
        rows = run.rows(f"prompts/{split}.parquet")
        self.rows = rows[:max_users] if max_users else rows
        if not self.rows:
            from rlhf.interactions import DataError

            raise DataError(
                f"no held-out prompts in {run.data / 'prompts' / (split + '.parquet')}; try another --split"
            )
        self.popularity, self.n_users = Counter(), 0
        for u in self._split_rows():
            self.popularity.update({h[0] for h in u["history"]})
            self.n_users += 1
        counts = np.array(sorted(self.popularity.get(it.item_id, 0) for it in self.catalog.items))
        self._pop_sorted = counts
        self.features = {it.item_id: set(it.genres) for it in self.catalog.items}
        self.sim = None
        if self.meta.get("simulator_seed") is not None:
            from rlhf.simulator import Simulator

            self.sim = Simulator(self.catalog, seed=self.meta["simulator_seed"])

    def _split_rows(self):
        with open(self.run.data / "splits.jsonl") as f:  # streamed: one user at a time
            for line in f:
                if line.strip():
                    yield json.loads(line)

    def fit_pairs(self):
        """(user, item, rating) of every training history, streamed afresh for each baseline fit."""
        for u in self._split_rows():
            for h in u["history"]:
                yield u["user_id"], h[0], h[2] if h[2] is not None else math.nan

    def pop_percentile(self, item_id: str) -> float:
        c = self.popularity.get(item_id, 0)
        return float(np.searchsorted(self._pop_sorted, c, side="right") / len(self._pop_sorted))


def list_metrics(
    ctx: Context,
    lists: list[list],
    k: int,
    explanations: list[list[str]] | None = None,
    counts: list[int] | None = None,
    rows: list[dict] | None = None,
    per_user: dict | None = None,
) -> dict:
    """Accuracy, health, beyond-accuracy and simulator metrics for one list per held-out row
    (``rows`` defaults to all of the context's rows). ``per_user``, when given, receives each row's
    true utility under "true_utility" (for paired comparisons of stages)."""
    from reward_models.rules import explanation_tied, rating_claims, shown_pairs

    acc = {
        f"hr@{k}": [],
        f"ndcg@{k}": [],
        f"recall@{k}": [],
        "hr@1": [],
        "valid": [],
        "grounded": [],
        "dup": [],
        "hist": [],
        "outc": [],
        "nov": [],
        "div": [],
        "popb": [],
        "util": [],
        "ctr": [],
        "faith": [],
        "elen": [],
        "claims": [],
    }
    if k < 10:
        acc.update({"hr@10": [], "ndcg@10": []})
    recommended = set()
    for j, (row, items) in enumerate(zip(rows if rows is not None else ctx.rows, lists)):
        rel = set(row["heldout_ids"])
        n = counts[j] if counts is not None else len(items)
        acc[f"hr@{k}"].append(M.hit_rate(items, rel, k))
        acc[f"ndcg@{k}"].append(M.ndcg(items, rel, k))
        acc[f"recall@{k}"].append(M.recall(items, rel, k))
        acc["hr@1"].append(M.hit_rate(items, rel, 1))
        if "hr@10" in acc and n >= 10:
            acc["hr@10"].append(M.hit_rate(items, rel, 10))
            acc["ndcg@10"].append(M.ndcg(items, rel, 10))
        acc["valid"].append(float(n == k))
        if items:
            acc["grounded"].append(sum(i is not None for i in items) / len(items))
            acc["dup"].append(M.duplicate_rate(items))
            acc["hist"].append(M.share(items, set(row["history_ids"])))
            if row.get("candidate_ids"):
                acc["outc"].append(1.0 - M.share(items, set(row["candidate_ids"])))
        real = [i for i in items if i is not None]
        recommended.update(real)
        if real:
            acc["nov"].append(M.novelty(real, ctx.popularity, ctx.n_users))
            acc["div"].append(M.intra_list_diversity(real, ctx.features))
            acc["popb"].append(float(np.mean([ctx.pop_percentile(i) for i in real])))
        if ctx.sim is not None:
            user = ctx.sim.user(row["user_id"])
            seen = set(row["history_ids"])
            acc["util"].append(ctx.sim.list_utility(user, items, seen, k))
            acc["ctr"].append(ctx.sim.expected_clicks(user, items, seen, k))
        if explanations is not None and j < len(explanations):
            ex = explanations[j]
            acc["faith"].extend(float(explanation_tied(e, row["history_ids"], ctx.catalog)) for e in ex)
            acc["elen"].extend(len(e.split()) for e in ex)
            shown = shown_pairs(row)  # None: the data has no shown ratings to check claims against
            if shown is not None:
                acc["claims"].extend(float(c) for e in ex for c in rating_claims(e, shown, ctx.catalog))
    out = {name: M.mean(acc[name]) for name in acc if "@" in name}
    out.update(
        {
            "valid_rate": M.mean(acc["valid"]),
            "grounded_rate": M.mean(acc["grounded"]) or 0.0,
            "duplicate_rate": M.mean(acc["dup"]) or 0.0,
            "history_repeat_rate": M.mean(acc["hist"]) or 0.0,
            "out_of_candidates_rate": M.mean(acc["outc"]) if ctx.meta["mode"] == "rerank" else None,
            "coverage": len(recommended) / len(ctx.catalog),
            "novelty": M.mean(acc["nov"]),
            "diversity": M.mean(acc["div"]),
            "popularity_bias": M.mean(acc["popb"]),
            "true_utility": M.mean(acc["util"]),
            "sim_ctr": M.mean(acc["ctr"]),
            "n": len(lists),
        }
    )
    if per_user is not None and acc["util"]:
        per_user["true_utility"] = acc["util"]
    if explanations is not None:
        out["faithfulness"] = M.mean(acc["faith"])
        out["explanation_words"] = M.mean(acc["elen"])
        # "which you rated N/5" claims that match the rating shown in the prompt (None: no claims)
        out["rating_claims_correct"] = M.mean(acc["claims"])
    return out


def baseline_lists(ctx: Context, k: int) -> dict[str, list[list]]:
    from rlhf import baselines

    item_ids = [it.item_id for it in ctx.catalog.items]
    out = {}
    rerank = ctx.meta["mode"] == "rerank"
    for name in ("popularity", "itemknn", "ease"):
        if name == "ease" and len(item_ids) > baselines.MAX_EASE_ITEMS:
            continue
        model = baselines.make(name, item_ids, ctx.fit_pairs())
        out[name] = [
            model.recommend(r["history_ids"], k, candidates=r["candidate_ids"] if rerank else None) for r in ctx.rows
        ]
    if rerank:
        retr = baselines.make(ctx.meta["retriever"], item_ids, ctx.fit_pairs())
        out["retriever_order"] = [retr.recommend(r["history_ids"], k, candidates=r["candidate_ids"]) for r in ctx.rows]
        rng = np.random.default_rng(0)
        out["random_order"] = [list(rng.permutation(r["candidate_ids"]))[:k] for r in ctx.rows]
    return out


def load_stage_model(run_dir: Path, stage: str, model_cfg):
    """(model, tokenizer) for base, sft or ppo; None when the stage has not been trained."""
    from rlhf.models import load_causal_lm, load_tokenizer, on_device, resolve_model

    if stage == "base":
        path = resolve_model(model_cfg.name)
        return on_device(load_causal_lm(path, model_cfg.dtype)), load_tokenizer(path)
    merged = run_dir / "sft" / "merged"
    if not merged.exists():
        return None
    model = load_causal_lm(str(merged), model_cfg.dtype)
    if stage == "ppo":
        adapter = run_dir / "ppo" / "adapter"
        if not adapter.exists():
            return None
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    return on_device(model), load_tokenizer(str(merged))


def response_kl(model, tokenizer, prompts, texts) -> float | None:
    """Mean summed log-ratio log pi(y|x) - log pi_ref(y|x) of the policy's own responses (adapter on vs off)."""
    import torch

    from reward_models.encoding import prompt_ids, response_ids

    if not hasattr(model, "disable_adapter"):
        return None
    vals = []
    model.eval()
    for p, t in zip(prompts, texts):
        q, r = prompt_ids(tokenizer, p), response_ids(tokenizer, t)
        ids = torch.tensor([q + r], device=model.device)
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0, len(q) - 1 : -1].float(), -1)
            with model.disable_adapter():
                lr = torch.log_softmax(model(input_ids=ids).logits[0, len(q) - 1 : -1].float(), -1)
        tok = torch.tensor(r, device=lp.device)
        vals.append(float((lp[range(len(r)), tok] - lr[range(len(r)), tok]).sum()))
    return float(np.mean(vals)) if vals else None


def run_eval(cfg: Config, run_dir: Path, k: int | None = None) -> dict:
    import torch

    from reward_models.composite import PromptContext
    from rlhf.generation import generate
    from rlhf.listing import parse_and_ground
    from rlhf.report import write_report

    run = RunDir(run_dir)
    ec = cfg.eval
    ctx = Context(run, ec.split, ec.max_users)
    k = k or ctx.meta["k"]
    out = run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, run_dir, ["eval"])
    torch.manual_seed(cfg.run.seed)
    composite = load_composite(run_dir, ctx, cfg)
    cold = [j for j, r in enumerate(ctx.rows) if r["cold_start"]]
    results, notes, examples = (
        {
            "k": k,
            "mode": ctx.meta["mode"],
            "split": ec.split,
            "users": len(ctx.rows),
            "stages": {},
            "baselines": {},
            "cold_start": {"users": len(cold), "stages": {}, "baselines": {}},
        },
        [],
        {},
    )
    if ctx.sim is None:
        notes.append(SIM_NOTE)
    prompts = [r["prompt"] for r in ctx.rows]
    per_user: dict[str, dict[str, list]] = {}
    learned: dict[str, list] = {}  # the learned part of each stage's per-user composite reward
    with open(out / "listings.jsonl", "w") as listing_file:
        for stage in ec.stages:
            loaded = load_stage_model(run_dir, stage, cfg.model)
            if loaded is None:
                notes.append(f"stage {stage}: not trained in this run, skipped (run `rlhf {stage} --run {run_dir}`)")
                continue
            model, tokenizer = loaded
            texts = generate(
                model,
                tokenizer,
                prompts,
                max_new_tokens=ec.max_new_tokens,
                batch_size=ec.batch_size,
                do_sample=ec.do_sample,
                seed=cfg.run.seed,
                progress=f"eval {stage}",
            )
            parsed = [parse_and_ground(t, ctx.catalog) for t in texts]
            lists = [[e.item_id for e in p][:k] for p in parsed]
            counts = [len(p) for p in parsed]
            expl = [[e.explanation for e in p] for p in parsed]
            per_user[stage] = {}
            m = list_metrics(ctx, lists, k, expl, counts, per_user=per_user[stage])
            if composite is not None:
                scored = composite.score_texts(prompts, texts, [PromptContext.from_row(r) for r in ctx.rows])
                for name in scored[0]:
                    m[f"reward/{name}"] = M.mean([s[name] for s in scored])
                per_user[stage]["reward"] = [s["reward"] for s in scored]
                learned[stage] = [s["learned"] for s in scored]
            m["kl_to_sft"] = (
                response_kl(model, tokenizer, prompts, texts) if stage == "ppo" else (0.0 if stage == "sft" else None)
            )
            results["stages"][stage] = m
            if cold:
                results["cold_start"]["stages"][stage] = _subset(ctx, cold, lists, k, expl, counts)
            for r, t in zip(ctx.rows, texts):
                listing_file.write(json.dumps({"stage": stage, "user_id": r["user_id"], "text": t}) + "\n")
            examples[stage] = texts[: ec.num_examples]
            del model
    # each later stage against SFT on the same users: mean difference and its paired standard error
    results["vs_sft"] = {
        stage: {
            metric: M.paired_difference(values, per_user["sft"][metric])
            for metric, values in per_user[stage].items()
            if metric in per_user["sft"]
        }
        for stage in per_user
        if stage not in ("sft", "base") and "sft" in per_user
    }
    if composite is not None:
        truth = _reward_vs_truth(per_user, learned, composite.rm_weight)
        if truth:
            results["reward_vs_truth"] = truth
    for name, lists in baseline_lists(ctx, k).items():
        results["baselines"][name] = list_metrics(ctx, lists, k)
        if cold:
            results["cold_start"]["baselines"][name] = _subset(ctx, cold, lists, k)
    results["notes"] = notes
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    write_report(run_dir, results, ctx, examples)
    print(f"eval: {len(ctx.rows)} {ec.split} users, K={k}; wrote {out / 'metrics.json'} and {out / 'report.html'}")
    for line in M.describe_eval(results):
        print(f"eval: {line}")
    for note in notes:
        print(f"eval: note: {note}")
    return results


def _reward_vs_truth(per_user: dict, learned: dict, rm_weight: float) -> dict | None:
    """Correlation with true utility of the composite reward, its learned part and its rule part, over every
    LLM listing that has both (None without the simulator).

    Does the reward PPO optimises track what it stands for? On the policies' own listings a learned score
    that ranks held-out preference pairs well can still be unrelated to the simulator's utility.
    """
    reward, score, util = [], [], []
    for stage, values in per_user.items():
        if "true_utility" in values and stage in learned:
            reward += values["reward"]
            score += learned[stage]
            util += values["true_utility"]
    if not util:
        return None
    rules = [r - rm_weight * s for r, s in zip(reward, score)]
    return {
        "reward": M.pearson(reward, util),
        "learned": M.pearson(score, util),
        "rules": M.pearson(rules, util),
        "n": len(util),
    }


def _subset(ctx, idx, lists, k, expl=None, counts=None):
    return list_metrics(
        ctx,
        [lists[j] for j in idx],
        k,
        [expl[j] for j in idx] if expl else None,
        [counts[j] for j in idx] if counts else None,
        rows=[ctx.rows[j] for j in idx],
    )


def load_composite(run_dir: Path, ctx: Context, cfg: Config):
    """The run's composite reward (learned score + rule terms, the recipe's weights), or None without a reward model."""
    rm = run_dir / "reward" / "model"
    if not rm.exists():
        return None
    from reward_models.composite import CompositeReward
    from reward_models.train import load_reward_model
    from rlhf.models import load_tokenizer, on_device

    tokenizer = load_tokenizer(str(rm))
    model = on_device(load_reward_model(rm, cfg.model.dtype))
    model.config.pad_token_id = tokenizer.pad_token_id
    return CompositeReward(model, tokenizer, ctx.catalog, ctx.meta["k"], cfg.ppo.rules, cfg.ppo.reward_model_weight)
