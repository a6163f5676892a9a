"""PPO, GRPO and RLOO on the same run and budget: true-utility gain over SFT with its paired standard error, KL to
SFT, coverage, seconds per update and peak memory, and each algorithm against the first on the same users.

    python bench/rl_compare.py --run runs/demo [--algos ppo,grpo,rloo] [--updates 10 | --seconds 900]
                               [--config recipes/demo.yaml] [--keep DIR] [--json FILE] [section.field=value ...]

Needs a run with data/, sft/ and reward/ (e.g. after `make demo`; its own ppo/ and eval/ are not touched). Each
algorithm gets a scratch run linking those folders and copying config.yaml, then `rlhf rl --algo A` with the budget
(``--updates N``: ppo.total_updates=N; ``--seconds S``: ppo.max_seconds=S at a constant learning rate, at most
--updates updates) and the trailing overrides, then `rlhf eval --stages sft,ppo` (the run's eval section: its
users, split and budget). Greedy SFT listings are the same in every copy, so the SFT column is one column.

Columns: true utility − SFT ± paired SE (eval's vs_sft), composite reward − SFT ± SE, KL to SFT (eval's kl_to_sft,
per listing), coverage (share of the catalog recommended), updates done, s/update (median after the first), peak
RSS of the RL process (GPU peak under CUDA); then each algorithm − the first on the same users (true utility).
CPU runs are not bit-reproducible: repeat before believing a difference of less than ~3 standard errors.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import device, run_child, scratch_run


def train_and_eval(algo: str, work: Path, args) -> dict:
    config = ["--config", args.config] if args.config else []
    budget = [f"ppo.total_updates={args.updates}"]
    if args.seconds:
        budget += [f"ppo.max_seconds={args.seconds}", "ppo.lr_scheduler=constant"]
    t0 = time.time()
    proc, peak = run_child(
        [sys.executable, "-m", "rlhf", "rl", "--algo", algo, "--run", str(work), *config, *budget, *args.overrides]
    )
    if proc.returncode:
        raise SystemExit(f"rlhf rl --algo {algo} failed:\n{proc.stderr[-3000:]}")
    seconds = time.time() - t0
    proc, _ = run_child([sys.executable, "-m", "rlhf", "eval", "--run", str(work), *config, "--stages", "sft,ppo"])
    if proc.returncode:
        raise SystemExit(f"rlhf eval after {algo} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(x) for x in (work / "ppo" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    metrics = json.loads((work / "eval" / "metrics.json").read_text())
    steady = rows[1:] or rows
    return {
        "algorithm": algo,
        "updates": json.loads((work / "ppo" / "summary.json").read_text())["updates"],
        "rl_seconds": round(seconds, 1),
        "s_per_update": statistics.median(r["time/update_s"] for r in steady) if steady else None,
        "peak_rss_gb": round(peak, 2),
        "gpu_peak_gb": rows[-1].get("memory/gpu_peak_gb") if rows else None,
        "vs_sft": metrics["vs_sft"]["ppo"],
        "kl_to_sft": metrics["stages"]["ppo"]["kl_to_sft"],
        "coverage": metrics["stages"]["ppo"]["coverage"],
        "true_utility": metrics["stages"]["ppo"]["true_utility"],
        "sft_true_utility": metrics["stages"]["sft"]["true_utility"],
        "per_user": per_user_truth(work, metrics),
    }


def per_user_truth(work: Path, metrics: dict) -> list | None:
    """The PPO-stage listings' true utility per held-out user, computed as eval computes it (None without the
    simulator); its mean is checked against eval's figure."""
    from rlhf.config import load_config
    from rlhf.evaluate import HeldOutUsers, list_metrics
    from rlhf.listing import parse_and_ground
    from rlhf.runs import RunDir

    run = RunDir(work)
    ec = load_config(None, run_config=run.config).eval
    users = HeldOutUsers(run, ec.split, ec.max_users)
    texts = [r["text"] for r in map(json.loads, run.eval.listings.read_text().splitlines()) if r["stage"] == "ppo"]
    parsed = [parse_and_ground(t, users.catalog) for t in texts]
    k, found = metrics["k"], {}
    list_metrics(
        users, [[e.item_id for e in p][:k] for p in parsed], k, counts=[len(p) for p in parsed], per_user=found
    )
    truth = found.get("true_utility")
    if truth is not None and abs(statistics.mean(truth) - metrics["stages"]["ppo"]["true_utility"]) > 1e-9:
        raise SystemExit(f"{work}: per-user true utility does not reproduce eval's mean")
    return truth


def pm(d: dict | None, digits: int = 3) -> str:
    return "n/a" if not d else f"{d['delta']:+.{digits}f} ± {d['se']:.{digits}f}"


def report(results: list[dict]) -> None:
    from rlhf.metrics import paired_difference

    first = results[0]
    print(f"SFT true utility {first['sft_true_utility']:.3f} on {first['vs_sft']['true_utility']['n']} users")
    head = f"{'algo':<5} {'true util − SFT':>17} {'reward − SFT':>17} {'KL':>7} {'cover':>6} {'upd':>4} "
    print(head + f"{'s/upd':>6} {'peak GB':>8}")
    for r in results:
        gpu = f" (GPU {r['gpu_peak_gb']:.1f})" if r["gpu_peak_gb"] is not None else ""
        print(
            f"{r['algorithm']:<5} {pm(r['vs_sft'].get('true_utility')):>17} {pm(r['vs_sft'].get('reward')):>17} "
            f"{r['kl_to_sft']:>7.3f} {r['coverage']:>6.3f} {r['updates']:>4} {r['s_per_update'] or 0:>6.1f} "
            f"{r['peak_rss_gb']:>8.1f}{gpu}"
        )
    for r in results[1:]:
        if r["per_user"] and first["per_user"]:
            d = paired_difference(r["per_user"], first["per_user"])
            print(f"{r['algorithm']} − {first['algorithm']}: true utility {pm(d)} (same users, paired)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a run with data/, sft/ and reward/")
    p.add_argument("--algos", default="ppo,grpo,rloo", help="comma list; the first is the paired reference")
    p.add_argument("--updates", type=int, default=10, help="updates per algorithm (with --seconds: the cap)")
    p.add_argument("--seconds", type=float, default=0, help="wall-clock training budget per algorithm instead")
    p.add_argument("--config", help="a recipe layered over the run's config.yaml (default: the run's own)")
    p.add_argument("--keep", help="keep the scratch runs under this folder (default: a deleted temporary one)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="for every `rlhf rl`")
    args = p.parse_args()
    source = Path(args.run)
    for part in ("data", "sft", "reward"):
        if not (source / part).exists():
            raise SystemExit(f"{source / part} is missing: run the data, sft and reward stages first")
    budget = f"{args.seconds:.0f} s (at most {args.updates} updates)" if args.seconds else f"{args.updates} updates"
    print(f"machine: {device()}; run {source}; budget {budget} per algorithm; overrides {args.overrides or 'none'}")
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="rl_compare-"))
    results = []
    try:
        for algo in args.algos.split(","):
            print(f"{algo}: training and evaluating in {root / algo} ...", flush=True)
            results.append(train_and_eval(algo, scratch_run(source, root / algo), args))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
