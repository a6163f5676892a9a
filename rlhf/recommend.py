"""`rlhf recommend`: one ranked, explained list for a known user or a typed history.

rlhf recommend --run runs/demo --user u00017
rlhf recommend --run runs/demo --history "The Matrix; Alien (1979); Heat" --constrained --json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rlhf.config import Config
from rlhf.runs import RunDir


class RecommendError(ValueError):
    pass


def _user_row(run: RunDir, user_id: str) -> dict:
    for split in ("test", "val", "train"):
        for r in run.rows(run.data.prompts(split)):
            if r["user_id"] == user_id:
                return r
    raise RecommendError(f"user {user_id!r} is not in {run.data.prompts('*')}; pass --history instead")


def history_from_titles(text: str, catalog) -> list[str]:
    titles = [t.strip() for t in text.split(";") if t.strip()]
    if not titles:
        raise RecommendError('--history is empty; give titles separated by ";", e.g. "The Matrix; Alien (1979)"')
    ids, unknown = [], []
    for t in titles:
        g = catalog.ground(t)
        (ids if g.in_catalog else unknown).append(g.item_id if g.in_catalog else t)
    if unknown:
        raise RecommendError(
            f"not in the catalog: {', '.join(repr(u) for u in unknown)}; check the spelling "
            f"(the catalog is {len(catalog)} items in the run's data/catalog.jsonl)"
        )
    return list(dict.fromkeys(ids))


def recommend(
    run_dir: Path,
    model_cfg,
    stage: str,
    history_ids: list[str],
    k: int,
    constrained: bool,
    max_new_tokens: int,
    prompt: list[dict] | None = None,
    loaded=None,
    candidate_ids: list[str] | None = None,
    shown: list[tuple[str, float | None]] | None = None,
) -> dict:
    """One listing for a history (or a user's prompt row and its rerank candidates), with its grounded items. A K
    other than the run's rebuilds the row's prompt for that K from what it showed (``shown``: (item_id, rating) pairs,
    else the history unrated) and its candidates."""
    from reward_models.encoding import prompt_ids
    from rlhf.constrained import PromptConstraints
    from rlhf.generation import generate
    from rlhf.listing import parse_and_ground
    from rlhf.models import load_stage
    from rlhf.precision import resolve
    from rlhf.prompts import PromptBuilder

    run = RunDir(run_dir)
    meta, catalog = run.meta(), run.catalog()
    loaded = loaded or load_stage(run_dir, stage, model_cfg, resolve(model_cfg, "recommend"))
    if loaded is None:
        raise RecommendError(
            f"stage {stage} is not trained in {run_dir}; run `rlhf {stage} --run {run_dir}` or pick another --stage"
        )
    model, tokenizer = loaded
    if prompt is None or k != meta["k"]:
        builder = PromptBuilder(
            catalog,
            tokenizer,
            k=k,
            noun=meta["noun"],
            max_prompt_tokens=meta["max_prompt_tokens"],
            ranked=meta.get("candidate_order") == "ranked",
        )
        prompt = builder.messages(shown or [(i, None) for i in history_ids], candidate_ids or None)
    constraints = None
    if constrained:  # the prompt's candidates when it offers some, the catalog otherwise
        constraints = PromptConstraints(tokenizer, catalog)
        constraints.register(prompt_ids(tokenizer, prompt), candidate_ids or [], history_ids, k)
    text = generate(
        model, tokenizer, [prompt], max_new_tokens=max_new_tokens, batch_size=1, k=k, constraints=constraints
    )[0]
    items = [
        {
            "rank": e.rank,
            "title": e.title,
            "item_id": e.item_id,
            "in_catalog": e.in_catalog,
            "explanation": e.explanation,
        }
        for e in parse_and_ground(text, catalog)
    ]
    return {"prompt": prompt, "text": text, "items": items}


def run_recommend(cfg: Config, run_dir: Path, args) -> dict:
    run = RunDir(run_dir)
    meta, catalog = run.meta(), run.catalog()
    k = args.k or meta["k"]
    if args.user:
        row = _user_row(run, args.user)
        history, prompt, cands = row["history_ids"], row["prompt"], row.get("candidate_ids")
        shown = [(s["item_id"], s["rating"]) for s in row.get("shown") or []]
    else:
        history, prompt, cands, shown = history_from_titles(args.history, catalog), None, None, None
    try:
        result = recommend(
            run_dir,
            cfg.model,
            args.stage,
            history,
            k,
            args.constrained,
            args.max_new_tokens,
            prompt,
            None,
            cands,
            shown,
        )
    except RecommendError as e:
        print(f"rlhf recommend: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        for it in result["items"]:
            mark = "" if it["in_catalog"] else "  [not in catalog]"
            print(f"{it['rank']}. {it['title']} — {it['explanation']}{mark}")
        if not result["items"]:
            print("(the model wrote no list; raw output follows)\n" + result["text"])
    return result
