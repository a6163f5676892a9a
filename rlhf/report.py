"""The evaluation report: a metrics table (stages beside baselines), plots, and example listings.

Everything from data or the model is HTML-escaped: titles and generations are untrusted text.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

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


def _plots(run_dir: Path, results: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir = run_dir / "eval" / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    made = []
    mpath = run_dir / "ppo" / "metrics.jsonl"
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
        fig.savefig(run_dir / "eval" / fname, dpi=110)
        plt.close(fig)
        made.append(fname)
    return made


def write_report(run_dir: Path, results: dict, ctx, examples: dict[str, list[str]]) -> None:
    out = run_dir / "eval"
    plots = _plots(run_dir, results)
    cols, entries = table_rows(results)
    k = results["k"]
    # -- markdown ---------------------------------------------------------------------------------
    md = [
        f"# Evaluation of {run_dir}",
        "",
        f"{results['users']} held-out users ({results['split']} split), K={k}, mode={results['mode']}. "
        "hr@1 is divided by all prompts (S-DPO's convention); see valid_rate for LLaRA's.",
        "",
        "| | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    md += [f"| {name} | " + " | ".join(_fmt(v.get(c)) for c in cols) + " |" for name, v in entries]
    summary = describe_eval(results)  # against SFT, and the reward against true utility
    if summary:
        md += [""] + [f"- {line}" for line in summary]
    if results["cold_start"]["users"]:
        md += [
            "",
            f"## Cold-start users ({results['cold_start']['users']})",
            "",
            f"| | valid_rate | hr@{k} | ndcg@{k} | true_utility |",
            "|---|---|---|---|---|",
        ]
        for group in ("stages", "baselines"):
            for name, v in results["cold_start"][group].items():
                md.append(
                    f"| {name} | {_fmt(v.get('valid_rate'))} | {_fmt(v.get(f'hr@{k}'))} | "
                    f"{_fmt(v.get(f'ndcg@{k}'))} | {_fmt(v.get('true_utility'))} |"
                )
    md += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    md += ["", "## Example listings", ""]
    for j, row in enumerate(ctx.rows[: max((len(v) for v in examples.values()), default=0)]):
        md += [
            f"### User {row['user_id']}",
            "",
            "History: " + "; ".join(ctx.catalog[i].display for i in row["history_ids"][-8:] if i in ctx.catalog),
            "",
        ]
        for stage, texts in examples.items():
            if j < len(texts):
                md += [f"**{stage}**", "", "```", texts[j], "```", ""]
    if results.get("notes"):
        md += ["## Notes", ""] + [f"- {n}" for n in results["notes"]]
    (out / "report.md").write_text("\n".join(md) + "\n")
    # -- html -------------------------------------------------------------------------------------
    e = html.escape
    h = [
        "<!doctype html><html><head><meta charset='utf-8'><title>rec-rlhf evaluation</title><style>",
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}",
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:4px 6px;text-align:right}",
        "th:first-child,td:first-child{text-align:left}tr.llm{background:#eef4ff}",
        "pre{background:#f6f6f6;padding:8px;white-space:pre-wrap;font-size:13px}.ex{display:flex;gap:1em}",
        ".ex>div{flex:1;min-width:0}img{max-width:100%;border:1px solid #ddd;margin:4px}</style></head><body>",
        f"<h1>Evaluation of {e(str(run_dir))}</h1>",
        f"<p>{results['users']} held-out users ({e(results['split'])} split), K={k}, mode={e(results['mode'])}. "
        "hr@1 is divided by all prompts (S-DPO's convention); valid_rate gives LLaRA's denominator.</p>",
        "<h2>Metrics</h2><table><tr><th></th>" + "".join(f"<th>{e(c)}</th>" for c in cols) + "</tr>",
    ]
    for name, v in entries:
        cls = " class='llm'" if "(LLM)" in name else ""
        h.append(f"<tr{cls}><td>{e(name)}</td>" + "".join(f"<td>{_fmt(v.get(c))}</td>" for c in cols) + "</tr>")
    h.append("</table>")
    if summary:
        h.append("<ul>" + "".join(f"<li>{e(line)}</li>" for line in summary) + "</ul>")
    if results["cold_start"]["users"]:
        h.append(
            f"<h2>Cold-start users ({results['cold_start']['users']})</h2><table><tr><th></th><th>valid_rate</th>"
            f"<th>hr@{k}</th><th>ndcg@{k}</th><th>true_utility</th></tr>"
        )
        for group in ("stages", "baselines"):
            for name, v in results["cold_start"][group].items():
                h.append(
                    f"<tr><td>{e(name)}</td><td>{_fmt(v.get('valid_rate'))}</td><td>{_fmt(v.get(f'hr@{k}'))}</td>"
                    f"<td>{_fmt(v.get(f'ndcg@{k}'))}</td><td>{_fmt(v.get('true_utility'))}</td></tr>"
                )
        h.append("</table>")
    h.append("<h2>Plots</h2>" + "".join(f"<img src='{e(p)}' alt='{e(p)}'>" for p in plots))
    h.append("<h2>Example listings</h2>")
    for j, row in enumerate(ctx.rows[: max((len(v) for v in examples.values()), default=0)]):
        hist = "; ".join(ctx.catalog[i].display for i in row["history_ids"][-8:] if i in ctx.catalog)
        h.append(f"<h3>User {e(str(row['user_id']))}</h3><p><b>History:</b> {e(hist)}</p><div class='ex'>")
        for stage, texts in examples.items():
            if j < len(texts):
                h.append(f"<div><b>{e(stage)}</b><pre>{e(texts[j]) or '(empty output)'}</pre></div>")
        h.append("</div>")
    if results.get("notes"):
        h.append("<h2>Notes</h2><ul>" + "".join(f"<li>{e(n)}</li>" for n in results["notes"]) + "</ul>")
    h.append("</body></html>")
    (out / "report.html").write_text("\n".join(h))
