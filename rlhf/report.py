"""The evaluation report: a metrics table (stages beside baselines), paired comparisons, how each reward term
tracks true utility, the round table when the run has `rlhf rounds`, plots and example listings, as Markdown and HTML
from one Jinja template pair (rlhf/templates/report.{md,html}.j2). The HTML template is autoescaped: titles and
generations are untrusted text.
"""

from __future__ import annotations

import json

from rlhf.metrics import describe_eval

TABLE_METRICS = [
    "valid_rate",
    "grounded_rate",
    "hr@{k}",
    "ndcg@{k}",
    "recall@{k}",
    "hr@1",
    "true_utility",
    "sim_ctr",
    "duplicate_rate",
    "history_repeat_rate",
    "out_of_candidates_rate",
    "coverage",
    "novelty",
    "diversity",
    "popularity_bias",
    "faithfulness",
    "rating_claims_correct",
    "explanation_words",
    "reward/reward",
    "reward/learned",
    "kl_to_sft",
]


def _fmt(v) -> str:
    if v is None:
        return "–"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def table_rows(results: dict) -> tuple[list[str], list[tuple[str, dict]]]:
    k = results["k"]
    cols = [m.format(k=k) for m in TABLE_METRICS]
    entries = [(f"{s} (LLM)", v) for s, v in results["stages"].items()]
    entries += [(f"{b} (baseline)", v) for b, v in results["baselines"].items()]
    cols = [c for c in cols if any(v.get(c) is not None for _, v in entries)]
    return cols, entries


def _plots(run, results: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir = run.eval.plots
    plot_dir.mkdir(parents=True, exist_ok=True)
    made = []
    mpath = run.ppo.metrics
    if mpath.exists():
        rows = [json.loads(line) for line in mpath.read_text().splitlines() if line.strip()]
        if rows:
            x = [r["update"] for r in rows]
            series = [
                ("objective/scores", "composite reward"),
                ("reward/learned", "learned RM score"),
                ("objective/kl", "KL to SFT"),
                ("reward/true_utility", "true utility (simulator)"),
            ]
            series = [(key, label) for key, label in series if any(key in r for r in rows)]
            fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3.2))
            for ax, (key, label) in zip(axes if len(series) > 1 else [axes], series):
                ax.plot(x, [r.get(key) for r in rows], marker="o")
                ax.set_title(label)
                ax.set_xlabel("PPO update")
                ax.grid(alpha=0.3)
            fig.tight_layout()
            fig.savefig(plot_dir / "ppo_curves.png", dpi=110)
            plt.close(fig)
            made.append("plots/ppo_curves.png")
    k = results["k"]
    for metric in [f"hr@{k}", f"ndcg@{k}", "true_utility", "valid_rate"]:
        names, vals = [], []
        for group in ("stages", "baselines"):
            for name, v in results[group].items():
                if v.get(metric) is not None:
                    names.append(name)
                    vals.append(v[metric])
        if not vals:
            continue
        fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(names)), 3.2))
        colors = ["tab:blue" if n in results["stages"] else "tab:gray" for n in names]
        ax.bar(names, vals, color=colors)
        ax.set_title(f"{metric} (blue: LLM stages, grey: baselines)")
        ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        fname = f"plots/bars_{metric.replace('@', '_at_').replace('/', '_')}.png"
        fig.savefig(run.eval.dir / fname, dpi=110)
        plt.close(fig)
        made.append(fname)
    return made


def _comparison_rows(results: dict) -> list[dict]:
    """One row per (LLM stage, baseline): paired differences of true utility and ndcg@K on the same users."""
    k, rows = results["k"], []
    for stage, by_baseline in results.get("vs_baselines", {}).items():
        for baseline, diffs in by_baseline.items():
            cells = {m: (f"{d['delta']:+.3f} ± {d['se']:.3f}" if d else "–") for m, d in diffs.items()}
            rows.append(
                {
                    "name": f"{stage} − {baseline}",
                    "true_utility": cells.get("true_utility", "–"),
                    "ndcg": cells.get(f"ndcg@{k}", "–"),
                }
            )
    return rows


def _term_rows(results: dict) -> list[tuple[str, str]]:
    terms = (results.get("reward_vs_truth") or {}).get("terms") or {}
    return [(name, "n/a" if r is None else f"{r:+.2f}") for name, r in terms.items()]


def _examples(users, examples: dict[str, list[str]]) -> list[dict]:
    out = []
    for j, row in enumerate(users.rows[: max((len(v) for v in examples.values()), default=0)]):
        history = "; ".join(users.catalog[i].display for i in row["history_ids"][-8:] if i in users.catalog)
        stages = [(stage, texts[j]) for stage, texts in examples.items() if j < len(texts)]
        out.append({"user_id": str(row["user_id"]), "history": history, "stages": stages})
    return out


def report_from_files(run, num_examples: int) -> None:
    """Write eval's report again from eval/metrics.json and eval/listings.jsonl alone (no model): what `rlhf rounds`
    does once a round's eval is kept, so the report's round table has that round's row."""
    from rlhf.evaluate import HeldOutUsers

    results = json.loads(run.eval.metrics.read_text())
    users = HeldOutUsers(run, results["split"], results["users"])
    examples: dict[str, list[str]] = {}
    for line in run.eval.listings.read_text().splitlines() if run.eval.listings.exists() else []:
        row = json.loads(line)
        texts = examples.setdefault(row["stage"], [])
        if len(texts) < num_examples:
            texts.append(row["text"])
    write_report(run, results, users, examples)


def write_report(run, results: dict, users, examples: dict[str, list[str]]) -> None:
    """eval/report.md and eval/report.html of a RunDir, and the plots they show."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    from rlhf.round_table import round_rows, table

    cols, entries = table_rows(results)
    k = results["k"]
    cold = [
        (name, [_fmt(v.get(c)) for c in ("valid_rate", f"hr@{k}", f"ndcg@{k}", "true_utility")])
        for group in ("stages", "baselines")
        for name, v in results["cold_start"][group].items()
    ]
    view = {
        "title": f"Evaluation of {run.root}",
        "results": results,
        "k": k,
        "cols": cols,
        "rows": [(name, "(LLM)" in name, [_fmt(v.get(c)) for c in cols]) for name, v in entries],
        "summary": describe_eval(results),
        "comparisons": _comparison_rows(results),
        "terms": _term_rows(results),
        "cold": cold,
        "plots": _plots(run, results),
        "examples": _examples(users, examples),
        "notes": results.get("notes") or [],
        "rounds": table(rows) if (rows := round_rows(run)) else None,
    }
    env = Environment(
        loader=PackageLoader("rlhf", "templates"),
        autoescape=select_autoescape(["html", "html.j2"]),  # report.html.j2: every value from data is escaped
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    run.eval.report_md.write_text(env.get_template("report.md.j2").render(**view))
    run.eval.report_html.write_text(env.get_template("report.html.j2").render(**view))
