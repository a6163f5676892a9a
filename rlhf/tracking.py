"""Experiment tracking for every stage: TensorBoard, trackio and Weights & Biases (offline), as ``track.report_to``
names them.

    rlhf sft --run runs/demo track.report_to=tensorboard,trackio       # later stages read it from the run
    tensorboard --logdir runs/demo/logs/tensorboard                     # a sub-run per stage
    TRACKIO_DIR=runs/demo/logs/trackio trackio show --project rec-rlhf  # the run's stages, one group
    wandb sync runs/demo/logs/wandb/wandb/offline-run-*                 # later, on a machine with network

Each stage opens a ``Tracker``: one tracker run per stage named ``<run>/<stage>``, grouped by the run directory's
name, holding the stage's resolved config. The trainer's per-step logs (SFT, reward) and PPO's per-update metrics
flow in through ``TrackerCallback``; the stage's final figures (what it writes to metrics.json or summary.json)
close it under ``final/``. Labeling rounds log one step per round into the ``labels`` run. Only the main process
logs. A fresh stage replaces its earlier logs, as it replaces its artifacts; a resumed one appends.

Why not transformers' ``report_to`` callbacks: they log the TrainingArguments instead of this project's config,
give trackio no group, and close their runs when training ends, before a stage's held-out figures exist.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
from pathlib import Path

import yaml
from transformers import TrainerCallback

from rlhf.runs import RunDir


def flatten(values: dict, prefix: str = "") -> dict[str, float]:
    """The numbers in a nested dict, keyed ``a/b/c``; strings, lists and None are left out."""
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}/"))
        elif hasattr(value, "item") and not isinstance(value, (list, str)):  # numpy / torch scalars
            out[name] = float(value.item())
        elif isinstance(value, (int, float)):
            out[name] = float(value)
    return out


class TensorBoardLog:
    """Event files in RUN_DIR/logs/tensorboard/<stage>/; the config as a text entry."""

    def __init__(self, run: RunDir, stage: str, name: str, group: str, project: str, config: dict, resume: bool):
        from torch.utils.tensorboard import SummaryWriter

        folder = run.logs.tensorboard(stage)
        if not resume and folder.exists():
            shutil.rmtree(folder)
        self.writer = SummaryWriter(log_dir=str(folder))
        text = yaml.safe_dump(config, sort_keys=False)
        self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()))  # a code block

    def log(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class TrackioLog:
    """trackio's local store (SQLite) in RUN_DIR/logs/trackio/, a run per stage with the run directory as group."""

    def __init__(self, run: RunDir, stage: str, name: str, group: str, project: str, config: dict, resume: bool):
        store = run.logs.trackio
        os.environ["TRACKIO_DIR"] = str(store.resolve())  # trackio reads it once, when first imported
        import trackio
        from trackio.utils import TRACKIO_DIR

        if Path(TRACKIO_DIR).resolve() != store.resolve():
            print(f"tracking: trackio was imported before, so it logs to {TRACKIO_DIR}", file=sys.stderr)
        if not resume:
            _delete_trackio_runs(trackio, project, name)
        self.trackio = trackio
        trackio.init(
            project=project,
            name=name,
            group=group,
            config=config,
            resume="allow" if resume else "never",
            embed=False,
            auto_log_cpu=False,
            auto_log_gpu=False,
        )

    def log(self, metrics: dict, step: int) -> None:
        self.trackio.log(metrics, step=step)

    def close(self) -> None:
        self.trackio.finish()


def _delete_trackio_runs(trackio, project: str, name: str) -> None:
    """An earlier run of the same stage, replaced like the stage's artifacts."""
    try:
        runs = list(trackio.Api().runs(project))
    except ValueError:  # no such project yet
        return
    for old in runs:
        if old.name == name:
            old.delete()


class WandbLog:
    """An offline Weights & Biases run in RUN_DIR/logs/wandb/; ``wandb sync`` uploads it later."""

    def __init__(self, run: RunDir, stage: str, name: str, group: str, project: str, config: dict, resume: bool):
        import wandb

        folder = run.logs.wandb
        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=project, group=group, name=name, job_type=stage, dir=str(folder), config=config, mode="offline"
        )

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


BACKENDS = {"tensorboard": TensorBoardLog, "trackio": TrackioLog, "wandb": WandbLog}


class Tracker:
    """One stage's logs in every tracker of ``cfg.track.report_to`` (none: every call does nothing)."""

    def __init__(self, cfg, run: RunDir, stage: str, resume: bool = False, main_process: bool = True):
        self.stage, self.step, self.logs = stage, 0, []
        if not main_process or not cfg.track.report_to:
            return
        group = run.root.resolve().name
        config = {"stage": stage, "run_dir": str(run.root), **cfg.to_dict()}
        for tracker in cfg.track.report_to:
            self.logs.append(
                BACKENDS[tracker](run, stage, f"{group}/{stage}", group, cfg.track.project, config, resume)
            )
        atexit.register(self.finish)  # a stage that fails still flushes what it logged

    def log(self, metrics: dict, step: int) -> None:
        numbers = flatten(metrics)
        if numbers and self.logs:
            self.step = max(self.step, step)
            for log in self.logs:
                log.log(numbers, step)

    def finish(self, final: dict | None = None) -> None:
        """Log the stage's final figures as ``final/...`` at its last step, then close every tracker."""
        if final:
            self.log({"final": final}, self.step)
        logs, self.logs = self.logs, []
        for log in logs:
            log.close()


class TrackerCallback(TrainerCallback):
    """A Trainer's logs into a Tracker: bare keys as ``train/<key>``, the rest (``objective/kl``, ...) as they are.
    The step is PPO's ``update`` where it logs one (it counts on across a resume), else the trainer's step."""

    def __init__(self, tracker: Tracker):
        self.tracker = tracker

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            step = int(logs.get("update", state.global_step))
            self.tracker.log({(k if "/" in k else f"train/{k}"): v for k, v in logs.items()}, step)


def log_round(cfg, run: RunDir, summary: dict) -> None:
    """A labeling round's import summary as step ``round`` of the run's ``labels`` tracker run."""
    tracker = Tracker(cfg, run, "labels", resume=True)
    tracker.log({"labels": {k: v for k, v in summary.items() if k != "round"}}, summary["round"])
    tracker.finish()
