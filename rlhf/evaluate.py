"""Evaluation stage: base / SFT / PPO listings and classic baselines on held-out users, one metrics table.

    rlhf eval --run runs/demo [--stages base,sft,ppo] [--split test] [--max-users 100] [--k 5]

Writes RUN_DIR/eval/metrics.json, listings.jsonl (every generated listing), report.md, report.html and
plots/*.png. Generation is batched, greedy unless eval.do_sample (seeded), from each stage's model with its adapters
merged, in the resolved compute dtype. Every later stage is compared with SFT and with each baseline on the same users
(mean difference and its paired standard error), and the reward's terms are correlated with true utility.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

from rlhf import metrics as M
from rlhf.config import Config, save_resolved
from rlhf.models import load_stage
from rlhf.runs import RunDir

SIM_NOTE = "simulator metrics (true_utility, sim_ctr) need the built-in simulator; this run's data has none"


class HeldOutUsers:
    """Everything about the held-out users that metric functions need."""

    def __init__(self, run: RunDir, split: str, max_users: int):
        self.run = run
        self.meta = run.meta()
        self.catalog = run.catalog()
        rows = run.rows(run.data.prompts(split))
        self.rows = rows[:max_users] if max_users else rows
        if not self.rows:
            from rlhf.data.loaders import DataError

            raise DataError(f"no held-out prompts in {run.data.prompts(split)}; try another --split")
        self.popularity, self.n_users = Counter(), 0
        for u in self._split_rows():
            self.popularity.update({h[0] for h in u["history"]})
            self.n_users += 1
        counts = np.array(sorted(self.popularity.get(it.item_id, 0) for it in self.catalog.items))
        self._pop_sorted = counts
        self.features = {it.item_id: set(it.genres) for it in self.catalog.items}
        self.sim = None
        if self.meta.get("simulator_seed") is not None:
            from rlhf.data.simulator import Simulator

            self.sim = Simulator(self.catalog, seed=self.meta["simulator_seed"])

    def _split_rows(self):
        with open(self.run.data.splits) as f:  # streamed: one user at a time
            for line in f:
                if line.strip():
                    yield json.loads(line)

    def fit_pairs(self):
        """(user, item, rating) of every training history, streamed afresh for each baseline fit."""
        from rlhf.data.splits import stored_training_triples

        return stored_training_triples(self.run.data.splits)

    def pop_percentile(self, item_id: str) -> float:
        c = self.popularity.get(item_id, 0)
        return float(np.searchsorted(self._pop_sorted, c, side="right") / len(self._pop_sorted))


def list_metrics(
    users: HeldOutUsers,
    lists: list[list],
    k: int,
    explanations: list[list[str]] | None = None,
    counts: list[int] | None = None,
    rows: list[dict] | None = None,
    per_user: dict | None = None,
) -> dict:
    """Accuracy, health, beyond-accuracy and simulator metrics for one list per held-out row (``rows`` defaults to
    all of the users' rows). ``per_user``, when given, receives each row's true utility (with the simulator) and
    ndcg@K under those names, for paired comparisons."""
    acc: dict[str, list] = {name: [] for name in (f"hr@{k}", f"ndcg@{k}", f"recall@{k}", "hr@1")}
    if k < 10:
        acc.update({"hr@10": [], "ndcg@10": []})
    recommended = set()
    for j, (row, items) in enumerate(zip(rows if rows is not None else users.rows, lists)):
        n = counts[j] if counts is not None else len(items)
        _accuracy(acc, items, set(row["heldout_ids"]), k, n)
        _health(acc, users, row, items, n, k)
        recommended.update(i for i in items if i is not None)
        if explanations is not None and j < len(explanations):
            _explanations(acc, users, row, explanations[j])
    out = {name: M.mean(acc[name]) for name in acc if "@" in name}
    get = lambda name: M.mean(acc.get(name, []))  # noqa: E731
    out.update(
        {
            "valid_rate": get("valid"),
            "grounded_rate": get("grounded") or 0.0,
            "duplicate_rate": get("dup") or 0.0,
            "history_repeat_rate": get("history_repeat") or 0.0,
            "out_of_candidates_rate": get("out_of_candidates") if users.meta["mode"] == "rerank" else None,
            "coverage": len(recommended) / len(users.catalog),
            "distinct_items": len(recommended),
            "novelty": get("novelty"),
            "diversity": get("diversity"),
            "popularity_bias": get("popularity_bias"),
            "true_utility": get("true_utility"),
            "sim_ctr": get("sim_ctr"),
            "n": len(lists),
        }
    )
    if per_user is not None:
        if acc.get("true_utility"):
            per_user["true_utility"] = acc["true_utility"]
        per_user[f"ndcg@{k}"] = acc[f"ndcg@{k}"]
    if explanations is not None:
        out["faithfulness"] = get("faithfulness")
        out["explanation_words"] = get("explanation_words")
        # "which you rated N/5" claims that match the rating shown in the prompt (None: no claims)
        out["rating_claims_correct"] = get("rating_claims")
    return out


def _accuracy(acc: dict, items: list, relevant: set, k: int, n: int) -> None:
    acc[f"hr@{k}"].append(M.hit_rate(items, relevant, k))
    acc[f"ndcg@{k}"].append(M.ndcg(items, relevant, k))
    acc[f"recall@{k}"].append(M.recall(items, relevant, k))
    acc["hr@1"].append(M.hit_rate(items, relevant, 1))
    if "hr@10" in acc and n >= 10:
        acc["hr@10"].append(M.hit_rate(items, relevant, 10))
        acc["ndcg@10"].append(M.ndcg(items, relevant, 10))


def _health(acc: dict, users: HeldOutUsers, row: dict, items: list, n: int, k: int) -> None:
    """Validity, grounding, repeats, beyond-accuracy and (with the simulator) true utility of one list."""
    add = lambda name, value: acc.setdefault(name, []).append(value)  # noqa: E731
    add("valid", float(n == k))
    if items:
        add("grounded", sum(i is not None for i in items) / len(items))
        add("dup", M.duplicate_rate(items))
        add("history_repeat", M.share(items, set(row["history_ids"])))
        if row.get("candidate_ids"):
            add("out_of_candidates", 1.0 - M.share(items, set(row["candidate_ids"])))
    real = [i for i in items if i is not None]
    if real:
        add("novelty", M.novelty(real, users.popularity, users.n_users))
        add("diversity", M.intra_list_diversity(real, users.features))
        add("popularity_bias", float(np.mean([users.pop_percentile(i) for i in real])))
    if users.sim is not None:
        user, seen = users.sim.user(row["user_id"]), set(row["history_ids"])
        add("true_utility", users.sim.list_utility(user, items, seen, k))
        add("sim_ctr", users.sim.expected_clicks(user, items, seen, k))


def _explanations(acc: dict, users: HeldOutUsers, row: dict, explanations: list[str]) -> None:
    from reward_models.terms.rules import explanation_tied, rating_claims, shown_pairs

    for name in ("faithfulness", "explanation_words", "rating_claims"):
        acc.setdefault(name, [])
    acc["faithfulness"].extend(float(explanation_tied(e, row["history_ids"], users.catalog)) for e in explanations)
    acc["explanation_words"].extend(len(e.split()) for e in explanations)
    shown = shown_pairs(row)  # None: the data has no shown ratings to check claims against
    if shown is not None:
        acc["rating_claims"].extend(float(c) for e in explanations for c in rating_claims(e, shown, users.catalog))


def baseline_lists(users: HeldOutUsers, k: int, behaviour_ratings: bool = True) -> dict[str, list[list]]:
    """Each classic recommender's top K per user, fit on the training interactions. In rerank mode they pick from
    the same candidates the LLM sees, and the same recommenders over the whole catalog are there too (``@catalog``),
    beside the retriever's own order and a random order of the candidates."""
    from rlhf import baselines

    item_ids = [it.item_id for it in users.catalog.items]
    out = {}
    rerank = users.meta["mode"] == "rerank"
    genres = baselines.catalog_genres(users.catalog)
    for name in ("popularity", "itemknn", "ease", "genre"):
        if name == "ease" and len(item_ids) > baselines.MAX_EASE_ITEMS:
            continue
        if name == "genre" and not any(genres.values()):
            continue
        model = baselines.make(name, item_ids, users.fit_pairs(), genres=genres)
        out[name] = [
            model.recommend(r["history_ids"], k, candidates=r["candidate_ids"] if rerank else None) for r in users.rows
        ]
        if rerank:
            out[f"{name}@catalog"] = [model.recommend(r["history_ids"], k) for r in users.rows]
    if rerank:
        retr = baselines.make(users.meta["retriever"], item_ids, users.fit_pairs(), genres=genres)
        out["retriever_order"] = [
            retr.recommend(r["history_ids"], k, candidates=r["candidate_ids"]) for r in users.rows
        ]
        rng = np.random.default_rng(0)
        out["random_order"] = [list(rng.permutation(r["candidate_ids"]))[:k] for r in users.rows]
    if users.run.reward.behaviour.exists():  # the reward's own teacher, so a policy that only copies it is seen
        out["behaviour_model"] = _behaviour_lists(users, k, rerank, behaviour_ratings)
    return out


def _behaviour_lists(users: HeldOutUsers, k: int, rerank: bool, ratings: bool = True) -> list[list]:
    """The behaviour model's top K per user, reading the history as the reward term does (weighted by the user's
    ratings unless reward.behaviour_ratings is off)."""
    from reward_models.terms.behaviour import BehaviourModel

    model, out = BehaviourModel.load(users.run.reward.behaviour), []
    for r in users.rows:
        pct = model.percentiles(r["history_ids"], r.get("history_ratings") if ratings else None)
        allowed = set(r["candidate_ids"]) if rerank else None
        order = [model.item_ids[j] for j in np.argsort(-np.nan_to_num(pct, nan=-1.0), kind="stable")]
        out.append([i for i in order if (allowed is None or i in allowed) and i not in r["history_ids"]][:k])
    return out


def response_kl(model, reference, tokenizer, prompts, texts, batch_size: int = 16) -> float | None:
    """Mean over responses of the summed log-ratio log pi(y|x) - log pi_ref(y|x), on the policy's own responses."""
    from reward_models.encoding import pad_left, prompt_ids, response_ids

    vals = []
    for s in range(0, len(texts), batch_size):
        seqs, spans = [], []
        for p, t in zip(prompts[s : s + batch_size], texts[s : s + batch_size]):
            q, r = prompt_ids(tokenizer, p), response_ids(tokenizer, t)
            seqs.append(q + r)
            spans.append(len(r))
        ids, mask = pad_left(seqs, tokenizer.pad_token_id)
        last = max(spans)
        lp = _token_logprobs(model, ids, mask, last)
        lr = _token_logprobs(reference, ids, mask, last)
        vals += [float((lp[row, -n:] - lr[row, -n:]).sum()) for row, n in enumerate(spans)]
    return float(np.mean(vals)) if vals else None


def _token_logprobs(model, ids, mask, last: int):
    """log p(token_t | tokens_<t) of the last ``last`` tokens of left-padded rows, in float32: [batch, last].
    Only those positions' logits are cast and normalised (a full-vocabulary log-softmax over every prompt
    position was a quarter of eval's time)."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, -last - 1 : -1].float()
    targets = ids[:, -last:].to(device).unsqueeze(-1)
    return torch.log_softmax(logits, -1).gather(-1, targets).squeeze(-1).cpu()


def run_eval(cfg: Config, run_dir: Path, k: int | None = None) -> dict:
    import torch

    from reward_models.composite import for_run
    from rlhf.precision import resolve
    from rlhf.report import write_report
    from rlhf.tracking import Tracker

    run, ec = RunDir(run_dir), cfg.eval
    users = HeldOutUsers(run, ec.split, ec.max_users)
    k = k or users.meta["k"]
    out = run.eval
    out.dir.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, run, ["eval", "track"])
    torch.manual_seed(cfg.run.seed)
    dtype = resolve(cfg.model, "eval")
    composite = for_run(run, cfg.ppo.reward_weights, dtype, cfg.reward) if run.done("reward") else None
    cold = [j for j, r in enumerate(users.rows) if r["cold_start"]]
    results = {
        "k": k,
        "mode": users.meta["mode"],
        "split": ec.split,
        "users": len(users.rows),
        "dtype": dtype,
        "stages": {},
        "baselines": {},
        "cold_start": {"users": len(cold), "stages": {}, "baselines": {}},
    }
    notes = [] if users.sim is not None else [SIM_NOTE]
    per_user: dict[str, dict[str, list]] = {}
    scored: dict = {}  # each LLM stage's composite reward, every term per user
    examples, reference = {}, None
    with open(out.listings, "w") as listing_file:
        for stage in ec.stages:
            loaded = load_stage(run_dir, stage, cfg.model, dtype)
            if loaded is None:
                notes.append(f"stage {stage}: not trained in this run, skipped (run `rlhf {stage} --run {run_dir}`)")
                continue
            model, tokenizer = loaded
            texts = _eval_stage(users, stage, model, tokenizer, k, cfg, results, per_user, scored, composite, cold)
            if stage == "sft":
                reference = model
            elif stage == "ppo":
                if reference is None:
                    reference = load_stage(run_dir, "sft", cfg.model, dtype)[0]
                prompts = [r["prompt"] for r in users.rows]
                results["stages"][stage]["kl_to_sft"] = response_kl(model, reference, tokenizer, prompts, texts)
            listing_file.writelines(
                json.dumps({"stage": stage, "user_id": r["user_id"], "text": t}) + "\n"
                for r, t in zip(users.rows, texts)
            )
            examples[stage] = texts[: ec.num_examples]
    for name, lists in baseline_lists(users, k, cfg.reward.behaviour_ratings).items():
        per_user[name] = {}
        results["baselines"][name] = list_metrics(users, lists, k, per_user=per_user[name])
        if cold:
            results["cold_start"]["baselines"][name] = _subset(users, cold, lists, k)
    _comparisons(results, per_user, ec.stages, list(results["baselines"]))
    if composite is not None and (truth := _reward_vs_truth(per_user, scored, composite)):
        results["reward_vs_truth"] = truth
    results["notes"] = notes
    out.metrics.write_text(json.dumps(results, indent=2))
    write_report(run, results, users, examples)
    # the table and the paired comparisons go to the trackers (track.report_to), as final/<part>/<row>/<metric>
    Tracker(cfg, run, "eval").finish({p: results[p] for p in ("stages", "baselines", "vs_sft", "vs_baselines")})
    print(f"eval: {len(users.rows)} {ec.split} users, K={k}; wrote {out.metrics} and {out.report_html}")
    for line in M.describe_eval(results):
        print(f"eval: {line}")
    for note in notes:
        print(f"eval: note: {note}")
    return results


def _eval_stage(users, stage, model, tokenizer, k, cfg, results, per_user, scored, composite, cold) -> list[str]:
    """Generate one stage's listings for every user and fill its metrics, per-user values and reward terms."""
    from reward_models.terms import PromptContext
    from rlhf.generation import generate
    from rlhf.listing import parse_and_ground

    ec = cfg.eval
    prompts = [r["prompt"] for r in users.rows]
    constraints = _constraints(users, tokenizer, k) if ec.constrained else None
    t0 = time.time()
    texts = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=ec.max_new_tokens,
        batch_size=ec.batch_size,
        do_sample=ec.do_sample,
        seed=cfg.run.seed,
        progress=f"eval {stage}",
        k=k,
        constraints=constraints,
    )
    seconds = time.time() - t0
    parsed = [parse_and_ground(t, users.catalog) for t in texts]
    lists, counts = [[e.item_id for e in p][:k] for p in parsed], [len(p) for p in parsed]
    expl = [[e.explanation for e in p] for p in parsed]
    per_user[stage] = {}
    m = list_metrics(users, lists, k, expl, counts, per_user=per_user[stage])
    if composite is not None:
        result = composite.score(prompts, texts, [PromptContext.from_row(r) for r in users.rows])
        m.update({f"reward/{name}": value for name, value in result.means().items()})
        per_user[stage]["reward"] = result.total
        scored[stage] = result
    m["kl_to_sft"] = 0.0 if stage == "sft" else None
    m["generation_s"], m["listings_per_s"] = round(seconds, 2), round(len(texts) / max(seconds, 1e-9), 3)
    results["stages"][stage] = m
    if cold:
        results["cold_start"]["stages"][stage] = _subset(users, cold, lists, k, expl, counts)
    return texts


def _constraints(users: HeldOutUsers, tokenizer, k: int):
    """Each held-out prompt's allowed titles: its candidates in rerank mode, the catalog otherwise."""
    from reward_models.encoding import prompt_ids
    from rlhf.constrained import PromptConstraints

    constraints = PromptConstraints(tokenizer, users.catalog)
    for r in users.rows:
        constraints.register(prompt_ids(tokenizer, r["prompt"]), r.get("candidate_ids") or [], r["history_ids"], k)
    return constraints


def _comparisons(results: dict, per_user: dict, stages: list, baselines: list) -> None:
    """Paired differences on the same users: each later stage against SFT (true utility, ndcg@K, composite
    reward) and each LLM stage against each baseline (true utility, ndcg@K)."""
    llm = [s for s in stages if s in per_user]
    results["vs_sft"] = {s: _paired(per_user, s, "sft") for s in llm if s not in ("sft", "base") and "sft" in per_user}
    results["vs_baselines"] = {s: {b: _paired(per_user, s, b, skip=("reward",)) for b in baselines} for s in llm}


def _paired(per_user: dict, a: str, b: str, skip=()) -> dict:
    """Every per-user metric ``a`` and ``b`` both have (in ``a``'s order): mean of a - b and its paired SE."""
    shared = [m for m in per_user[a] if m in per_user[b] and m not in skip]
    return {m: M.paired_difference(per_user[a][m], per_user[b][m]) for m in shared}


def _reward_vs_truth(per_user: dict, scored: dict, composite) -> dict | None:
    """Pearson correlation with true utility, over every LLM listing that has both, of the composite reward, its
    learned part, its rule part and each term (None without the simulator); and per stage, on that stage's own
    listings, of the composite and its learned part (``by_stage``: what `rlhf rounds` tracks round after round).

    Does the reward PPO optimises track what it stands for? On the policies' own listings a learned score that
    ranks held-out preference pairs well can still be unrelated to the simulator's utility.
    """
    util, total, rules, terms, by_stage = [], [], [], {}, {}
    for stage, result in scored.items():
        if "true_utility" not in per_user[stage]:
            continue
        own = per_user[stage]["true_utility"]
        by_stage[stage] = {
            "reward": M.pearson(result.total, own),
            "learned": M.pearson(result.terms["learned"], own) if "learned" in result.terms else None,
            "n": len(own),
        }
        util += own
        total += result.total
        rules += composite.rule_part(result)
        for name, values in result.terms.items():
            terms.setdefault(name, []).extend(values)
    if not util:
        return None
    out = {"reward": M.pearson(total, util), "rules": M.pearson(rules, util), "n": len(util)}
    out["learned"] = M.pearson(terms["learned"], util) if "learned" in terms else None
    out["terms"] = {name: M.pearson(values, util) for name, values in terms.items()}
    out["by_stage"] = by_stage
    return out


def _subset(users, idx, lists, k, expl=None, counts=None):
    return list_metrics(
        users,
        [lists[j] for j in idx],
        k,
        [expl[j] for j in idx] if expl else None,
        [counts[j] for j in idx] if counts else None,
        rows=[users.rows[j] for j in idx],
    )
