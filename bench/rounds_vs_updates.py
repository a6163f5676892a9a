"""Labeling rounds against the same RL compute spent without them: is it the new labels that help, or the updates?

    python bench/rounds_vs_updates.py --run runs/demo --rounds 2 --updates 5 [--config recipes/demo.yaml]
                                      [--keep DIR] [--json FILE] [section.field=value ...]

Needs a run with data/, sft/ and reward/ (e.g. after `make demo`; the run itself is not touched; when its RL stage is
done both arms continue from its adapter). Two scratch runs share its data and SFT model (links):

- rounds:  `rlhf rounds --rounds R rounds.rl_updates=U` with the simulated labelers: each round the policy's own
           listings are judged, the reward model retrained warm on every pair so far, RL continued for U updates, eval;
- updates: one `rlhf rl` of R x U updates from the same start against the starting reward model, then `rlhf eval
           --stages sft,ppo`.

Prints the rounds' table (round 0: the common start) with the updates arm as one more row, then what the goal asks:
the learned reward model's Pearson correlation with true utility on the policy's own listings after the last round,
true utility round over round, and rounds − updates in true utility on the same users (paired standard error; the
per-user values recomputed from each arm's eval listings, as bench/rl_compare.py does). Trailing overrides go to both
arms (e.g. ppo.reward_weights.learned=1.0). CPU runs are not bit-reproducible: repeat before believing a small gap.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import device, run_child, scratch_run
from rl_compare import per_user_truth, pm


def rlhf(*args, config: str | None) -> float:
    """One `rlhf` command; its seconds. Stops the benchmark, with the command's last output, when it fails."""
    cmd = [sys.executable, "-m", "rlhf", str(args[0]), *(["--config", config] if config else []), *map(str, args[1:])]
    t0 = time.time()
    proc, _ = run_child(cmd)
    if proc.returncode:
        raise SystemExit(f"`rlhf {' '.join(map(str, args[:2]))}` failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return time.time() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a run with data/, sft/ and reward/")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--updates", type=int, default=5, help="RL updates per round; the updates arm gets rounds x this")
    p.add_argument("--config", help="a recipe layered over the run's config.yaml (default: the run's own)")
    p.add_argument("--keep", help="keep the scratch runs under this folder (default: a deleted temporary one)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="for both arms")
    args = p.parse_args()
    source = Path(args.run)
    for part in ("data", "sft", "reward", "config.yaml"):
        if not (source / part).exists():
            raise SystemExit(f"{source / part} is missing: run the data, sft and reward stages first")
    total = args.rounds * args.updates
    print(f"machine: {device()}; run {source}; {args.rounds} rounds x {args.updates} updates vs {total} updates")
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="rounds_vs_updates-"))
    try:
        results = compare(source, root, args, total)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    report(results, args.rounds)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def compare(source: Path, root: Path, args, total: int) -> dict:
    from rlhf.round_table import eval_figures, round_rows
    from rlhf.runs import RunDir

    started = (source / "ppo" / "summary.json").exists() and (source / "ppo" / "adapter").exists()
    arm = scratch_run(source, root / "rounds", ("data", "sft"), ("reward", "ppo", "labels"))
    print(f"rounds: {args.rounds} rounds in {arm} ...", flush=True)
    loop = ["--rounds", args.rounds, f"rounds.rl_updates={args.updates}", "rounds.labelers=simulated"]
    rounds_s = rlhf("rounds", "--run", arm, *loop, *args.overrides, config=args.config)
    rows = round_rows(RunDir(arm))
    other = scratch_run(source, root / "updates", ("data", "sft"), ("reward", "labels"))
    init = ["--init-adapter", (source / "ppo" / "adapter").resolve()] if started else []
    print(f"updates: {total} updates in {other} ...", flush=True)
    updates_s = rlhf("rl", "--run", other, *init, f"ppo.total_updates={total}", *args.overrides, config=args.config)
    updates_s += rlhf("eval", "--run", other, "--stages", "sft,ppo", *args.overrides, config=args.config)
    metrics = json.loads((other / "eval" / "metrics.json").read_text())
    start_updates = rows[0]["rl_updates"] if rows else 0
    updates_row = {"round": "updates", "rl_updates": start_updates + total, **eval_figures(metrics)}
    last = json.loads((arm / "eval" / "metrics.json").read_text())
    return {
        "rounds": rows,
        "updates": updates_row,
        "seconds": {"rounds": round(rounds_s, 1), "updates": round(updates_s, 1)},
        "per_user": {"rounds": per_user_truth(arm, last), "updates": per_user_truth(other, metrics)},
    }


def report(results: dict, rounds: int) -> None:
    from rlhf.metrics import paired_difference
    from rlhf.round_table import render

    rows, other = results["rounds"], results["updates"]
    print(render([*rows, other]))
    print(f"seconds: rounds arm {results['seconds']['rounds']:.0f}, updates arm {results['seconds']['updates']:.0f}")
    last = rows[-1] if rows else {}
    r = last.get("learned_vs_truth")
    verdict = "n/a" if r is None else ("met" if r >= 0.5 else "not met")
    print(f"after {rounds} rounds: the learned score against true utility on the policy's listings r = {_r(r)}")
    print(f"  goal r >= +0.5: {verdict}")
    utilities = [row.get("true_utility") for row in rows]
    rising = all(a is not None and b is not None and b > a for a, b in zip(utilities, utilities[1:]))
    print(f"true utility by round: {' -> '.join(map(_f, utilities))} (rising every round: {'yes' if rising else 'no'})")
    figures = f"true utility {_f(other.get('true_utility'))}, learned r = {_r(other.get('learned_vs_truth'))}"
    print(f"updates arm ({other['rl_updates']} updates, no new labels): {figures}")
    mine, theirs = results["per_user"]["rounds"], results["per_user"]["updates"]
    if mine and theirs:
        print(f"rounds − updates: true utility {pm(paired_difference(mine, theirs))} (same users, paired)")


def _f(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _r(value) -> str:
    return "n/a" if value is None else f"{value:+.2f}"


if __name__ == "__main__":
    main()
