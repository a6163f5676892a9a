"""`rlhf pipeline`: data -> sft -> reward -> ppo -> eval, each stage in its own process.

Stages whose outputs are complete are skipped, so running the command again resumes: an interrupted
RL stage (``rlhf rl``: PPO, GRPO or RLOO, as ``ppo.algorithm`` says) continues from its last checkpoint
(``--resume``). The run directory is the only thing the stages share.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from rlhf.config import Config
from rlhf.metrics import describe_eval
from rlhf.runs import RunDir

STAGES = ("data", "sft", "reward", "ppo", "eval")


def stage_command(stage: str, run_dir: Path, config: str | None, overrides: list[str]) -> list[str]:
    # the RL stage runs `rlhf rl`: the algorithm the config names (ppo.algorithm), into the stage's folder ppo/
    command = {"data": ["data", "prepare", "--out"], "ppo": ["rl", "--run"]}.get(stage, [stage, "--run"])
    head = [sys.executable, "-m", "rlhf", *command, str(run_dir)]
    if config:
        head += ["--config", config]
    if stage == "ppo":
        head.append("--resume")
    return head + list(overrides)


def plan(run_dir: Path) -> list[tuple[str, bool]]:
    run = RunDir(run_dir)
    return [(s, run.done(s)) for s in STAGES]


def run_pipeline(cfg: Config, run_dir: Path, config: str | None = None, overrides: list[str] = ()) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    timings = {}
    started = time.time()
    todo = plan(run_dir)
    for n, (stage, done) in enumerate(todo, 1):
        label = f"[{n}/{len(STAGES)}] {stage}"
        if done:
            print(f"{label}: already complete in {run_dir}, skipped", flush=True)
            continue
        print(f"{label}: running", flush=True)
        t0 = time.time()
        rc = subprocess.call(stage_command(stage, run_dir, config, overrides))
        timings[stage] = round(time.time() - t0, 1)
        if rc != 0:
            print(
                f"{label}: failed (exit {rc}) after {timings[stage]:.0f}s; fix the error above and run the "
                f"same command again: finished stages are kept",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(rc)
        print(f"{label}: done in {timings[stage]:.0f}s", flush=True)
    total = round(time.time() - started, 1)
    summary = {"run_dir": str(run_dir), "seconds": total, "stage_seconds": timings}
    run = RunDir(run_dir)
    run.pipeline.write_text(json.dumps(summary, indent=2))
    report = run.eval.report_html
    print(f"pipeline: finished in {total / 60:.1f} min; report: {report if report.exists() else '(no report)'}")
    metrics = run.eval.metrics
    if metrics.exists():
        m = json.loads(metrics.read_text())
        for stage, vals in m.get("stages", {}).items():
            util = vals.get("true_utility")
            print(
                f"  {stage:>5}: valid_rate={vals.get('valid_rate', 0):.2f} "
                f"hr@{m['k']}={vals.get('hr@' + str(m['k']), 0):.3f}"
                + (f" true_utility={util:.3f}" if util is not None else "")
            )
        for line in describe_eval(m):
            print(f"  {line}")
    return summary
