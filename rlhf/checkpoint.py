"""The PPO resume record: trainable weights, optimiser, scheduler, per-rank RNG and the dataloader position.

A checkpoint is ``RUN/ppo/checkpoints/update-NNNNNN/`` with ``trainable.pt``, ``optimizer.pt``, ``scheduler.pt``,
``rng-<rank>.pt``, ``order-<rank>.pt`` (the RNG states the current pass's prompt order was drawn from) and
``state.json`` (update count, episodes, world size, batch size). It is written into ``update-NNNNNN.tmp``, every
file fsynced, then renamed, so a killed run never leaves a half checkpoint; the newest ``KEEP`` complete ones are
kept. ``latest`` finds the newest complete one; ``load`` puts it back into a trainer built for the same model and
LoRA config.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

from rlhf.runs import fsync_dir

KEEP = 2


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (half-written ``.tmp`` folders are ignored), or None."""
    if not root.exists():
        return None
    done = sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith("update-") and not p.name.endswith(".tmp") and (p / "state.json").exists()
    )
    return done[-1] if done else None


def rng_state() -> dict:
    import numpy as np
    import torch

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class PromptLoader:
    """Wraps the prompt dataloader for the whole run so that a resumed run draws the prompts the first would have.

    As each pass over the prompts begins it records the RNG states the pass's shuffled order is drawn from (torch's
    global generator, from which a single-process sampler seeds each pass, and the sampler's own generator, which
    accelerate gives it under several processes); a checkpoint saves them. On resume (``resume``) the next pass
    restores them, skips the batches the first run already used, then restores the RNG saved after the
    checkpoint's update, so sampling continues as it would have. At a pass boundary nothing is skipped: the new
    pass draws its order from the checkpoint's RNG, as the first run's next pass did."""

    def __init__(self, loader):
        self.loader = loader
        self.pass_start: dict | None = None
        self._pending: tuple[dict | None, int, dict | None] | None = None

    def resume(self, pass_start: dict | None, skip: int, rng: dict | None) -> None:
        self._pending = (pass_start, skip, rng)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):  # a generator: this body runs at the first batch, when the pass's order is drawn
        pass_start, skip, rng = self._pending or (None, 0, None)
        self._pending = None
        if skip and pass_start is not None:
            _set_order_state(self.loader, pass_start)
        elif rng is not None and not skip:  # (a checkpoint without order-<rank>.pt skips, as before, then restores)
            set_rng_state(rng)
        self.pass_start = _order_state(self.loader)
        it = iter(self.loader)
        for _ in range(skip):
            next(it)
        if rng is not None:
            set_rng_state(rng)
        yield from it


def _sampler_generator(loader):
    """The torch.Generator a (prepared) dataloader shuffles with, when it has its own."""
    import torch

    for holder in (
        loader,
        getattr(loader, "sampler", None),
        getattr(getattr(loader, "batch_sampler", None), "sampler", None),
    ):
        for name in ("synchronized_generator", "generator"):
            g = getattr(holder, name, None)
            if isinstance(g, torch.Generator):
                return g
    return None


def _order_state(loader) -> dict:
    import torch

    g = _sampler_generator(loader)
    return {"torch": torch.get_rng_state(), "sampler": g.get_state() if g is not None else None}


def _set_order_state(loader, state: dict) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    g = _sampler_generator(loader)
    if g is not None and state.get("sampler") is not None:
        g.set_state(state["sampler"])


def _trainable(model) -> dict:
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save(trainer, root: Path, update: int, total_updates: int) -> Path:
    """Every rank calls this; rank 0 writes the weights and the record, each rank its RNG state."""
    import torch

    acc = trainer.accelerator
    final, tmp = root / f"update-{update:06d}", root / f"update-{update:06d}.tmp"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng-{acc.process_index}.pt")
    if isinstance(trainer.dataloader, PromptLoader) and trainer.dataloader.pass_start is not None:
        torch.save(trainer.dataloader.pass_start, tmp / f"order-{acc.process_index}.pt")
    if acc.is_main_process:
        torch.save(_trainable(acc.unwrap_model(trainer.model)), tmp / "trainable.pt")
        torch.save(trainer.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(trainer.lr_scheduler.state_dict(), tmp / "scheduler.pt")
    acc.wait_for_everyone()
    if acc.is_main_process:
        batch = trainer.args.batch_size
        state = {
            "update": update,
            "episode": update * batch,
            "world_size": acc.num_processes,
            "batch_size": batch,
            "total_updates": total_updates,
            "time": time.time(),
        }
        (tmp / "state.json").write_text(json.dumps(state))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
        os.replace(tmp, final)
        fsync_dir(root)
        for old in sorted(p for p in root.glob("update-*") if not p.name.endswith(".tmp"))[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def load(trainer, path: Path, update_offset: int) -> None:
    """Weights, optimiser and scheduler into ``trainer``; its dataloader skips what the first run consumed."""
    import torch

    model = trainer.accelerator.unwrap_model(trainer.model)
    saved = torch.load(path / "trainable.pt", map_location="cpu", weights_only=False)
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in saved]
    if missing:
        raise RuntimeError(
            f"{path}: checkpoint lacks trainable parameters {missing[:3]}...; "
            "was it written with another model or LoRA config?"
        )
    with torch.no_grad():
        for n, v in saved.items():
            params[n].copy_(v.to(params[n].device))
    trainer.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
    trainer.lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=False))
    # the optimizer state carries the learning rate of the saved schedule; when the run's length changed on
    # resume, take the rate the current schedule gives at this step instead
    current = trainer.lr_scheduler.get_lr()
    for group, lr in zip(trainer.optimizer.param_groups, current):
        group["lr"] = lr
    trainer.lr_scheduler._last_lr = list(current)
    rank = trainer.accelerator.process_index
    rng_file, order_file = path / f"rng-{rank}.pt", path / f"order-{rank}.pt"
    rng = torch.load(rng_file, map_location="cpu", weights_only=False) if rng_file.exists() else None
    order = torch.load(order_file, map_location="cpu", weights_only=False) if order_file.exists() else None
    if not isinstance(trainer.dataloader, PromptLoader):
        trainer.dataloader = PromptLoader(trainer.dataloader)
    trainer.dataloader.resume(order, update_offset % max(len(trainer.dataloader), 1), rng)
