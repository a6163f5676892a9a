"""The round table of `rlhf rounds`: a row per round, read from what the round kept (rounds/round-NNN/), its labeling
round's summary and rounds/state.json. The rounds command, `rlhf status`, the eval report and
bench/rounds_vs_updates.py show it.

Per round: the policy's true utility (the simulator's) and ndcg@K on eval's held-out users, with the paired
difference of true utility against SFT; the learned reward model's Pearson correlation with true utility on the
policy's own listings (eval's reward_vs_truth by stage: the round's reward model scoring the round's policy); KL to
SFT; coverage; the preference pairs the round added, its judgments and labeler agreement (share of agreeing labeler
pairs, Fleiss' kappa); the reward model's held-out accuracy overall and on this round's pairs; RL updates so far.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhf.runs import RunDir, round_name

# (key, header) of the table as printed and reported
COLUMNS = [
    ("round", "round"),
    ("policy", "policy"),
    ("rl_updates", "RL updates"),
    ("true_utility", "true utility"),
    ("vs_sft", "− SFT ± SE"),
    ("ndcg", "ndcg@K"),
    ("learned_vs_truth", "learned r"),
    ("kl_to_sft", "KL"),
    ("coverage", "coverage"),
    ("pairs_added", "pairs added"),
    ("agreement", "agreement"),
    ("rm_accuracy", "RM acc"),
    ("rm_accuracy_round", "RM acc (round)"),
]


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def read_state(run: RunDir) -> dict:
    """rounds/state.json, or {} when the run has no rounds."""
    return _json(run.rounds.state)


def round_rows(run: RunDir) -> list[dict]:
    """One row per round the loop has begun (round 0: where it started), None where a figure is not there yet."""
    state, rows, updates = read_state(run), [], 0
    for key in sorted((state.get("rounds") or {}), key=int):
        r, entry = int(key), state["rounds"][key]
        snap = run.rounds.round(r)
        updates += _json(snap.ppo.summary).get("updates") or 0
        label_round = (entry.get("export") or {}).get("label_round")
        labels = _json(run.labels.round(label_round).summary) if label_round else {}
        rm = _json(snap.reward.metrics)
        agreement = labels.get("agreement") or {}
        steps = entry.get("steps") or []
        rows.append(
            {
                "round": r,
                "label_round": label_round,
                "state": "done" if "eval" in steps else f"at {_next(r, steps)}",
                "rl_updates": updates,
                **eval_figures(_json(snap.eval.metrics)),
                "pairs_added": labels.get("pairs"),
                "judgments": (labels.get("judgments") or {}).get("used"),
                "agreement": agreement.get("pairwise"),
                "fleiss_kappa": agreement.get("fleiss_kappa"),
                "rm_accuracy": rm.get("val_accuracy"),
                "rm_accuracy_round": _round_accuracy(rm, label_round),
            }
        )
    return rows


def eval_figures(m: dict) -> dict:
    """The policy's figures in one eval/metrics.json: the RL stage when it was evaluated, else SFT."""
    stages = m.get("stages") or {}
    policy = "ppo" if "ppo" in stages else "sft" if stages else None
    s = stages.get(policy) or {}
    truth = ((m.get("reward_vs_truth") or {}).get("by_stage") or {}).get(policy) or {}
    return {
        "policy": policy,
        "true_utility": s.get("true_utility"),
        "vs_sft": ((m.get("vs_sft") or {}).get(policy) or {}).get("true_utility"),
        "ndcg": s.get(f"ndcg@{m.get('k')}"),
        "k": m.get("k"),
        "learned_vs_truth": truth.get("learned"),
        "reward_vs_truth": truth.get("reward"),
        "kl_to_sft": s.get("kl_to_sft"),
        "coverage": s.get("coverage"),
    }


def _next(r: int, steps: list[str]) -> str:
    from rlhf.rounds import ROUND_STEPS, START_STEPS

    return next((s for s in (START_STEPS if r == 0 else ROUND_STEPS) if s not in steps), "eval")


def _round_accuracy(rm: dict, label_round: int | None) -> float | None:
    if not label_round:
        return None
    return ((rm.get("val_by_round") or {}).get(f"labels:{round_name(label_round)}") or {}).get("accuracy")


def cell(key: str, value) -> str:
    """A figure as the table shows it: '–' when absent."""
    if value is None:
        return "–"
    if key == "vs_sft":
        return f"{value['delta']:+.3f} ± {value['se']:.3f}"
    if key in ("learned_vs_truth", "reward_vs_truth"):
        return f"{value:+.2f}"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """(headers, cells) for the templates and the text table; ndcg's K filled in from the rows."""
    k = next((row["k"] for row in rows if row.get("k")), "K")
    headers = [h.replace("@K", f"@{k}") for _, h in COLUMNS]
    return headers, [[cell(key, row.get(key)) for key, _ in COLUMNS] for row in rows]


def render(rows: list[dict]) -> str:
    """The round table as fixed-width text."""
    if not rows:
        return "rounds: none yet"
    headers, cells = table(rows)
    widths = [max(len(h), *(len(c[j]) for c in cells)) for j, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
