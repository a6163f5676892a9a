"""``RecPPOTrainer``: TRL 1.12's PPOTrainer with what this project needs around it.

Added: the composite reward's terms and per-phase timing (generation / scoring / optimisation) in every logged
update, sampled rollouts written for reading, atomic resumable checkpoints (rlhf/checkpoint.py), and rollouts
sampled and scored as rlhf/rollout.py describes. TRL 1.12 fixes, each made once here:

1. Accumulation: TRL uses ``gradient_accumulation_steps`` both to size the rollout batch and as accelerate's
   accumulation count, so with ``num_mini_batches`` M > 1 the optimiser stepped once per rollout batch instead of
   once per mini-batch and approxkl, losses and the ratio read M times too small (``_fix_accumulation``).
2. DDP: TRL reads ``model.policy`` on the prepared model, which a DDP wrapper lacks (``_expose_policy``), and its
   ``null_ref_context`` unwraps ``model.policy`` the same way (overridden below).
3. QLoRA under bf16: TRL's casting leaves a 4-bit policy's head in bf16 and its norms in fp32, and rollouts run
   outside autocast, so ``generate`` failed at lm_head (``models.head_in_fp32``).
4. The learning-rate schedule spans the whole run, also when a resumed process does only the remaining updates.
5. TRL's loop never reads ``control.should_training_stop``: ``ppo.max_seconds`` ends it by raising ``BudgetSpent``
   after the update's checkpoint.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from transformers import get_scheduler
from trl.experimental.ppo import PPOTrainer

from rlhf import checkpoint
from rlhf.budget import BudgetCallback
from rlhf.models import gpu_peak_gb, head_in_fp32
from rlhf.rollout import PPOPolicy

ROLLOUT_SAMPLES_PER_UPDATE = 4


class BudgetSpent(Exception):
    """Raised after the update during which ``ppo.max_seconds`` ran out (TRL fix 5)."""


class CheckpointEvery(BudgetCallback):
    """Saves a resume record every ``ppo.checkpoint_every`` updates, after the last one and when the time budget is
    spent (then ends training: TRL fix 5)."""

    def on_step_end(self, args, state, control, **kwargs):
        t = self.trainer
        update = t.update_offset + state.global_step
        spent = self.budget.spent(t.accelerator)
        if update % t.stage_cfg.checkpoint_every == 0 or update == t.total_updates or spent:
            checkpoint.save(t, t.out.checkpoints, update, t.total_updates)
        if spent and update < t.total_updates:
            raise BudgetSpent(update)
        return control


class RecPPOTrainer(PPOTrainer):
    def __init__(
        self,
        *args,
        stage_cfg,
        out,
        reward,
        total_updates: int,
        update_offset: int,
        resume_from: Path | None,
        merged_rollouts: bool,
        constraints=None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.stage_cfg, self.out, self.reward = stage_cfg, out, reward
        self.total_updates, self.update_offset = total_updates, update_offset
        self._fix_accumulation()
        self._expose_policy()
        self.lr_scheduler = get_scheduler(
            self.args.lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=self.args.get_warmup_steps(total_updates),
            num_training_steps=total_updates,
        )
        policy = self.policy_module
        if self.args.bf16 and getattr(policy, "is_loaded_in_4bit", False):
            head_in_fp32(policy)  # TRL fix 3
        # a merged copy cannot be built from 4-bit or sharded weights: those sample from the policy itself
        plain = self.accelerator.distributed_type in ("NO", "MULTI_CPU", "MULTI_GPU")
        self.merged_rollouts = merged_rollouts and plain and not getattr(policy, "is_loaded_in_4bit", False)
        if isinstance(policy, PPOPolicy):  # without LoRA, TRL's own sampler and log-probabilities
            policy.setup_rollouts(
                self.accelerator.autocast,
                self.merged_rollouts,
                stage_cfg.rollout_logprobs,
                stage_cfg.cliprange,
                constraints,
            )
        else:
            self.merged_rollouts = False
        self._phase_start, self._optimisation_start = time.time(), None
        self.accelerator.unwrap_model(self.model).register_forward_pre_hook(self._mark_optimisation)
        self.add_callback(CheckpointEvery(self))
        self.dataloader = checkpoint.PromptLoader(self.dataloader)  # so a checkpoint can replay the prompt order
        if resume_from is not None:
            checkpoint.load(self, resume_from, update_offset)

    @property
    def policy_module(self):
        return self.accelerator.unwrap_model(self.model).policy

    def _fix_accumulation(self) -> None:
        """TRL fix 1: accumulate over the micro-batches of one mini-batch, not of the whole rollout batch (the
        rollout size was fixed from the original count in TRL's __init__). DeepSpeed fixed its count at prepare."""
        micro_per_mini = self.args.local_mini_batch_size // self.args.per_device_train_batch_size
        if self.accelerator.distributed_type != "DEEPSPEED":
            self.args.gradient_accumulation_steps = micro_per_mini
            self.accelerator.gradient_accumulation_steps = micro_per_mini

    def _expose_policy(self) -> None:
        """TRL fix 2: give a DDP wrapper the ``policy`` attribute TRL reads, without registering it as a submodule."""
        if not hasattr(self.model, "policy"):
            object.__setattr__(self.model, "policy", self.policy_module)

    @contextmanager
    def null_ref_context(self):
        # TRL fix 2: TRL's version unwraps `self.model.policy`, which fails under DDP; unwrap the model first
        policy = self.policy_module
        with policy.disable_adapter() if self.is_peft_model and not self.ref_adapter_name else nullcontext():
            yield

    def _mark_optimisation(self, module, args) -> None:
        """Forward pre-hook: the first forward with gradients ends the rollout phase of an update."""
        if torch.is_grad_enabled() and self._optimisation_start is None:
            self._optimisation_start = time.time()

    def log(self, logs, start_time=None):
        if "objective/scores" in logs:
            self._add_update_metrics(logs)
        super().log(logs, start_time) if start_time is not None else super().log(logs)
        self._phase_start = time.time()

    def _add_update_metrics(self, logs: dict) -> None:
        now = time.time()
        policy = self.policy_module
        optimisation_start = self._optimisation_start or now
        generation = getattr(policy, "generation_seconds", 0.0)
        logs["time/generation_s"] = round(generation, 3)
        logs["time/scoring_s"] = round(max(optimisation_start - self._phase_start - generation, 0.0), 3)
        logs["time/optimisation_s"] = round(now - optimisation_start, 3)
        logs["time/update_s"] = round(now - self._phase_start, 3)
        if (peak := gpu_peak_gb()) is not None:
            logs["memory/gpu_peak_gb"] = peak
        if isinstance(policy, PPOPolicy):
            for name, value in policy.take_rollout_stats().items():
                logs[f"rollout/{name}"] = value
            policy.generation_seconds = 0.0
        records = self.reward.take_records()
        if records:
            for name in records[0]["means"]:
                logs[f"reward/{name}"] = float(np.mean([r["means"][name] for r in records if name in r["means"]]))
        logs["update"] = update = self.update_offset + self.state.global_step
        self._optimisation_start = None
        if not self.accelerator.is_main_process:
            return
        if update % self.stage_cfg.sample_every == 0:  # read these: metrics hide reward hacking
            samples = [s for r in records for s in r["samples"]][:ROLLOUT_SAMPLES_PER_UPDATE]
            with open(self.out.rollouts, "a") as f:
                f.writelines(json.dumps({"update": update, **s}) + "\n" for s in samples)
        with open(self.out.metrics, "a") as f:
            f.write(json.dumps({k: (v.item() if hasattr(v, "item") else v) for k, v in logs.items()}) + "\n")
