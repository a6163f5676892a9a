"""What the SFT and reward-model trainer configs of this project share (TRL's SFTConfig and RewardConfig take it
as keyword arguments): the step budget, a cosine schedule with 10% warm-up, logging, seeds, precision
(rlhf/precision.py), no checkpoints of the trainer's own (each stage saves its artifacts itself)."""

from __future__ import annotations

from pathlib import Path


def shared_args(stage_cfg, model_cfg, output_dir: Path, seed: int) -> dict:
    """``stage_cfg`` is a TrainCommon section (sft or reward)."""
    from rlhf.precision import trainer_precision

    return {
        "output_dir": str(output_dir),
        "max_steps": stage_cfg.max_steps,
        "num_train_epochs": stage_cfg.epochs,
        "per_device_train_batch_size": stage_cfg.batch_size,
        "gradient_accumulation_steps": stage_cfg.grad_accum,
        "learning_rate": stage_cfg.learning_rate,
        "lr_scheduler_type": "cosine",
        "warmup_steps": max(1, stage_cfg.max_steps // 10),
        "logging_steps": stage_cfg.logging_steps,
        "logging_first_step": True,
        "max_length": stage_cfg.max_length,
        "save_strategy": "no",
        "report_to": "none",
        "seed": seed,
        "data_seed": seed,
        "dataloader_num_workers": 0,
        "gradient_checkpointing": stage_cfg.gradient_checkpointing,
        **trainer_precision(model_cfg),
    }
