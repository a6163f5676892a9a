"""Critic-free RL (`rlhf rl --algo grpo|rloo`): TRL's real GRPOTrainer and RLOOTrainer on the tiny model, through the
CLI. Each writes the artifacts PPO writes (an adapter eval and export read, metrics with every reward term, true
utility and KL, rollouts, a summary naming the algorithm); a SIGKILLed run resumes where its last checkpoint left it
and continues exactly as the uninterrupted run did; the time budget stops PPO, GRPO and RLOO alike."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, TINY, read_jsonl, rlhf

UPDATES = 3  # tiny.yaml: ppo.checkpoint_every=1, batch 4 = 1 user x 4 listings, 2 mini-batches, 1 epoch


def _fresh(tiny_reward, path):
    shutil.copytree(tiny_reward, path, ignore=shutil.ignore_patterns("ppo", "eval"))
    return path


def _train(tiny_reward, path, algo: str):
    run = _fresh(tiny_reward, path)
    rlhf("rl", "--algo", algo, "--run", run, "--config", TINY, f"ppo.total_updates={UPDATES}")
    return run


@pytest.fixture(scope="module")
def grpo_run(tiny_reward, tmp_path_factory):
    return _train(tiny_reward, tmp_path_factory.mktemp("grpo") / "run", "grpo")


@pytest.fixture(scope="module")
def rloo_run(tiny_reward, tmp_path_factory):
    return _train(tiny_reward, tmp_path_factory.mktemp("rloo") / "run", "rloo")


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_critic_free_run_writes_what_eval_and_export_read(algo, request, tmp_path):
    from peft import PeftConfig
    from safetensors.torch import load_file

    run = request.getfixturevalue(f"{algo}_run")
    out = run / "ppo"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["algorithm"] == algo and summary["updates"] == UPDATES and summary["num_generations"] == 4
    assert summary["merged_rollouts"] is True  # sampled from the merged copy (rlhf/rollout.py)
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["update"] for r in rows] == list(range(1, UPDATES + 1))  # one line per update
    for key in ("loss", "kl", "entropy", "reward", "reward_std", "learning_rate", "time/generation_s"):
        assert key in rows[0], key
    terms = {"learned", "parses", "has_k", "in_catalog", "no_duplicates", "explained", "true_utility", "reward"}
    assert {f"reward/{t}" for t in terms} <= set(rows[0])
    assert all(r["time/update_s"] >= r["time/generation_s"] > 0 for r in rows)
    # the tiny model never ends a listing within 16 tokens: its reward is the composite minus missing_eos_penalty
    assert rows[0]["reward"] == pytest.approx(rows[0]["reward/reward"] - 1.0, abs=1e-3)
    rollouts = read_jsonl(out / "rollouts.jsonl")
    assert {r["update"] for r in rollouts} == {2} and {"text", "reward", "learned", "has_k"} <= set(rollouts[0])
    # the adapter trained: LoRA's B matrices start at zero, and the reference (adapter disabled) is not saved with it
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any(w.abs().max() > 0 for n, w in weights.items() if "lora_B" in n)
    assert not any(".ref." in n for n in weights)
    assert (out / "samples.jsonl").exists()

    rlhf("eval", "--run", run, "--config", TINY, "--stages", "sft,ppo")
    m = json.loads((run / "eval" / "metrics.json").read_text())
    assert m["stages"]["ppo"]["kl_to_sft"] is not None and m["vs_sft"]["ppo"]["true_utility"]["n"] == m["users"]
    rlhf("export", "--run", run, "--config", TINY, "--out", tmp_path / "export")
    # the export is SFT's adapter (r 8) and this one (r 8) as one LoRA on the original base
    assert PeftConfig.from_pretrained(tmp_path / "export").r == 16


def test_grpo_resumes_after_sigkill_and_continues_as_if_uninterrupted(grpo_run, tiny_reward, tmp_path):
    run = _fresh(tiny_reward, tmp_path / "run")
    args = ["rl", "--algo", "grpo", "--run", str(run), "--config", TINY, f"ppo.total_updates={UPDATES}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf", *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    marker = run / "ppo" / "trainer" / "checkpoint-2" / "COMPLETE"  # update 1 = 2 Trainer steps
    deadline = time.time() + 400
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert marker.exists(), "no complete checkpoint appeared"
    os.killpg(proc.pid, signal.SIGKILL)  # update 2 is in flight
    proc.wait()
    assert not (run / "ppo" / "adapter").exists()
    resumed = rlhf(*args, "--resume")
    assert "resuming from checkpoint-2 (1 of 3 updates done)" in resumed.stdout
    rows = read_jsonl(run / "ppo" / "metrics.jsonl")
    assert [r["update"] for r in rows] == [1, 2, 3]  # nothing lost past the checkpoint, nothing twice
    state = json.loads((run / "ppo" / "trainer" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    summary = json.loads((run / "ppo" / "summary.json").read_text())
    assert summary["resumed_at"] == 1 and summary["updates"] == 3
    # weights, optimiser, schedule, RNG and the data position came back: the same numbers as the uninterrupted run
    reference = read_jsonl(grpo_run / "ppo" / "metrics.jsonl")
    for key in ("learning_rate", "reward", "loss"):
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in reference], rel=1e-3, abs=1e-6), key
    again = rlhf(*args, "--resume")
    assert "3 of 3 updates already done" in again.stdout
    wrong = rlhf("rl", "--algo", "rloo", "--run", run, "--config", TINY, "--resume", check=False)
    assert wrong.returncode == 2 and "written by ppo.algorithm=grpo" in wrong.stderr


@pytest.mark.parametrize("algo", ["ppo", "grpo", "rloo"])
def test_time_budget_stops_after_an_update_and_still_writes_the_adapter(algo, tiny_reward, tmp_path):
    run = _fresh(tiny_reward, tmp_path / "run")
    rlhf("rl", "--algo", algo, "--run", run, "--config", TINY, "ppo.total_updates=50", "ppo.max_seconds=0.01")
    summary = json.loads((run / "ppo" / "summary.json").read_text())
    assert summary["algorithm"] == algo and summary["stopped_by_time"] is True and summary["updates"] == 1
    assert [r["update"] for r in read_jsonl(run / "ppo" / "metrics.jsonl")] == [1]
    assert (run / "ppo" / "adapter" / "adapter_config.json").exists()


def test_ppo_command_runs_ppo_and_the_pipeline_runs_the_configured_algorithm(tmp_path):
    from rlhf.cli import _flag_overrides, build_parser
    from rlhf.pipeline import stage_command

    args = build_parser().parse_args(["ppo", "--run", str(tmp_path), "ppo.algorithm=grpo"])
    assert _flag_overrides(args)[-1] == "ppo.algorithm=ppo"  # after the overrides: it wins
    args = build_parser().parse_args(["rl", "--algo", "rloo", "--run", str(tmp_path)])
    assert "ppo.algorithm=rloo" in _flag_overrides(args)
    assert stage_command("ppo", tmp_path, None, [])[3:5] == ["rl", "--run"]
