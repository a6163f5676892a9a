"""``RecGRPOTrainer`` and ``RecRLOOTrainer``: TRL 1.12's GRPOTrainer and RLOOTrainer with what this project adds
around them, the same for both (``GroupRLMixin``).

An update (rlhf/rl.py) is one generation batch of ``ppo.batch_size`` listings per process, then ``ppo_epochs``
passes of ``mini_batches`` optimiser steps over it: ``steps_per_update`` Trainer steps. Logging, checkpoints and
the time budget happen on update boundaries. Added:

- metrics.jsonl, one line per update: TRL's logs (loss, kl, entropy, clip ratios, reward, reward_std, completion
  lengths, learning_rate), the composite's terms and true utility as ``reward/<term>`` (reward_models/trl_funcs.py),
  seconds per phase (``time/generation_s``; ``time/scoring_s``: rewards and the old / reference log-probability
  forwards, of which ``time/reward_s`` the rewards; ``time/optimisation_s``; ``time/update_s``), the GPU peak;
- rollouts.jsonl: sampled completions with their terms every ``ppo.sample_every`` updates;
- a completion marker in each Trainer checkpoint (``COMPLETE``, written once every file of it is fsynced): the
  Trainer writes checkpoint-N/ in place, trainer_state.json last, and syncs nothing, so a run killed while saving
  would resume from half a checkpoint. ``latest_complete`` finds the newest whole one;
- ``ppo.max_seconds``: training stops at the first update boundary past the budget, with a checkpoint.

TRL 1.12 behaviour worked around, once, here:
1. Handed a PEFT model (ours samples from a merged copy: rlhf/rollout.py), TRL adds a "ref" adapter, a copy of the
   trained one, and takes reference log-probabilities through it: one more LoRA forward per batch and a second
   adapter in every checkpoint. For a freshly initialised LoRA that copy is the adapter-disabled model, which is
   TRL's reference when no "ref" adapter exists, so it is deleted (``_drop_ref_adapter``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from trl import GRPOTrainer, RLOOTrainer

from rlhf.budget import BudgetCallback
from rlhf.models import gpu_peak_gb
from rlhf.rollout import SampledPolicy
from rlhf.runs import atomic_write, fsync_dir

COMPLETE = "COMPLETE"
ROLLOUT_SAMPLES_PER_UPDATE = 4


def mark_complete(folder: Path, record: dict) -> None:
    """Make every file of a Trainer checkpoint durable, then write its COMPLETE marker (atomically): ``record``
    (algorithm, update, global_step)."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    for d in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        fsync_dir(d)
    atomic_write(folder / COMPLETE, json.dumps(record))


def latest_complete(root: Path) -> tuple[Path, dict] | None:
    """The newest Trainer checkpoint under ``root`` with its COMPLETE marker, and the marker's record; or None."""
    found = []
    for path in Path(root).glob("checkpoint-*") if Path(root).exists() else []:
        step, marker = path.name.removeprefix("checkpoint-"), path / COMPLETE
        if step.isdigit() and marker.exists():
            found.append((int(step), path))
    if not found:
        return None
    path = max(found)[1]
    return path, json.loads((path / COMPLETE).read_text())


class UpdateBoundaries(BudgetCallback):
    """Stops training at the first update boundary past ``ppo.max_seconds`` and marks each saved checkpoint
    complete once every rank has written its part."""

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer
        if state.global_step % t.steps_per_update == 0 and self.budget.spent(t.accelerator):
            t.stopped_by_time = True
            control.should_training_stop = True
            control.should_save = True
        return control

    def on_save(self, args, state, control, **kwargs):
        acc = self.trainer.accelerator
        acc.wait_for_everyone()  # each rank has written its RNG state
        if acc.is_main_process:
            record = {
                "algorithm": self.trainer.stage_cfg.algorithm,
                "update": state.global_step // self.trainer.steps_per_update,
                "global_step": state.global_step,
            }
            mark_complete(Path(args.output_dir) / f"checkpoint-{state.global_step}", record)
        return control


class GroupRLMixin:
    """What RecGRPOTrainer and RecRLOOTrainer add to TRL's trainers (the module docstring lists it)."""

    def __init__(self, *args, stage_cfg, out, reward, steps_per_update: int, merged_rollouts: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.stage_cfg, self.out, self.reward, self.steps_per_update = stage_cfg, out, reward, steps_per_update
        policy = self.accelerator.unwrap_model(self.model)
        self._drop_ref_adapter(policy)
        # a merged copy cannot be built from 4-bit or sharded weights: those sample from the policy itself
        plain = self.accelerator.distributed_type in ("NO", "MULTI_CPU", "MULTI_GPU")
        quantized = getattr(policy, "is_loaded_in_4bit", False)
        self.merged_rollouts = merged_rollouts and plain and not quantized and isinstance(policy, SampledPolicy)
        if self.merged_rollouts:
            policy.use_merged_copy()
        self.stopped_by_time = False
        self._seconds = {"generation": 0.0, "rollout": 0.0, "reward": 0.0}
        self._update_start = None
        self.add_callback(UpdateBoundaries(self))

    @staticmethod
    def _drop_ref_adapter(policy) -> None:
        """TRL workaround 1: the reference is the adapter-disabled model, not a copy of a fresh adapter."""
        if "ref" in getattr(policy, "peft_config", {}):
            policy.delete_adapter("ref")

    def _generate_and_score_completions(self, inputs):
        t0 = time.time()
        self._update_start = self._update_start or t0
        out = super()._generate_and_score_completions(inputs)
        self._seconds["rollout"] += time.time() - t0
        return out

    def _generate_single_turn(self, *args, **kwargs):
        t0 = time.time()
        out = super()._generate_single_turn(*args, **kwargs)
        self._seconds["generation"] += time.time() - t0
        return out

    def _calculate_rewards(self, *args, **kwargs):
        t0 = time.time()
        out = super()._calculate_rewards(*args, **kwargs)
        self._seconds["reward"] += time.time() - t0
        return out

    def log(self, logs: dict, start_time: float | None = None) -> None:
        update_end = "loss" in logs and self.state.global_step % self.steps_per_update == 0
        if update_end:
            self._add_phase_seconds(logs)
        super().log(logs, start_time)  # TRL adds its metrics (the reward terms among them) to ``logs``
        if update_end:
            self._write_update(logs)

    def _add_phase_seconds(self, logs: dict) -> None:
        now, s = time.time(), self._seconds
        start = self._update_start or now
        logs["time/generation_s"] = round(s["generation"], 3)
        logs["time/scoring_s"] = round(s["rollout"] - s["generation"], 3)
        logs["time/reward_s"] = round(s["reward"], 3)
        logs["time/optimisation_s"] = round(now - start - s["rollout"], 3)
        logs["time/update_s"] = round(now - start, 3)
        if (peak := gpu_peak_gb()) is not None:
            logs["memory/gpu_peak_gb"] = peak
        logs["update"] = self.state.global_step // self.steps_per_update
        self._seconds = dict.fromkeys(s, 0.0)
        self._update_start = None

    def _write_update(self, logs: dict) -> None:
        records = self.reward.take_records()
        if not self.accelerator.is_main_process:
            return
        update = logs["update"]
        if update % self.stage_cfg.sample_every == 0:  # read these: metrics hide reward hacking
            samples = [s for r in records for s in r["samples"]][:ROLLOUT_SAMPLES_PER_UPDATE]
            with open(self.out.rollouts, "a") as f:
                f.writelines(json.dumps({"update": update, **s}) + "\n" for s in samples)
        with open(self.out.metrics, "a") as f:
            f.write(json.dumps({k: (v.item() if hasattr(v, "item") else v) for k, v in logs.items()}) + "\n")


class RecGRPOTrainer(GroupRLMixin, GRPOTrainer):
    """TRL's GRPOTrainer: advantages = (reward - the user's group mean) / the group's standard deviation."""


class RecRLOOTrainer(GroupRLMixin, RLOOTrainer):
    """TRL's RLOOTrainer: advantages = reward - the mean of the user's other listings."""
