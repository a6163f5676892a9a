"""`rlhf status --run RUN [--json]`: where a run stands, read from its artifacts alone (nothing is loaded or run).

    rlhf status --run runs/demo
    rlhf status --run runs/demo --json

For each stage (data, sft, reward, ppo, eval): done, interrupted (its folder holds less than the files it writes
last, e.g. PPO checkpoints without the final adapter) or missing (``RunDir.state``), with its key figures: data
counts, SFT's valid-listing rate, the reward model's held-out accuracy, PPO's updates and last reward, eval's
table against the baselines. Then each labeling round, the round table of `rlhf rounds` (rlhf/round_table.py) with
the step an unfinished loop is at, and the next command to run.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhf.runs import MAKERS, STAGES, RunDir

TABLE_COLUMNS = ("valid_rate", "hr@{k}", "ndcg@{k}", "true_utility")


def read_json(path: Path) -> dict | None:
    """A JSON file's object, or None when it is absent or half-written."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_jsonl(path: Path) -> list[dict]:
    """The readable lines of a JSON-lines file (a killed writer may leave half a line)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def data_figures(run: RunDir) -> dict:
    s = read_json(run.data.summary) or {}
    return {k: s[k] for k in ("users", "items", "interactions") if k in s}


def sft_figures(run: RunDir) -> dict:
    m = read_json(run.sft.metrics) or {}
    return {
        "steps": m.get("steps"),
        "last_loss": m.get("last_loss"),
        "valid_rate": (m.get("samples_after") or {}).get("valid_rate"),
        "valid_rate_before": (m.get("samples_before") or {}).get("valid_rate"),
    }


def reward_figures(run: RunDir) -> dict:
    m = read_json(run.reward.metrics) or {}
    by_source = {s: v.get("accuracy") for s, v in (m.get("val_by_source") or {}).items()}
    return {"steps": m.get("steps"), "accuracy": m.get("val_accuracy"), "accuracy_by_source": by_source}


def ppo_figures(run: RunDir) -> dict:
    from rlhf.checkpoint import latest

    rows = [r for r in read_jsonl(run.ppo.metrics) if "update" in r]
    last = rows[-1] if rows else {}
    ckpt = latest(run.ppo.checkpoints)
    run_cfg = _run_config(run).get("ppo") or {}
    summary = read_json(run.ppo.summary) or {}
    return {
        "updates": last.get("update", 0),
        "total_updates": summary.get("updates", run_cfg.get("total_updates")),
        "checkpoint": int(ckpt.name.removeprefix("update-")) if ckpt else None,
        "last_reward": last.get("reward/reward"),  # the composite's mean over the update's rollouts
        "last_score": last.get("objective/scores"),  # what PPO optimised: the composite less the no-EOS penalty
        "last_true_utility": last.get("reward/true_utility"),
    }


def eval_figures(run: RunDir) -> dict:
    m = read_json(run.eval.metrics)
    if not m:
        return {}
    k = m.get("k")
    columns = [c.format(k=k) for c in TABLE_COLUMNS]
    table = [
        {"row": name, "kind": kind, **{c: values.get(c) for c in columns}}
        for part, kind in (("stages", "llm"), ("baselines", "baseline"))
        for name, values in (m.get(part) or {}).items()
    ]
    return {"k": k, "users": m.get("users"), "split": m.get("split"), "columns": columns, "table": table}


FIGURES = {"data": data_figures, "sft": sft_figures, "reward": reward_figures, "ppo": ppo_figures, "eval": eval_figures}


def _run_config(run: RunDir) -> dict:
    import yaml

    try:
        return yaml.safe_load(run.config.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def rounds(run: RunDir) -> list[dict]:
    """Each labeling round: imported (pairs made), judging (judgments, not imported), exported (no judgment yet)
    or interrupted (no batch)."""
    out = []
    for folder in sorted(run.labels.dir.glob("round-*")) if run.labels.dir.is_dir() else []:
        if not folder.is_dir() or not folder.name.removeprefix("round-").isdigit():
            continue
        files = run.labels.round(int(folder.name.removeprefix("round-")))
        summary = read_json(files.summary)
        judgments = len(read_jsonl(files.judgments))
        if summary is not None:
            state = "imported"
        elif files.batch.exists():
            state = "judging" if judgments else "exported"
        else:
            state = "interrupted"
        entry = {"round": int(folder.name.removeprefix("round-")), "state": state, "judgments": judgments}
        entry["prompts"] = len(read_jsonl(files.batch))
        if summary is not None:
            entry["pairs"] = summary.get("pairs")
            entry["fleiss_kappa"] = (summary.get("agreement") or {}).get("fleiss_kappa")
        out.append(entry)
    return out


# what each stage reads from the stages before it; a done stage older than one of them is out of date
UPSTREAM = {"sft": ("data",), "reward": ("data", "sft"), "ppo": ("sft", "reward"), "eval": ("sft", "reward", "ppo")}


def older_than(run: RunDir, stage: str, label_rounds: list[dict]) -> list[str]:
    """The stages (and, for the reward model, imported labeling rounds with pairs) that finished after this done
    stage began writing its results: it was made from what they have since replaced."""
    started = min(p.stat().st_mtime for p in run.finals(stage))
    newer = [
        up
        for up in UPSTREAM.get(stage, ())
        if run.done(up) and max(p.stat().st_mtime for p in run.finals(up)) > started
    ]
    if stage == "reward":
        pairs = {r["round"]: run.labels.round(r["round"]).pairs for r in label_rounds if r.get("pairs")}
        newer += [f"round-{n:03d}" for n, p in pairs.items() if p.exists() and p.stat().st_mtime > started]
    return newer


def loop_figures(run: RunDir) -> dict | None:
    """`rlhf rounds`: rounds asked for and done, the step an unfinished round is at (running, or stopped there: the
    files cannot tell), and the round table."""
    from rlhf.round_table import round_rows

    rows = round_rows(run)
    if not rows:
        return None
    target = (_run_config(run).get("rounds") or {}).get("rounds")
    done = sum(1 for row in rows if row["round"] and row["state"] == "done")
    unfinished = next((row for row in rows if row["state"] != "done"), None)
    return {
        "target": target,
        "done": done,
        "unfinished": {"round": unfinished["round"], "step": unfinished["state"][3:]} if unfinished else None,
        "table": rows,
    }


def next_command(run: RunDir, stages: dict, label_rounds: list[dict], loop: dict | None = None) -> str | None:
    """An unfinished `rlhf rounds` loop (it resumes), else the first stage not done (PPO with a checkpoint resumes),
    else the first one out of date, else a round waiting for judgments or their import. None when nothing is left."""
    root = run.root
    if loop and (loop["unfinished"] or (loop["target"] or 0) > loop["done"]):
        return f"rlhf rounds --run {root} --rounds {max(loop['target'] or 0, loop['done'])}"
    for stage in STAGES:
        info = stages[stage]
        if info["state"] == "done":
            continue
        command = MAKERS[stage].format(run=root)
        if stage == "ppo" and info.get("checkpoint"):
            command += " --resume"
        if stage == "data" and run.config.exists():  # prepare again with the settings it started with
            command += f" --config {run.config}"
        return command
    for stage in STAGES:
        if stages[stage].get("older_than"):
            return MAKERS[stage].format(run=root)
    for r in label_rounds:
        if r["state"] == "exported":
            return f"rlhf label serve --run {root} --round {r['round']}"
        if r["state"] == "judging":
            return f"rlhf label import --run {root} --round {r['round']}"
    return None


def status(run_dir: Path) -> dict:
    """Everything `rlhf status` shows, as one JSON-ready dict."""
    run = RunDir(run_dir)
    stages = {}
    for stage in STAGES:
        state = run.state(stage)
        info = {"state": state}
        if state == "interrupted":
            info["unfinished"] = [str(p.relative_to(run.root)) for p in run.unfinished(stage)]
        if state != "missing":
            info.update({k: v for k, v in FIGURES[stage](run).items() if v is not None})
        stages[stage] = info
    label_rounds = rounds(run)
    for stage, info in stages.items():
        if info["state"] == "done" and (newer := older_than(run, stage, label_rounds)):
            info["older_than"] = newer
    loop = loop_figures(run)
    return {
        "run": str(run.root),
        "exists": run.root.is_dir(),
        "stages": stages,
        "rounds": label_rounds,
        "loop": loop,
        "next": next_command(run, stages, label_rounds, loop),
        "report": str(run.eval.report_html) if run.eval.report_html.exists() else None,
    }


def _num(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _describe(stage: str, info: dict) -> str:
    """One line of figures per stage."""
    if stage == "data":
        return ", ".join(f"{info[k]} {k}" for k in ("users", "items", "interactions") if k in info)
    if stage == "sft" and "steps" in info:
        return (
            f"{info['steps']} steps, last loss {_num(info.get('last_loss'))}, held-out valid listings "
            f"{_num(info.get('valid_rate_before'), 2)} -> {_num(info.get('valid_rate'), 2)}"
        )
    if stage == "reward" and "steps" in info:
        per = ", ".join(f"{s} {_num(a)}" for s, a in info.get("accuracy_by_source", {}).items())
        return f"{info['steps']} steps, held-out pair accuracy {_num(info.get('accuracy'))}" + (
            f" ({per})" if per else ""
        )
    if stage == "ppo":
        text = f"{info.get('updates', 0)} of {_num(info.get('total_updates'))} updates"
        if "checkpoint" in info and info["state"] != "done":
            text += f", checkpoint at update {info['checkpoint']}"
        if "last_reward" in info:
            text += f", last reward {_num(info['last_reward'])}"
        if "last_score" in info:
            text += f" (score {_num(info['last_score'])})"
        if "last_true_utility" in info:
            text += f", true utility {_num(info['last_true_utility'])}"
        return text
    if stage == "eval" and "table" in info:
        return f"K={info['k']}, {info.get('users', '?')} {info.get('split') or 'held-out'} users"
    return ""


def render(st: dict) -> str:
    """The human-readable view of ``status()``."""
    lines = [f"run {st['run']}" + ("" if st["exists"] else " (no such directory)")]
    for stage, info in st["stages"].items():
        text = _describe(stage, info) if info["state"] != "missing" else ""
        if info.get("unfinished"):
            text += ("; " if text else "") + "not written: " + ", ".join(info["unfinished"])
        if info.get("older_than"):
            text += f"; out of date: made before the latest {', '.join(info['older_than'])}"
        lines.append(f"  {stage:<7} {info['state']:<12} {text}".rstrip())
    for r in st["rounds"]:
        figures = f"{r['prompts']} prompts, {r['judgments']} judgments"
        if r["state"] == "imported":
            figures += f", {r.get('pairs')} pairs, Fleiss' kappa {_num(r.get('fleiss_kappa'), 2)}"
        lines.append(f"  labels  round-{r['round']:03d} {r['state']}: {figures}")
    lines += _render_loop(st.get("loop"))
    ev = st["stages"]["eval"]
    if ev.get("table"):
        names = [f"{row['row']} ({'LLM' if row['kind'] == 'llm' else 'baseline'})" for row in ev["table"]]
        width = max(map(len, names)) + 2
        lines.append("eval:")
        lines.append("  " + " " * width + "".join(f"{c:>14}" for c in ev["columns"]))
        for name, row in zip(names, ev["table"]):
            lines.append("  " + f"{name:<{width}}" + "".join(f"{_num(row.get(c)):>14}" for c in ev["columns"]))
    if st["report"]:
        lines.append(f"report: {st['report']}")
    lines.append(f"next: {st['next']}" if st["next"] else "next: nothing left to run")
    return "\n".join(lines)


def _render_loop(loop: dict | None) -> list[str]:
    from rlhf.round_table import render as render_table

    if not loop:
        return []
    head = f"rounds: {loop['done']} of {_num(loop['target'])} done"
    if loop["unfinished"]:
        head += f"; round {loop['unfinished']['round']} unfinished, at step {loop['unfinished']['step']}"
    return [head, *("  " + line for line in render_table(loop["table"]).splitlines())]


def run_status(run_dir, as_json: bool = False) -> int:
    st = status(Path(run_dir))
    print(json.dumps(st, indent=2) if as_json else render(st))
    return 0
