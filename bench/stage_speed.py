"""Every stage that runs a model, in float32 and in bfloat16, on the same run data and settings, in one run.

    python bench/stage_speed.py --run runs/demo [--dtypes float32,bfloat16] [--sft-steps 8] [--reward-steps 8]
                                [--ppo-updates 3] [--eval-users 20] [--recommend-users 8]

Needs a run with data/ (e.g. after `make demo` or `rlhf data prepare`). For each dtype it trains a throwaway chain
in a temporary run directory that links the run's data: SFT (tokens/s from TRL's own counters), the reward model
(steps/s), PPO (s/update split into generation / scoring / optimisation, medians after the first update), eval
of SFT and PPO (listings/s of greedy generation), and `rlhf recommend` (p50 latency of one listing, the model
loaded once). Every stage runs as its own process, as the pipeline runs it; peak RSS is that process's. The
recipe's settings apply (demo by default), with model.dtype set per column. Prints one table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from _common import ROOT, device, run_child, scratch_run

STAGES = ("sft", "reward", "ppo", "eval", "recommend")


def _rlhf(args: list[str]) -> float:
    proc, peak = run_child([sys.executable, "-m", "rlhf", *args])
    if proc.returncode:
        raise SystemExit(f"rlhf {' '.join(args[:3])} failed:\n{proc.stderr[-3000:]}")
    return peak


def _chain(run: Path, work: Path, dtype: str, a) -> dict:
    """Train and time every stage once in ``dtype`` inside ``work``; returns the row of the table."""
    scratch_run(run, work, links=("data",))
    common = ["--run", str(work), "--config", a.config, f"model.dtype={dtype}"]
    row = {}
    peak = _rlhf(["sft", *common, f"sft.max_steps={a.sft_steps}", "sft.num_samples=1", "sft.logging_steps=1"])
    log = [json.loads(x) for x in (work / "sft" / "log.jsonl").read_text().splitlines()]
    secs = next(r for r in reversed(log) if "train_runtime" in r)["train_runtime"]
    tokens = next(r for r in reversed(log) if "num_tokens" in r)["num_tokens"]
    row["sft"] = {"SFT tokens/s": tokens / secs, "peak": peak}
    peak = _rlhf(["reward", *common, f"reward.max_steps={a.reward_steps}", "reward.accuracy_on_train=0"])
    rm = json.loads((work / "reward" / "metrics.json").read_text())
    row["reward"] = {"reward steps/s": rm["steps"] / rm["seconds"], "peak": peak}
    peak = _rlhf(["ppo", *common, f"ppo.total_updates={a.ppo_updates}", "ppo.checkpoint_every=1000"])
    rows = [json.loads(x) for x in (work / "ppo" / "metrics.jsonl").read_text().splitlines()][1:]
    med = {
        k: statistics.median(r[f"time/{k}_s"] for r in rows)
        for k in ("update", "generation", "scoring", "optimisation")
    }
    row["ppo"] = {f"PPO {k} s": v for k, v in med.items()} | {"peak": peak}
    peak = _rlhf(["eval", *common, "--stages", "sft,ppo", "--max-users", str(a.eval_users)])
    ev = json.loads((work / "eval" / "metrics.json").read_text())["stages"]
    row["eval"] = {f"eval {s} listings/s": ev[s]["listings_per_s"] for s in ("sft", "ppo")} | {"peak": peak}
    proc, peak = run_child(
        [
            sys.executable,
            str(ROOT / "bench" / "recommend_latency.py"),
            "--run",
            str(work),
            "--users",
            str(a.recommend_users),
            "--free-only",
            f"model.dtype={dtype}",
        ]
    )
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    p50 = json.loads(proc.stdout.strip().splitlines()[-1])["free"]["p50_s"]
    row["recommend"] = {"recommend p50 s": p50, "peak": peak}
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--config", default=str(ROOT / "recipes" / "demo.yaml"))
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--sft-steps", type=int, default=8)
    p.add_argument("--reward-steps", type=int, default=8)
    p.add_argument("--ppo-updates", type=int, default=3)
    p.add_argument("--eval-users", type=int, default=20)
    p.add_argument("--recommend-users", type=int, default=8)
    a = p.parse_args()
    dtypes = a.dtypes.split(",")
    table = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in dtypes:
            table[dtype] = _chain(Path(a.run), Path(tmp) / dtype, dtype, a)
            print(f"{dtype}: done", file=sys.stderr, flush=True)
    print(
        f"machine: {device()}; recipe {Path(a.config).name}; SFT {a.sft_steps} steps, reward {a.reward_steps} steps, "
        f"PPO {a.ppo_updates} updates (medians after the first), eval {a.eval_users} users, "
        f"recommend {a.recommend_users} users"
    )
    print("| stage | measure | " + " | ".join(dtypes) + (" | × |" if len(dtypes) == 2 else " |"))
    print("|---" * (len(dtypes) + 2 + (len(dtypes) == 2)) + "|")
    for stage in STAGES:
        for measure in table[dtypes[0]][stage]:
            values = [table[d][stage][measure] for d in dtypes]
            label = "peak RSS GB" if measure == "peak" else measure
            cells = " | ".join(f"{v:.2f}" for v in values)
            ratio = ""
            if len(values) == 2 and values[1]:
                faster_is_lower = measure == "peak" or measure.endswith(" s")  # seconds, not a rate
                ratio = f" | {values[0] / values[1] if faster_is_lower else values[1] / values[0]:.2f}"
            print(f"| {stage} | {label} | {cells}{ratio} |")


if __name__ == "__main__":
    main()
