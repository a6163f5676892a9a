"""PPO stage: TRL 1.12's PPOTrainer with a LoRA policy on the SFT-merged model, against the composite reward.

    rlhf ppo --run runs/demo --config recipes/demo.yaml            # one CPU
    rlhf ppo --run runs/demo --resume                              # continue after an interruption
    rlhf ppo --run runs/demo --init-adapter runs/demo/rounds/round-001/ppo/adapter   # continue from a saved policy
    accelerate launch --config_file accelerate_configs/multi_cpu.yaml -m rlhf ppo --run runs/demo
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m rlhf ppo --run runs/demo

Policy: RUN_DIR/sft/merged + a new LoRA adapter, or one holding a saved adapter's weights (``--init-adapter``: what
`rlhf rounds` passes, the previous round's) (rlhf/rollout.py: how its rollouts are sampled and scored);
reference: the same model with the adapter disabled (no second copy); value model: the reward model with its own
LoRA adapter and trainable head; reward: the composite of registered terms (reward_models/composite.py). The
trainer and its TRL fixes are in rlhf/ppo_trainer.py, the resume record in rlhf/checkpoint.py.

Writes RUN_DIR/ppo/adapter (PEFT), metrics.jsonl (one line per update), rollouts.jsonl (sampled completions with
their reward terms), samples.jsonl, summary.json and checkpoints/update-NNNNNN/ every ``ppo.checkpoint_every``
updates; with ``track.report_to``, every update's metrics and the summary to the trackers (rlhf/tracking.py).
``--resume`` continues from the newest complete checkpoint.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from rlhf import checkpoint
from rlhf.config import Config, save_resolved
from rlhf.runs import RunDir


def run_ppo(cfg: Config, run_dir: Path, resume: bool = False, init_adapter: str | None = None) -> dict:
    from accelerate import PartialState
    from datasets import Dataset
    from transformers import set_seed

    from reward_models.encoding import prompt_ids
    from rlhf.models import check_init_adapter, load_tokenizer
    from rlhf.ppo_trainer import BudgetSpent, RecPPOTrainer
    from rlhf.precision import resolve
    from rlhf.rollout import PPOPolicy, build_policy
    from rlhf.tracking import Tracker, TrackerCallback

    run = RunDir(run_dir)
    sft_path, rm_path = run.need(run.sft.merged), run.need(run.reward.model)
    ppo_cfg, model_cfg = cfg.ppo, cfg.model
    dtype = resolve(model_cfg, "ppo")
    init_adapter = init_adapter and check_init_adapter(init_adapter, model_cfg)
    state = PartialState(cpu=not torch.cuda.is_available())
    resume_from = checkpoint.latest(run.ppo.checkpoints) if resume else None
    if resume and resume_from is None:
        print(f"ppo: --resume found no complete checkpoint under {run.ppo.checkpoints}; starting from update 0")
    done = json.loads((resume_from / "state.json").read_text())["update"] if resume_from else 0
    if state.is_main_process:
        prepare_output(run.ppo, resume_from, done)
        save_resolved(cfg, run, ["ppo", "track"])
    state.wait_for_everyone()
    if done >= ppo_cfg.total_updates:
        print(f"ppo: {done} of {ppo_cfg.total_updates} updates already done")
        return {"updates": done}
    # python, numpy and torch: TRL's PPO seeds torch only, and draws each update's mini-batch order from numpy
    # (unseeded, two runs of one seed trained differently)
    set_seed(cfg.run.seed)

    tokenizer = load_tokenizer(str(sft_path))
    rows = run.rows(run.data.prompts("train"))
    rows = rows[: ppo_cfg.max_prompts] if ppo_cfg.max_prompts else rows
    if len(rows) < ppo_cfg.batch_size:
        from rlhf.config import ConfigError

        raise ConfigError(f"{len(rows)} PPO prompts is fewer than ppo.batch_size={ppo_cfg.batch_size}; lower it")
    ids = [prompt_ids(tokenizer, r["prompt"]) for r in rows]
    policy, start = build_policy(PPOPolicy, sft_path, model_cfg, tokenizer.pad_token_id, init_adapter)
    reward, constraints = _reward_and_constraints(run, cfg, tokenizer, rows, ids, policy.config, dtype)
    trainer = RecPPOTrainer(
        args=_trl_config(cfg, run, done, state.num_processes),
        processing_class=tokenizer,
        model=policy,
        ref_model=None,
        reward_model=reward,
        value_model=_value_model(rm_path, cfg, tokenizer.pad_token_id),
        train_dataset=Dataset.from_list([{"input_ids": i} for i in ids]),
        peft_config=None,  # the LoRA policy is built above (PPOPolicy); without LoRA TRL copies a reference
        stage_cfg=ppo_cfg,
        out=run.ppo,
        reward=reward,
        total_updates=ppo_cfg.total_updates,
        update_offset=done,
        resume_from=resume_from,
        merged_rollouts=ppo_cfg.merged_rollouts,
        constraints=constraints,
    )
    tracker = Tracker(cfg, run, "ppo", resume=resume_from is not None, main_process=state.is_main_process)
    trainer.add_callback(TrackerCallback(tracker))  # every update's metrics, as ppo/metrics.jsonl has them
    if resume_from:
        print(f"ppo: resuming from {resume_from.name} ({done} of {ppo_cfg.total_updates} updates done)")
    t0, stopped = time.time(), False
    try:
        trainer.train()
    except BudgetSpent:
        stopped = True
    summary = _finish(trainer, run, cfg, tokenizer, reward.composite, done, time.time() - t0, dtype, stopped, start)
    if summary:
        tracker.finish(summary)
    return summary


def _reward_and_constraints(run: RunDir, cfg: Config, tokenizer, rows, ids, policy_config, dtype: str):
    """The composite behind TRL's reward interface, and (with ppo.constrained) each prompt's allowed titles."""
    from reward_models.composite import for_run
    from reward_models.trl_ppo import TRLRewardAdapter
    from rlhf.data.simulator import listing_truth

    composite = for_run(run, cfg.ppo.reward_weights, dtype, cfg.reward)
    reward = TRLRewardAdapter(composite, tokenizer, policy_config, truth=listing_truth(run.catalog(), run.meta()))
    constraints = None
    if cfg.ppo.constrained:
        from rlhf.constrained import PromptConstraints

        constraints = PromptConstraints(tokenizer, composite.env.catalog, cfg.ppo.title_explore)
    k = run.meta()["k"]
    for r, prompt in zip(rows, ids):
        reward.register(prompt, r["prompt"], _context(r))
        if constraints is not None:
            constraints.register(prompt, r.get("candidate_ids") or [], r["history_ids"], k)
    return reward, constraints


def _trl_config(cfg: Config, run: RunDir, done: int, processes: int):
    """TRL's PPOConfig for the remaining updates. The rollout batch per process is per_device_train_batch_size x
    gradient_accumulation_steps, split into num_mini_batches: one micro-batch per mini-batch. Trackers are ours
    (rlhf/tracking.py), so TRL reports to none."""
    from trl.experimental.ppo import PPOConfig

    from rlhf.precision import trainer_precision

    p = cfg.ppo
    return PPOConfig(
        output_dir=str(run.ppo.trainer),
        learning_rate=p.learning_rate,
        per_device_train_batch_size=p.batch_size // p.mini_batches,
        gradient_accumulation_steps=p.mini_batches,
        num_mini_batches=p.mini_batches,
        num_ppo_epochs=p.ppo_epochs,
        total_episodes=(p.total_updates - done) * p.batch_size * processes,
        local_rollout_forward_batch_size=p.batch_size,
        response_length=p.response_length,
        temperature=p.temperature,
        kl_coef=p.kl_coef,
        kl_estimator=p.kl_estimator,
        missing_eos_penalty=p.missing_eos_penalty,
        cliprange=p.cliprange,
        cliprange_value=p.cliprange_value,
        vf_coef=p.vf_coef,
        whiten_rewards=p.whiten_rewards,
        gamma=p.gamma,
        lam=p.lam,
        stop_token="eos",
        num_sample_generations=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=cfg.run.seed + done,
        lr_scheduler_type=p.lr_scheduler,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        **trainer_precision(cfg.model),
    )


def _finish(
    trainer,
    run: RunDir,
    cfg: Config,
    tokenizer,
    composite,
    done: int,
    seconds: float,
    dtype: str,
    stopped: bool,
    start: dict,
) -> dict:
    """Adapter, samples and ppo/summary.json (written last: the stage's done marker), by the main process only
    (TRL 1.12 fails saving on another rank)."""
    trainer.accelerator.wait_for_everyone()
    if not trainer.accelerator.is_main_process:
        return {}
    policy = trainer.policy_module
    policy.save_pretrained(run.ppo.adapter)
    tokenizer.save_pretrained(run.ppo.adapter)
    write_samples(policy, tokenizer, run, composite, cfg.ppo)
    updates = done + trainer.state.global_step
    summary = {
        "algorithm": "ppo",
        "updates": updates,
        "total_updates": cfg.ppo.total_updates,
        "stopped_by_time": stopped,
        "resumed_at": done or None,
        "seconds": round(seconds, 1),
        "processes": trainer.accelerator.num_processes,
        "dtype": dtype,
        "merged_rollouts": trainer.merged_rollouts,
        "constrained": cfg.ppo.constrained,
        "reward_weights": cfg.ppo.reward_weights,
        **start,
    }
    run.ppo.summary.write_text(json.dumps(summary, indent=2))
    print(f"ppo: {updates - done} updates in {seconds:.0f}s (now {updates}); wrote {run.ppo.adapter}")
    return summary


def _context(row: dict):
    from reward_models.terms import PromptContext

    return PromptContext.from_row(row)


def prepare_output(out, resume_from: Path | None, done: int) -> None:
    """A fresh run replaces an earlier run's metrics and checkpoints; a resumed one drops the lines logged after
    its checkpoint (they belong to lost work)."""
    if not resume_from and out.dir.exists():
        shutil.rmtree(out.dir)
    out.dir.mkdir(parents=True, exist_ok=True)
    if resume_from:
        for path in (out.metrics, out.rollouts):
            if path.exists():
                lines = [x for x in path.read_text().splitlines() if x.strip()]
                path.write_text("".join(x + "\n" for x in lines if json.loads(x).get("update", 0) <= done))


def _value_model(rm_path: Path, cfg: Config, pad_id: int):
    """The reward model's first ``ppo.value_layers`` layers and head, with a LoRA adapter; trained parts in fp32."""
    from peft import get_peft_model

    from rlhf.models import load_reward_model, lora_config, truncate_layers
    from rlhf.precision import base_dtype, trainable_in_fp32

    model_cfg = cfg.model
    model = truncate_layers(load_reward_model(rm_path, base_dtype(model_cfg)), cfg.ppo.value_layers)
    model.config.pad_token_id = pad_id
    if model_cfg.use_lora:
        model = get_peft_model(model, lora_config(model_cfg, task_type="SEQ_CLS"))
        # TRL reads base_model_prefix, score and the backbone on the value model itself
        base = model.get_base_model()
        model.base_model_prefix = base.base_model_prefix
        model.score = base.score
        setattr(model, base.base_model_prefix, getattr(base, base.base_model_prefix))
    trainable_in_fp32(model)
    # TRL scores rollouts outside autocast, where the bf16 backbone's output would meet the fp32 head
    for head in model.score.modules():
        if isinstance(head, torch.nn.Linear):
            head.register_forward_pre_hook(_input_in_weight_dtype)
    return model


def _input_in_weight_dtype(module, args):
    return (args[0].to(module.weight.dtype), *args[1:])


def write_samples(policy, tokenizer, run: RunDir, composite, ppo_cfg) -> None:
    """Greedy completions for a few validation users with their reward terms: read them. Decoded as eval decodes
    (stopping after K item lines) from the rollouts' merged copy of the policy where there is one (an unmerged
    adapter generates at about half the speed on CPU)."""
    from rlhf.generation import generate

    rows = run.rows(run.data.prompts("val"))[:6]
    if not rows:
        return
    model = policy
    if getattr(policy, "merged_copy", None) is not None:
        policy.merged_copy.refresh()
        model = policy.merged_copy.model
    prompts = [r["prompt"] for r in rows]
    texts = generate(model, tokenizer, prompts, max_new_tokens=ppo_cfg.response_length, k=run.meta()["k"])
    scored = composite.score(prompts, texts, [_context(r) for r in rows])
    with open(run.ppo.samples, "w") as f:
        for r, t, s in zip(rows, texts, scored.rows()):
            f.write(json.dumps({"user_id": r["user_id"], "text": t, **s}) + "\n")
