"""A round's batch: held-out prompts, each with 2-4 sampled candidate listings in a shuffled order.

`export_round` writes it; `Batch.load` reads it back for the server, the simulator and import. Which stage
wrote a candidate is kept apart in provenance.jsonl so labelers judge the lists, not their source.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rlhf.data.loaders import DataError
from rlhf.labeling import round_files
from rlhf.runs import MissingInput, RunDir, atomic_write, round_name

SPECIAL = ("tie", "both_bad")
# where each stage's weights live (the base model by name, trained stages in the run directory)
WEIGHTS = {
    "base": lambda run, cfg: cfg.model.name,
    "sft": lambda run, cfg: run.sft.merged,
    "ppo": lambda run, cfg: run.ppo.adapter,
}


@dataclass
class Batch:
    batch_id: str
    rows: list[dict]

    def __post_init__(self):
        self.by_prompt = {r["prompt_id"]: r for r in self.rows}

    @classmethod
    def load(cls, run_dir: Path, round_no: int) -> Batch:
        path = round_files(run_dir, round_no).batch
        if not path.exists():
            raise MissingInput(f"{path} is missing; make it with: rlhf label export --run {run_dir} --round {round_no}")
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                ids = [c["candidate_id"] for c in row["candidates"]]
                _ = row["batch_id"], row["prompt_id"], row["history"], row["prompt"]
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{path}:{n}: not a batch row ({type(e).__name__}: {e})") from None
            if len(set(ids)) != len(ids) or len(ids) < 2 or set(ids) & set(SPECIAL):
                raise DataError(f"{path}:{n}: candidate ids {ids} must be 2-4 distinct ids other than tie/both_bad")
            rows.append(row)
        if not rows:
            raise DataError(f"{path}: the batch is empty")
        ids = {r["batch_id"] for r in rows}
        if len(ids) != 1:
            raise DataError(f"{path}: rows name several batch ids {sorted(ids)}")
        return cls(ids.pop(), rows)


def _history(catalog, row: dict, history_len: int) -> list[dict]:
    """The history as the prompt shows it (oldest first), with titles, years, genres and ratings."""
    shown = row.get("shown") or [{"item_id": i, "rating": None} for i in row["history_ids"][-history_len:]]
    out = []
    for h in shown:
        it = catalog[h["item_id"]] if h["item_id"] in catalog else None
        out.append(
            {
                "item_id": h["item_id"],
                "title": it.title if it else h["item_id"],
                "year": it.year if it else None,
                "genres": list(it.genres) if it else [],
                "rating": h.get("rating"),
            }
        )
    return out


def _digest(path: Path) -> str | None:
    if not path.exists():
        return None
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def export_round(cfg, run_dir: Path, round_no: int) -> dict:
    """Sample ``label.prompts`` held-out prompts and ``label.candidates`` sampled listings for each."""
    lc, run = cfg.label, RunDir(run_dir)
    out = round_files(run_dir, round_no)
    if out.judgments.exists() and out.judgments.stat().st_size > 0:
        raise DataError(
            f"{out.judgments} already holds judgments; export round {round_no} again would orphan them. "
            f"Use a new round number (--round {round_no + 1})."
        )
    seed = cfg.run.seed * 1000 + round_no
    rng = np.random.default_rng(seed)
    rows, notes = _pick_prompts(run, lc, rng)
    stages = [s for s in lc.stages if s == "base" or run.done(s)]
    notes += [f"stage {s}: not trained in this run, no candidates from it" for s in lc.stages if s not in stages]
    if not stages:
        raise MissingInput(
            f"none of the stages {lc.stages} is trained in {run_dir}; run `rlhf sft --run {run_dir}` first"
        )
    texts, prov = _candidates(cfg, run, rows, stages, seed)
    batch_rows, prov_rows, dropped = _batch_rows(run.catalog(), cfg, rows, texts, prov, rng)
    if dropped:
        notes.append(f"{dropped} prompts dropped: every candidate for them was the same text")
    if not batch_rows:
        raise DataError("no prompt kept two distinct candidates; raise label.temperature or label.candidates")
    body = json.dumps(batch_rows, sort_keys=True).encode()
    batch_id = f"{round_name(round_no)}-{hashlib.sha256(body).hexdigest()[:8]}"
    for b in batch_rows:
        b["batch_id"] = batch_id
    out.dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out.batch, "".join(json.dumps(b, ensure_ascii=False) + "\n" for b in batch_rows))
    atomic_write(out.provenance, "".join(json.dumps(p) + "\n" for p in prov_rows))
    manifest = {
        "round": round_no,
        "batch_id": batch_id,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "split": lc.split,
        "seed": seed,
        "prompts": len(batch_rows),
        "candidates_per_prompt": lc.candidates,
        "temperature": lc.temperature,
        "max_new_tokens": lc.max_new_tokens,
        "base_model": cfg.model.name,
        "stages": {
            s: {"path": str(WEIGHTS[s](run, cfg)), "digest": None if s == "base" else _digest(WEIGHTS[s](run, cfg))}
            for s in stages
        },
        "notes": notes,
    }
    atomic_write(out.manifest, json.dumps(manifest, indent=2))
    print(
        f"label export: {len(batch_rows)} prompts x {lc.candidates} candidates from {', '.join(stages)} -> {out.batch}"
    )
    for n in notes:
        print(f"label export: note: {n}")
    return manifest


def _pick_prompts(run: RunDir, lc, rng) -> tuple[list[dict], list[str]]:
    """``label.prompts`` held-out prompts with a history, drawn with the round's seed; and a note if too few."""
    rows = [r for r in run.rows(run.data.prompts(lc.split)) if r["history_ids"]]
    if not rows:
        raise DataError(f"{run.data.prompts(lc.split)}: no held-out prompts with a history")
    picked = sorted(rng.choice(len(rows), size=min(lc.prompts, len(rows)), replace=False).tolist())
    notes = (
        [] if len(picked) == lc.prompts else [f"only {len(picked)} {lc.split} prompts exist; asked for {lc.prompts}"]
    )
    return [rows[i] for i in picked], notes


def _candidates(cfg, run: RunDir, rows: list[dict], stages: list[str], seed: int):
    """texts[i][j], provenance[i][j]: candidate j of prompt i, written by stages[j % len(stages)] (SFT and PPO side
    by side when both exist), seeded sampling at label.temperature."""
    from rlhf.generation import generate
    from rlhf.models import load_stage
    from rlhf.precision import resolve

    lc, slots = cfg.label, {}
    for j in range(lc.candidates):
        slots.setdefault(stages[j % len(stages)], []).append(j)
    texts = [[None] * lc.candidates for _ in rows]
    prov = [[None] * lc.candidates for _ in rows]
    prompts, dtype, k = [r["prompt"] for r in rows], resolve(cfg.model, "label export"), run.meta()["k"]
    for s_index, (stage, js) in enumerate(slots.items()):
        model, tokenizer = load_stage(run.root, stage, cfg.model, dtype)
        for j in js:
            gen_seed = seed * 100 + s_index * 10 + j
            outs = generate(
                model,
                tokenizer,
                prompts,
                max_new_tokens=lc.max_new_tokens,
                batch_size=cfg.eval.batch_size,
                do_sample=True,
                temperature=lc.temperature,
                seed=gen_seed,
                progress=f"label {stage}",
                k=k,
            )
            for i, t in enumerate(outs):
                texts[i][j], prov[i][j] = t, {"stage": stage, "seed": gen_seed, "temperature": lc.temperature}
        del model
    return texts, prov


def _batch_rows(catalog, cfg, rows, texts, prov, rng) -> tuple[list[dict], list[dict], int]:
    """Batch rows (candidates deduplicated, in a shuffled order under neutral ids) and their provenance; and how
    many prompts were dropped for lack of two distinct candidates."""
    batch_rows, prov_rows, dropped = [], [], 0
    for i, r in enumerate(rows):
        seen, cands = set(), []
        for j in rng.permutation(cfg.label.candidates).tolist():  # shown order hides which stage wrote what
            if texts[i][j] in seen:
                continue
            seen.add(texts[i][j])
            cands.append((texts[i][j], prov[i][j]))
        if len(cands) < 2:
            dropped += 1
            continue
        pid = f"p{len(batch_rows) + 1:04d}"
        batch_rows.append(
            {
                "prompt_id": pid,
                "user_id": r["user_id"],
                "prompt": r["prompt"],
                "history": _history(catalog, r, cfg.data.history_len),
                "candidates": [{"candidate_id": f"c{n + 1}", "text": t} for n, (t, _) in enumerate(cands)],
                # whose prompt it is, as the reward terms read it: imported pairs carry it on
                **{f: r[f] for f in ("history_ids", "history_ratings", "candidate_ids", "shown") if f in r},
            }
        )
        prov_rows.append({"prompt_id": pid, "candidates": {f"c{n + 1}": p for n, (_, p) in enumerate(cands)}})
    return batch_rows, prov_rows, dropped
