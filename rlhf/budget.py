"""The wall-clock budget of an RL run (``ppo.max_seconds``), read on rank 0 and shared, so that every rank stops
after the same update (a rank that stopped alone would leave the others waiting in a collective)."""

from __future__ import annotations

import time

from transformers import TrainerCallback


class TimeBudget:
    def __init__(self, seconds: float):
        self.seconds, self.started = seconds, time.time()

    def restart(self) -> None:
        self.started = time.time()

    def spent(self, accelerator) -> bool:
        """True once ``seconds`` have passed since the start (never with a budget of 0); every rank gets rank 0's
        answer."""
        if not self.seconds:
            return False
        from accelerate.utils import broadcast_object_list

        answer = [time.time() - self.started > self.seconds]
        if accelerator.num_processes > 1:
            broadcast_object_list(answer, from_process=0)
        return answer[0]


class BudgetCallback(TrainerCallback):
    """A trainer callback that holds the trainer and its ``ppo.max_seconds`` budget, started when training starts
    (not when the trainer was built: loading and a resume come first). Subclasses decide what a spent budget does."""

    def __init__(self, trainer):
        self.trainer, self.budget = trainer, TimeBudget(trainer.stage_cfg.max_seconds)

    def on_train_begin(self, args, state, control, **kwargs):
        self.budget.restart()
