"""Judgments -> preference pairs for the reward model (`source: labels:round-NNN`), with a round summary.

Rules (README "Labeling rounds"):
- one decision per labeler and prompt: a repeated idempotency key, or a second judgment of a prompt the
  labeler already judged, counts once (the first); judgments naming another batch or an unknown prompt
  are skipped and counted; an unfinished last line (a crash mid-append, never acknowledged) is skipped;
- for each prompt, candidate X beats Y when more labelers picked X than Y; each such (X, Y) is a pair.
  One labeler picking X among three lists gives X>Y and X>Z and nothing about Y vs Z;
- "tie" and "both_bad" say nothing about the order, so they give no pair; they are counted, and a
  prompt whose labelers split evenly gives no pair either;
- agreement on prompts judged by two or more labelers: the share of labeler pairs that gave the same
  answer, and Fleiss' kappa over the answers (candidate position, tie, both bad).
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from itertools import combinations
from pathlib import Path

from rlhf.labeling import round_files
from rlhf.labeling.batch import SPECIAL, Batch
from rlhf.runs import round_name


def read_judgments(path: Path) -> tuple[list[dict], Counter]:
    """Complete, parseable lines of a judgment log, read without changing it (a server may be running)."""
    counts = Counter()
    if not path.exists():
        return [], counts
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        counts["incomplete_last_line"] += 1
    out = []
    for line in data[:end].splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            _ = rec["labeler"], rec["prompt_id"], rec["preferred"], rec["idempotency_key"]
        except (ValueError, KeyError, TypeError):
            counts["unreadable_line"] += 1
            continue
        out.append(rec)
    return out, counts


def fleiss_kappa(tables: list[Counter]) -> float | None:
    """Fleiss' kappa for items rated by varying numbers of raters (each Counter: answer -> raters)."""
    items = [t for t in tables if sum(t.values()) >= 2]
    if not items:
        return None
    p_items, totals, n_all = [], Counter(), 0
    for t in items:
        n = sum(t.values())
        p_items.append((sum(v * v for v in t.values()) - n) / (n * (n - 1)))
        totals.update(t)
        n_all += n
    p_bar = sum(p_items) / len(p_items)
    p_e = sum((v / n_all) ** 2 for v in totals.values())
    return None if p_e >= 1 else (p_bar - p_e) / (1 - p_e)


def run_import(cfg, run_dir: Path, round_no: int) -> dict:
    from rlhf.data.prepare import write_rows

    out = round_files(run_dir, round_no)
    batch = Batch.load(run_dir, round_no)
    prov = {}
    if out.provenance.exists():
        lines = out.provenance.read_text().splitlines()
        prov = {p["prompt_id"]: p["candidates"] for p in (json.loads(line) for line in lines if line.strip())}
    decided, counts = _decided(batch, out.judgments)
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    for r in decided.values():
        by_prompt[r["prompt_id"]].append(r)
    source = f"labels:{round_name(round_no)}"
    pairs, answers, stage_wins, tables = [], Counter(), Counter(), []
    agree_same = agree_all = 0
    for pid, judged in sorted(by_prompt.items()):
        row = batch.by_prompt[pid]
        votes = Counter(j["preferred"] for j in judged)
        answers.update("candidate" if a not in SPECIAL else a for a in (j["preferred"] for j in judged))
        if len(judged) >= 2:
            tables.append(Counter({_answer(row, a): n for a, n in votes.items()}))
            for a, b in combinations([j["preferred"] for j in judged], 2):
                agree_all += 1
                agree_same += a == b
        pairs += _pairs(batch.batch_id, row, votes, sorted(j["labeler"] for j in judged), prov.get(pid, {}), source)
    for p in pairs:
        stages = json.loads(p["provenance"])
        if stages["chosen_stage"] and stages["rejected_stage"]:
            stage_wins[f"{stages['chosen_stage']}>{stages['rejected_stage']}"] += 1
    write_rows(pairs, out.pairs)
    per_labeler = Counter(j["labeler"] for j in decided.values())
    summary = {
        "round": round_no,
        "batch_id": batch.batch_id,
        "imported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "prompts": len(batch.rows),
        "prompts_judged": len(by_prompt),
        "judgments": dict(counts),
        "answers": dict(answers),
        "pairs": len(pairs),
        "labelers": dict(sorted(per_labeler.items())),
        "agreement": {
            "prompts_with_2plus": len(tables),
            "pairwise": agree_same / agree_all if agree_all else None,
            "fleiss_kappa": fleiss_kappa(tables),
        },
        "stage_wins": dict(stage_wins),
    }
    out.summary.write_text(json.dumps(summary, indent=2))
    print(
        f"label import: {counts['used']} judgments ({counts['duplicate']} duplicates dropped) from "
        f"{len(per_labeler)} labelers -> {len(pairs)} pairs in {out.pairs} (source {source})"
    )
    if stage_wins:
        print(f"label import: stage wins {dict(stage_wins)}")
    return summary


def _decided(batch: Batch, path: Path) -> tuple[dict, Counter]:
    """One decision per (labeler, prompt) of this batch; repeated keys and lines count once, judgments of another
    batch, an unknown prompt or an unknown candidate are dropped and counted."""
    records, counts = read_judgments(path)
    counts["read"] = len(records)
    keys, decided = set(), {}
    for r in records:
        if r.get("batch_id") != batch.batch_id or r["prompt_id"] not in batch.by_prompt:
            counts["other_batch_or_unknown_prompt"] += 1
            continue
        row = batch.by_prompt[r["prompt_id"]]
        if r["preferred"] not in (*[c["candidate_id"] for c in row["candidates"]], *SPECIAL):
            counts["unknown_candidate"] += 1
            continue
        if (r["labeler"], r["idempotency_key"]) in keys or (r["labeler"], r["prompt_id"]) in decided:
            counts["duplicate"] += 1
            continue
        keys.add((r["labeler"], r["idempotency_key"]))
        decided[(r["labeler"], r["prompt_id"])] = r
    counts["used"] = len(decided)
    return decided, counts


def _pairs(batch_id: str, row: dict, votes: Counter, labelers: list[str], prov: dict, source: str) -> list[dict]:
    """X beats Y when more labelers picked X than Y: one pair per such (X, Y); an even split gives none. The pair
    carries the prompt's context (history, ratings, candidates) for the reward terms, as the data stage's do."""
    text = {c["candidate_id"]: c["text"] for c in row["candidates"]}
    context = {f: row[f] for f in ("history_ids", "history_ratings", "candidate_ids", "shown") if f in row}
    out = []
    for x, y in combinations(sorted(text), 2):
        if votes[x] == votes[y]:
            continue
        win, lose = (x, y) if votes[x] > votes[y] else (y, x)
        info = {
            "batch_id": batch_id,
            "prompt_id": row["prompt_id"],
            "chosen": win,
            "rejected": lose,
            "votes": {k: votes[k] for k in (win, lose)},
            "labelers": labelers,
            "chosen_stage": prov.get(win, {}).get("stage"),
            "rejected_stage": prov.get(lose, {}).get("stage"),
        }
        out.append(
            {
                "prompt": row["prompt"],
                "chosen": [{"role": "assistant", "content": text[win]}],
                "rejected": [{"role": "assistant", "content": text[lose]}],
                "source": source,
                "user_id": row["user_id"],
                "provenance": json.dumps(info, sort_keys=True),
                **context,
            }
        )
    return out


def _answer(row: dict, preferred: str) -> str:
    """An answer comparable across prompts: the shown position of the picked list, or tie / both_bad."""
    if preferred in SPECIAL:
        return preferred
    ids = [c["candidate_id"] for c in row["candidates"]]
    return f"position-{ids.index(preferred) + 1}"
