"""Shared fixtures: one tiny run directory, prepared and trained once per session and reused.

Everything here is real: the SmolLM2 tokenizer, TRL trainers, a randomly initialised 2-layer model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "recipes" / "tiny.yaml")
SHARED = ROOT.parent / "shared" / "datasets" / "goodbooks-10k"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def rlhf(*args, check=True, env=None, timeout=900):
    """Run the real `rlhf` command in a fresh process, as a user would."""
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"rlhf {' '.join(map(str, args))} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    run = tmp_path_factory.mktemp("tiny") / "run"
    rlhf("data", "prepare", "--out", run, "--config", TINY)
    return run


# the shared run logs to both local trackers from SFT on; reward, PPO and eval take it from the run's config.yaml
TRACKED = "track.report_to=tensorboard,trackio"


@pytest.fixture(scope="session")
def tiny_sft(tiny_data):
    rlhf("sft", "--run", tiny_data, "--config", TINY, TRACKED)
    return tiny_data


@pytest.fixture(scope="session")
def tiny_reward(tiny_sft):
    rlhf("reward", "--run", tiny_sft, "--config", TINY)
    return tiny_sft


@pytest.fixture(scope="session")
def tiny_ppo(tiny_reward):
    rlhf("ppo", "--run", tiny_reward, "--config", TINY)
    return tiny_reward


@pytest.fixture(scope="session")
def tiny_eval(tiny_ppo):
    """The shared run evaluated (test_eval_writes_metrics_report_and_plots may have done it already)."""
    if not (tiny_ppo / "eval" / "report.html").exists():
        rlhf("eval", "--run", tiny_ppo, "--config", TINY)
    return tiny_ppo


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
