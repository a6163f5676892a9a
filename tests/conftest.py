"""Shared fixtures: one tiny run directory, prepared and trained once per session and reused.

Everything here is real: the SmolLM2 tokenizer, TRL trainers, a randomly initialised 2-layer model.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "recipes" / "tiny.yaml")
# CI puts the shared datasets beside the checkout; REC_RLHF_SHARED points elsewhere (e.g. from a git worktree)
SHARED = Path(os.environ.get("REC_RLHF_SHARED") or ROOT.parent / "shared") / "datasets" / "goodbooks-10k"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test TEST_JOBS=N`: N workers each start stage processes; with torch's default of a thread per core they
    # would run N x cores spinning threads on the cores. One thread each (a user's own setting stays).
    os.environ.setdefault("OMP_NUM_THREADS", "1")


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


# Each stage's fixture is its own run directory: a copy of the previous stage's run with one more stage
# done, never changed afterwards. A test gets exactly the stages it names, whatever ran before it (the
# suite runs in random order), and one that writes copies the run first.
def _next_stage(previous: Path, tmp_path_factory, name: str, *args) -> Path:
    run = tmp_path_factory.mktemp(f"tiny-{name}") / "run"
    shutil.copytree(previous, run)
    rlhf(name, "--run", run, "--config", TINY, *args)
    return run


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Prepared data only (data/, config.yaml)."""
    run = tmp_path_factory.mktemp("tiny-data") / "run"
    rlhf("data", "prepare", "--out", run, "--config", TINY)
    return run


# the shared run logs to both local trackers from SFT on; reward, PPO and eval take it from the run's config.yaml
TRACKED = "track.report_to=tensorboard,trackio"


@pytest.fixture(scope="session")
def tiny_sft(tiny_data, tmp_path_factory):
    """+ sft/ (tracked from here on: the run's config.yaml carries track.report_to to the later stages)"""
    return _next_stage(tiny_data, tmp_path_factory, "sft", TRACKED)


@pytest.fixture(scope="session")
def tiny_reward(tiny_sft, tmp_path_factory):
    """+ reward/"""
    return _next_stage(tiny_sft, tmp_path_factory, "reward")


@pytest.fixture(scope="session")
def tiny_ppo(tiny_reward, tmp_path_factory):
    """+ ppo/"""
    return _next_stage(tiny_reward, tmp_path_factory, "ppo")


@pytest.fixture(scope="session")
def tiny_eval(tiny_ppo, tmp_path_factory):
    """+ eval/ (base, SFT and PPO against the baselines)"""
    return _next_stage(tiny_ppo, tmp_path_factory, "eval")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the tests' servers bind only there)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
