"""The RL stage: PPO (rlhf/ppo.py) or a critic-free algorithm, TRL 1.12's GRPO or RLOO, against the same reward.

    rlhf rl --algo grpo --run runs/demo --config recipes/demo.yaml       # one CPU
    rlhf rl --algo rloo --run runs/demo --resume                          # continue after an interruption
    rlhf rl --run runs/demo --init-adapter runs/demo/rounds/round-001/ppo/adapter   # continue from a saved policy
    rlhf ppo --run runs/demo                                              # the same as rlhf rl --algo ppo
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m rlhf rl --algo grpo --run runs/demo

``ppo.algorithm`` (``--algo``) picks the algorithm. Each writes the same artifacts into RUN_DIR/ppo/, so eval, export,
labeling and recommend read any of them as the stage "ppo": adapter/ (PEFT), metrics.jsonl (one line per update:
every reward term, true utility, KL, seconds per phase), rollouts.jsonl, samples.jsonl, summary.json (which names
the algorithm).

GRPO and RLOO have no value model: for each user prompt they sample ``ppo.num_generations`` listings and compare them
with each other, so every user gets their own baseline (GRPO: the group's mean, advantages divided by its standard
deviation; RLOO: the mean of the other listings). Policy: RUN_DIR/sft/merged + a new LoRA adapter (or, with
``--init-adapter``, one holding a saved adapter's weights: `rlhf rounds` passes the previous round's), sampled through a
merged copy (rlhf/rollout.py: SampledPolicy); reference: the same model with the adapter disabled, at KL coefficient
``ppo.kl_coef`` (GRPO: k3 per token, in the loss; RLOO: k1 summed over the listing, in the reward); reward: the
composite (reward_models/trl_funcs.py). An update is one batch of ``ppo.batch_size`` listings per process
(``batch_size / num_generations`` users), then ``ppo_epochs`` x ``mini_batches`` optimiser steps on it
(rlhf/rl_trainer.py). Resume goes through the Trainer's checkpoints, RUN_DIR/ppo/trainer/checkpoint-N every
``ppo.checkpoint_every`` updates (weights, optimiser, scheduler, RNG, step count).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from rlhf.config import Config, ConfigError, save_resolved
from rlhf.runs import RunDir


def run_rl(cfg: Config, run_dir: Path, resume: bool = False, init_adapter: str | None = None) -> dict:
    """The RL stage with ``cfg.ppo.algorithm``; ``init_adapter``: a saved adapter the policy's starts from."""
    if cfg.ppo.algorithm == "ppo":
        from rlhf.ppo import run_ppo

        return run_ppo(cfg, run_dir, resume, init_adapter)
    return run_group(cfg, run_dir, resume, init_adapter)


def run_group(cfg: Config, run_dir: Path, resume: bool = False, init_adapter: str | None = None) -> dict:
    from accelerate import PartialState

    from rlhf.models import check_init_adapter, load_tokenizer
    from rlhf.ppo import prepare_output
    from rlhf.precision import resolve
    from rlhf.tracking import Tracker, TrackerCallback

    run, ppo_cfg, algo = RunDir(run_dir), cfg.ppo, cfg.ppo.algorithm
    if not cfg.model.use_lora:
        raise ConfigError(
            f"ppo.algorithm={algo} trains a LoRA adapter (eval and export read ppo/adapter): set model.use_lora=true"
        )
    sft_path = run.need(run.sft.merged)
    if ppo_cfg.reward_weights["learned"]:
        run.need(run.reward.model)
    dtype, out = resolve(cfg.model, algo), run.ppo
    init_adapter = init_adapter and check_init_adapter(init_adapter, cfg.model)
    state = PartialState(cpu=not torch.cuda.is_available())
    resume_from, done = _resume_point(out, resume, algo)
    if state.is_main_process:
        prepare_output(out, resume_from, done)
        _drop_unfinished(out.trainer)
        save_resolved(cfg, run, ["ppo", "track"])
    state.wait_for_everyone()
    if done >= ppo_cfg.total_updates and out.adapter.exists():
        print(f"{algo}: {done} of {ppo_cfg.total_updates} updates already done")
        return {"updates": done}
    torch.manual_seed(cfg.run.seed)

    tokenizer = load_tokenizer(str(sft_path))
    rows = run.rows(run.data.prompts("train"))
    rows = rows[: ppo_cfg.max_prompts] if ppo_cfg.max_prompts else rows
    users_per_update = ppo_cfg.batch_size // ppo_cfg.num_generations
    if len(rows) < users_per_update:
        raise ConfigError(
            f"{len(rows)} RL prompts: fewer than the {users_per_update} users an update samples "
            "(ppo.batch_size / ppo.num_generations)"
        )
    trainer, start = _trainer(cfg, run, sft_path, tokenizer, rows, dtype, init_adapter)
    tracker = Tracker(cfg, run, "ppo", resume=resume_from is not None, main_process=state.is_main_process)
    trainer.add_callback(TrackerCallback(tracker))
    if resume_from:
        print(f"{algo}: resuming from {resume_from.name} ({done} of {ppo_cfg.total_updates} updates done)")
    t0 = time.time()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.time() - t0
    trainer.accelerator.wait_for_everyone()
    if not trainer.accelerator.is_main_process:
        return {}
    summary = {**_save(trainer, tokenizer, run, cfg, dtype), **start}
    summary.update(resumed_at=done or None, seconds=round(seconds, 1))
    out.summary.write_text(json.dumps(summary, indent=2))
    tracker.finish(summary)
    print(
        f"{algo}: {summary['updates'] - done} updates in {seconds:.0f}s (now {summary['updates']}); wrote {out.adapter}"
    )
    return summary


def _trainer(cfg: Config, run: RunDir, sft_path: Path, tokenizer, rows: list[dict], dtype: str, init_adapter=None):
    """RecGRPOTrainer or RecRLOOTrainer on the prompts ``rows``, scoring through the run's composite reward; and the
    record of the reference and the adapter the policy began from."""
    from datasets import Dataset

    from reward_models.composite import for_run
    from reward_models.terms import PromptContext
    from reward_models.trl_funcs import CompositeRewardFunc
    from rlhf.data.simulator import listing_truth
    from rlhf.rl_trainer import RecGRPOTrainer, RecRLOOTrainer
    from rlhf.rollout import SampledPolicy, build_policy

    p = cfg.ppo
    reward = CompositeRewardFunc(
        for_run(run, p.reward_weights, dtype, cfg.reward),
        [PromptContext.from_row(r) for r in rows],
        tokenizer.eos_token_id,
        p.missing_eos_penalty,
        truth=listing_truth(run.catalog(), run.meta()),
    )
    steps_per_update = p.mini_batches * p.ppo_epochs
    policy, start = build_policy(SampledPolicy, sft_path, cfg.model, tokenizer.pad_token_id, init_adapter)
    if p.constrained:  # as PPO's: sampling and every policy forward restricted to each prompt's allowed titles
        from reward_models.encoding import prompt_ids
        from rlhf.constrained import PromptConstraints

        allowed = policy.constraints = PromptConstraints(tokenizer, run.catalog(), p.title_explore)
        k = run.meta()["k"]
        for r in rows:
            allowed.register(prompt_ids(tokenizer, r["prompt"]), r.get("candidate_ids") or [], r["history_ids"], k)
    trainer = (RecGRPOTrainer if p.algorithm == "grpo" else RecRLOOTrainer)(
        model=policy,
        reward_funcs=[reward],
        args=_trainer_args(cfg, run.ppo, steps_per_update),
        train_dataset=Dataset.from_list([{"prompt": r["prompt"], "row": i} for i, r in enumerate(rows)]),
        processing_class=tokenizer,
        peft_config=None,  # the LoRA policy is built above (SampledPolicy)
        stage_cfg=p,
        out=run.ppo,
        reward=reward,
        steps_per_update=steps_per_update,
        merged_rollouts=p.merged_rollouts,
    )
    return trainer, start


def _save(trainer, tokenizer, run: RunDir, cfg: Config, dtype: str) -> dict:
    """The trained adapter (what eval, export and labeling read as the stage "ppo"), greedy samples; the summary."""
    from rlhf.ppo import write_samples

    policy = trainer.accelerator.unwrap_model(trainer.model)
    policy.save_pretrained(run.ppo.adapter)
    tokenizer.save_pretrained(run.ppo.adapter)
    write_samples(policy, tokenizer, run, trainer.reward.composite, cfg.ppo)
    return {
        "algorithm": cfg.ppo.algorithm,
        "updates": trainer.state.global_step // trainer.steps_per_update,
        "total_updates": cfg.ppo.total_updates,
        "stopped_by_time": trainer.stopped_by_time,
        "processes": trainer.accelerator.num_processes,
        "num_generations": cfg.ppo.num_generations,
        "dtype": dtype,
        "merged_rollouts": trainer.merged_rollouts,
        "reward_weights": cfg.ppo.reward_weights,
    }


def _resume_point(out, resume: bool, algo: str) -> tuple[Path | None, int]:
    """(newest complete Trainer checkpoint, the updates it holds), or (None, 0) for a fresh run."""
    from rlhf.rl_trainer import latest_complete

    found = latest_complete(out.trainer) if resume else None
    if found is None:
        if resume:
            print(f"{algo}: --resume found no complete checkpoint under {out.trainer}; starting from update 0")
        return None, 0
    path, record = found
    if record["algorithm"] != algo:
        raise ConfigError(
            f"{path} was written by ppo.algorithm={record['algorithm']}: resume with --algo {record['algorithm']}, "
            f"or run {algo} without --resume (which starts afresh)"
        )
    return path, record["update"]


def _drop_unfinished(root: Path) -> None:
    """Checkpoints a killed run left without their COMPLETE marker: the resumed run writes them again."""
    from rlhf.rl_trainer import COMPLETE

    for path in root.glob("checkpoint-*") if root.exists() else []:
        if not (path / COMPLETE).exists():
            shutil.rmtree(path, ignore_errors=True)


def _trainer_args(cfg: Config, out, steps_per_update: int):
    """TRL's GRPOConfig or RLOOConfig from the ppo section. TRL's generation batch is ``steps_per_generation`` x
    the per-device batch: one mini-batch per Trainer step, no accumulation, ``num_iterations`` passes."""
    from trl import GRPOConfig, RLOOConfig

    from rlhf.precision import trainer_precision

    p = cfg.ppo
    args = {
        "output_dir": str(out.trainer),
        "learning_rate": p.learning_rate,
        "lr_scheduler_type": p.lr_scheduler,
        "per_device_train_batch_size": p.batch_size // p.mini_batches,
        "gradient_accumulation_steps": 1,
        "steps_per_generation": p.mini_batches,
        "num_iterations": p.ppo_epochs,
        "num_generations": p.num_generations,
        "max_completion_length": p.response_length,
        "temperature": p.temperature,
        "beta": p.kl_coef,
        "epsilon": p.cliprange,
        "max_steps": p.total_updates * steps_per_update,
        "logging_steps": steps_per_update,
        "save_strategy": "steps",
        "save_steps": p.checkpoint_every * steps_per_update,
        "save_total_limit": 2,
        "disable_dropout": True,  # old, reference and training log-probabilities from the same deterministic forward
        "remove_unused_columns": False,
        "report_to": [],  # the trackers are ours (rlhf/tracking.py: TrackerCallback), as in PPO
        "seed": cfg.run.seed,
        "gradient_checkpointing": False,
        "dataloader_num_workers": 0,
        **trainer_precision(cfg.model),
    }
    return (GRPOConfig if p.algorithm == "grpo" else RLOOConfig)(**args)
